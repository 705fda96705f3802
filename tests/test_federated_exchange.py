"""Federated groundwork: sealed site updates, aggregation, quorum, and what may leave a site."""

from __future__ import annotations

import base64
import json

import dagster as dg
import pytest
import torch

from kaapana_assets.federated.aggregation import QuorumNotMet, coordinate_median, fedavg, require_quorum
from kaapana_assets.federated.exchange import UpdateRejected, generate_site_key, open_sealed, read_manifest, seal
from kaapana_assets.federated.guard import leaked_identifiers, site_identifiers
from kaapana_assets.federated.payload import PayloadError, SiteUpdate, pack_update, unpack_update
from kaapana_assets.lake import Lake

KEYS = {"site-a": generate_site_key(), "site-b": generate_site_key()}


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.full((2, 3), value), "norm.num_batches_tracked": torch.tensor(int(value))}


def _sealed(site: str = "site-a", round_: int = 2, value: float = 1.0) -> bytes:
    payload = pack_update(_weights(value), cases=3, metrics={"val_dice_liver": 0.8})
    return seal(payload, KEYS[site], "exp1", round_, site, cases=3)


def test_sealed_update_round_trip() -> None:
    manifest, payload = open_sealed(_sealed(), KEYS["site-a"], "exp1", 2, "site-a")
    update = unpack_update("site-a", payload)
    assert (manifest.round, manifest.cases, update.cases) == (2, 3, 3)
    assert torch.equal(update.weights["conv.weight"], torch.full((2, 3), 1.0))
    assert update.metrics == {"val_dice_liver": 0.8}


def test_tampered_update_is_rejected() -> None:
    envelope = bytearray(_sealed())
    envelope[-5] ^= 0x01  # one bit of the ciphertext
    with pytest.raises(UpdateRejected) as exc:
        open_sealed(bytes(envelope), KEYS["site-a"], "exp1", 2, "site-a")
    assert exc.value.reason == "unauthentic"


def test_edited_manifest_is_rejected() -> None:
    head, _, body = _sealed().partition(b"\n")
    manifest = json.loads(head)
    manifest["cases"] = 1000  # claim more cases to weigh more in FedAvg
    forged = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode() + b"\n" + body
    with pytest.raises(UpdateRejected) as exc:
        open_sealed(forged, KEYS["site-a"], "exp1", 2, "site-a")
    assert exc.value.reason == "unauthentic"


def test_foreign_update_is_rejected() -> None:
    # site-b's update dropped where site-a's belongs, relabelled as site-a.
    head, _, body = _sealed("site-b").partition(b"\n")
    manifest = json.loads(head)
    manifest["site"] = "site-a"
    relabelled = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode() + b"\n" + body
    with pytest.raises(UpdateRejected) as exc:
        open_sealed(relabelled, KEYS["site-a"], "exp1", 2, "site-a")
    assert exc.value.reason == "unauthentic"
    with pytest.raises(UpdateRejected) as exc:
        open_sealed(_sealed("site-b"), KEYS["site-a"], "exp1", 2, "site-a")
    assert exc.value.reason == "wrong_site"


def test_replayed_update_is_rejected() -> None:
    old = _sealed(round_=1)
    assert read_manifest(old).round == 1
    with pytest.raises(UpdateRejected) as exc:
        open_sealed(old, KEYS["site-a"], "exp1", 2, "site-a")
    assert exc.value.reason == "replayed"
    with pytest.raises(UpdateRejected) as exc:
        open_sealed(_sealed(), KEYS["site-a"], "exp2", 2, "site-a")
    assert exc.value.reason == "replayed"


def test_payload_carries_only_tensors_counts_and_metrics() -> None:
    with pytest.raises(PayloadError, match="metric name"):
        pack_update(_weights(1), 3, {"patient SITE-A-0001": 1.0})
    with pytest.raises(PayloadError, match="must be a number"):
        pack_update(_weights(1), 3, {"note": "Phantom^site"})  # type: ignore[dict-item]
    with pytest.raises(PayloadError, match="positive"):
        pack_update(_weights(1), 0, {})
    with pytest.raises(PayloadError, match="not a safetensors payload"):
        unpack_update("site-a", b"\x80\x04pickle")


