"""The association limits shared by the receiver's worker processes (`network/limits.py`):
counted over all workers, by peer address, and forgotten with a dead worker."""

from __future__ import annotations

import multiprocessing

from kaapana_assets.network.limits import AssociationLimits, Limit, Refused


def _hold_two_then_die(limits: AssociationLimits) -> None:
    worker = limits.for_worker(1)
    assert worker.acquire("10.0.0.1") is None and worker.acquire("::ffff:10.0.0.1") is None  # one address


def test_limits_count_over_worker_processes_and_forget_a_dead_one() -> None:
    limits = AssociationLimits(max_per_caller=3, max_associations=4, workers=2)
    child = multiprocessing.get_context("fork").Process(target=_hold_two_then_die, args=(limits,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert limits.running("10.0.0.1") == 2 and limits.running() == 2  # the child's counts, seen here
    assert limits.acquire("10.0.0.1") is None  # worker 0: the third from that address
    assert limits.acquire("10.0.0.1") == Refused(Limit.PER_CALLER, 3, 3)
    assert limits.acquire("2001:db8::1") is None  # another address: the fourth in all
    assert limits.acquire("10.0.0.2") == Refused(Limit.TOTAL, 4, 4)
    limits.forget(1)  # worker 1 died: its two associations ended with it
    assert limits.running("10.0.0.1") == 1 and limits.running() == 2
    limits.release("10.0.0.1")
    limits.release("10.0.0.1")  # never below zero
    assert limits.running("10.0.0.1") == 0
    assert limits.acquire("10.0.0.2") is None and limits.acquire("10.0.0.3") is None  # columns reused


def _accept_idle(limits: AssociationLimits) -> None:
    limits.for_worker(1).accepting()


def test_a_worker_accepts_only_while_no_accepting_worker_is_less_busy() -> None:
    limits = AssociationLimits(max_per_caller=16, max_associations=8, workers=2)
    assert limits.my_turn()  # nobody accepts yet
    limits.accepting()
    assert limits.acquire("10.0.0.1") is None
    assert limits.my_turn()  # the only one accepting
    child = multiprocessing.get_context("fork").Process(target=_accept_idle, args=(limits,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert not limits.my_turn()  # worker 1 accepts with no association: the next connection is its
    limits.forget(1)  # it died: this one accepts again
    assert limits.my_turn()
