"""The researcher's Python client: a site's cohorts, images, SEGs, evaluations and lineage as
numpy arrays and polars frames, read with the platform's own code (cohort snapshots with
Delta time travel, volume assembly, the SEG reader). No Dagster, no server: it reads
KAAPANA_HOME (its lake, archive and MLflow store) directly.

    from kaapana_assets.client import Kaapana

    k = Kaapana(".kaapana")
    cohort = k.cohort("liver-train", version=1)
    for image, labels, geometry, series in cohort.cases():
        print(series["series_uid"], image.shape, geometry.spacing_zyx, (labels == 1).sum())

Given an `identity` (a user, their roles and projects), it reads only the series of that
user's projects (an admin's: all) and records every read of images in the `audit` table.
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from kaapana_assets.access.audit import Action, AuditEvent, AuditLog, Via
from kaapana_assets.access.identity import Identity
from kaapana_assets.access.scopes import ScopeCache
from kaapana_assets.cohorts.definitions import EXAMPLES
from kaapana_assets.cohorts.labels import member_labels
from kaapana_assets.cohorts.membership import CohortSnapshot, cohort_versions, read_cohort
from kaapana_assets.cohorts.references import reference_sources
from kaapana_assets.evaluation.evaluate import archive_paths
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.volume import Volume, assemble_volume, seg_labels
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import COHORT_MEMBERS, EVALUATIONS, INSTANCES, SEGMENTATIONS, SERIES
from kaapana_assets.training.export import label_ids as cohort_label_ids


class NotFound(LookupError):
    pass


@dataclass(frozen=True)
class Geometry:
    """Where the voxels are: (z, y, x) arrays, LPS patient coordinates in mm."""

    spacing_zyx: tuple[float, float, float]
    origin: tuple[float, float, float]  # LPS position of voxel (0, 0, 0)
    direction: np.ndarray  # 3×3, rows: row (x) direction, column (y) direction, slice normal (z)
    shape: tuple[int, int, int]  # (z, y, x)

    @classmethod
    def of(cls, volume: Volume) -> Geometry:
        return cls(tuple(volume.spacing_zyx), tuple(volume.origin), np.asarray(volume.direction, dtype=float),  # type: ignore[arg-type]
                   tuple(int(n) for n in volume.hu.shape))  # type: ignore[arg-type]

    @property
    def affine(self) -> np.ndarray:
        """4×4: voxel index (z, y, x, 1) → LPS position (x, y, z, 1) in mm."""
        dz, dy, dx = self.spacing_zyx
        out = np.eye(4)
        out[:3, 0] = self.direction[2] * dz
        out[:3, 1] = self.direction[1] * dy
        out[:3, 2] = self.direction[0] * dx
        out[:3, 3] = self.origin
        return out


@dataclass
class Case:
    """One cohort member: its CT, the reference label volume (None without a reference SEG),
    the geometry and the series row as the cohort version recorded it. Unpacks as
    (image, labels, geometry, series)."""

    series_uid: str
    study_uid: str
    patient_id: str
    image: np.ndarray  # (z, y, x) float32, Hounsfield units
    labels: np.ndarray | None  # (z, y, x) uint8, values from label_ids; None: no reference
    label_ids: dict[str, int]
    geometry: Geometry
    series: dict[str, Any]
    reference_seg_series_uid: str | None = None  # when one SEG series gives every label; else see reference_sources
    reference_sources: dict[str, str] = field(default_factory=dict)  # label → the SEG series it comes from
    volume: Volume | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.image, self.labels, self.geometry, self.series))

    def sitk_image(self, array: np.ndarray | None = None) -> Any:
        """The CT (or `array` on its grid) as a SimpleITK image with the geometry."""
        if self.volume is None:
            raise ValueError("no volume")
        return self.volume.sitk_image(self.image if array is None else array)


@dataclass
class SegArrays:
    """A DICOM SEG read back onto the CT series it segments."""

    seg_sop_instance_uid: str
    seg_series_uid: str
    source_series_uid: str
    study_uid: str
    labels: np.ndarray  # (z, y, x) uint8, values from label_ids, aligned with image
    label_ids: dict[str, int]
    image: np.ndarray  # the source CT, (z, y, x) float32 HU
    geometry: Geometry
    description: str


class Cohort:
    """A cohort version exactly as snapshotted (time travel: the series rows are those of the
    `series` table version the snapshot read, and the slices those of its `instances` version,
    whatever the tables hold now)."""

    def __init__(self, client: Kaapana, snapshot: CohortSnapshot, label_ids: Mapping[str, int]):
        self.client, self.snapshot = client, snapshot
        self.label_ids = dict(label_ids)

    def __repr__(self) -> str:
        return f"Cohort({self.name!r}, version={self.version}, series={len(self)})"

    def __len__(self) -> int:
        return self.snapshot.size if self.client.identity is None else self.members.height

    @property
    def name(self) -> str:
        return self.snapshot.cohort

    @property
    def version(self) -> int:
        return self.snapshot.version

    @property
    def members(self) -> pl.DataFrame:
        """cohort_members rows joined with the series rows as of the snapshot (those of the
        reader's projects only)."""
        return self.client.in_scope(self.snapshot.members)

    @property
    def series_uids(self) -> list[str]:
        return self.snapshot.members["series_uid"].to_list()

    @property
    def delta_versions(self) -> dict[str, int | None]:
        """The Delta versions this cohort version was cut from."""
        return {"series": self.snapshot.series_table_version, "tags": self.snapshot.tags_table_version,
                "instances": self.snapshot.instances_table_version}

    def case(self, series_uid: str) -> Case:
        rows = self.members.filter(pl.col("series_uid") == series_uid)
        if not rows.height:
            raise NotFound(f"{series_uid} is not a member of {self.name} v{self.version}")
        return self._case(rows.row(0, named=True))

    def cases(self) -> Iterator[Case]:
        """Every member, in series UID order, read from the archive one at a time."""
        for member in self.members.sort("series_uid").iter_rows(named=True):
            yield self._case(member)

    def _case(self, member: dict[str, Any]) -> Case:
        self.client.audit_read(member["study_uid"], member["series_uid"], f"{self.name}:v{self.version}")
        lake, archive = self.client.lake, self.client.home.archive
        volume = assemble_volume(archive_paths(lake, archive, member["series_uid"], self.snapshot.instances_table_version))
        sources = {s.label: s.seg_series_uid for s in reference_sources(member)}
        labels = None
        if sources:  # the references the cohort version recorded, read as the nnU-Net export reads them
            labels = member_labels(lake, archive, member, volume, self.label_ids,
                                   self.snapshot.instances_table_version).labels
        single = next(iter(set(sources.values()))) if len(set(sources.values())) == 1 else None
        return Case(member["series_uid"], member["study_uid"], member["patient_id"] or "", volume.hu, labels,
                    dict(self.label_ids), Geometry.of(volume), dict(member), reference_seg_series_uid=single,
                    reference_sources=sources, volume=volume)

    def export_nifti(self, folder: str | Path) -> Path:
        """images/<case>.nii.gz and, with a reference, labels/<case>.nii.gz, plus manifest.json
        naming the cohort version, its membership and the Delta versions it was cut from.
        Returns the manifest's path."""
        import SimpleITK as sitk

        folder = Path(folder)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        cases = []
        for index, case in enumerate(self.cases()):
            name = f"case{index:04d}"
            sitk.WriteImage(case.sitk_image(), str(folder / "images" / f"{name}.nii.gz"))
            entry: dict[str, Any] = {
                "case": name, "series_uid": case.series_uid, "study_uid": case.study_uid,
                "patient_id": case.patient_id, "image": f"images/{name}.nii.gz", "label": None,
                "reference_seg_series_uid": case.reference_seg_series_uid, "reference_sources": case.reference_sources,
                "spacing_zyx": list(case.geometry.spacing_zyx), "shape_zyx": list(case.geometry.shape),
            }
            if case.labels is not None:
                (folder / "labels").mkdir(exist_ok=True)
                sitk.WriteImage(case.sitk_image(case.labels), str(folder / "labels" / f"{name}.nii.gz"))
                entry["label"] = f"labels/{name}.nii.gz"
            cases.append(entry)
        lake = self.client.lake
        manifest = {
            "cohort": self.name, "cohort_version": self.version, "purpose": self.snapshot.purpose,
            "membership_hash": self.snapshot.membership_hash,
            # The slices read: the version's pinned `instances`, or the table as it is for versions cut
            # before it was recorded.
            "delta_versions": {**self.delta_versions, "cohort_members": lake.version(COHORT_MEMBERS),
                               "instances": self.snapshot.instances_table_version
                               if self.snapshot.instances_table_version is not None else lake.version(INSTANCES)},
            "lake": lake.root, "labels": {"background": 0, **self.label_ids},
            "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(), "cases": cases,
        }
        path = folder / "manifest.json"
        path.write_text(json.dumps(manifest, indent=2))
        return path

    def evaluations(self, model_name: str | None = None, model_version: str | int | None = None) -> pl.DataFrame:
        """This cohort version's rows of the `evaluations` table."""
        return self.client.evaluations(self.name, self.version, model_name, model_version)

    def evaluate(self, model_name: str | None = None, model_version: str | int | None = None,
                 device: str = "auto", allow_overlap: bool = False) -> pl.DataFrame:
        """Measure a model version (default: the production version of the site's segmentation
        model) on this cohort version as the segmentation_evaluation asset does — the same code:
        the held-out check (NotHeldOut when patients of this version are in the model's training
        data, unless `allow_overlap`), SEGs archived, rows in `evaluations`, a run in MLflow;
        returns the rows."""
        from kaapana_assets.archive.service import Archive
        from kaapana_assets.evaluation.models import load_model
        from kaapana_assets.evaluation.run import run_evaluation

        tracking = self.client.tracking()
        model = load_model(tracking, model_name or self.client.segmentation_model, model_version,
                           self.client.home.root / "models", device)
        report = run_evaluation(Archive.for_home(self.client.home, self.client.lake), tracking, self.snapshot,
                                model, allow_overlap=allow_overlap)
        return report.evaluation.rows


class Kaapana:
    """One site's data, read where it lies: `Kaapana()` reads $KAAPANA_HOME (default ./.kaapana);
    cohort definitions (for their required labels) from `cohorts`, else $KAAPANA_COHORTS, else
    the shipped examples."""

    def __init__(self, home: str | Path | None = None, cohorts: str | Path | None = None,
                 identity: Identity | None = None):
        from kaapana_assets.environment import Environment

        environment = Environment.read(home=Path(home) if home else None)  # the client's top: read once
        self._environment = environment
        self.home = KaapanaHome(environment.home)
        self.lake = Lake.of(environment)  # KAAPANA_LAKE_URI (an object store), else <home>/lake
        if self.lake.is_local and not Path(self.lake.root).exists():
            raise NotFound(f"{self.home.root} holds no lake: run `make demo` or ingest data first")
        self.definitions = Path(cohorts or environment.cohorts or EXAMPLES)
        self.segmentation_model = environment.segmentation_model  # what `evaluate` measures by default
        self.identity = identity
        self._scopes = ScopeCache(self.lake)
        self._audit = AuditLog(self.lake) if identity is not None else None
        if self._audit is not None:
            self._audit.start()
            atexit.register(self.close)  # a notebook's kernel ending appends what is left

    def __repr__(self) -> str:
        return f"Kaapana({str(self.home.root)!r}" + (f", identity={self.identity.user!r})" if self.identity else ")")

    def __enter__(self) -> Kaapana:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Append the audit rows still queued."""
        if self._audit is not None:
            self._audit.close()

    def in_scope(self, frame: pl.DataFrame) -> pl.DataFrame:
        """The rows of `frame` (with a series_uid column) of the reader's projects."""
        if self.identity is None:
            return frame
        scope = self._scopes.scope(self.identity)
        return frame if scope.everything else frame.filter(pl.col("series_uid").is_in(sorted(scope.series_uids)))

    def audit_read(self, study_uid: str | None, series_uid: str | None, target: str | None = None) -> None:
        if self._audit is not None and self.identity is not None:
            self._audit.record(AuditEvent(self.identity, Action.CLIENT_READ, Via.CLIENT, study_uid, series_uid,
                                          target=target))

    def tracking(self) -> Any:
        from kaapana_assets.training.tracking import default_tracking

        return default_tracking(self._environment)

    def cohorts(self) -> pl.DataFrame:
        """Every cohort and its versions (size, membership hash, series table version)."""
        names = sorted(set(self.lake.read(COHORT_MEMBERS)["cohort"].to_list()))
        frames = [cohort_versions(self.lake, name).with_columns(pl.lit(name).alias("cohort")) for name in names]
        if not frames:
            return pl.DataFrame(schema={"cohort": pl.String, "cohort_version": pl.Int64})
        return pl.concat(frames).select("cohort", pl.exclude("cohort"))

    def cohort(self, name: str, version: int | None = None,
               labels: Mapping[str, int] | Sequence[str] | None = None) -> Cohort:
        """A cohort version (default: the latest). `labels`: label name → value in the label
        volumes (or names, numbered from 1). Default: as the nnU-Net export numbers them — the
        definition's required labels first, then the other labels of the members' reference
        SEGs, sorted."""
        snapshot = read_cohort(self.lake, name, version)
        if labels is None:
            ids = cohort_label_ids(snapshot, self._required_labels(name))
        elif isinstance(labels, Mapping):
            ids = dict(labels)
        else:
            ids = {label: i + 1 for i, label in enumerate(labels)}
        return Cohort(self, snapshot, ids)

    def _required_labels(self, name: str) -> list[str]:
        from kaapana_assets.cohorts.definitions import CohortDefinitionError, load_definition

        path = self.definitions / f"{name}.yaml"
        try:
            return list(load_definition(path).required_labels) if path.exists() else []
        except CohortDefinitionError:
            return []

    def segs(self, study_uid: str) -> pl.DataFrame:
        """The study's SEG series: UIDs, description, labels, the series they segment, and the
        model that wrote it (null for references)."""
        series = self.in_scope(self.lake.read(SERIES, (pl.col("study_uid") == study_uid) & (pl.col("modality") == "SEG")))
        written = self.lake.read(SEGMENTATIONS).select("seg_series_uid", "model_name", "model_version").unique(
            "seg_series_uid") if self.lake.exists(SEGMENTATIONS) else pl.DataFrame(
            schema={"seg_series_uid": pl.String, "model_name": pl.String, "model_version": pl.String})
        return series.join(written, left_on="series_uid", right_on="seg_series_uid", how="left").select(
            "series_uid", "series_description", "segment_labels", "referenced_series_uids", "model_name",
            "model_version").sort("series_uid")

    def read_seg(self, uid: str, label_ids: Mapping[str, int] | None = None) -> SegArrays:
        """A SEG (its SOP Instance UID or series UID) as a label volume on its source CT.
        `label_ids`: label name → value; default: the SEG's segments in order, from 1."""
        instances = self.in_scope(self.lake.read(
            INSTANCES, ((pl.col("sop_instance_uid") == uid) | (pl.col("series_uid") == uid)) & (pl.col("modality") == "SEG")))
        if not instances.height:
            raise NotFound(f"{uid} is neither a SEG SOP Instance UID nor a SEG series UID in {self.lake.root}")
        seg = instances.sort("sop_instance_uid").row(0, named=True)
        self.audit_read(seg["study_uid"], seg["series_uid"])
        import highdicom as hd

        path = self.home.archive / seg["archive_path"]
        dataset = hd.seg.segread(path)
        names = [str(s.SegmentLabel) for s in sorted(dataset.SegmentSequence, key=lambda s: int(s.SegmentNumber))]
        ids = dict(label_ids) if label_ids else {name: i + 1 for i, name in enumerate(names)}
        sources = list(seg.get("referenced_series_uids") or [])
        if not sources:
            raise NotFound(f"SEG {seg['sop_instance_uid']} references no series")
        volume = assemble_volume(archive_paths(self.lake, self.home.archive, sources[0]))
        return SegArrays(seg["sop_instance_uid"], seg["series_uid"], sources[0], seg["study_uid"],
                         seg_labels(path, volume, ids), ids, volume.hu, Geometry.of(volume),
                         str(getattr(dataset, "SeriesDescription", "")))

    def evaluations(self, cohort: str | None = None, cohort_version: int | None = None,
                    model_name: str | None = None, model_version: str | int | None = None) -> pl.DataFrame:
        """Rows of the `evaluations` table (one per case and label), filtered."""
        if not self.lake.exists(EVALUATIONS):
            return pl.from_arrow(EVALUATIONS.empty())  # type: ignore[return-value]
        conditions: Sequence[pl.Expr] = [
            pl.col(column) == value for column, value in (
                ("cohort", cohort), ("cohort_version", cohort_version), ("model_name", model_name),
                ("model_version", None if model_version is None else str(model_version))) if value is not None]
        where = pl.all_horizontal(conditions) if conditions else None
        return self.in_scope(self.lake.read(EVALUATIONS, where)).sort("cohort", "cohort_version", "model_name", "model_version",
                                                         "series_uid", "label_value")

    def lineage(self, uid: str) -> str:
        """`kaapana lineage` as text: a SEG, a model (`name:vN`) or an evaluation id."""
        from kaapana_assets.lineage import trace

        return "\n".join(trace(self.home, self.tracking(), uid, self.lake).lines())
