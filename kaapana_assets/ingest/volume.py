"""Archive → arrays: a CT series as a 3D volume with its geometry, and a DICOM SEG as a
label volume aligned to it. Shared by training (dataset export) and segmentation."""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom

from kaapana_assets.archive.index import multiframe_issue

ORIENTATION_TOLERANCE = 1e-4
SPACING_TOLERANCE = 0.01  # relative spread of slice gaps that still counts as uniform


def _cache_iod_lookups() -> None:
    """highdicom 0.28 asks, for every slice it reads and every SEG frame it writes, whether
    the SOP class's IOD has a given attribute (pixel data, NumberOfFrames), by scanning the
    standard's module tables: 30–40 % of assembling a CT volume, measured. The answer depends
    only on (attribute, SOP class, excluded paths) and the standard's tables highdicom
    ships, so it is remembered per process. Nothing changes where highdicom has no such
    function (a later version)."""
    from highdicom import _standard_utils as standard

    lookup = getattr(standard, "is_attribute_in_iod", None)
    if lookup is None or hasattr(lookup, "cache_info"):
        return
    remembered = functools.lru_cache(maxsize=4096)(
        lambda attribute, sop_class_uid, excluded: lookup(attribute, sop_class_uid, list(excluded) if excluded else None))

    @functools.wraps(lookup)
    def is_attribute_in_iod(attribute: str, sop_class_uid: str, exclude_path_elements: Sequence[str] | None = None) -> bool:
        return remembered(attribute, str(sop_class_uid), tuple(exclude_path_elements) if exclude_path_elements else None)

    is_attribute_in_iod.cache_info = remembered.cache_info  # type: ignore[attr-defined]
    standard.is_attribute_in_iod = is_attribute_in_iod


_cache_iod_lookups()


class VolumeError(ValueError):
    """The series cannot form a regular 3D volume."""


