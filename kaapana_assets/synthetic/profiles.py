"""Scanner profiles per site. Sites differ the way hospitals do (vendor, slice thickness,
in-plane spacing, noise, calibration offset, patient population), so federated data are
non-IID on purpose."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class SiteProfile:
    name: str
    institution: str
    manufacturer: str
    model: str
    slice_thickness_mm: float
    pixel_spacing_mm: float
    slices: int
    matrix: int
    noise_hu: float
    hu_offset: float
    # Mean liver semi-axes (left-right, anterior-posterior, cranio-caudal) in mm; the site's
    # population varies around it by `organ_scale_sd`.
    organ_axes_mm: tuple[float, float, float]
    organ_scale_sd: float
    lesion_rate: float
    kvp: float = 120.0
    # Stored-pixel convention: unsigned with intercept -1024, or signed with intercept 0.
    signed_pixels: bool = False
    # Some scanners number instances head-to-feet, others feet-to-head.
    instance_numbers_descending: bool = False

    def resized(self, slices: int | None = None, matrix: int | None = None) -> "SiteProfile":
        """Same site, smaller grid (tests): the field of view and coverage stay the same."""
        slices = slices or self.slices
        matrix = matrix or self.matrix
        return dataclasses.replace(
            self,
            slices=slices,
            matrix=matrix,
            slice_thickness_mm=round(self.slice_thickness_mm * self.slices / slices, 3),
            pixel_spacing_mm=round(self.pixel_spacing_mm * self.matrix / matrix, 4),
        )


SITE_PROFILES: dict[str, SiteProfile] = {
    p.name: p
    for p in (
        SiteProfile(
            name="site-a",
            institution="Heidelberg University Hospital (synthetic)",
            manufacturer="SIEMENS",
            model="SOMATOM Force",
            slice_thickness_mm=3.0,
            pixel_spacing_mm=3.0,
            slices=48,
            matrix=128,
            noise_hu=12.0,
            hu_offset=0.0,
            organ_axes_mm=(75.0, 60.0, 55.0),
            organ_scale_sd=0.08,
            lesion_rate=1.2,
        ),
        SiteProfile(
            name="site-b",
            institution="Essen University Hospital (synthetic)",
            manufacturer="GE MEDICAL SYSTEMS",
            model="Revolution CT",
            slice_thickness_mm=5.0,
            pixel_spacing_mm=3.4,
            slices=32,
            matrix=112,
            noise_hu=20.0,
            hu_offset=12.0,
            organ_axes_mm=(85.0, 66.0, 60.0),
            organ_scale_sd=0.12,
            lesion_rate=0.6,
            signed_pixels=True,
        ),
        SiteProfile(
            name="site-c",
            institution="Dresden University Hospital (synthetic)",
            manufacturer="Philips",
            model="IQon Spectral CT",
            slice_thickness_mm=2.5,
            pixel_spacing_mm=3.8,
            slices=64,
            matrix=96,
            noise_hu=8.0,
            hu_offset=-8.0,
            organ_axes_mm=(68.0, 55.0, 50.0),
            organ_scale_sd=0.06,
            lesion_rate=2.0,
            instance_numbers_descending=True,
        ),
    )
}


def get_profile(site: str | SiteProfile) -> SiteProfile:
    if isinstance(site, SiteProfile):
        return site
    if site in SITE_PROFILES:
        return SITE_PROFILES[site]
    # Unknown names get a deterministic variant of a built-in profile, so
    # `kaapana synth --site my-hospital` works without configuration.
    base = list(SITE_PROFILES.values())[sum(site.encode()) % len(SITE_PROFILES)]
    return dataclasses.replace(base, name=site, institution=f"{site} (synthetic)")
