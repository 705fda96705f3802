"""A mutation fuzzer over the ingest: synthetic files in every transfer syntax and pydicom's
shipped files, mutated by bit flips, truncation, length and VR corruption, hostile values
and UIDs, and deep or huge sequences. Every input must be accounted for (indexed, already
indexed or quarantined, never an exception), nothing may be written or linked outside the
home, and the ingest's peak (Python) memory stays under a stated bound.

`make test` runs 300 inputs; `make test-all` runs 2,000 (slow); KAAPANA_FUZZ_INPUTS=20000
runs the long campaign."""

from __future__ import annotations

import os
import random
import struct
import tracemalloc
from pathlib import Path

import pydicom
import pytest

from kaapana_assets.archive.service import Archive
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.headers import Reason
from kaapana_assets.ingest.pipeline import ingest_files
from tests.helpers import EncodedCorpus

PEAK_BOUND = 256 * 2**20  # Python allocations of one ingest of the whole mutated corpus
VRS = [b"SS", b"SL", b"US", b"UL", b"FD", b"FL", b"UN", b"SQ", b"OB", b"OW", b"UI", b"CS", b"IS", b"DS", b"XX", b"\x00\x00"]
HOSTILE_UIDS = [b"../../etc/passwd", b"1.2.3/../../x", b"0" * 200, b"1.2.\x00.3", b"/abs/olute", b"1..2", b""]


def _seed_files(encoded_corpus: EncodedCorpus) -> list[bytes]:
    files = [fs[0] for fs in encoded_corpus.series.values()] + list(encoded_corpus.segs.values())
    shipped = Path(pydicom.__file__).parent / "data" / "test_files"
    files += sorted(p for p in shipped.rglob("*.dcm") if p.stat().st_size < 400_000)
    return [p.read_bytes() for p in files]


def _element_offsets(data: bytes) -> list[int]:
    """Plausible explicit-VR element header offsets (two upper-case letters after a tag)."""
    return [i - 4 for i in range(136, min(len(data), 20_000) - 2) if 65 <= data[i] <= 90 and 65 <= data[i + 1] <= 90
            and i % 2 == 0]


def _deep_sequence(depth: int) -> bytes:
    """(0008,1140) ReferencedImageSequence nested `depth` times, undefined lengths."""
    head = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    tail = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return head * depth + tail * depth


def _many_items(count: int) -> bytes:
    item = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
    return b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + item * count + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    kind = rng.randrange(9)
    offsets = _element_offsets(data) if kind in (2, 3, 4, 5) else []
    if kind == 0:  # bit flips
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncation
        return bytes(buf[: rng.randrange(len(buf))])
    elif kind == 2 and offsets:  # a length field set to something hostile
        at = rng.choice(offsets)
        value = rng.choice([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFFFFFE, len(buf), rng.randrange(1 << 32)])
        if buf[at + 4 : at + 6] in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL"):
            buf[at + 8 : at + 12] = struct.pack("<I", value)
        else:
            buf[at + 6 : at + 8] = struct.pack("<H", value & 0xFFFF)
    elif kind == 3 and offsets:  # a VR replaced
        at = rng.choice(offsets)
        buf[at + 4 : at + 6] = rng.choice(VRS)
    elif kind == 4 and offsets:  # a UID or text value replaced by a hostile one (same length field kept)
        at = rng.choice(offsets)
        length = struct.unpack_from("<H", buf, at + 6)[0]
        value = (rng.choice(HOSTILE_UIDS) + b"\x00" * length)[:length]
        buf[at + 8 : at + 8 + length] = value
    elif kind == 5 and offsets:  # an element duplicated or spliced elsewhere
        a, b = sorted(rng.sample(offsets, 2)) if len(offsets) > 1 else (offsets[0], offsets[0])
        buf[a:a] = buf[b : b + rng.randint(8, 64)]
    elif kind == 6:  # a deep sequence inserted after the file meta
        cut = min(len(buf), 400)
        buf[cut:cut] = _deep_sequence(rng.choice([20, 200, 5_000]))
    elif kind == 7:  # a huge item count
        cut = min(len(buf), 400)
        buf[cut:cut] = _many_items(rng.choice([1_000, 150_000]))
    else:  # random bytes overwritten in the header region
        start = rng.randrange(min(len(buf), 2_000))
        buf[start : start + 32] = rng.randbytes(32)
    return bytes(buf)


def _campaign(tmp_path: Path, encoded_corpus: EncodedCorpus, inputs: int, seed: int) -> None:
    rng = random.Random(seed)
    seeds = _seed_files(encoded_corpus)
    spool = tmp_path / "spool"
    spool.mkdir()
    for n in range(inputs):
        (spool / f"{n:06d}.dcm").write_bytes(mutate(rng.choice(seeds), rng))
    home = KaapanaHome(tmp_path / "home").ensure()
    outside_before = sorted(p for p in tmp_path.rglob("*") if home.root not in p.parents and p.parent != spool)
    tracemalloc.start()
    try:
        report = ingest_files(sorted(spool.iterdir()), Archive.for_home(home), workers=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    summary = report.summary()
    assert summary["failed"] == 0, [f.error for f in report.files if f.status == "failed"][:5]
    assert summary["indexed"] + summary["already_indexed"] + summary["quarantined"] == inputs, summary
    assert all(f.reason in set(Reason) for f in report.files if f.status == "quarantined")
    assert list(spool.iterdir()) == []
    # Nothing written outside the home, and the home holds regular files only, inside it.
    outside_after = sorted(p for p in tmp_path.rglob("*") if home.root not in p.parents and p.parent != spool)
    assert outside_after == outside_before
    for path in home.root.rglob("*"):
        assert not path.is_symlink(), path
        assert os.path.realpath(path).startswith(str(home.root.resolve()))
    assert peak < PEAK_BOUND, f"peak {peak / 2**20:.0f} MiB"
    print(f"\nfuzz: {inputs} inputs, {summary}, reasons {report.reasons}, peak {peak / 2**20:.0f} MiB")


def test_fuzz_small(tmp_path: Path, encoded_corpus: EncodedCorpus) -> None:
    _campaign(tmp_path, encoded_corpus, 300, seed=1)


@pytest.mark.slow
def test_fuzz_campaign(tmp_path: Path, encoded_corpus: EncodedCorpus) -> None:
    _campaign(tmp_path, encoded_corpus, int(os.environ.get("KAAPANA_FUZZ_INPUTS", "2000")), seed=2026)
