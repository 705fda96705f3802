"""What crosses Flower's channel: signed messages (tampered, foreign, replayed and
mislabelled ones rejected), aggregation by Flower's strategies, quorum, local DP, and
what may leave a site. Real Flower records and messages; no network here."""

from __future__ import annotations

import base64
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from kaapana_assets.federated.aggregation import QuorumNotMet, aggregate, aggregate_round, require_quorum
from kaapana_assets.federated.hub import ExperimentSpec, Privacy, publish_experiment
from kaapana_assets.federated.privacy import noise_stdv, privatize
from kaapana_assets.federated.strategy import Strategy
from kaapana_assets.federation.channel import (
    ALIASES,
    ARRAYS,
    MANIFEST,
    METRICS,
    Kind,
    UpdateRejected,
    content_bytes,
    from_arrays,
    full_arrays,
    metrics_of,
    metrics_record,
    seal,
    to_arrays,
    verify,
    weight_records,
    weights_of,
)
from kaapana_assets.federation.guard import leaked_identifiers, site_identifiers
from kaapana_assets.federation.keys import InvalidSiteKey, generate_site_key
from kaapana_assets.federation.payload import PayloadError, pack_update, unpack_update
from kaapana_assets.federation.sites import FederationConfigError, SiteEntry, load_site_keys, read_sites, write_sites
from kaapana_assets.federation.store import FederationStore
from kaapana_assets.lake import Lake
from resources.federation import FederationResource

KEYS = {"site-a": generate_site_key(), "site-b": generate_site_key()}


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.full((2, 3), value), "conv.bias": torch.full((3,), value)}


def _update(site: str = "site-a", round_: int = 2, value: float = 1.0, cases: int = 3) -> RecordDict:
    content = RecordDict({ARRAYS: to_arrays(_weights(value)), METRICS: metrics_record(cases, {"train_loss": 0.5})})
    return seal(content, Kind.UPDATE, "exp1", round_, site, cases, KEYS[site])


pytestmark = pytest.mark.usefixtures("flower_run")  # every test here builds Messages


def _reply(content: RecordDict) -> Message:
    return Message(content, 1, "train")


def test_signed_update_round_trip() -> None:
    content = _update()
    manifest = verify(content, KEYS["site-a"], Kind.UPDATE, "exp1", 2, "site-a")
    assert (manifest.round, manifest.cases, manifest.kind) == (2, 3, "update")
    assert metrics_of(content) == (3, {"train_loss": 0.5})
    assert torch.equal(from_arrays(content[ARRAYS])["conv.weight"], torch.full((2, 3), 1.0))


def _aliased_state_dict() -> dict[str, torch.Tensor]:
    """nnU-Net's naming: the encoder appears twice, conv/norm again as all_modules.0/1."""
    conv, norm = torch.randn(4, 2, 3), torch.randn(4)
    return {"encoder.conv.weight": conv, "encoder.all_modules.0.weight": conv,
            "decoder.encoder.conv.weight": conv.clone(), "encoder.norm.bias": norm,
            "encoder.all_modules.1.bias": norm, "zeros.a": torch.zeros(3), "zeros.b": torch.zeros(3),
            "zeros.int": torch.zeros(3, dtype=torch.int64), "head.bias": torch.randn(2)}


def test_weights_travel_once_per_distinct_array_and_come_back_whole() -> None:
    weights = _aliased_state_dict()
    records = weight_records(weights)
    sent = records[ARRAYS]
    assert isinstance(sent, ArrayRecord)
    # conv once (three names), norm once, zeros once per dtype, head: 5 arrays for 9 names
    assert len(sent.keys()) == 5 and len(records[ALIASES]) == 4
    content = seal(RecordDict({**records, METRICS: metrics_record(2, {})}), Kind.UPDATE, "exp1", 1, "site-a", 2,
                   KEYS["site-a"])
    verify(content, KEYS["site-a"], Kind.UPDATE, "exp1", 1, "site-a")
    back = weights_of(content)
    assert list(back) and set(back) == set(weights)
    for name, tensor in weights.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    # every name its own tensor again (safetensors refuses shared storage)
    assert len({t.data_ptr() for t in back.values()}) == len(back)
    # the alias map is content: rewiring a name to another array breaks the digest
    content[ALIASES] = ConfigRecord({**dict(content[ALIASES]), "zeros.b": "head.bias"})
    with pytest.raises(UpdateRejected) as exc:
        verify(content, KEYS["site-a"], Kind.UPDATE, "exp1", 1, "site-a")
    assert exc.value.reason == "digest_mismatch"


