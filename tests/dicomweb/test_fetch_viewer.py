"""`make viewer`'s fetch without the network: tarballs made here, served as file:// URLs through
the same urllib download. A good one replaces the build; a wrong integrity, an unsafe member or
an unreachable URL is refused, naming the URL, and leaves the previous build as it was."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from kaapana_assets.dicomweb.fetch_viewer import NpmTarball, ViewerFetchError, fetch_viewer, main

INDEX = b"<!doctype html><title>OHIF Viewer</title>"


def tarball(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> NpmTarball:
    """A gzipped tarball of `files` (member name → bytes) and symbolic `links` (name → where it
    points) at `path`, with its sha512 integrity."""
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
        for name, points_to in (links or {}).items():
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, points_to
            archive.addfile(link)
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()
    return NpmTarball(path.as_uri(), integrity)


PACKAGE = {"package/dist/index.html": INDEX, "package/dist/app.bundle.js": b"console.log('ohif')",
           "package/LICENSE": b"MIT", "package/package.json": b"{}", "package/src/index.js": b""}


@pytest.fixture
def previous(tmp_path: Path) -> Path:
    """A build already in place, which a refused fetch must leave untouched."""
    target = tmp_path / "build" / "ohif"
    (target / "dist").mkdir(parents=True)
    (target / "dist" / "index.html").write_bytes(b"previous")
    return target


def test_the_package_build_replaces_the_previous_one(tmp_path: Path, previous: Path) -> None:
    fetch_viewer(tarball(tmp_path / "app.tgz", PACKAGE), previous)
    assert sorted(p.relative_to(previous).as_posix() for p in previous.rglob("*")) == [
        "LICENSE", "dist", "dist/app.bundle.js", "dist/index.html"]
    assert (previous / "dist" / "index.html").read_bytes() == INDEX
    assert sorted(p.name for p in previous.parent.iterdir()) == ["ohif"]  # no temporary folder left


def test_a_wrong_integrity_is_refused_naming_the_url(tmp_path: Path, previous: Path) -> None:
    good = tarball(tmp_path / "app.tgz", PACKAGE)
    wrong = NpmTarball(good.url, "sha512-" + base64.b64encode(hashlib.sha512(b"other").digest()).decode())
    with pytest.raises(ViewerFetchError, match=f"{good.url} does not have the pinned integrity"):
        fetch_viewer(wrong, previous)
    assert (previous / "dist" / "index.html").read_bytes() == b"previous"
    assert sorted(p.name for p in previous.parent.iterdir()) == ["ohif"]


@pytest.mark.parametrize(("files", "links"), [
    ({"../escaped": b"x"}, {}),
    ({"package/dist/../../../escaped": b"x"}, {}),
    ({}, {"package/dist/escaped": "../../../escaped"}),
    ({}, {"package/dist/escaped": "/etc/passwd"}),
], ids=["dotdot", "dotdot-inside-dist", "link-out", "absolute-link"])
def test_a_member_leading_out_refuses_the_whole_tarball(tmp_path: Path, previous: Path, files: dict[str, bytes],
                                                        links: dict[str, str]) -> None:
    source = tarball(tmp_path / "app.tgz", {**PACKAGE, **files}, links)
    with pytest.raises(ViewerFetchError, match="refused to extract the tarball"):
        fetch_viewer(source, previous)
    assert not list(tmp_path.parent.rglob("escaped"))
    assert (previous / "dist" / "index.html").read_bytes() == b"previous"
    assert sorted(p.name for p in previous.parent.iterdir()) == ["ohif"]


def test_a_tarball_without_the_build_is_refused(tmp_path: Path, previous: Path) -> None:
    source = tarball(tmp_path / "app.tgz", {"package/LICENSE": b"MIT", "package/dist/app.bundle.js": b""})
    with pytest.raises(ViewerFetchError, match="no package/dist/index.html"):
        fetch_viewer(source, previous)
    assert (previous / "dist" / "index.html").read_bytes() == b"previous"


def test_an_unreachable_url_is_refused_naming_it(tmp_path: Path, previous: Path) -> None:
    missing = (tmp_path / "missing.tgz").as_uri()
    with pytest.raises(ViewerFetchError, match=f"could not download {missing}"):
        fetch_viewer(NpmTarball(missing, "sha512-AAAA"), previous)
    assert (previous / "dist" / "index.html").read_bytes() == b"previous"


def test_the_command_prints_one_line_naming_the_registry_url(previous: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    # Refused before any download: not an SRI integrity.
    assert main(["--ohif-version", "3.13.2", "--integrity", "md5-AAAA", str(previous)]) == 1
    assert capsys.readouterr().err == ("make viewer: https://registry.npmjs.org/@ohif/app/-/app-3.13.2.tgz: "
                                       "'md5-AAAA' is not an SRI integrity (sha512-<base64>)\n")
    assert (previous / "dist" / "index.html").read_bytes() == b"previous"
