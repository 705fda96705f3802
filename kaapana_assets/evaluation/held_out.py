"""Is a test cohort held out from the model it measures? Held out is per patient: no patient of
the evaluated cohort version may be among the patients the model version learned from, as far
as this site can know them:

- a model trained here: the cohort version its MLflow version records (`kaapana.cohort`,
  `kaapana.cohort_version`), validation patients included (their Dice gated its promotion);
- a federated model: this site's cohort version in every round of the experiment it trained
  in, up to the round the model was registered from (the site's own `federated_site_rounds`
  rows; other sites' patients never come here, and are not this site's patients);
- a model without training lineage (imported): nothing at this site to overlap with.

An evaluation that is not held out fails, unless `allow_overlap` asks for a deliberate
in-sample report, which then says so in its title."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import polars as pl

from kaapana_assets.cohorts.exclusion import cohort_patients
from kaapana_assets.cohorts.membership import CohortSnapshot
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import FEDERATED_SITE_ROUNDS


class NotHeldOut(ValueError):
    pass


@dataclass(frozen=True)
class TrainingData:
    """The patients of this site a model version learned from."""

    description: str  # e.g. "cohort liver-train v1"
    cohort_versions: tuple[tuple[str, int], ...]
    patients: frozenset[str]
    missing: str = ""  # why the training patients cannot be known here ("" when they can)


@dataclass(frozen=True)
class HeldOutCheck:
    cohort: str
    cohort_version: int
    model: str  # name:vN
    training: TrainingData
    overlap: tuple[str, ...]  # patients of the evaluated version in the training data
    allowed: bool = False  # allow_overlap: a deliberate in-sample evaluation

    @property
    def held_out(self) -> bool:
        return not self.overlap and not self.training.missing

    @property
    def summary(self) -> str:
        if self.training.missing:
            return f"not verified: {self.training.missing}"
        if self.overlap:
            return (f"IN-SAMPLE: {len(self.overlap)} patient(s) of {self.cohort} v{self.cohort_version} are in the "
                    f"training data of {self.model} ({self.training.description})")
        return (f"held out: no patient of {self.cohort} v{self.cohort_version} is in the training data of "
                f"{self.model} ({self.training.description})")


def training_data(lake: Lake, tags: Mapping[str, str]) -> TrainingData:
    """This site's patients behind a model version, from the tags MLflow registered it with."""
    if tags.get("kaapana.source") == "federated":
        return _federated(lake, tags)
    cohort, version = tags.get("kaapana.cohort"), tags.get("kaapana.cohort_version")
    if not cohort or not version:
        return TrainingData("no training lineage (trained elsewhere or imported)", (), frozenset())
    found = cohort_patients(lake, cohort, int(version))
    if found is None:
        return TrainingData(f"cohort {cohort} v{version}", ((cohort, int(version)),), frozenset(),
                            missing=f"its training cohort {cohort} v{version} is not in this site's lake")
    return TrainingData(f"cohort {cohort} v{version}", ((cohort, int(version)),), found.patients)


def _federated(lake: Lake, tags: Mapping[str, str]) -> TrainingData:
    experiment = tags.get("kaapana.federated_experiment", "")
    last = int(tags.get("kaapana.rounds") or 0)
    rows = (lake.read(FEDERATED_SITE_ROUNDS, (pl.col("experiment") == experiment) & (pl.col("round") <= last))
            if lake.exists(FEDERATED_SITE_ROUNDS) else pl.DataFrame())
    if not rows.height:
        return TrainingData(f"federated experiment {experiment}: no round trained at this site", (), frozenset())
    versions = tuple(sorted({(c, int(v)) for c, v in rows.select("cohort", "cohort_version").iter_rows()}))
    rounds = sorted(rows["round"].unique().to_list())
    patients: set[str] = set()
    for cohort, version in versions:
        found = cohort_patients(lake, cohort, version)
        if found is None:
            return TrainingData(f"federated experiment {experiment}", versions, frozenset(),
                                missing=f"this site's cohort {cohort} v{version} of experiment {experiment} is "
                                f"not in its lake")
        patients |= found.patients
    cohorts = ", ".join(f"{c} v{v}" for c, v in versions)
    return TrainingData(f"this site's {cohorts} in round(s) {', '.join(map(str, rounds))} of federated experiment "
                        f"{experiment}", versions, frozenset(patients))


def check_held_out(lake: Lake, snapshot: CohortSnapshot, model: str, tags: Mapping[str, str],
                   allow_overlap: bool = False) -> HeldOutCheck:
    """The held-out check of an evaluation of `model` (name:vN, registered with `tags`) on a
    cohort version; NotHeldOut naming the patients, unless `allow_overlap`."""
    training = training_data(lake, tags)
    overlap = tuple(sorted(snapshot.patients & training.patients))
    check = HeldOutCheck(snapshot.cohort, snapshot.version, model, training, overlap, allow_overlap)
    if check.held_out or allow_overlap:
        return check
    if training.missing:
        raise NotHeldOut(f"cannot tell whether cohort {snapshot.cohort} v{snapshot.version} is held out from "
                         f"{model}: {training.missing}; set allow_overlap to evaluate it anyway")
    shown = ", ".join(overlap[:10]) + (f" and {len(overlap) - 10} more" if len(overlap) > 10 else "")
    raise NotHeldOut(
        f"cohort {snapshot.cohort} v{snapshot.version} is not held out from {model}: patient(s) {shown} are in "
        f"its training data ({training.description}); leave them out (filter.exclude_cohorts: "
        f"[{', '.join(sorted({c for c, _ in training.cohort_versions}))}]) or, for a deliberate in-sample report, "
        f"set allow_overlap")
