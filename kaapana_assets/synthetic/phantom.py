"""A CT phantom in Hounsfield units: air, a body with a fat rim, a spine, a liver-like
ellipsoid and 0–3 hypodense lesions inside it, plus the exact label map."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kaapana_assets.synthetic.profiles import SiteProfile

# Label values of the reference annotation (nnU-Net convention: 0 is background).
LABELS: dict[str, int] = {"background": 0, "liver": 1, "lesion": 2}


@dataclass(frozen=True)
class Phantom:
    hu: np.ndarray  # (z, y, x) float32 Hounsfield units
    labels: np.ndarray  # (z, y, x) uint8, values from LABELS
    spacing_zyx: tuple[float, float, float]
    lesion_count: int


def make_phantom(profile: SiteProfile, rng: np.random.Generator) -> Phantom:
    nz, n = profile.slices, profile.matrix
    dz, dxy = profile.slice_thickness_mm, profile.pixel_spacing_mm
    # Physical coordinates in mm, centred on the volume.
    z = (np.arange(nz) - (nz - 1) / 2) * dz
    y = (np.arange(n) - (n - 1) / 2) * dxy
    x = (np.arange(n) - (n - 1) / 2) * dxy
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    fov = n * dxy

    hu = np.full((nz, n, n), -1000.0, dtype=np.float32)
    labels = np.zeros((nz, n, n), dtype=np.uint8)

    body_a, body_b = 0.42 * fov, 0.32 * fov
    body = (xx / body_a) ** 2 + (yy / body_b) ** 2
    hu[body <= 1.0] = -95.0  # subcutaneous fat
    hu[body <= 0.85**2] = 35.0  # soft tissue
    spine = (xx**2 + (yy - 0.2 * fov) ** 2) <= (0.06 * fov) ** 2
    hu[spine] = 450.0

    scale = float(np.clip(rng.normal(1.0, profile.organ_scale_sd), 0.7, 1.3))
    ax, ay, az = (a * scale for a in profile.organ_axes_mm)
    coverage = nz * dz
    az = min(az, 0.42 * coverage)
    ax, ay = min(ax, 0.3 * fov), min(ay, 0.24 * fov)
    cx = -0.12 * fov + rng.uniform(-0.03, 0.03) * fov
    cy = -0.04 * fov + rng.uniform(-0.03, 0.03) * fov
    cz = rng.uniform(-0.08, 0.08) * coverage
    liver = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 + ((zz - cz) / az) ** 2 <= 1.0
    hu[liver] = 62.0
    labels[liver] = LABELS["liver"]

    lesion_count = int(min(3, rng.poisson(profile.lesion_rate)))
    for _ in range(lesion_count):
        r = rng.uniform(0.15, 0.25) * min(ax, ay, az)
        # Keep the lesion centre well inside the organ so it is a lesion *of the liver*.
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        depth = rng.uniform(0.0, 0.5)
        lx, ly, lz = cx + u[0] * depth * ax, cy + u[1] * depth * ay, cz + u[2] * depth * az
        sphere = ((xx - lx) ** 2 + (yy - ly) ** 2 + (zz - lz) ** 2) <= r**2
        sphere &= liver
        hu[sphere] = 22.0
        labels[sphere] = LABELS["lesion"]

    hu += profile.hu_offset
    hu += rng.normal(0.0, profile.noise_hu, size=hu.shape).astype(np.float32)
    return Phantom(hu=hu, labels=labels, spacing_zyx=(dz, dxy, dxy), lesion_count=lesion_count)
