"""Per-study wall time of the `segmentations` asset against bare nnUNetPredictor, same run.

    python bench/segment.py [--studies 3] [--schedule tiny]

Trains a model once (the `tiny` schedule by default; speed, not quality, is measured),
registers and promotes it in a throwaway MLflow store, ingests new studies at the
scanner's full grid, then per study times
  - the asset: `dg.materialize([segmentations])` — model resolution (cached after the
    first), volume assembly from the archive, prediction, DICOM SEG writing, SEG
    ingest into archive + Delta, statistics, preview, Dagster run overhead;
  - bare nnU-Net: `predictor.predict_single_npy_array` on the same volume and model.
Prints both and their ratio (goal ≤ 1.15). The first asset run, which downloads and
loads the model, is reported separately.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COHORT = """name: liver-train
purpose: train
required_labels: [liver]
filter: {modality: CT, has_reference_segmentation: true}
harmonization: {min_size: 4}
"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--schedule", default="tiny")
    args = parser.parse_args()

    import dagster as dg

    from kaapana_assets.cohorts.assets import cohorts
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.ingest.assets import dicom_studies
    from kaapana_assets.ingest.pipeline import IngestTargets, ingest_files
    from kaapana_assets.ingest.volume import assemble_volume
    from kaapana_assets.segmentation.assets import segmentations
    from kaapana_assets.segmentation.models import production_model
    from kaapana_assets.synthetic import generate_site
    from kaapana_assets.training import nnunet
    from kaapana_assets.training.assets import nnunet_dataset, trained_model
    from kaapana_assets.training.assets import production_model as promote
    from resources import site_resources

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        home = KaapanaHome(root / "home").ensure()
        train = generate_site("site-a", 6, seed=5, out=root / "train", with_annotations=True)
        ingest_files([f for s in train for f in s.files], IngestTargets.for_home(home), remove_sources=False)
        (root / "cohorts").mkdir()
        (root / "cohorts" / "liver-train.yaml").write_text(COHORT)
        resources = site_resources(home.root, root / "cohorts", device="cpu", schedule=args.schedule, promotion_dice=0.0)
        quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions("cohorts", ["liver-train"])
            t0 = time.perf_counter()
            dg.materialize([cohorts, nnunet_dataset, trained_model, promote], partition_key="liver-train",
                           instance=instance, resources=resources, run_config=quiet)
            print(f"model trained ({args.schedule}) in {time.perf_counter() - t0:.0f}s")

            new = generate_site("site-a", args.studies, seed=6, out=root / "new", first_index=100)
            asset_times, bare_times = [], []
            for i, study in enumerate(new):
                spool = home.incoming / f"s{i}"
                spool.mkdir(parents=True)
                for f in study.ct_files:
                    shutil.copy(f, spool / f.name)
                instance.add_dynamic_partitions("studies", [study.study_uid])
                dg.materialize([dicom_studies], partition_key=study.study_uid, instance=instance,
                               resources=resources, run_config=quiet)
                t0 = time.perf_counter()
                result = dg.materialize([segmentations], partition_key=study.study_uid, instance=instance,
                                        resources=resources, run_config=quiet)
                asset_times.append(time.perf_counter() - t0)
                assert result.success

                model = production_model(resources["mlflow"].tracking(), "nnunet-liver-train",
                                         resources["nnunet_settings"].model_cache(), "cpu")
                volume = assemble_volume(study.ct_files)
                t0 = time.perf_counter()
                nnunet.predict(model.predictor, volume.hu, volume.spacing_zyx)
                bare_times.append(time.perf_counter() - t0)

    first, rest = asset_times[0], asset_times[1:] or asset_times
    asset, bare = statistics.median(rest), statistics.median(bare_times)
    print(f"\nvolume {volume.hu.shape} voxels, {args.studies} studies (median of the warm ones)")
    print(f"{'segmentations asset (warm, per study)':45s} {asset:7.2f} s")
    print(f"{'bare nnUNetPredictor (same volume, model)':45s} {bare:7.2f} s")
    print(f"{'ratio asset / bare':45s} {asset / bare:7.2f}   (goal ≤ 1.15)")
    print(f"{'first asset run (model download + load)':45s} {first:7.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
