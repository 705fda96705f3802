"""Which SEGs are a series' reference segmentations for a cohort, and which one each label
comes from. The one place this is decided: membership records the choice in the cohort
version (cohort_members.reference_sources), the export and the evaluation read it from there.

The `series` table lists every SEG that references a series (a raw fact). For a cohort, a SEG
is a reference when
  - it was not written by this platform's models (`made_by_platform`, from the SEG's own
    Manufacturer and algorithm identification: an interrupted commit cannot make our output
    a reference), and
  - every segment it holds has a Segment Algorithm Type the cohort accepts
    (`reference_algorithm_types`, default MANUAL and SEMIAUTOMATIC), and
  - its segments are recorded in `seg_segments` (a SEG of unknown provenance is none).
Several references of one series are combined per label: each label comes from the most
recent reference holding it (Content Date/Time), ties broken by the lowest SOP Instance UID.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import polars as pl

from kaapana_assets.dicom.seg_segments import made_by_platform


@dataclass(frozen=True)
class SegInstance:
    """One SEG instance as the policy sees it (from its `seg_segments` rows)."""

    sop_instance_uid: str
    series_uid: str
    labels: frozenset[str]
    algorithm_types: frozenset[str]
    by_platform: bool
    content_datetime: str  # DA + TM, normalized so that string order is time order; "" if absent

    def accepted(self, algorithm_types: Collection[str]) -> bool:
        return not self.by_platform and bool(self.algorithm_types) and self.algorithm_types <= set(algorithm_types)


@dataclass(frozen=True)
class ReferenceSource:
    """Where a label of a case comes from."""

    label: str
    seg_series_uid: str
    seg_sop_instance_uid: str


@dataclass(frozen=True)
class References:
    """A series' references for one cohort: the accepted SEG series and one source per label."""

    seg_series_uids: tuple[str, ...]
    sources: tuple[ReferenceSource, ...]  # label order

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.sources]


def content_datetime(date: str | None, time: str | None) -> str:
    """DA + TM as one sortable string: TM may be "HH", "HHMM", "HHMMSS.ffffff" (or the old
    "HH:MM:SS"); the parts a SEG leaves out count as zero."""
    if not date:
        return ""
    whole, _, fraction = (time or "").replace(":", "").strip().partition(".")
    return f"{date.strip()}{whole.ljust(6, '0')[:6]}.{fraction.ljust(6, '0')[:6]}"


def seg_instances(segments: pl.DataFrame) -> dict[str, list[SegInstance]]:
    """`seg_segments` rows → SEG instances, grouped by their series UID."""
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in segments.iter_rows(named=True):
        rows[row["sop_instance_uid"]].append(row)
    out: dict[str, list[SegInstance]] = defaultdict(list)
    for sop, segs in sorted(rows.items()):
        first = segs[0]
        out[first["series_uid"]].append(SegInstance(
            sop_instance_uid=sop,
            series_uid=first["series_uid"],
            labels=frozenset(s["segment_label"] for s in segs if s["segment_label"]),
            algorithm_types=frozenset(s["algorithm_type"] or "" for s in segs),
            by_platform=made_by_platform(first["manufacturer"], [s["algorithm_source"] for s in segs],
                                         [s["algorithm_name"] for s in segs]),
            content_datetime=content_datetime(first["content_date"], first["content_time"]),
        ))
    return dict(out)


def choose_references(candidates: Iterable[SegInstance], algorithm_types: Collection[str]) -> References:
    """The accepted SEGs among `candidates` and, per label, the one it is taken from: the most
    recent (Content Date/Time), ties broken by the lowest SOP Instance UID."""
    accepted = sorted((s for s in candidates if s.accepted(algorithm_types)), key=lambda s: s.sop_instance_uid)
    accepted.sort(key=lambda s: s.content_datetime, reverse=True)  # stable: UID order within one time
    chosen: dict[str, SegInstance] = {}
    for seg in accepted:
        for label in seg.labels:
            chosen.setdefault(label, seg)
    sources = tuple(ReferenceSource(label, seg.series_uid, seg.sop_instance_uid) for label, seg in sorted(chosen.items()))
    return References(tuple(sorted({s.series_uid for s in accepted})), sources)


def missing_labels(labels: Collection[str], required: Sequence[str]) -> list[str]:
    return sorted(set(required) - set(labels))


def annotated(required_labels: Sequence[str]) -> pl.Expr:
    """Series rows (as `apply_reference_policy` leaves them) annotated for a cohort: an accepted
    reference, and every required label in one of its accepted references."""
    has = pl.col("reference_seg_series_uids").list.len() > 0
    required = sorted(set(required_labels))
    if required:
        held = pl.col("reference_labels").list.set_intersection(pl.lit(required, dtype=pl.List(pl.String)))
        has = has & (held.list.len() == len(required))
    return has


SOURCE_TYPE = pl.List(pl.Struct({"label": pl.String, "seg_series_uid": pl.String, "seg_sop_instance_uid": pl.String}))


def apply_reference_policy(series: pl.DataFrame, segments: pl.DataFrame,
                           algorithm_types: Collection[str]) -> pl.DataFrame:
    """The series rows with `reference_seg_series_uids` narrowed to the accepted references and
    `reference_labels` and `reference_sources` (label → SEG instance) added. SEG rows keep
    their lists; their own references are none."""
    by_series = seg_instances(segments)
    accepted, labels, sources = [], [], []
    for modality, segs in zip(series["modality"].to_list(), series["reference_seg_series_uids"].to_list(), strict=True):
        if modality == "SEG":
            refs = References((), ())
        else:
            refs = choose_references((s for uid in segs or [] for s in by_series.get(uid, [])), algorithm_types)
        accepted.append(list(refs.seg_series_uids))
        labels.append(refs.labels)
        sources.append([asdict(s) for s in refs.sources])
    return series.with_columns(
        pl.Series("reference_seg_series_uids", accepted, dtype=pl.List(pl.String)),
        pl.Series("reference_labels", labels, dtype=pl.List(pl.String)),
        pl.Series("reference_sources", sources, dtype=SOURCE_TYPE),
    )


def reference_sources(member: dict[str, Any]) -> list[ReferenceSource]:
    """A cohort member's recorded sources (cohort_members.reference_sources)."""
    return [ReferenceSource(s["label"], s["seg_series_uid"], s["seg_sop_instance_uid"])
            for s in member.get("reference_sources") or []]


def references_digest(members: pl.DataFrame) -> dict[str, str]:
    """Per member: its accepted references and the SEG instance of each label, as text for
    the membership hash (a new or newly refused reference is a new cohort version)."""
    out = {}
    for row in members.select("series_uid", "reference_seg_series_uids", "reference_sources").iter_rows(named=True):
        sources = ",".join(f"{s.label}={s.seg_sop_instance_uid}" for s in reference_sources(row))
        out[row["series_uid"]] = f"{','.join(row['reference_seg_series_uids'] or [])}|{sources}"
    return out