def test_local_dp_clips_and_noises_each_parameter_once() -> None:
    start = _aliased_state_dict()
    trained = {k: v + 1.0 if v.is_floating_point() else v for k, v in start.items()}
    conv = trained["encoder.conv.weight"]
    trained["encoder.all_modules.0.weight"] = conv  # still one parameter under two names
    privacy = Privacy(epsilon=2.0, delta=1e-5, clipping_norm=0.5, sensitivity=0.5)
    private = privatize(trained, start, privacy)
    assert torch.equal(private["encoder.conv.weight"], private["encoder.all_modules.0.weight"])
    assert len(weight_records(private)[ARRAYS].keys()) < len(private)  # still sent once
    assert torch.equal(private["zeros.int"], trained["zeros.int"])  # integers untouched


def test_an_alias_map_that_does_not_fit_the_arrays_is_refused() -> None:
    records = weight_records(_aliased_state_dict())
    for aliases in ({"x": "no-such-array"}, {"head.bias": "encoder.norm.bias"}):
        with pytest.raises(ValueError, match="alias map"):
            full_arrays(RecordDict({ARRAYS: records[ARRAYS], ALIASES: ConfigRecord(aliases)}))


def test_an_update_altered_in_transit_is_rejected() -> None:
    content = _update()
    array = content[ARRAYS]["conv.weight"]
    data = bytearray(array.data)
    data[-1] ^= 0x01  # one bit of one weight
    array.data = bytes(data)
    with pytest.raises(UpdateRejected) as exc:
        verify(content, KEYS["site-a"], Kind.UPDATE, "exp1", 2, "site-a")
    assert exc.value.reason == "digest_mismatch"
    # Editing the manifest to match (a new digest) breaks its HMAC instead.
    manifest = dict(content[MANIFEST])
    import hashlib
    manifest["sha256"] = hashlib.sha256(content_bytes(content)).hexdigest()
    content[MANIFEST] = ConfigRecord(manifest)
    with pytest.raises(UpdateRejected) as exc:
        verify(content, KEYS["site-a"], Kind.UPDATE, "exp1", 2, "site-a")
    assert exc.value.reason == "unauthentic"


def test_foreign_replayed_and_mislabelled_messages_are_rejected() -> None:
    with pytest.raises(UpdateRejected) as exc:  # signed with another site's key
        verify(_update("site-b"), KEYS["site-a"], Kind.UPDATE, "exp1", 2, "site-b")
    assert exc.value.reason == "unauthentic"
    with pytest.raises(UpdateRejected) as exc:  # site-b's message presented as site-a's
        verify(_update("site-b"), KEYS["site-a"], Kind.UPDATE, "exp1", 2, "site-a")
    assert exc.value.reason == "wrong_site"
    with pytest.raises(UpdateRejected) as exc:  # round 1's update replayed in round 2
        verify(_update(round_=1), KEYS["site-a"], Kind.UPDATE, "exp1", 2, "site-a")
    assert exc.value.reason == "replayed"
    with pytest.raises(UpdateRejected) as exc:  # another experiment
        verify(_update(), KEYS["site-a"], Kind.UPDATE, "exp2", 2, "site-a")
    assert exc.value.reason == "replayed"
    with pytest.raises(UpdateRejected) as exc:  # a site's update is not the hub's global weights
        verify(_update(), KEYS["site-a"], Kind.TRAIN, "exp1", 2, "site-a")
    assert exc.value.reason == "replayed"
    with pytest.raises(UpdateRejected) as exc:
        verify(RecordDict({}), KEYS["site-a"], Kind.UPDATE, "exp1", 2, "site-a")
    assert exc.value.reason == "malformed"


