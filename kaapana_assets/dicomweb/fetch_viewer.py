"""`make viewer`: OHIF's published build fetched from the npm registry at install time, without
npm (Debian's `nodejs` ships none). The service never runs this; it serves what was fetched.

    python -m kaapana_assets.dicomweb.fetch_viewer --ohif-version 3.13.2 --integrity sha512-… build/ohif

(the Makefile pins the version and its integrity side by side).

The package's tarball is downloaded with urllib, checked against the pinned `dist.integrity`
(`npm view @ohif/app@<version> dist.integrity`: an SRI hash, sha512 in base64), and its `dist/`
and `LICENSE` extracted into a temporary folder beside the target, which replaces the target
only when complete: an interrupted or refused fetch leaves the previous build as it was.
Standard library only, so the system Python runs it before any venv exists."""

from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

REGISTRY = "https://registry.npmjs.org"
PACKAGE = "@ohif/app"
# npm packs every file of a package under this folder of its tarball.
PACKED = PurePosixPath("package")
# What the service needs of the package: its build, and the license that goes with it.
KEPT = (PACKED / "dist", PACKED / "LICENSE")
INDEX = Path("dist") / "index.html"
CHUNK = 1 << 20
TIMEOUT_S = 60


class ViewerFetchError(Exception):
    """The build could not be fetched or was refused; the message names the URL."""


@dataclass(frozen=True)
class NpmTarball:
    """One published version of an npm package, and the integrity its tarball must have."""

    url: str
    integrity: str  # SRI: "<algorithm>-<base64 digest>"

    @classmethod
    def of(cls, package: str, version: str, integrity: str) -> NpmTarball:
        """The registry's tarball URL: `@scope/name` → `@scope/name/-/name-<version>.tgz`."""
        name = package.rpartition("/")[2]
        return cls(f"{REGISTRY}/{package}/-/{name}-{version}.tgz", integrity)


def _hash(integrity: str, url: str) -> tuple[str, str]:
    algorithm, _, digest = integrity.partition("-")
    if algorithm not in ("sha256", "sha384", "sha512") or not digest:
        raise ViewerFetchError(f"{url}: {integrity!r} is not an SRI integrity (sha512-<base64>)")
    return algorithm, digest


def download(tarball: NpmTarball, into: Path) -> Path:
    """The tarball written to `into`, hashed as it streams; refused unless its digest is the
    pinned one."""
    algorithm, expected = _hash(tarball.integrity, tarball.url)
    digest = hashlib.new(algorithm)
    path = into / "package.tgz"
    try:
        with urllib.request.urlopen(tarball.url, timeout=TIMEOUT_S) as response, open(path, "wb") as file:
            while chunk := response.read(CHUNK):
                digest.update(chunk)
                file.write(chunk)
    except (urllib.error.URLError, OSError) as exc:  # HTTPError and timeouts included
        raise ViewerFetchError(f"could not download {tarball.url}: {exc}") from exc
    actual = base64.b64encode(digest.digest()).decode()
    if actual != expected:
        raise ViewerFetchError(f"{tarball.url} does not have the pinned integrity: expected "
                               f"{algorithm}-{expected}, got {algorithm}-{actual}")
    return path


def extract(path: Path, into: Path, url: str) -> None:
    """`package/dist` and `package/LICENSE` extracted to `into/dist` and `into/LICENSE`. Every
    member is checked by tarfile's `data` filter first (no absolute or `..` paths, no links
    leading out, no devices): one unsafe member refuses the whole tarball, before anything is
    written."""
    staging = into / "unpacked"
    try:
        with tarfile.open(path, "r:gz") as archive:
            members = archive.getmembers()
            for member in members:
                tarfile.data_filter(member, str(staging))
            kept = [m for m in members
                    if any(PurePosixPath(m.name) == k or k in PurePosixPath(m.name).parents for k in KEPT)]
            archive.extractall(staging, members=kept, filter="data")
    except (tarfile.TarError, OSError) as exc:  # FilterError is a TarError
        raise ViewerFetchError(f"{url}: refused to extract the tarball: {exc}") from exc
    for kept_path in KEPT:
        source = staging.joinpath(*kept_path.parts)
        if not source.exists():
            raise ViewerFetchError(f"{url}: the tarball has no {kept_path}")
        source.rename(into / kept_path.name)
    shutil.rmtree(staging)
    if not (into / INDEX).is_file():
        raise ViewerFetchError(f"{url}: the tarball's build has no {PACKED / INDEX}")


def fetch_viewer(tarball: NpmTarball, target: Path) -> None:
    """OHIF's build in `target` (`dist/`, `LICENSE`), replacing what was there only once the new
    one is complete."""
    target = target.absolute()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Beside the target, so that the renames below stay on one file system.
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise ViewerFetchError(f"cannot write beside {target}: {exc}") from exc
    new, old = work / "new", work / "old"
    try:
        new.mkdir()
        extract(download(tarball, work), new, tarball.url)
        try:
            if target.exists():
                target.rename(old)  # removed with `work`, once the new build is in place
            new.rename(target)
        except OSError as exc:
            if old.exists() and not target.exists():
                old.rename(target)
            raise ViewerFetchError(f"cannot move the new build to {target}: {exc}") from exc
    finally:
        if target.exists() or not old.exists():  # the previous build stays while nothing replaces it
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("target", type=Path, help="the folder that receives dist/ and LICENSE")
    parser.add_argument("--ohif-version", required=True)
    parser.add_argument("--integrity", required=True, help="the version's dist.integrity (sha512-<base64>)")
    args = parser.parse_args(argv)
    try:
        fetch_viewer(NpmTarball.of(PACKAGE, args.ohif_version, args.integrity), args.target)
    except ViewerFetchError as exc:
        print(f"make viewer: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