@dataclass
class Volume:
    hu: np.ndarray  # (z, y, x) float32, rescale applied
    spacing_zyx: tuple[float, float, float]
    origin: tuple[float, float, float]  # ImagePositionPatient of the first slice (along the normal)
    direction: np.ndarray  # 3×3, rows: row direction, column direction, slice normal (LPS)
    sop_uids: list[str]  # in volume (slice) order
    series_uid: str
    study_uid: str
    datasets: Sequence[pydicom.Dataset]  # in volume order, pixel data loaded

    def sitk_image(self, array: np.ndarray | None = None):
        """This geometry as a SimpleITK image (for NIfTI): spacing x,y,z; direction as columns."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.hu if array is None else array)
        dz, dy, dx = self.spacing_zyx
        image.SetSpacing((dx, dy, dz))
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(float(v) for v in self.direction.T.flatten()))
        return image


def assemble_volume(paths: Sequence[Path | str]) -> Volume:
    """Slices sorted by their position along the slice normal (not by InstanceNumber),
    rescale applied. Mixed orientation, mixed size, missing or irregular slices raise
    VolumeError with the reason."""
    if not paths:
        raise VolumeError("no files")
    datasets = [pydicom.dcmread(p) for p in paths]
    for ds in datasets:  # never mis-assembled: frames of one file are not slices of a series
        issue = multiframe_issue(str(ds.get("SOPClassUID", "")), int(ds.get("NumberOfFrames") or 1), ds.get("Modality"))
        if issue:
            raise VolumeError(issue)
    series = {str(ds.SeriesInstanceUID) for ds in datasets}
    if len(series) != 1:
        raise VolumeError(f"files of {len(series)} series given; a volume is one series")
    first = datasets[0]
    if "ImageOrientationPatient" not in first or "ImagePositionPatient" not in first:
        raise VolumeError("no ImageOrientationPatient/ImagePositionPatient: not a volume series")
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    for ds in datasets:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), orientation, atol=ORIENTATION_TOLERANCE):
            raise VolumeError(f"mixed orientation (instance {ds.get('InstanceNumber')})")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise VolumeError(f"mixed image size (instance {ds.get('InstanceNumber')})")
        if [float(v) for v in ds.PixelSpacing] != [float(v) for v in first.PixelSpacing]:
            raise VolumeError(f"mixed pixel spacing (instance {ds.get('InstanceNumber')})")
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    positions = np.array([np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), normal) for ds in datasets])
    order = np.argsort(positions)
    datasets = [datasets[i] for i in order]
    positions = positions[order]
    if len(datasets) > 1:
        gaps = np.diff(positions)
        if np.any(gaps < 1e-3):
            raise VolumeError("two slices at the same position")
        median = float(np.median(gaps))
        if np.any(gaps > 1.5 * median):
            missing = int(round(float(np.sum(gaps[gaps > 1.5 * median] / median - 1))))
            raise VolumeError(f"missing slices: about {missing} gap(s) along the normal")
        if (gaps.max() - gaps.min()) > SPACING_TOLERANCE * median + 1e-3:
            raise VolumeError(f"varying slice spacing ({gaps.min():.3f}–{gaps.max():.3f} mm)")
        # Our checks above give the reasons; highdicom builds the array and its geometry.
        try:
            volume = hd.get_volume_from_series(datasets, dtype=np.float32, apply_modality_transform=True,
                                               rtol=SPACING_TOLERANCE)
        except (ValueError, RuntimeError) as exc:
            raise VolumeError(f"highdicom cannot form a volume: {exc}") from exc
        if float(np.dot(volume.direction[:, 0], normal)) < 0:  # slices along the normal, as everywhere here
            volume = volume.flip_spatial((0,))
        hu = volume.array
        dz, dy, dx = (float(v) for v in volume.spacing)
        x, y, z = (float(v) for v in volume.position)
    else:  # one slice is no series for highdicom: its own thickness is the third spacing
        hu = first.pixel_array.astype(np.float32)[None] * float(first.get("RescaleSlope", 1) or 1) + float(
            first.get("RescaleIntercept", 0) or 0)
        dy, dx = (float(v) for v in first.PixelSpacing)
        dz = float(first.get("SliceThickness") or 1.0)
        x, y, z = (float(v) for v in first.ImagePositionPatient)
    return Volume(
        hu=hu,
        spacing_zyx=(dz, dy, dx),
        origin=(x, y, z),
        direction=np.stack([row, col, normal]),
        sop_uids=[str(ds.SOPInstanceUID) for ds in datasets],
        series_uid=str(first.SeriesInstanceUID),
        study_uid=str(first.StudyInstanceUID),
        datasets=datasets,
    )


@dataclass
class LabelVolume:
    """Labels painted into one volume, and what the overlap rule decided."""

    labels: np.ndarray  # (z, y, x) uint8, 0 = background
    overlap_voxels: int  # voxels that two or more labels claim
    hidden_voxels: dict[str, int]  # per label: its voxels that a label on top took


def seg_masks(seg_path: Path | str, volume: Volume, labels: Collection[str]) -> dict[str, np.ndarray]:
    """The SEG's segments with these SegmentLabels as masks aligned to `volume`, one per label
    (the union of its segments); labels the SEG lacks are left out."""
    seg = hd.seg.segread(seg_path)
    numbers = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    wanted = [n for n, label in numbers.items() if label in labels]
    if not wanted:
        return {}
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=volume.sop_uids,
        segment_numbers=wanted,
        combine_segments=False,
        assert_missing_frames_are_empty=True,
    )  # (slices, rows, cols, segments)
    masks: dict[str, np.ndarray] = {}
    for index, number in enumerate(wanted):
        mask = pixels[..., index] > 0
        label = numbers[number]
        masks[label] = masks[label] | mask if label in masks else mask
    return masks


def paint_labels(masks: Mapping[str, np.ndarray], label_ids: Mapping[str, int],
                 priority: Sequence[str] = ()) -> LabelVolume:
    """One label volume from possibly overlapping masks. Where masks overlap, the voxel takes
    the first label of `priority` it belongs to; labels not listed come after, the smaller
    structure (fewer voxels) on top, so a tumour inside a liver survives whatever the segment
    numbers. Masks of labels not in `label_ids` are ignored."""
    names = [name for name in masks if name in label_ids]
    shape = next(iter(masks.values())).shape if masks else (0, 0, 0)
    sizes = {name: int(masks[name].sum()) for name in names}
    rank = {name: i for i, name in enumerate(priority)}
    on_top_first = sorted(names, key=lambda n: (0, rank[n], 0, n) if n in rank else (1, 0, sizes[n], n))
    out = np.zeros(shape, dtype=np.uint8)
    claimed = np.zeros(shape, dtype=bool)
    overlap = np.zeros(shape, dtype=bool)
    hidden: dict[str, int] = {}
    for name in on_top_first:
        mask = masks[name]
        taken = mask & claimed
        hidden[name] = int(taken.sum())
        overlap |= taken
        out[mask & ~claimed] = label_ids[name]
        claimed |= mask
    return LabelVolume(out, int(overlap.sum()), hidden)


def seg_labels(seg_path: Path | str, volume: Volume, label_ids: Mapping[str, int],
               priority: Sequence[str] = ()) -> np.ndarray:
    """The SEG's segments as one label volume aligned to `volume` (uint8, 0 = background).
    Segments are mapped by their SegmentLabel to `label_ids`; unknown labels are ignored;
    overlaps follow `paint_labels`."""
    masks = seg_masks(seg_path, volume, label_ids)
    if not masks:
        return np.zeros(volume.hu.shape, dtype=np.uint8)
    return paint_labels(masks, label_ids, priority).labels
