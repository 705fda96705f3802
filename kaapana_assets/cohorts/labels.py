"""A cohort member's reference label volume: each label read from the SEG instance the cohort
version recorded for it (cohorts/references.py), painted with the version's overlap rule.
The nnU-Net export, the evaluation and the Python client all read references through here."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from kaapana_assets.cohorts.references import reference_sources
from kaapana_assets.ingest.volume import LabelVolume, Volume, paint_labels, seg_masks
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import INSTANCES


class MissingReference(LookupError):
    """A recorded reference SEG is not (or no longer) in the index."""


def member_labels(lake: Lake, archive: Path, member: Mapping[str, Any], volume: Volume,
                  label_ids: Mapping[str, int], instances_version: int | None = None) -> LabelVolume:
    """The member's labels in `label_ids`, each from its recorded source SEG (one file read per
    SEG, however many labels it gives), found in `instances` (at `instances_version`, the
    snapshot's, where recorded). A label no reference holds stays background."""
    by_sop: dict[str, list[str]] = defaultdict(list)
    for source in reference_sources(dict(member)):
        if source.label in label_ids:
            by_sop[source.seg_sop_instance_uid].append(source.label)
    paths = dict(lake.read(INSTANCES, pl.col("sop_instance_uid").is_in(sorted(by_sop)), version=instances_version)
                 .select("sop_instance_uid", "archive_path").iter_rows())
    masks: dict[str, np.ndarray] = {}
    for sop, labels in sorted(by_sop.items()):
        if sop not in paths:
            raise MissingReference(f"reference SEG {sop} of series {member['series_uid']} is not indexed")
        masks.update(seg_masks(archive / paths[sop], volume, labels))
    if not masks:
        return LabelVolume(np.zeros(volume.hu.shape, dtype=np.uint8), 0, {})
    return paint_labels(masks, label_ids, list(member.get("label_priority") or []))
