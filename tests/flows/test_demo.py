"""`kaapana demo` as a user runs it, end to end (the session fixture demo_home), and the
lineage of one of its segmentations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kaapana_assets.cli import main
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import COHORT_MEMBERS, FEDERATED_ROUNDS, QUARANTINE, SEGMENTATIONS, STUDIES


@pytest.mark.slow  # the whole demo
@pytest.mark.timeout(1500)
def test_demo_end_to_end(demo_home: Path, capsys: pytest.CaptureFixture) -> None:
    assert (demo_home / "exit_code").read_text() == "0"
    lake = Lake(demo_home / "kaapana" / "lake")
    # site-a's annotated studies + the new one; the truncated file in quarantine
    assert lake.read(STUDIES).height == 4
    assert lake.read(QUARANTINE)["reason"].to_list() == ["truncated"]
    # site-b and site-c ingested at their own homes; nothing of theirs is in the hub's lake
    for site in ("site-b", "site-c"):
        assert Lake(demo_home / "kaapana" / "sites" / site / "lake").read(STUDIES).height == 3
    rounds = lake.read(FEDERATED_ROUNDS)
    assert sorted(rounds.filter(rounds["site"] == "global")["round"].to_list()) == [1, 2, 3]
    assert set(rounds.filter(rounds["status"] == "aggregated")["site"]) == {"site-a", "site-b", "site-c"}
    segs = lake.read(SEGMENTATIONS)
    assert segs.height and set(segs["model_name"]) == {"nnunet-liver-train"}
    assert (demo_home / "dagster" / "dagster.yaml").exists()
    assert os.listdir(demo_home / "dagster" / "storage")  # runs recorded on the persistent instance


@pytest.mark.slow  # the whole demo
@pytest.mark.timeout(1500)
def test_lineage_of_a_demo_segmentation(demo_home: Path, capsys: pytest.CaptureFixture) -> None:
    lake = Lake(demo_home / "kaapana" / "lake")
    seg = lake.read(SEGMENTATIONS).row(0, named=True)
    capsys.readouterr()
    assert main(["lineage", seg["seg_sop_instance_uid"], "--home", str(demo_home / "kaapana")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"model nnunet-liver-train v{seg['model_version']}" in out
    assert "federated experiment liver-fed: 3 round(s)" in out
    assert "round 1: site-a" in out and "round 3: site-a" in out
    assert "this site: cohort liver-train v" in out and "Delta versions read: series v" in out
    assert "other sites: cohort versions and members stay at the sites" in out
    sources = lake.read(COHORT_MEMBERS)["series_uid"].to_list()
    assert any(uid in out for uid in sources)  # source series UIDs …
    assert "SOP " in out and f"segmented series {seg['series_uid']}" in out  # … and SOP UIDs
    assert "project(s) of the segmented series: admin" in out
    # by the segmented series UID too; an unknown UID is a clear error
    assert main(["lineage", seg["series_uid"], "--home", str(demo_home / "kaapana")]) == 0
    assert main(["lineage", "1.2.3.4", "--home", str(demo_home / "kaapana")]) == 2


@pytest.mark.slow  # the whole demo
@pytest.mark.timeout(1500)
def test_the_demo_prints_the_epsilon_dp_accounting_gives(demo_home: Path) -> None:
    """The demo's mechanism, per site and round: the update clipped to L2 norm 40, Gaussian
    noise of multiplier 5e-5 (σ 0.002), on all of the site's training cases (sampling fraction
    1); three rounds, each site sending in each. ε at δ 1e-5 is dp-accounting's RDP accountant's
    for that composition: in the rounds table, in what the demo printed, under the budget."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    from kaapana_assets.demo import DEMO_PRIVACY

    clipping_norm, noise_multiplier, delta, rounds = 40.0, 5e-5, 1e-5, 3
    assert (DEMO_PRIVACY.clipping_norm, DEMO_PRIVACY.delta) == (clipping_norm, delta)
    assert DEMO_PRIVACY.noise_stdv == pytest.approx(noise_multiplier * clipping_norm, rel=1e-12)
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.GaussianDpEvent(noise_multiplier)),
                       rounds)
    reference = accountant.get_epsilon(delta)

    rounds_table = Lake(demo_home / "kaapana" / "lake").read(FEDERATED_ROUNDS)
    last = rounds_table.filter(rounds_table["round"] == rounds)
    spent = dict(zip(last["site"], last["epsilon"], strict=True))
    assert spent == {site: pytest.approx(reference, rel=1e-9) for site in ("site-a", "site-b", "site-c", "global")}
    assert reference <= DEMO_PRIVACY.max_epsilon
    printed = " ".join((demo_home / "demo.out").read_text().split())
    print(f"ε per site after the demo's {rounds} rounds (δ {delta:g}): {reference:.6g}")
    assert (f"privacy spent (RDP accountant, δ {delta:g}, budget {DEMO_PRIVACY.max_epsilon:g}): "
            + ", ".join(f"{site} ε {reference:.4g} after round {rounds}" for site in ("site-a", "site-b", "site-c"))
            in printed)
