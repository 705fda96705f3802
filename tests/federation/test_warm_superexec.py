"""kaapana-superexec: Flower's SuperExec whose ClientApps are forked from a process that
has the site's stack imported. Here: what a forked ClientApp gets and leaves behind. The
federation tests (test_federated.py, test_network_statistics.py) run every site through it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec

from kaapana_assets.federation.superlink import superexec_command, supernode_command
from kaapana_assets.federation.warm_superexec import clientapp_arguments, site_stack

# Runs in a fresh interpreter, as kaapana-superexec does: the parent imports torch and
# numpy and never computes with them; Flower's exit handlers and signal handlers are set
# as Flower's loop sets them. The ClientApp entry point is replaced by one that reports
# what the child got, and the executor forks it twice.
CHILD_REPORT = textwrap.dedent('''
    import importlib, json, os, signal, sys, time
    import numpy as np, torch
    from flwr.supercore.exit import add_exit_handler, exit_handler
    entry = importlib.import_module("flwr.supernode.cli.flwr_clientapp")  # the package re-exports the function
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec
    from kaapana_assets.federation.warm_superexec import ForkingClientAppExecutor

    out = sys.argv[1]
    add_exit_handler(lambda: open(out + ".parent-handler-ran", "w").close())
    signal.signal(signal.SIGTERM, lambda *_: open(out + ".parent-signal-handler-ran", "w").close())
    parent_state = np.random.get_state()[1][:4].tolist()

    def report():
        torch.set_num_threads(2)
        product = torch.ones(256, 256) @ torch.ones(256, 256)  # OpenMP in the child: must not hang
        with open(out + f".{os.getpid()}", "w") as f:
            json.dump({"argv": sys.argv, "comm": open("/proc/self/comm").read().strip(),
                       "handlers": len(exit_handler.registered_exit_handlers),
                       "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
                       "numpy": np.random.get_state()[1][:4].tolist(), "parent_numpy": parent_state,
                       "product": float(product[0, 0])}, f)
        sys.exit(3)  # flwr_exit ends with sys.exit: the child leaves with that code

    entry.flwr_clientapp = report
    executor = ForkingClientAppExecutor()
    for task_id in (1, 2):
        spec = ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9",
                             token=f"token-{task_id}", insecure=True, root_certificates_path=None,
                             runtime_dependency_install=False, parent_pid=os.getpid(), suppress_output=False,
                             task_id=task_id)
        assert executor.launch(spec).status == "accepted"
    deadline = time.monotonic() + 60
    codes = {}
    while len(codes) < 2 and time.monotonic() < deadline:
        for pid in list(executor.children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
                executor.children.discard(pid)
        time.sleep(0.05)
    executor.reconcile()
    print(json.dumps({"codes": list(codes.values()), "left": len(executor.children)}))
''')


def test_a_forked_clientapp_is_a_clean_process_of_its_own(tmp_path: Path) -> None:
    out = tmp_path / "child"
    result = subprocess.run([sys.executable, "-c", CHILD_REPORT, str(out)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {"codes": [3, 3], "left": 0}  # each child ends with the entry point's code, and is reaped
    reports = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("child.*")) if p.suffix[1:].isdigit()]
    assert len(reports) == 2
    tokens = set()
    for report in reports:
        argv = report["argv"]
        assert argv[:3] == ["flwr-clientapp", "--runtime-api-address", "127.0.0.1:9"]
        tokens.add(argv[argv.index("--token") + 1])
        assert "--insecure" in argv and "--parent-pid" in argv
        assert report["comm"] == "flwr-clientapp"
        assert report["handlers"] == 0 and report["sigterm_default"]  # the parent's are not the child's
        assert report["product"] == 256.0
        assert report["numpy"] != report["parent_numpy"]  # reseeded, as a fresh interpreter would be
    assert tokens == {"token-1", "token-2"}
    assert reports[0]["numpy"] != reports[1]["numpy"]
    # The parent's Flower exit handler and signal handler never ran in a child.
    assert not list(tmp_path.glob("child.parent-*"))


def test_the_arguments_are_flowers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same command line Flower's SubprocessExecutor builds for a ClientApp, for every
    combination of TLS, parent and dependency installation."""
    from flwr.supercore.superexec.executor import SubprocessExecutor, subprocess_executor

    started: list[list[str]] = []
    monkeypatch.setattr(subprocess_executor.subprocess, "Popen", lambda args, **_: started.append(list(args)))
    for insecure, certificates, parent, install in [(True, None, 7, False), (False, "/ca.pem", None, True),
                                                    (False, None, 9, False), (True, "/ignored.pem", None, True)]:
        spec = ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9094", token="t",
                             insecure=insecure, root_certificates_path=certificates,
                             runtime_dependency_install=install, parent_pid=parent, suppress_output=True, task_id=1)
        SubprocessExecutor().launch(spec)
        assert clientapp_arguments(spec) == started[-1]
    assert started[1] == ["flwr-clientapp", "--runtime-api-address", "127.0.0.1:9094", "--token", "t",
                          "--root-certificates", "/ca.pem", "--allow-runtime-dependency-installation"]


def test_the_site_runs_its_supernode_with_our_superexec(tmp_path: Path) -> None:
    supernode = supernode_command("hub:9092", tmp_path / "ca.pem", tmp_path / "k", "site-a", tmp_path, 9094)
    assert supernode[supernode.index("--isolation") + 1] == "process"
    superexec = superexec_command(9094, parent_pid=42)
    assert Path(superexec[0]).name == "kaapana-superexec"
    assert superexec[1:] == ["--insecure", "--runtime-api-address", "127.0.0.1:9094", "--parent-pid", "42"]
    assert Path(superexec[0]).exists()  # installed as a console script beside flwr's
    stack = site_stack()  # the app module registers the steps; their site handlers' imports follow
    assert stack[:2] == ("flwr.supernode.cli.flwr_clientapp", "kaapana_assets.flower_apps")
    assert "nnunetv2.training.nnUNetTrainer.nnUNetTrainer" in stack


def test_flowers_superexec_loop_gets_the_forking_executor() -> None:
    """The seam kaapana-superexec uses in the pinned Flower: the loop's executor factory."""
    import inspect

    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.superexec import run_superexec

    from kaapana_assets.federation.warm_superexec import ForkingClientAppExecutor, install_forking_executor

    assert "get_executor(" in inspect.getsource(run_superexec.run_superexec)  # the loop asks its module
    original = run_superexec.get_executor
    try:
        install_forking_executor()
        install_forking_executor()  # idempotent: wraps Flower's factory, never itself
        assert isinstance(run_superexec.get_executor(ExecutorType.SUBPROCESS), ForkingClientAppExecutor)
        assert run_superexec._flower_get_executor is original  # type: ignore[attr-defined]
    finally:
        run_superexec.get_executor = original  # type: ignore[assignment]
        del run_superexec._flower_get_executor  # type: ignore[attr-defined]


# slow: a fresh interpreter importing torch, nnU-Net and Flower (≈9 s)
@pytest.mark.slow
def test_the_preload_leaves_cuda_alone() -> None:
    """What kaapana-superexec imports must not initialise CUDA: a forked child could not
    use the GPU (checked in a fresh interpreter, as the SuperExec starts)."""
    code = ("import os; os.environ['PYTORCH_NVML_BASED_CUDA_CHECK'] = '1'\n"
            "from kaapana_assets.federation.warm_superexec import fork_unsafe_reason, preload, site_stack\n"
            "assert preload(site_stack()) == [], preload(site_stack())\n"
            "import torch; torch.cuda.is_available()\n"
            "print(fork_unsafe_reason())")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "None"
