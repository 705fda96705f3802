"""preload: what a run imports (and first loads) while it waits, and what fails does not stop it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kaapana_assets.preload import preload, warm_in_background


def test_preload_imports_calls_and_reports_failures() -> None:
    calls: list[str] = []
    module = type(sys)("kaapana_test_preload_module")
    module.warm = lambda: calls.append("warm")  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        failed = preload(["json", f"{module.__name__}:warm", "json:no_such_function", "no_such_module_kaapana"])
    finally:
        del sys.modules[module.__name__]
    assert failed == ["json:no_such_function", "no_such_module_kaapana"] and calls == ["warm"]
    assert warm_in_background([]) is None
    thread = warm_in_background(["json"])
    assert thread is not None and thread.daemon
    thread.join(timeout=30)
    assert not thread.is_alive()


# slow: a fresh interpreter loading nnU-Net's predictor (≈7 s)
@pytest.mark.slow
def test_the_prediction_warmup_loads_in_a_fresh_interpreter() -> None:
    """Every name the incoming sensor asks an early run to warm exists in the installed
    versions (a renamed module would silently cost the run its head start)."""
    code = ("from kaapana_assets.preload import preload\n"
            "from kaapana_assets.segmentation.models import PREDICTION_IMPORTS\n"
            "import highdicom._standard_utils as s\n"
            "print(preload(PREDICTION_IMPORTS), s.get_module_attribute_map.cache_info().currsize)")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["[]", "1"]