def test_payload_carries_only_tensors_counts_and_metrics() -> None:
    with pytest.raises(PayloadError, match="metric name"):
        pack_update(_weights(1), 3, {"patient SITE-A-0001": 1.0})
    with pytest.raises(PayloadError, match="must be a number"):
        pack_update(_weights(1), 3, {"note": "Phantom^site"})  # type: ignore[dict-item]
    with pytest.raises(PayloadError, match="positive"):
        pack_update(_weights(1), 0, {})
    with pytest.raises(PayloadError, match="not a safetensors payload"):
        unpack_update("site-a", b"\x80\x04pickle")


def test_flower_strategies_aggregate_as_their_definitions_say() -> None:
    """FedAvg weights by the reported case count; FedMedian and FedTrimmedAvg are robust to
    one wild site. Same arithmetic as numpy on the stacked updates."""
    a, b = _update("site-a", value=0.0, cases=1), _update("site-b", value=4.0, cases=3)
    start = _weights(0.0)
    averaged = aggregate([_reply(a), _reply(b)], 2, Strategy.FEDAVG, reference=start)
    assert torch.allclose(averaged["conv.weight"], torch.full((2, 3), 3.0))  # (0·1 + 4·3) / 4
    assert averaged["conv.weight"].dtype == torch.float32
    assert torch.allclose(aggregate([_reply(_update("site-a", value=0.0, cases=1)), _reply(_update("site-b", value=4.0))],
                                    2, "fedprox", reference=start)["conv.bias"], torch.full((3,), 3.0))
    rng = np.random.default_rng(3)
    values = [rng.normal(size=(2, 3)).astype(np.float32) for _ in range(5)]
    values[0] *= 1000  # one wild site

    def replies() -> list[Message]:  # FedMedian consumes the arrays of the messages it aggregates
        return [_reply(RecordDict({ARRAYS: ArrayRecord({"conv.weight": to_arrays({"w": torch.from_numpy(v)})["w"]}),
                                   METRICS: metrics_record(1, {})})) for v in values]

    stacked = np.stack(values)
    median = aggregate(replies(), 1, Strategy.MEDIAN)["conv.weight"].numpy()
    assert np.allclose(median, np.median(stacked, axis=0), atol=1e-6)
    trimmed = aggregate(replies(), 1, Strategy.TRIMMED_MEAN)["conv.weight"].numpy()
    ordered = np.sort(stacked, axis=0)[1:-1]  # beta 0.2 of 5 trims one at each end
    assert np.allclose(trimmed, ordered.mean(axis=0), atol=1e-5)
    with pytest.raises(ValueError, match="unknown strategy 'krum'; one of fedavg, fedavgm, fedprox, median, "
                                         "trimmed_mean"):
        Strategy.parse("krum")
    with pytest.raises(ValueError, match="lacks"):
        aggregate([_reply(a)], 1, Strategy.FEDAVG, reference={**start, "extra": torch.zeros(1)})


