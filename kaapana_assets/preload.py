"""Importing ahead of need: a process that will need a heavy stack (torch, nnU-Net) imports
it while it would otherwise wait, so that the import is off the critical path."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterable


def preload(modules: Iterable[str]) -> list[str]:
    """Import the modules; `module:function` also calls that function with no arguments (a
    first-use cost such as a table loaded once and cached). Returns those that failed
    (whoever needs one fails with the real error when it uses it itself)."""
    failed = []
    for name in modules:
        module, _, function = name.partition(":")
        try:
            loaded = importlib.import_module(module)
            if function:
                getattr(loaded, function)()
        except Exception:  # noqa: BLE001 - reported, not fatal: the user imports it again
            failed.append(name)
    return failed


def warm_in_background(modules: Iterable[str]) -> threading.Thread | None:
    """preload() in a daemon thread. Safe beside later imports of the same modules (Python's
    per-module import locks make them wait for it); not before a fork() of this process."""
    names = list(modules)
    if not names:
        return None
    thread = threading.Thread(target=preload, args=(names,), name="kaapana-preload", daemon=True)
    thread.start()
    return thread
