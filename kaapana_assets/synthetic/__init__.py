"""Deterministic multi-site CT phantom generator: the data of every demo, test and benchmark."""

from kaapana_assets.synthetic.generator import GeneratedStudy, generate_site, generate_sites
from kaapana_assets.synthetic.phantom import LABELS, Phantom, make_phantom
from kaapana_assets.synthetic.profiles import SITE_PROFILES, SiteProfile, get_profile

__all__ = [
    "GeneratedStudy",
    "generate_site",
    "generate_sites",
    "LABELS",
    "Phantom",
    "make_phantom",
    "SITE_PROFILES",
    "SiteProfile",
    "get_profile",
]