def test_fedavgm_carries_the_server_momentum_from_round_to_round(tmp_path: Path) -> None:
    """FedAvgM (Hsu et al. 2019, Flower's implementation): v_r = m·v_{r-1} + (w_{r-1} − mean_r),
    w_r = w_{r-1} − v_r. The momentum lives one round in Flower's strategy; the hub hands it in."""
    start = _weights(0.0)
    first = aggregate_round([_reply(_update("site-a", value=2.0)), _reply(_update("site-b", value=4.0))], 1,
                            Strategy.FEDAVGM, reference=start, server_momentum=0.5)
    assert torch.allclose(first.weights["conv.weight"], torch.full((2, 3), 3.0))  # no momentum yet: FedAvg
    assert first.momentum is not None and set(first.momentum) == set(start)
    assert torch.allclose(first.momentum["conv.weight"], torch.full((2, 3), -3.0))
    second = aggregate_round([_reply(_update("site-a", value=4.0, round_=2)), _reply(_update("site-b", value=4.0,
                                                                                           round_=2))],
                             2, Strategy.FEDAVGM, reference=first.weights, server_momentum=0.5, momentum=first.momentum)
    # v = 0.5·(−3) + (3 − 4) = −2.5 → w = 3 + 2.5
    assert torch.allclose(second.weights["conv.weight"], torch.full((2, 3), 5.5))
    assert second.momentum is not None and torch.allclose(second.momentum["conv.bias"], torch.full((3,), -2.5))
    store = FederationStore(tmp_path)  # the hub keeps it beside the round's global model
    store.write_momentum("exp1", 2, second.momentum)
    assert all(torch.equal(store.read_momentum("exp1", 2)[k], v) for k, v in second.momentum.items())
    with pytest.raises(FileNotFoundError, match="not aggregated with fedavgm"):
        store.read_momentum("exp1", 1)
    assert aggregate_round([_reply(_update("site-a"))], 1, Strategy.FEDAVG, reference=start).momentum is None
    with pytest.raises(ValueError, match="needs the global model"):
        aggregate_round([_reply(_update("site-a"))], 1, Strategy.FEDAVGM, server_momentum=0.5)
    with pytest.raises(ValueError, match="does not fit"):
        aggregate_round([_reply(_update("site-a"))], 2, Strategy.FEDAVGM, reference=start, server_momentum=0.5,
                        momentum={"conv.weight": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"server momentum in \(0, 1\)"):
        ExperimentSpec(experiment="e", cohort="c", labels=["liver"], rounds=1, min_sites=1, strategy="fedavgm",
                       schedule={})
    with pytest.raises(ValueError, match="server momentum is fedavgm's"):
        ExperimentSpec(experiment="e", cohort="c", labels=["liver"], rounds=1, min_sites=1, strategy="fedavg",
                       schedule={}, server_momentum=0.5)


def test_quorum() -> None:
    require_quorum(["site-a", "site-b"], ["site-a", "site-b", "site-c"], min_sites=2)
    with pytest.raises(QuorumNotMet, match="missing: site-b, site-c"):
        require_quorum(["site-a"], ["site-a", "site-b", "site-c"], min_sites=2)


def test_local_dp_clips_the_update_and_adds_the_calibrated_noise() -> None:
    start = {"w": torch.zeros(100_000)}
    trained = {"w": torch.full((100_000,), 0.01)}  # update norm 3.16
    loose = Privacy(clipping_norm=1.0, epsilon=1e9, delta=1e-5)  # ~no noise: clipping alone
    clipped = privatize(trained, start, loose)["w"]
    assert abs(float(clipped.norm()) - 1.0) < 1e-3 and clipped.dtype == torch.float32
    private = Privacy(clipping_norm=1.0, epsilon=2.0, delta=1e-5, sensitivity=0.001)
    noisy = privatize(trained, start, private)["w"] - clipped
    assert abs(float(noisy.std()) - noise_stdv(private)) < 0.05 * noise_stdv(private)
    assert noise_stdv(private) == pytest.approx(0.001 * np.sqrt(2 * np.log(1.25 / 1e-5)) / 2.0)


def test_federation_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = generate_site_key()
    (tmp_path / "b.key").write_text(key + "\n")
    monkeypatch.setenv("KAAPANA_TEST_KEY_A", KEYS["site-a"])
    path = write_sites(tmp_path / "federation.yaml", [SiteEntry("site-a", key_env="KAAPANA_TEST_KEY_A"),
                                                     SiteEntry("site-b", key_file="b.key")])
    assert load_site_keys(path) == {"site-a": KEYS["site-a"], "site-b": key}
    (tmp_path / "bad.yaml").write_text("sites:\n  - name: ../x\n    key: abc\n")
    with pytest.raises(ValueError, match="not allowed"):
        read_sites(tmp_path / "bad.yaml")
    (tmp_path / "twice.yaml").write_text("sites:\n  - name: a\n  - name: a\n")
    with pytest.raises(FederationConfigError, match="twice"):
        read_sites(tmp_path / "twice.yaml")
    with pytest.raises(FederationConfigError, match="lists no sites"):
        (tmp_path / "empty.yaml").write_text("sites: []\n")
        read_sites(tmp_path / "empty.yaml")


def test_a_malformed_site_key_is_a_configuration_error_not_tampering(tmp_path: Path) -> None:
    """A bad key names the site when it is loaded; "unauthentic" stays for failed authentication."""
    for bad in ("not base64!!", base64.b64encode(b"short").decode()):
        with pytest.raises(InvalidSiteKey, match="site 'site-a'"):
            verify(_update(), bad, Kind.UPDATE, "exp1", 2, "site-a")
        path = write_sites(tmp_path / "f.yaml", [SiteEntry("site-b", key=bad)])
        with pytest.raises(FederationConfigError, match="site 'site-b'"):
            load_site_keys(path)
    with pytest.raises(UpdateRejected) as exc:
        verify(_update(), generate_site_key(), Kind.UPDATE, "exp1", 2, "site-a")
    assert exc.value.reason == "unauthentic"


@pytest.mark.slow  # trains nnU-Net
def test_nothing_identifying_leaves_a_site(trained_site) -> None:  # type: ignore[no-untyped-def]
    """A real nnU-Net update of a site with ingested studies, as the Flower message that
    would leave the site: no patient name or ID or any UID of the site's data in it."""
    from kaapana_assets.nnunet.registry import find_version

    tracking = trained_site.tracking()
    folder = tracking.download(find_version(tracking, "nnunet-liver-train"))
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    weights = checkpoint["network_weights"]
    payload = pack_update(weights, cases=6, metrics={"val_dice_liver": 0.7, "train_loss": 0.4})
    update = unpack_update("site-a", payload)
    message = seal(RecordDict({ARRAYS: to_arrays(update.weights), METRICS: metrics_record(6, update.metrics)}),
                   Kind.UPDATE, "exp1", 1, "site-a", 6, KEYS["site-a"])
    identifiers = site_identifiers(Lake(trained_site.home.lake))
    assert len(identifiers) > 50  # patient IDs, names and hundreds of UIDs
    assert leaked_identifiers(payload, identifiers) == []
    assert leaked_identifiers(content_bytes(message), identifiers) == []
    # And the scan does find an identifier where one is present.
    some_uid = sorted(identifiers)[0]
    assert leaked_identifiers(payload + some_uid.encode(), identifiers) == [some_uid]
    assert len(from_arrays(message[ARRAYS])) == len(weights)


def test_spec_refuses_hostile_names() -> None:
    with pytest.raises(ValueError, match="not allowed"):
        ExperimentSpec("../etc", "liver-train", ["liver"], 1, 1, "fedavg", {})
    with pytest.raises(ValueError, match="not allowed"):
        FederationStore("/tmp/x").message_path("exp", 1, "update", "../../site")
    with pytest.raises(ValueError, match="unknown strategy"):
        ExperimentSpec("exp", "liver-train", ["liver"], 1, 1, "krum", {})


def test_round_chain_sensor_requests_next_round_then_model(tmp_path: Path) -> None:
    import definitions
    from sensors.federated_rounds import federated_round_chain

    store = FederationStore(tmp_path / "federation")
    publish_experiment(store, ExperimentSpec("chain", "liver-train", ["liver"], 2, 1, "fedavg", {}))
    federation = FederationResource(folder=str(store.root))
    with dg.instance_for_test() as instance, dg.partition_loading_context(dynamic_partitions_store=instance):
        instance.add_dynamic_partitions("federated_experiments", ["chain"])
        instance.report_runless_asset_event(dg.AssetMaterialization("federated_rounds", partition="chain|1"))
        # The first tick only notes where history ends: finished rounds are not re-run.
        first = federated_round_chain(dg.build_sensor_context(
            instance=instance, definitions=definitions.defs, resources={"federation": federation}))
        assert not first.run_requests
        requests = []
        cursor = first.cursor
        for r in (1, 2):
            instance.report_runless_asset_event(dg.AssetMaterialization("federated_rounds", partition=f"chain|{r}"))
            context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=definitions.defs,
                                              resources={"federation": federation})
            result = federated_round_chain(context)
            requests.extend(result.run_requests)
            cursor = result.cursor
        assert (requests[0].job_name, requests[0].partition_key) == ("federated_round", "chain|2")
        assert (requests[1].job_name, requests[1].partition_key) == ("register_federated_model", "chain")
