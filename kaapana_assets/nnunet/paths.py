"""The folders of one nnU-Net root (raw, preprocessed, results) and the one place where
nnU-Net's environment variables are set."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kaapana_assets.environment import unchanged_environment

CONFIGURATION = "3d_fullres"
PLANS = "nnUNetPlans"
FOLD = 0


@dataclass(frozen=True)
class NnunetPaths:
    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "preprocessed"

    @property
    def results(self) -> Path:
        return self.root / "results"


@contextmanager
def nnunet_environment(paths: NnunetPaths, threads: int | None = None, training: bool = False) -> Iterator[NnunetPaths]:
    """nnU-Net's folders and process counts in the environment for the duration of the block,
    restoring what was there.

    Unavoidable, and done only here: nnunetv2 takes dataset ids, not folders, and resolves
    them through `nnunetv2.paths` (nnUNet_raw, nnUNet_preprocessed, nnUNet_results, read from
    the environment at each use in 2.8); nnUNet_def_n_proc and nnUNet_n_proc_DA are read
    from the environment as well. Our own code never reads them back: it is given the
    folders (`paths`)."""
    values = {
        "nnUNet_raw": str(paths.raw),
        "nnUNet_preprocessed": str(paths.preprocessed),
        "nnUNet_results": str(paths.results),
        "nnUNet_def_n_proc": str(threads or 1),
    }
    if training:
        # Augmentation in-process: on 2 cores, worker processes were slower. Planning must
        # not see it (torch.set_num_threads(0) crashes there).
        values["nnUNet_n_proc_DA"] = "0"
    for folder in (paths.raw, paths.preprocessed, paths.results):
        folder.mkdir(parents=True, exist_ok=True)
    with unchanged_environment(*values):
        os.environ.update(values)
        yield paths
