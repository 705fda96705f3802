"""Per-label statistics of a segmentation, and an overlay preview."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

COLOURS = [(230, 80, 60), (60, 180, 230), (250, 200, 40), (120, 220, 90), (200, 90, 220)]


def label_statistics(hu: np.ndarray, labels: np.ndarray, spacing_zyx: tuple[float, float, float],
                     label_names: Mapping[int, str]) -> list[dict[str, Any]]:
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    rows = []
    for value, name in sorted(label_names.items()):
        if not value:
            continue
        mask = labels == value
        count = int(mask.sum())
        if count == 0:
            rows.append({"label": name, "label_value": value, "voxel_count": 0, "volume_ml": 0.0,
                         "mean_hu": None, "min_hu": None, "max_hu": None, "bbox": []})
            continue
        values = hu[mask]
        rows.append({
            "label": name, "label_value": value, "voxel_count": count, "volume_ml": round(count * voxel_ml, 3),
            "mean_hu": round(float(values.mean()), 2), "min_hu": float(values.min()), "max_hu": float(values.max()),
            "bbox": bounding_box(mask),
        })
    return rows


def bounding_box(mask: np.ndarray) -> list[int]:
    """z0, z1, y0, y1, x0, x1 (inclusive) of a non-empty 3D mask, from its projections on each
    axis: no coordinate list of every voxel (np.argwhere) is built."""
    box = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box += [int(present[0]), int(present[-1])]
    return box


def overlay_png(hu: np.ndarray, labels: np.ndarray, size: int = 256, window: tuple[float, float] = (40.0, 400.0)) -> bytes:
    """The axial slice through the centre of the largest label, soft-tissue window, labels
    blended in colour."""
    top = int(labels.max()) if labels.size else 0
    if 0 < top <= 255:  # a few label values: one vectorised comparison each beats sorting every voxel
        counted = [(value, int(np.count_nonzero(labels == value))) for value in range(1, top + 1)]
        values = np.array([value for value, count in counted if count])
        counts = np.array([count for _, count in counted if count])
    else:
        values, counts = np.unique(labels[labels > 0], return_counts=True)
    if len(values):
        largest = values[np.argmax(counts)]
        per_slice = (labels == largest).sum(axis=(1, 2))  # the mean slice index of its voxels
        z = int(np.round(float(np.dot(np.arange(len(per_slice)), per_slice)) / float(per_slice.sum())))
    else:
        z = hu.shape[0] // 2
    centre, width = window
    grey = np.clip((hu[z] - (centre - width / 2)) / width * 255.0, 0, 255)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for i, value in enumerate(sorted(values)):
        mask = labels[z] == value
        rgb[mask] = 0.45 * rgb[mask] + 0.55 * np.array(COLOURS[i % len(COLOURS)])
    image = Image.fromarray(rgb.astype(np.uint8))
    image = image.resize((size, int(size * image.height / image.width)), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
