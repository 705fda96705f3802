"""The federation file: which sites take part, the key each signs with, and the public key
its SuperNode authenticates with at the SuperLink. Read by the hub's resource and by the
ServerApp (which runs in a process the SuperLink starts, so it reads the file itself).

    sites:
      - name: site-a
        key_env: KAAPANA_KEY_SITE_A        # or key_file: /secrets/site-a.key, or key: <base64>
        public_key: keys/site-a.pub        # EC (NIST curve), OpenSSH format; relative to this file
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from kaapana_assets.federation.keys import InvalidSiteKey, validate_site_key
from kaapana_assets.federation.store import checked_name


class FederationConfigError(ValueError):
    pass


@dataclass(frozen=True)
class SiteEntry:
    name: str
    key: str = ""
    key_env: str = ""
    key_file: str = ""
    public_key: str = ""

    def secret(self, base: Path | None = None) -> str:
        key = self.key
        if not key and self.key_env:
            # A secret, named by the federation file: read where it is used, by design, never
            # carried in an Environment or a resource's config (which the UI shows).
            key = os.environ.get(self.key_env, "")
        if not key and self.key_file:
            path = Path(self.key_file)
            path = path if path.is_absolute() or base is None else base / path
            key = path.read_text().strip() if path.exists() else ""
        if not key:
            raise FederationConfigError(f"no key for site {self.name}: set key, key_env or key_file")
        try:
            return validate_site_key(key, self.name)
        except InvalidSiteKey as exc:
            raise FederationConfigError(str(exc)) from None


def read_sites(path: str | Path) -> list[SiteEntry]:
    path = Path(path)
    if not path.exists():
        raise FederationConfigError(f"federation file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    entries = data.get("sites") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise FederationConfigError(f"{path} lists no sites (a list under `sites:`)")
    sites = []
    for entry in entries:
        if not isinstance(entry, dict) or "name" not in entry:
            raise FederationConfigError(f"{path}: every site needs a name, got {entry!r}")
        unknown = set(entry) - {"name", "key", "key_env", "key_file", "public_key"}
        if unknown:
            raise FederationConfigError(f"{path}: site {entry['name']} has unknown fields {sorted(unknown)}")
        sites.append(SiteEntry(**{k: str(v) for k, v in entry.items()}))
        checked_name("site", sites[-1].name)
    if len({s.name for s in sites}) != len(sites):
        raise FederationConfigError(f"{path} names a site twice")
    return sites


def write_sites(path: Path, sites: list[SiteEntry]) -> Path:
    entries = [{k: v for k, v in vars(s).items() if v} for s in sites]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"sites": entries}, sort_keys=False))
    return path


def load_site_keys(path: str | Path) -> dict[str, str]:
    path = Path(path)
    return {site.name: site.secret(path.parent) for site in read_sites(path)}