def test_fedavg_weights_by_cases_and_median() -> None:
    a = SiteUpdate("site-a", 1, _weights(0.0))
    b = SiteUpdate("site-b", 3, _weights(4.0))
    averaged = fedavg([a, b])
    assert torch.allclose(averaged["conv.weight"], torch.full((2, 3), 3.0))  # (0·1 + 4·3) / 4
    assert averaged["norm.num_batches_tracked"].item() == 4  # counters: from the largest site
    c = SiteUpdate("site-c", 1, _weights(100.0))
    assert torch.allclose(coordinate_median([a, b, c])["conv.weight"], torch.full((2, 3), 4.0))
    with pytest.raises(ValueError, match="different network"):
        fedavg([a, SiteUpdate("site-d", 1, {"other": torch.zeros(1)})])


def test_quorum() -> None:
    updates = [SiteUpdate("site-a", 2, _weights(1)), SiteUpdate("site-b", 2, _weights(1))]
    require_quorum(updates, ["site-a", "site-b", "site-c"], min_sites=2)
    with pytest.raises(QuorumNotMet, match="missing: site-b, site-c"):
        require_quorum(updates[:1], ["site-a", "site-b", "site-c"], min_sites=2)


@pytest.mark.slow  # trains nnU-Net
def test_nothing_identifying_leaves_a_site(trained_site) -> None:  # type: ignore[no-untyped-def]
    """A real nnU-Net update of a site with ingested studies: neither the plaintext payload
    nor the sealed envelope contains a patient name or ID or any UID of the site's data."""
    from kaapana_assets.training.tracking import PRODUCTION

    tracking = trained_site.tracking()
    folder = tracking.download(tracking.version_by_alias("nnunet-liver-train", PRODUCTION))
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    weights = checkpoint["network_weights"]
    payload = pack_update(weights, cases=6, metrics={"val_dice_liver": 0.7, "train_loss": 0.4})
    envelope = seal(payload, KEYS["site-a"], "exp1", 1, "site-a", cases=6)
    identifiers = site_identifiers(Lake(trained_site.home.lake))
    assert len(identifiers) > 50  # patient IDs, names and hundreds of UIDs
    assert leaked_identifiers(payload, identifiers) == []
    assert leaked_identifiers(envelope, identifiers) == []
    # And the scan does find an identifier where one is present.
    some_uid = sorted(identifiers)[0]
    assert leaked_identifiers(payload + some_uid.encode(), identifiers) == [some_uid]
    assert len(unpack_update("site-a", payload).weights) == len(weights)


def test_median_of_an_even_number_of_sites_averages_the_middle_pair() -> None:
    """With two sites (the default quorum) torch.median would be an element-wise minimum."""
    import numpy as np

    rng = np.random.default_rng(3)
    for count in (2, 4):
        updates = [SiteUpdate(f"site-{i}", 1, {"conv.weight": torch.from_numpy(rng.normal(size=(2, 3)).astype(np.float32))})
                   for i in range(count)]
        expected = np.median(np.stack([u.weights["conv.weight"].numpy() for u in updates]), axis=0)
        assert np.allclose(coordinate_median(updates)["conv.weight"].numpy(), expected, atol=1e-6)


def test_a_malformed_site_key_is_a_configuration_error_not_tampering() -> None:
    """A bad key names the site when it is loaded; "unauthentic" stays for failed authentication."""
    from kaapana_assets.federated.exchange import InvalidSiteKey, generate_site_key, open_sealed, seal
    from resources.federation import FederatedSite

    key = generate_site_key()
    envelope = seal(b"payload", key, "exp", 1, "site-a", 3)
    for bad in ("not base64!!", base64.b64encode(b"short").decode()):
        with pytest.raises(InvalidSiteKey, match="site 'site-a'"):
            open_sealed(envelope, bad, "exp", 1, "site-a")
        with pytest.raises(dg.Failure, match="site 'site-b'"):
            FederatedSite(name="site-b", key=bad).secret()
    with pytest.raises(UpdateRejected) as exc:
        open_sealed(envelope, generate_site_key(), "exp", 1, "site-a")
    assert exc.value.reason == "unauthentic"
