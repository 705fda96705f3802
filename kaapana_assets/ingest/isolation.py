"""Decoding compressed pixels of untrusted files in a child process.

Native codecs can take the whole process down on hostile bytes: the 20,000-input fuzz
campaign aborted the ingest process inside GDCM (C++ abort, uncatchable), and panicked
pylibjpeg-rle (a Rust panic). Whatever decodes encapsulated pixels of a file nobody has
vetted yet (the same-instance check, the study preview) runs here: one spawned worker,
reused, replaced when it dies or hangs. A crash or a timeout is an ordinary, reported
failure of that one call. Uncompressed pixels are plain numpy and stay in-process."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

T = TypeVar("T")
DECODE_TIMEOUT_S = 120.0

_POOL: ProcessPoolExecutor | None = None


class IsolatedFailure(RuntimeError):
    """The isolated call crashed its process, hung past its timeout, or raised."""


def _pool() -> ProcessPoolExecutor:
    global _POOL
    if _POOL is None:
        # spawn: the caller may be a threaded Dagster or deltalake process.
        _POOL = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    return _POOL


def _discard() -> None:
    """Drop the worker (killing it if it hangs): the next call starts a fresh one."""
    global _POOL
    pool, _POOL = _POOL, None
    if pool is None:
        return
    for process in list(getattr(pool, "_processes", {}).values()):  # no public handle on the worker
        if process.is_alive() and process.pid:
            try:
                os.kill(process.pid, signal.SIGKILL)
            except ProcessLookupError:  # it died between the check and the kill
                pass
    pool.shutdown(wait=False, cancel_futures=True)


def run_isolated(fn: Callable[..., T], *args: Any, timeout_s: float = DECODE_TIMEOUT_S) -> T:
    """`fn(*args)` in the decoding worker; IsolatedFailure if it crashes, hangs or raises."""
    try:
        return _pool().submit(fn, *args).result(timeout=timeout_s)
    except (BrokenProcessPool, FutureTimeout) as exc:
        _discard()
        raise IsolatedFailure(f"the decoder process {'hung' if isinstance(exc, FutureTimeout) else 'died'} "
                              f"({type(exc).__name__})") from None
    except Exception as exc:
        raise IsolatedFailure(f"{type(exc).__name__}: {exc}"[:500]) from None
