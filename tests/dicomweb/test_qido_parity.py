"""QIDO-RS parity with Orthanc's DICOMweb plugin (Debian orthanc + orthanc-dicomweb): the same
files in both, the same queries (each level, each kind of matching, includefield, paging) to
both, and for every object returned the same attributes with the same values.

Set aside, on purpose (docs/dicomweb.md): RetrieveURL values (each server names itself; the
attribute must be in both); Orthanc's SpecificCharacterSet (DICOM JSON is UTF-8 whatever the
files' character set, so we do not return one); includefield=all, which Orthanc answers with
its defaults only while we return every attribute the index holds (ours must then hold all of
Orthanc's, equal). Orthanc answers 200 where we answer 400/404 (an unknown attribute, an
unknown study in the path): those are status-code tests in test_qido.py, not queries here.

Orthanc listens on every interface, so the exchange runs inside a private network namespace
(`unshare -n`, as root): this file, run as a script, is what runs in there."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest

from bench import orthanc
from kaapana_assets.archive.service import Archive
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.pipeline import ingest_files
from kaapana_assets.synthetic import GeneratedStudy
from tests.helpers import REPO, can_unshare

pytestmark = pytest.mark.slow  # Orthanc's start and stop cost seconds

SPECIFIC_CHARACTER_SET = "00080005"
RETRIEVE_URL = "00081190"
UID_KEY = {"studies": "0020000D", "series": "0020000E", "instances": "00080018"}


def _queries(studies: list[GeneratedStudy]) -> list[str]:
    first, last = studies[0], studies[-1]
    ds = pydicom.dcmread(first.ct_files[0], stop_before_pixels=True)
    sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in first.ct_files[:2]]
    dates = sorted(pydicom.dcmread(s.ct_files[0], stop_before_pixels=True).StudyDate for s in studies)
    study, series, seg = first.study_uid, first.series_uid, first.seg_series_uid
    pid = ds.PatientID
    # Written as sent, unescaped: Orthanc 1.10's DICOMweb plugin does not decode percent-escapes
    # in query values (PatientName=Phantom%5E* finds nothing there), and no value here needs one.
    assert all(c.isalnum() or c in "-^" for c in pid + str(ds.PatientName))
    return [
        # studies
        "/studies",
        f"/studies?PatientID={pid}",
        f"/studies?00100020={pid}",
        "/studies?PatientName=phantom^*",
        f"/studies?PatientName=*{str(ds.PatientName).split('^')[1][:-1]}?",
        f"/studies?PatientName={str(ds.PatientName).lower()}",
        f"/studies?StudyDate={dates[1]}-{dates[-2]}",
        f"/studies?StudyDate={dates[2]}-",
        f"/studies?StudyDate=-{dates[2]}",
        f"/studies?StudyDate={dates[0]}",
        "/studies?StudyTime=0900-1000",
        f"/studies?StudyInstanceUID={study},{last.study_uid}",
        "/studies?ModalitiesInStudy=SEG",
        "/studies?AccessionNumber=A*",
        "/studies?includefield=StudyDescription",
        "/studies?includefield=00081030&includefield=all",
        "/studies?limit=2&offset=1",
        # series
        f"/studies/{study}/series",
        "/series",
        "/series?Modality=SEG",
        f"/series?PatientID={pid}&Modality=CT",
        f"/series?SeriesInstanceUID={series},{seg}",
        "/series?SeriesNumber=300",
        f"/studies/{study}/series?includefield=all",
        "/series?limit=3&offset=2",
        # instances
        f"/studies/{study}/series/{series}/instances",
        f"/studies/{study}/series/{seg}/instances",
        f"/studies/{study}/instances",
        f"/studies/{study}/instances?Modality=SEG",
        f"/instances?SOPInstanceUID={','.join(sops)}",
        f"/instances?InstanceNumber=2&PatientID={pid}",
        f"/studies/{study}/series/{series}/instances?limit=2&offset=1",
    ]


def _unpaged(query: str) -> str:
    path, _, params = query.partition("?")
    kept = [p for p in params.split("&") if p and not p.startswith(("limit=", "offset="))]
    return path + ("?" + "&".join(kept) if kept else "")


@pytest.mark.skipif(not can_unshare(), reason="needs root and unshare -n to confine Orthanc to a private loopback")
@pytest.mark.tools(*orthanc.TOOLS)
def test_qido_answers_as_orthanc_does(corpus: dict[str, list[GeneratedStudy]], tmp_path: Path) -> None:
    studies = [s for site_studies in corpus.values() for s in site_studies]
    home = KaapanaHome(tmp_path / "home")
    ingest_files([f for s in studies for f in s.files], Archive.for_home(home), remove_sources=False)
    queries = _queries(studies)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"home": str(home.root), "files": [str(f) for s in studies for f in s.files],
                                    "queries": queries}))
    out = subprocess.run(["unshare", "-n", sys.executable, "-m", "tests.dicomweb.test_qido_parity", str(tmp_path),
                          str(manifest)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    answers = json.loads(out.stdout.strip().splitlines()[-1])

    differences = [d for query in queries for d in _differences(query, answers[query])]
    assert not differences, "\n".join(differences)


def _differences(query: str, answer: dict) -> list[str]:
    """How our answer to `query` differs from Orthanc's, one line each."""
    ours, theirs = answer["ours"], answer["orthanc"]
    if not ours["status"] == theirs["status"] == 200:
        return [f"{query}: status {ours['status']} (ours) vs {theirs['status']} (Orthanc)"]
    level = query.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    uid = UID_KEY[level]
    if not ours["body"]:
        return [f"{query}: nothing found, nothing compared"]
    if len(ours["body"]) != len(theirs["body"]):
        return [f"{query}: {len(ours['body'])} objects (ours) vs {len(theirs['body'])} (Orthanc)"]
    # Orthanc's whole answer to the query without paging: what each paged object must equal.
    reference = {o[uid]["Value"][0]: o for o in answer["orthanc_unpaged"]["body"]}
    out = []
    for obj in ours["body"]:
        key = obj[uid]["Value"][0]
        if key not in reference:
            out.append(f"{query}: {key} is not in Orthanc's answer")
            continue
        expected = dict(reference[key])
        expected.pop(SPECIFIC_CHARACTER_SET, None)
        got = dict(obj)
        if RETRIEVE_URL not in got or RETRIEVE_URL not in expected:
            out.append(f"{query}: RetrieveURL missing")
        got.pop(RETRIEVE_URL, None), expected.pop(RETRIEVE_URL, None)
        if "includefield=all" in query:
            got = {k: v for k, v in got.items() if k in expected}
        for k in sorted(set(got) | set(expected)):
            if got.get(k) != expected.get(k):
                out.append(f"{query}: {key} {k}: {got.get(k)} (ours) vs {expected.get(k)} (Orthanc)")
    return out


def _fetch(base: str, query: str) -> dict:
    request = urllib.request.Request(base + query, headers={"Accept": "application/dicom+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            body = response.read()
            return {"status": response.status, "body": json.loads(body) if body.strip() else []}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read().decode(errors="replace")[:500]}


def _in_namespace(workdir: Path, manifest: Path) -> None:
    """Inside `unshare -n`: Orthanc and `kaapana dicomweb` on the namespace's own loopback,
    the files uploaded to Orthanc over REST, every query asked of both. Prints the answers."""
    sys.path.insert(0, str(REPO))
    from bench.dicomweb_server import beside_orthanc

    spec = json.loads(manifest.read_text())
    with beside_orthanc(Path(spec["home"]), spec["files"], workdir / "orthanc") as (ours, pacs):
        answers = {
            query: {"ours": _fetch(ours.url, query), "orthanc": _fetch(pacs.url + "/dicom-web", query),
                    "orthanc_unpaged": _fetch(pacs.url + "/dicom-web", _unpaged(query))}
            for query in spec["queries"]
        }
        print(json.dumps(answers))


if __name__ == "__main__":
    _in_namespace(Path(sys.argv[1]), Path(sys.argv[2]))
