"""Overlap and surface-distance metrics of a predicted label against a reference, computed
with SimpleITK (ITK's filters), voxel spacing honoured, distances in millimetres.

- Dice: `LabelOverlapMeasuresImageFilter`.
- HD95, Hausdorff distance (the maximum) and ASSD: surface distances from `SignedMaurerDistanceMap` (exact Euclidean distance
  transform in mm) sampled on the other object's `LabelContour` (its surface voxels).
  HD95 is the larger of the two directed 95th percentiles (as medpy and MONAI define it),
  the Hausdorff distance the larger of the two maxima, so HD95 ≤ HD always holds.
  (`HausdorffDistanceImageFilter` measures between all voxels of the two objects, not their
  surfaces: for one object inside the other it can be smaller than the surface HD95.)
  ASSD is the mean over the surface voxels of both objects of their distance to the other
  surface.

Empty masks: both empty → Dice, HD95, HD and ASSD are undefined (None), as nnU-Net reports
NaN; one empty → Dice 0 and every distance undefined (None): there is no surface to measure
from. Volumes are always defined.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

Spacing = tuple[float, float, float]  # (z, y, x) in mm, as Volume.spacing_zyx


@dataclass(frozen=True)
class LabelMetrics:
    dice: float | None
    hd95_mm: float | None
    hausdorff_mm: float | None
    assd_mm: float | None
    reference_voxels: int
    predicted_voxels: int
    reference_ml: float
    predicted_ml: float

    @property
    def volume_difference_ml(self) -> float:
        """Predicted minus reference volume (ml): positive when the model over-segments."""
        return self.predicted_ml - self.reference_ml


def _image(mask: np.ndarray, spacing_zyx: Spacing) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
    dz, dy, dx = spacing_zyx
    image.SetSpacing((float(dx), float(dy), float(dz)))
    return image


def surface_distances(source: sitk.Image, target: sitk.Image) -> np.ndarray:
    """Distance (mm) from every surface voxel of `source` to the surface of `target`."""
    distance = sitk.Abs(sitk.SignedMaurerDistanceMap(target, insideIsPositive=False, squaredDistance=False,
                                                     useImageSpacing=True))
    surface = sitk.GetArrayFromImage(sitk.LabelContour(source, fullyConnected=False)) > 0
    return sitk.GetArrayFromImage(distance)[surface].astype(np.float64)


def label_metrics(reference: np.ndarray, predicted: np.ndarray, spacing_zyx: Spacing) -> LabelMetrics:
    """Metrics of one binary label: `reference` and `predicted` are boolean (z, y, x) masks on
    the same grid with `spacing_zyx` in mm."""
    if reference.shape != predicted.shape:
        raise ValueError(f"reference {reference.shape} and prediction {predicted.shape} are not on one grid")
    reference, predicted = reference.astype(bool), predicted.astype(bool)
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    n_ref, n_pred = int(reference.sum()), int(predicted.sum())
    volumes: dict[str, Any] = {"reference_voxels": n_ref, "predicted_voxels": n_pred,
                               "reference_ml": n_ref * voxel_ml, "predicted_ml": n_pred * voxel_ml}
    if not n_ref and not n_pred:
        return LabelMetrics(dice=None, hd95_mm=None, hausdorff_mm=None, assd_mm=None, **volumes)
    if not n_ref or not n_pred:
        return LabelMetrics(dice=0.0, hd95_mm=None, hausdorff_mm=None, assd_mm=None, **volumes)
    ref_image, pred_image = _image(reference, spacing_zyx), _image(predicted, spacing_zyx)
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(ref_image, pred_image)
    ref_to_pred = surface_distances(ref_image, pred_image)
    pred_to_ref = surface_distances(pred_image, ref_image)
    hd95 = max(float(np.percentile(ref_to_pred, 95)), float(np.percentile(pred_to_ref, 95)))
    assd = float((ref_to_pred.sum() + pred_to_ref.sum()) / (ref_to_pred.size + pred_to_ref.size))
    return LabelMetrics(dice=float(overlap.GetDiceCoefficient(1)), hd95_mm=hd95,
                        hausdorff_mm=max(float(ref_to_pred.max()), float(pred_to_ref.max())), assd_mm=assd,
                        **volumes)


def case_metrics(reference: np.ndarray, predicted: np.ndarray, spacing_zyx: Spacing,
                 label_ids: Mapping[str, int]) -> dict[str, LabelMetrics]:
    """Every label of `label_ids` (name → value in both label volumes), by name."""
    return {name: label_metrics(reference == value, predicted == value, spacing_zyx)
            for name, value in label_ids.items() if value}
