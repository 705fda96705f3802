"""Federated vs centralized vs site-alone nnU-Net, Dice on every site's held-out data.

    python bench/federated.py [--train 6] [--test 10] [--rounds 16] [--local-epochs 1] [--iterations 12]
        [--strategy fedavg] [--seed 0] [--no-baselines] [--no-cross-site] [--threads N]

Three synthetic non-IID sites (three scanner profiles). Each site has `--train` annotated
studies in its own KAAPANA_HOME and `--test` held-out studies no model ever trains on.
  - federated: the production path — federated_plan, `--rounds` federated_rounds and
    federated_model through Dagster; a LocalFederation (a Flower SuperLink and one SuperNode
    per site, on loopback) carries every plan and round as one Flower run, and each site's
    ClientApp materializes site_update/site_evaluation into the site's own Dagster instance.
    Every site trains `--local-epochs` × `--iterations` per round from the global weights.
  - centralized: the sites' training patients pooled in one lake, one nnU-Net trained for
    rounds × local epochs (the same number of epochs each federated site trained).
  - centralized ×3: the same, with as many gradient steps as the three sites made together.
  - site-alone: each site trains on its own patients only, the same budget.
Every model predicts every site's held-out studies; the table shows Dice of the liver per
site and the mean, and the ratios federated / centralized and federated / centralized ×3
(the same total gradient steps; goal ≥ 0.98).

Then the platform's own answer (unless --no-cross-site): each site's held-out studies are
also in its own lake as cohort liver-test, every site consents to cross-site evaluation,
and cross_site_evaluation trains each site's local baseline over Flower (the federation's
plan, initial network and schedule) and has every site evaluate the global model and
every baseline on its liver-test. The matrix (data site × model owner, mean Dice of the
liver) is printed with every row where the global model is worse than the site's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SITES = ("site-a", "site-b", "site-c")
LIVER = 1


def main() -> int:
    from kaapana_assets.federated.strategy import Strategy

    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=6)
    parser.add_argument("--test", type=int, default=10)
    # 16 rounds of 12 local iterations: the sites synchronise every 12 steps. At 8 × 25 (the
    # same steps) the sites drift apart between averagings and two seeds differ by 0.007.
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--matrix", type=int, default=48)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--strategy", default=Strategy.FEDAVG.value, choices=[s.value for s in Strategy],
                        help="the federation's Flower strategy")
    parser.add_argument("--server-momentum", type=float, default=0.9, help="fedavgm's server momentum")
    parser.add_argument("--no-baselines", action="store_true", help="the federated row only (the centralized "
                        "and site-alone rows depend only on the seed: tuning the federation needs them once)")
    parser.add_argument("--no-cross-site", action="store_true", help="skip cross_site_evaluation")
    parser.add_argument("--seed", type=int, default=0, help="seeds every training (the federation's initial "
                        "network and each site's rounds; the centralized and site-alone models)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // len(SITES)),
                        help="torch threads per site's SuperNode (the sites train in parallel)")
    args = parser.parse_args()

    import dagster as dg
    import numpy as np

    from kaapana_assets import nnunet
    from kaapana_assets.archive.service import Archive
    from kaapana_assets.cohorts.definitions import CohortDefinition
    from kaapana_assets.cohorts.membership import CohortSnapshot, snapshot_cohort
    from kaapana_assets.cohorts.tags import add_tag
    from kaapana_assets.federated.assets import cross_site_evaluation, federated_model, federated_plan, federated_rounds
    from kaapana_assets.federated.partitions import round_key
    from kaapana_assets.federation.keys import generate_site_key
    from kaapana_assets.federation.local import LocalFederation, LocalSite
    from kaapana_assets.federation.sites import SiteEntry, write_sites
    from kaapana_assets.federation.store import FederationStore
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.ingest.pipeline import ingest_files
    from kaapana_assets.ingest.volume import assemble_volume, seg_labels
    from kaapana_assets.lake import Lake
    from kaapana_assets.synthetic import generate_site
    from kaapana_assets.training.export import export_cohort
    from resources import site_resources
    from resources.federation import FederationResource

    cohort = CohortDefinition.model_validate({"name": "liver-train", "purpose": "train", "required_labels": ["liver"],
                                              "filter": {"modality": "CT", "has_reference_segmentation": True}})
    test_cohort = CohortDefinition.model_validate({
        "name": "liver-test", "purpose": "test", "required_labels": ["liver"],
        "filter": {"modality": "CT", "tags": ["held-out"], "has_reference_segmentation": True}})
    grid = {"slices": args.slices, "matrix": args.matrix}
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    schedule = nnunet.Schedule.preset(nnunet.SchedulePreset.TINY, epochs=args.rounds * args.local_epochs,
                                      iterations_per_epoch=args.iterations, base_features=args.width, seed=args.seed)
    timings: dict[str, float] = {}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pooled = KaapanaHome(root / "pooled").ensure()
        homes, keys, train, test = {}, {}, {}, {}
        # The liver-train versions cut before any held-out study is ingested: every model here
        # trains on these (a cut taken later would take the held-out studies in too).
        training: dict[str, CohortSnapshot] = {}
        for i, site in enumerate(SITES):
            homes[site] = KaapanaHome(root / site).ensure()
            keys[site] = generate_site_key()
            train[site] = generate_site(site, args.train, seed=100 + i, out=root / "train", with_annotations=True,
                                        **grid)
            test[site] = generate_site(site, args.test, seed=200 + i, out=root / "test", with_annotations=True,
                                       first_index=1000, **grid)
            files = [f for s in train[site] for f in s.files]
            for home in (homes[site], pooled):
                ingest_files(files, Archive.for_home(home), remove_sources=False)
            training[site] = snapshot_cohort(Lake(homes[site].lake), cohort)
        training["pooled"] = snapshot_cohort(Lake(pooled.lake), cohort)
        # Each site's held-out studies in its own lake too, after liver-train was cut (its
        # version 1 is what the federation trains on), as the tagged cohort liver-test.
        for site in SITES:
            site_lake = Lake(homes[site].lake)
            ingest_files([f for s in test[site] for f in s.files], Archive.for_home(homes[site]), remove_sources=False)
            add_tag(site_lake, "held-out", [s.series_uid for s in test[site]])
            snapshot_cohort(site_lake, test_cohort)

        # Held-out volumes and reference labels, straight from the DICOM files.
        held_out = {}
        for site in SITES:
            held_out[site] = []
            for study in test[site]:
                volume = assemble_volume(study.ct_files)
                held_out[site].append((volume, seg_labels(study.seg_file, volume, {"liver": LIVER})))

        def score(model_folder: Path) -> dict[str, float]:
            predictor = nnunet.load_predictor(model_folder, args.device)
            return {site: statistics.mean(nnunet.dice(nnunet.predict(predictor, v.hu, v.spacing_zyx), truth, LIVER)
                                          for v, truth in cases) for site, cases in held_out.items()}

        results: dict[str, dict[str, float]] = {}

        # Federated, through the assets: a SuperLink for the hub, one SuperNode per site.
        t0 = time.perf_counter()
        hub = root / "hub"
        flower = LocalFederation(hub / "flower", [LocalSite(s, homes[s].root, keys[s], args.device, args.threads,
                                                             share_local_model=True) for s in SITES])
        try:
            flower.start()
            print(f"federation up: SuperLink {flower.connection.address}, {len(SITES)} SuperNodes "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
            federation = FederationResource(
                superlink=flower.connection.address, root_certificate=str(flower.connection.root_certificate),
                federation_file=str(write_sites(hub / "federation.yaml", [SiteEntry(s, key=keys[s]) for s in SITES])),
                folder=str(KaapanaHome(hub).hub_federation), rounds=args.rounds, min_sites=len(SITES), schedule="tiny",
                strategy=args.strategy, server_momentum=args.server_momentum,
                local_epochs=args.local_epochs, iterations_per_epoch=args.iterations, base_features=args.width,
                seed=args.seed)
            resources = {**site_resources(hub, device=args.device, promotion_dice=0.0), "federation": federation}
            with dg.instance_for_test() as instance:
                instance.add_dynamic_partitions("federated_experiments", ["bench"])
                dg.materialize([federated_plan], partition_key="bench", instance=instance, resources=resources,
                               run_config=quiet)
                for r in range(1, args.rounds + 1):
                    dg.materialize([federated_plan, federated_rounds], partition_key=round_key("bench", r),
                                   instance=instance, resources=resources, selection=[federated_rounds],
                                   run_config=quiet)
                    print(f"federated round {r}/{args.rounds} done ({time.perf_counter() - t0:.0f}s)", flush=True)
                dg.materialize([federated_rounds, federated_model], partition_key="bench", instance=instance,
                               resources=resources, selection=[federated_model], run_config=quiet)
                timings["federated"] = time.perf_counter() - t0
                if not args.no_cross_site:
                    t1 = time.perf_counter()
                    cross_site = dg.materialize(
                        [federated_model, cross_site_evaluation], partition_key="bench", instance=instance,
                        resources=resources, selection=[cross_site_evaluation],
                        run_config={**quiet, "ops": {"cross_site_evaluation": {"config": {"cohort": "liver-test"}}}})
                    matrix = cross_site.get_asset_materialization_events()[0].materialization.metadata
                    timings["cross-site"] = time.perf_counter() - t1
        finally:
            flower.close()
        store = FederationStore(KaapanaHome(hub).hub_federation)
        folder = nnunet.model_folder_from_weights(root / "models" / "federated", store.read_json("bench", "plans"),
                                                  store.read_json("bench", "dataset"),
                                                  store.read_global("bench", args.rounds))
        results["federated"] = score(folder)

        held_out_patients = {s.patient_id for site in SITES for s in test[site]}

        def train_alone(name: str, home: KaapanaHome, snapshot: CohortSnapshot,
                        schedule: nnunet.Schedule = schedule) -> Path:
            """nnU-Net on one lake's liver-train version, the patients the federated sites trained on."""
            t0 = time.perf_counter()
            lake = Lake(home.lake)
            paths = nnunet.NnunetPaths(root / "work" / name.replace(" ", "_"))
            raw = paths.raw / nnunet.dataset_name(1, name)
            export_cohort(lake, home.archive, snapshot, raw, ["liver"])
            cases = json.loads((raw / "cases.json").read_text())
            leaked = {c["patient_id"] for c in cases} & held_out_patients
            if leaked:
                raise SystemExit(f"{name}: {len(leaked)} held-out patients in the training export")
            held = set()
            for site in SITES:  # each site's own validation patients stay out, as in the federation
                mine = [(c["case"], c["patient_id"]) for c in cases
                        if c["patient_id"] in {s.patient_id for s in train[site]}]
                if mine:
                    held |= set(nnunet.patient_split(mine)["val"])
            split = {"train": sorted(c["case"] for c in cases if c["case"] not in held), "val": sorted(held)}
            nnunet.plan_and_preprocess(paths, 1)
            result = nnunet.train(paths, 1, schedule, split, args.device, 2)
            folder = nnunet.package_model(result, root / "models" / name.replace(" ", "_"))
            timings[name] = time.perf_counter() - t0
            print(f"{name}: {len(split['train'])} training cases, {time.perf_counter() - t0:.0f}s", flush=True)
            return folder

        if args.no_baselines:
            print(f"\nfederated ({args.strategy}, seed {args.seed}): "
                  + "  ".join(f"{s} {d:.3f}" for s, d in results["federated"].items())
                  + f"  mean {np.mean(list(results['federated'].values())):.3f}")
            if not args.no_cross_site:
                print_cross_site(matrix, timings["cross-site"])
            return 0
        results["centralized"] = score(train_alone("centralized", pooled, training["pooled"]))
        # The federation made len(SITES)× the gradient steps (every site trained the full
        # budget each round): a centralized model with that many steps too.
        results["centralized ×3"] = score(train_alone("centralized ×3", pooled, training["pooled"], dataclasses.replace(
            schedule, iterations_per_epoch=schedule.iterations_per_epoch * len(SITES))))
        for site in SITES:
            results[f"{site} alone"] = score(train_alone(f"{site} alone", homes[site], training[site]))

    print(f"\nliver Dice on held-out studies ({args.test} per site, grid {args.slices}×{args.matrix}²); "
          f"{args.rounds} rounds × {args.local_epochs} local epochs × {args.iterations} iterations, width {args.width}")
    header = f"{'model':16s}" + "".join(f"{s:>9s}" for s in SITES) + f"{'mean':>9s}{'time':>8s}"
    print(header)
    print("-" * len(header))
    for name, scores in results.items():
        mean = float(np.mean(list(scores.values())))
        print(f"{name:16s}" + "".join(f"{scores[s]:9.3f}" for s in SITES) + f"{mean:9.3f}"
              + f"{timings.get(name, float('nan')):7.0f}s")
    fed = float(np.mean(list(results["federated"].values())))
    central = float(np.mean(list(results["centralized"].values())))
    central3 = float(np.mean(list(results["centralized ×3"].values())))
    print(f"\nfederated / centralized = {fed / central:.3f}   (same epochs per site)")
    print(f"federated / centralized ×3 = {fed / central3:.3f}   (same total gradient steps; goal ≥ 0.98)")
    if not args.no_cross_site:
        print_cross_site(matrix, timings["cross-site"])
    return 0


def print_cross_site(metadata: dict, seconds: float) -> None:
    """cross_site_evaluation's matrix (mean liver Dice, data site × model owner) and its answer."""
    layout = metadata["cross_val_results"].value
    owners = [*SITES, "global"]
    print(f"\ncross_site_evaluation ({seconds:.0f}s): mean liver Dice on each site's liver-test, "
          "data site (rows) × model owner (columns)")
    header = f"{'data site':12s}" + "".join(f"{o + ' model':>15s}" for o in owners)
    print(header)
    print("-" * len(header))
    for site in SITES:
        values = [layout.get(site, {}).get(owner, {}).get("dice_liver") for owner in owners]
        print(f"{site:12s}" + "".join(f"{'–' if v is None else f'{v:.3f}':>15s}" for v in values))
    print()
    for line in metadata["answer"].value.splitlines():
        print(line.removeprefix("- "))
    worse = metadata["global_worse_at"].value
    print("global model worse than the site's own model at: " + (", ".join(worse) if worse else "no site"))


if __name__ == "__main__":
    sys.exit(main())
