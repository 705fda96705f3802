"""The federation folder of one side, never shared: at the hub it holds what the hub
published (experiment, plans, global weights per round), the messages it received and the
result of each Flower run; at a site, what the hub sent it (verified) and what the site
will send back (its outbox). Only Flower's channel connects the two.

Writes are atomic (temp file + rename), so a reader never sees half a file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from kaapana_assets.files import write_atomically

if TYPE_CHECKING:  # torch loads where weights are read or written, not in every run of the code location
    import torch


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save

    # state dicts alias tensors (decoder.encoder.* is encoder.*): clone so each key is saved
    write_atomically(path, save({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}))
    return path


def _read_tensors(path: Path, missing: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    if not path.exists():
        raise FileNotFoundError(missing)
    return load(path.read_bytes())


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def checked_name(kind: str, value: str) -> str:
    """Experiment and site names become path components: refuse anything that could escape."""
    if not NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"{kind} name {value[:80]!r} is not allowed: letters, digits, '.', '_', '-' (max 64)")
    return value


class FederationStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def experiment_dir(self, experiment: str) -> Path:
        return self.root / checked_name("experiment", experiment)

    # -- published by the hub ------------------------------------------------------------
    def write_json(self, experiment: str, name: str, data: dict) -> Path:
        path = self.experiment_dir(experiment) / f"{name}.json"
        write_atomically(path, json.dumps(data, indent=2, sort_keys=True).encode())
        return path

    def read_json(self, experiment: str, name: str) -> dict:
        path = self.experiment_dir(experiment) / f"{name}.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: has federated_plan[{experiment}] been materialized?")
        return json.loads(path.read_text())

    def global_path(self, experiment: str, round_: int) -> Path:
        return self.experiment_dir(experiment) / "global" / f"round-{round_:04d}.safetensors"

    def write_global(self, experiment: str, round_: int, weights: dict[str, torch.Tensor]) -> Path:
        return _write_tensors(self.global_path(experiment, round_), weights)

    def read_global(self, experiment: str, round_: int) -> dict[str, torch.Tensor]:
        return _read_tensors(self.global_path(experiment, round_), f"no global model for {experiment} round {round_}: "
                             + ("materialize federated_plan first" if round_ == 0
                                else f"round {round_} has not completed"))

    def has_global(self, experiment: str, round_: int) -> bool:
        return self.global_path(experiment, round_).exists()

    def momentum_path(self, experiment: str, round_: int) -> Path:
        return self.experiment_dir(experiment) / "global" / f"momentum-{round_:04d}.safetensors"

    def write_momentum(self, experiment: str, round_: int, momentum: dict[str, torch.Tensor]) -> Path:
        """FedAvgM's server momentum after round r: hub state, never sent to a site."""
        return _write_tensors(self.momentum_path(experiment, round_), momentum)

    def read_momentum(self, experiment: str, round_: int) -> dict[str, torch.Tensor]:
        return _read_tensors(self.momentum_path(experiment, round_), f"no server momentum for {experiment} round "
                             f"{round_}: the round was not aggregated with fedavgm")

    def local_path(self, experiment: str, site: str) -> Path:
        return self.experiment_dir(experiment) / "local" / f"{checked_name('site', site)}.safetensors"

    def write_local(self, experiment: str, site: str, weights: dict[str, torch.Tensor]) -> Path:
        """A consenting site's local-only baseline (cross-site evaluation): kept at the hub to
        go out to the other sites for evaluation."""
        return _write_tensors(self.local_path(experiment, site), weights)

    def read_local(self, experiment: str, site: str) -> dict[str, torch.Tensor]:
        return _read_tensors(self.local_path(experiment, site), f"no local model of {site} for {experiment}: "
                             "it did not consent to share one, or its baseline has not been trained")

    def has_local(self, experiment: str, site: str) -> bool:
        return self.local_path(experiment, site).exists()

    # -- what a site will send (site side) and what the hub received (hub side) ---------------
    def message_path(self, experiment: str, round_: int, kind: str, site: str, box: str = "outbox") -> Path:
        if box not in {"outbox", "received"}:
            raise ValueError(f"unknown box {box!r}")
        return (self.experiment_dir(experiment) / box / f"round-{round_:04d}" / checked_name("kind", kind)
                / f"{checked_name('site', site)}.bin")

    def write_message(self, experiment: str, round_: int, kind: str, site: str, data: bytes,
                      box: str = "outbox") -> Path:
        path = self.message_path(experiment, round_, kind, site, box)
        write_atomically(path, data)
        return path

    def read_message(self, experiment: str, round_: int, kind: str, site: str, box: str = "outbox") -> bytes:
        path = self.message_path(experiment, round_, kind, site, box)
        if not path.exists():
            raise FileNotFoundError(f"{path}: the site step wrote nothing to send")
        return path.read_bytes()

    # -- results of Flower runs (hub side) ------------------------------------------------------
    def result_path(self, experiment: str, step: str) -> Path:
        return self.experiment_dir(experiment) / "results" / f"{checked_name('step', step)}.json"

    def files(self, experiment: str | None = None) -> list[Path]:
        root = self.experiment_dir(experiment) if experiment else self.root
        return sorted(p for p in root.rglob("*") if p.is_file())
