"""`kaapana-superexec`: Flower's SuperExec for a site, with the site's stack kept imported.

Flower runs every message to a site in a fresh `flwr-clientapp` process. For our ClientApp
that process spends ≈6 s importing Flower, torch, nnU-Net and Dagster before it reads the
hub's message (timed imports of site_stack() below on 2 cores: flwr 0.9 s, torch 1.0 s,
nnU-Net 3.0 s, Dagster 0.3 s, ours 0.7 s), twice per round (train, then evaluate) on the
round's critical path (`bench/federated_overhead.py` shows it per phase).

This is Flower's own SuperExec (`flower-superexec`: same arguments, same task loop, same
Runtime API, same tokens), with one change: its subprocess executor starts a ClientApp by
`fork()` from this process, which imported the site's stack once at start-up, instead of
exec'ing a new interpreter. Every message still gets a process of its own, which ends
with it; the child runs Flower's `flwr-clientapp` entry point with exactly the arguments
Flower's executor would have passed. Anything else (other task types) is started as
Flower starts it.

Fork safety, and why it holds here:
- the parent only *imports* the stack: it never runs torch or numpy work, so no OpenMP
  pool exists to be inherited half-initialised, and it opens no connection before the
  loop starts (Flower's Runtime API client is plain HTTP on loopback: the child never uses
  the parent's socket and leaves with `os._exit`, so it never closes it for the parent);
- the child resets the parent's signal handlers and forgets the parent's Flower exit
  handlers before anything else, and reseeds numpy's and torch's global generators as a
  fresh interpreter would have (Python's `random` reseeds itself after fork).

Run it beside a SuperNode started with `--isolation process` (see superlink.py)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence

from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND, ExecutorType, TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult, SubprocessExecutor

from kaapana_assets.federation.runs import APP_MODULE
from kaapana_assets.preload import preload


def site_stack() -> tuple[str, ...]:
    """What a site's ClientApp imports for a message: Flower's ClientApp entry point, our
    app module (which registers the steps) and what the registered steps' site handlers
    import when they run (the bench's direct reference imports the same before its timer)."""
    preload([APP_MODULE])  # registers the steps; a failure shows when a ClientApp imports it
    from kaapana_assets.federation.registry import site_preloads

    return ("flwr.supernode.cli.flwr_clientapp", APP_MODULE, *site_preloads())


def clientapp_arguments(spec: ExecutionSpec) -> list[str]:
    """The command line Flower's SubprocessExecutor would run for this task."""
    args = [TASK_TYPE_TO_COMMAND[spec.task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
            spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        args += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
    return args


def _name_process(name: str) -> None:
    """What `ps`/`top` show (15 bytes): the child is a ClientApp, not a SuperExec."""
    try:
        with open(f"/proc/{os.getpid()}/comm", "w") as comm:
            comm.write(name[:15])
    except OSError:
        pass


def _reseed() -> None:
    """A fresh interpreter seeds numpy's and torch's global generators from the OS; a
    forked child would otherwise repeat its parent's state in every message."""
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()


def run_forked_clientapp(argv: Sequence[str], suppress_output: bool) -> None:
    """The child's whole life: Flower's `flwr-clientapp` entry point, then `os._exit`."""
    code = 1
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        from flwr.supercore.exit import exit_handler

        exit_handler.registered_exit_handlers.clear()  # the parent's: not this process's to run
        _name_process("flwr-clientapp")
        if suppress_output:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        _reseed()
        from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

        sys.argv = list(argv)
        flwr_clientapp()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child must never return into the parent's loop
        traceback.print_exc()
    finally:
        try:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class ForkingClientAppExecutor(SubprocessExecutor):
    """Flower's subprocess executor, except that ClientApps are forked from this process."""

    def __init__(self) -> None:
        self.children: set[int] = set()

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
        argv = clientapp_arguments(spec)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            return LaunchResult.failed(f"cannot fork a ClientApp: {exc}")
        if pid == 0:
            run_forked_clientapp(argv, spec.suppress_output)  # never returns
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap ClientApps that have ended (called by Flower's loop between polls)."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)


def install_forking_executor() -> None:
    """Make Flower's SuperExec loop use ForkingClientAppExecutor where it would use its
    subprocess executor. Flower's loop looks its executor factory up in its own module at
    start: the one seam it has (tests/federation/test_warm_superexec.py checks it on the pinned Flower)."""
    from flwr.supercore.superexec import run_superexec

    flower_get_executor = getattr(run_superexec, "_flower_get_executor", run_superexec.get_executor)

    def get_executor(executor_type: ExecutorType, *args: object, **kwargs: object) -> object:
        if executor_type == ExecutorType.SUBPROCESS:
            return ForkingClientAppExecutor()
        return flower_get_executor(executor_type, *args, **kwargs)  # type: ignore[arg-type]

    run_superexec._flower_get_executor = flower_get_executor  # type: ignore[attr-defined]
    run_superexec.get_executor = get_executor  # type: ignore[assignment]


def fork_unsafe_reason() -> str | None:
    """Why forking from this process would be unsafe, if it would: a CUDA context cannot
    be used in a forked child, so the preload must not have initialised CUDA."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "the preload initialised CUDA"
    return None


def main() -> None:
    """`kaapana-superexec`: `flower-superexec`'s command line, ClientApps forked warm."""
    from flwr.supercore.cli.flower_superexec import flower_superexec

    # torch.cuda.is_available() (if anything asks during the imports) then asks NVML and
    # leaves CUDA uninitialised, so children can still use the GPU.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    failed = preload(site_stack())
    if failed:
        print(f"kaapana-superexec: could not preload {', '.join(failed)}; ClientApps import them themselves",
              file=sys.stderr, flush=True)
    reason = fork_unsafe_reason()
    if reason is None:
        install_forking_executor()
    else:  # Flower's own executor: a fresh interpreter per ClientApp, as flower-superexec
        print(f"kaapana-superexec: {reason}; starting ClientApps as fresh processes", file=sys.stderr, flush=True)
    flower_superexec()


if __name__ == "__main__":
    main()
