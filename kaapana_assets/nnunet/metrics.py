"""Dice, and a predictor's mean Dice per label on raw cases (validation after training, a
site's score of a federated global model)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from kaapana_assets.nnunet.prediction import predict


def dice(prediction: np.ndarray, truth: np.ndarray, label: int) -> float:
    p, t = prediction == label, truth == label
    total = int(p.sum() + t.sum())
    return float("nan") if total == 0 else 2.0 * float(np.logical_and(p, t).sum()) / total


def evaluate(predictor, raw_folder: Path, cases: list[str], labels: Mapping[str, int]) -> dict[str, float]:
    """Mean Dice per label of the predictor on raw cases (imagesTr vs labelsTr)."""
    import SimpleITK as sitk

    scores: dict[str, list[float]] = {name: [] for name in labels}
    for case in cases:
        image = sitk.ReadImage(str(raw_folder / "imagesTr" / f"{case}_0000.nii.gz"))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(raw_folder / "labelsTr" / f"{case}.nii.gz")))
        spacing = tuple(reversed(image.GetSpacing()))
        prediction = predict(predictor, sitk.GetArrayFromImage(image), spacing)
        for name, value in labels.items():
            score = dice(prediction, truth, value)
            if not np.isnan(score):
                scores[name].append(score)
    return {name: float(np.mean(v)) if v else float("nan") for name, v in scores.items()}
