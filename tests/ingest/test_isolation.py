"""Compressed pixels of untrusted files are decoded in a child process: a codec that aborts
(GDCM did, in the fuzz campaign) or hangs costs one call, not the ingest."""

from __future__ import annotations

import os
import time

import pytest

from kaapana_assets.ingest.isolation import IsolatedFailure, run_isolated


def _abort() -> None:
    os.abort()  # what GDCM's C++ abort does to the process


def _sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


def _pid() -> int:
    return os.getpid()


def test_a_crashing_decoder_is_a_failure_and_the_next_call_works() -> None:
    with pytest.raises(IsolatedFailure, match="died"):
        run_isolated(_abort)
    assert run_isolated(_pid) != os.getpid()


def test_a_hanging_decoder_is_killed() -> None:
    first = run_isolated(_pid)
    with pytest.raises(IsolatedFailure, match="hung"):
        run_isolated(_sleep, 60, timeout_s=1)
    assert run_isolated(_pid) != first  # a fresh worker
    assert run_isolated(_sleep, 0) == "done"
