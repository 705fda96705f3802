"""The federated plan's fingerprint: each site summarizes its nnU-Net dataset locally and
sends only aggregates; the hub combines them into one nnU-Net fingerprint and plans.

What a site sends (per site, never images or voxel samples):
  spacings, shapes after cropping and relative sizes (nnU-Net's own per-case analysis),
  and of the foreground intensities: count, sum, sum of squares, min, max and a histogram
  with 1-unit bins over [-2048, 8191].
How exact the combination is:
  mean, std, min and max are exact (moments add up); the median and the 0.5/99.5
  percentiles come from the summed histogram: exact to the bin for integer-valued data
  (CT in HU after an integer rescale), within one unit otherwise. nnU-Net's own
  single-site fingerprint *samples* foreground voxels with replacement, so the federated
  figures are at least as exact as the centralized ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

HIST_LOW, HIST_HIGH = -2048, 8191


class FederationError(ValueError):
    pass


@dataclass
class SiteFingerprint:
    site: str
    cases: int
    labels: dict[str, int]
    channel_names: dict[str, str]
    spacings: list[list[float]]
    shapes_after_crop: list[list[int]]
    relative_sizes: list[float]
    count: int
    total: float
    total_sq: float
    minimum: float
    maximum: float
    histogram: list[int]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SiteFingerprint":
        return cls(**json.loads(text))


def site_fingerprint(raw_folder: Path, site: str) -> SiteFingerprint:
    """Summarize a site's nnU-Net raw dataset (run at the site)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    dataset_json = json.loads((raw_folder / "dataset.json").read_text())
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (raw_folder / "imagesTr").glob("*_0000.nii.gz"))
    if not cases:
        raise FederationError(f"{raw_folder} has no training cases")
    histogram = np.zeros(HIST_HIGH - HIST_LOW + 1, dtype=np.int64)
    spacings, shapes, sizes = [], [], []
    count, total, total_sq, low, high = 0, 0.0, 0.0, np.inf, -np.inf
    reader = SimpleITKIO()
    for case in cases:
        image_file = str(raw_folder / "imagesTr" / f"{case}_0000.nii.gz")
        label_file = str(raw_folder / "labelsTr" / f"{case}.nii.gz")
        shape, spacing, _, _, relative = DatasetFingerprintExtractor.analyze_case(
            [image_file], label_file, SimpleITKIO, num_samples=1)
        spacings.append([float(s) for s in spacing])
        shapes.append([int(s) for s in shape])
        sizes.append(float(relative))
        images, _ = reader.read_images([image_file])
        segmentation, _ = reader.read_seg(label_file)
        values = images[0][segmentation[0] > 0].astype(np.float64)
        if values.size:
            count += int(values.size)
            total += float(values.sum())
            total_sq += float(np.square(values).sum())
            low, high = min(low, float(values.min())), max(high, float(values.max()))
            bins = np.clip(np.rint(values).astype(np.int64), HIST_LOW, HIST_HIGH) - HIST_LOW
            histogram += np.bincount(bins, minlength=histogram.size)
    if count == 0:
        raise FederationError(f"site {site}: no foreground voxels in its labels")
    return SiteFingerprint(
        site=site, cases=len(cases), labels=dataset_json["labels"], channel_names=dataset_json["channel_names"],
        spacings=spacings, shapes_after_crop=shapes, relative_sizes=sizes, count=count, total=total,
        total_sq=total_sq, minimum=low, maximum=high, histogram=histogram.tolist(),
    )


def _percentile(histogram: np.ndarray, q: float) -> float:
    """Nearest-rank percentile of the values the histogram counts."""
    cumulative = np.cumsum(histogram)
    rank = max(1, int(np.ceil(q / 100.0 * cumulative[-1])))
    return float(np.searchsorted(cumulative, rank) + HIST_LOW)


def aggregate_fingerprints(sites: list[SiteFingerprint]) -> dict:
    """One nnU-Net dataset_fingerprint.json from the sites' summaries. Labels and channels
    must agree: one plan serves every site."""
    if not sites:
        raise FederationError("no site fingerprints to aggregate")
    reference = sites[0]
    for s in sites[1:]:
        if s.labels != reference.labels:
            raise FederationError(f"labels of {s.site} {s.labels} differ from {reference.site} {reference.labels}")
        if s.channel_names != reference.channel_names:
            raise FederationError(f"channels of {s.site} differ from {reference.site}")
    count = sum(s.count for s in sites)
    mean = sum(s.total for s in sites) / count
    variance = max(sum(s.total_sq for s in sites) / count - mean * mean, 0.0)
    histogram = np.sum([np.asarray(s.histogram, dtype=np.int64) for s in sites], axis=0)
    return {
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": max(s.maximum for s in sites), "mean": mean, "median": _percentile(histogram, 50.0),
                "min": min(s.minimum for s in sites), "percentile_00_5": _percentile(histogram, 0.5),
                "percentile_99_5": _percentile(histogram, 99.5), "std": float(np.sqrt(variance)),
            }
        },
        "median_relative_size_after_cropping": float(np.median([r for s in sites for r in s.relative_sizes])),
        "shapes_after_crop": [shape for s in sites for shape in s.shapes_after_crop],
        "spacings": [spacing for s in sites for spacing in s.spacings],
    }


def plan_at_hub(fingerprint: dict, sites: list[SiteFingerprint], raw_dataset: Path, preprocessed_dataset: Path,
                dataset_id: int) -> dict:
    """Plan with nnU-Net's ExperimentPlanner from the aggregated fingerprint alone: the hub's
    raw folder holds a dataset.json naming the reader (so no image is needed) and no image.
    Call inside nnunet_environment. Returns the plans every site will use."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset

    cases = sum(s.cases for s in sites)
    raw_dataset.mkdir(parents=True, exist_ok=True)
    preprocessed_dataset.mkdir(parents=True, exist_ok=True)
    dataset_json = {
        "channel_names": sites[0].channel_names, "labels": sites[0].labels, "numTraining": cases,
        "file_ending": ".nii.gz", "overwrite_image_reader_writer": "SimpleITKIO",
        # Case entries only; the images stay at their sites (the planner reads none).
        "dataset": {f"case{i:04d}": {"images": [os.devnull], "label": os.devnull} for i in range(cases)},
        "description": "federated: planned from aggregated site fingerprints",
    }
    (raw_dataset / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    (preprocessed_dataset / "dataset_fingerprint.json").write_text(json.dumps(fingerprint, indent=2))
    _, plans_identifier = plan_experiment_dataset(dataset_id)
    return json.loads((preprocessed_dataset / f"{plans_identifier}.json").read_text())
