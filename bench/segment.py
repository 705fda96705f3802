"""Per-study wall time of the `segmentations` asset against bare nnUNetPredictor, same run.

    python bench/segment.py [--studies 3] [--burst 4] [--schedule tiny] [--sizes 48x128,100x256]
                            [--model FOLDER | --save-model FOLDER] [--device cpu|cuda]

Trains a model once (the `tiny` schedule by default; speed, not quality, is measured) — or
imports an nnU-Net results folder given with --model (--save-model keeps the trained one for
that, so that two versions of the code can be timed with one model) — registers and promotes it in a
throwaway MLflow store, then for each grid size (slices x matrix; the first is the grid the
model was trained on, 48x128, the second a realistic 100 slices of 256²) ingests new studies
and per study times
  - the asset: `dg.materialize([segmentations])` — model resolution (the alias looked up,
    the loaded predictor cached per process), volume assembly from the archive, prediction,
    DICOM SEG building, archiving and indexing, statistics, preview, Dagster run overhead;
    inside it, `segment_studies` and its `nnunet.predict` are timed too, so the overhead
    splits into "Dagster run + model resolution" and "our work around the prediction";
  - bare nnU-Net: `predictor.predict_single_npy_array` on the same volume and model.
Prints both and their ratio (goal ≤ 1.15), and the asset over its own prediction timed inside
the run ("same pred.": free of the bare call's own variation). The first asset run, which downloads and
loads the model, is reported separately and left out of the medians. Then, per size, a burst
of `--burst` new studies segmented in ONE run over their partition range (what the incoming
sensor requests for studies that arrive together) against bare nnU-Net on the same volumes.

On a GPU node (`--device cuda`, torch with CUDA) the same comparison shows what the work
around the prediction costs where the prediction no longer fills the CPU cores.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.training_site import TRAIN_COHORT  # noqa: E402  (after the sys.path line above)

MODEL = "nnunet-liver-train"


def timed(record: list[float], func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            record.append(time.perf_counter() - t0)

    return wrapper


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", type=int, default=3, help="studies per size (the first is the cold run)")
    parser.add_argument("--schedule", default="tiny")
    parser.add_argument("--sizes", default="48x128,100x256", help="slices x matrix of the new studies, comma separated")
    parser.add_argument("--burst", type=int, default=4, help="studies per size segmented in one run")
    model_source = parser.add_mutually_exclusive_group()
    model_source.add_argument("--model", type=Path, help="an nnU-Net v2 results folder to import instead of training")
    model_source.add_argument("--save-model", type=Path, help="copy the trained model's folder here (for a later --model)")
    parser.add_argument("--device", default="cpu", help="where nnU-Net trains and predicts: cpu, or cuda on a GPU node")
    args = parser.parse_args()
    if args.save_model and args.save_model.exists():
        parser.error(f"--save-model {args.save_model} exists already")  # said before training, not after
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]

    import dagster as dg
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    from kaapana_assets import nnunet
    from kaapana_assets.archive.service import Archive
    from kaapana_assets.cohorts.assets import cohorts
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.ingest.assets import dicom_studies
    from kaapana_assets.ingest.pipeline import ingest_files
    from kaapana_assets.ingest.volume import assemble_volume
    from kaapana_assets.segmentation import assets as segmentation_assets
    from kaapana_assets.segmentation import segment
    from kaapana_assets.segmentation.models import import_model, production_model
    from kaapana_assets.synthetic import generate_site
    from kaapana_assets.training.assets import nnunet_dataset, trained_model
    from kaapana_assets.training.assets import production_model as promote
    from resources import site_resources

    # Instrumentation only: the asset's own code paths, timed from outside.
    inner: dict[str, list[float]] = {"segment_studies": [], "predict": []}
    segmentation_assets.segment_studies = timed(inner["segment_studies"], segment.segment_studies)
    segment.nnunet.predict = timed(inner["predict"], nnunet.predict)
    bare_predict = nnunet.predict.__wrapped__  # type: ignore[attr-defined]

    rows = []
    bursts: list[tuple[str, int, float, float, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        home = KaapanaHome(root / "home").ensure()
        (root / "cohorts").mkdir()
        (root / "cohorts" / "liver-train.yaml").write_text(TRAIN_COHORT)
        resources = site_resources(home.root, root / "cohorts", device=args.device, schedule=args.schedule, promotion_dice=0.0)
        quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}

        def loaded_model() -> Any:
            """The production model as the asset loads it (cached per process)."""
            return production_model(resources["mlflow"].tracking(), MODEL,  # type: ignore[attr-defined]
                                    resources["nnunet_settings"].model_cache(), args.device)  # type: ignore[attr-defined]

        with dg.instance_for_test() as instance:
            t0 = time.perf_counter()
            if args.model:
                import_model(resources["mlflow"].tracking(), args.model, MODEL, promote=True)  # type: ignore[attr-defined]
                print(f"model imported from {args.model}")
            else:
                train = generate_site("site-a", 6, seed=5, out=root / "train", with_annotations=True)
                ingest_files([f for s in train for f in s.files], Archive.for_home(home), remove_sources=False)
                instance.add_dynamic_partitions("cohorts", ["liver-train"])
                dg.materialize([cohorts, nnunet_dataset, trained_model, promote], partition_key="liver-train",
                               instance=instance, resources=resources, run_config=quiet)
                print(f"model trained ({args.schedule}) in {time.perf_counter() - t0:.0f}s")
                if args.save_model:
                    shutil.copytree(loaded_model().folder, args.save_model)
                    print(f"model saved to {args.save_model}")

            index = 100
            for slices, matrix in sizes:
                new = generate_site("site-a", args.studies, seed=6, out=root / f"new{slices}x{matrix}",
                                    first_index=index, slices=slices, matrix=matrix)
                index += args.studies
                asset_times, study_times, predict_times, bare_times = [], [], [], []
                for i, study in enumerate(new):
                    spool = home.incoming / f"s{slices}x{matrix}-{i}"
                    spool.mkdir(parents=True)
                    for f in study.ct_files:
                        shutil.copy(f, spool / f.name)
                    instance.add_dynamic_partitions("studies", [study.study_uid])
                    dg.materialize([dicom_studies], partition_key=study.study_uid, instance=instance,
                                   resources=resources, run_config=quiet)
                    t0 = time.perf_counter()
                    result = dg.materialize([segmentation_assets.segmentations], partition_key=study.study_uid,
                                            instance=instance, resources=resources, run_config=quiet)
                    asset_times.append(time.perf_counter() - t0)
                    assert result.success
                    study_times.append(inner["segment_studies"][-1])
                    predict_times.append(inner["predict"][-1])

                    model = loaded_model()
                    volume = assemble_volume(study.ct_files)
                    t0 = time.perf_counter()
                    bare_predict(model.predictor, volume.hu, volume.spacing_zyx)
                    bare_times.append(time.perf_counter() - t0)

                def warm(times: list[float]) -> float:
                    return statistics.median(times[1:] if len(times) > 1 else times)

                rows.append((f"{slices}x{matrix}x{matrix}", warm(asset_times), warm(study_times),
                             warm(predict_times), warm(bare_times), asset_times[0]))

                # A burst, as the automatic path runs one: the studies' partition range in one run.
                burst = generate_site("site-a", args.burst, seed=7, out=root / f"burst{slices}x{matrix}",
                                      first_index=index, slices=slices, matrix=matrix)
                index += args.burst
                uids = sorted(b.study_uid for b in burst)
                ingest_files([f for b in burst for f in b.ct_files], Archive.for_home(home), remove_sources=False)
                instance.add_dynamic_partitions("studies", uids)
                t0 = time.perf_counter()
                result = dg.materialize([segmentation_assets.segmentations], instance=instance, resources=resources,
                                        run_config=quiet, tags={ASSET_PARTITION_RANGE_START_TAG: uids[0],
                                                                ASSET_PARTITION_RANGE_END_TAG: uids[-1]})
                burst_s = time.perf_counter() - t0
                assert result.success
                in_burst, burst_predicts = inner["segment_studies"][-1], sum(inner["predict"][-len(uids):])
                bare_burst = 0.0
                for b in burst:
                    volume = assemble_volume(b.ct_files)
                    t0 = time.perf_counter()
                    bare_predict(model.predictor, volume.hu, volume.spacing_zyx)
                    bare_burst += time.perf_counter() - t0
                bursts.append((f"{slices}x{matrix}x{matrix}", len(uids), burst_s, bare_burst, in_burst, burst_predicts))

    print(f"\n{args.studies} studies per size, median of the warm ones (the first run per size excluded)")
    print(f"{'volume (z×y×x)':16s} {'asset':>7s} {'bare':>7s} {'ratio':>6s} {'same pred.':>10s} | {'dagster+model':>13s} "
          f"{'around predict':>14s} {'predict in asset':>16s} | {'first run':>9s}")
    for size, asset, in_asset, predict, bare, first in rows:
        print(f"{size:16s} {asset:6.2f}s {bare:6.2f}s {asset / bare:6.2f} {asset / predict:10.2f} | "
              f"{asset - in_asset:12.2f}s {in_asset - predict:13.2f}s {predict:15.2f}s | {first:8.2f}s")
    print("goal: ratio asset / bare ≤ 1.15. 'same pred.': the asset over its own prediction (the same model call"
          "\ntimed inside the run; the bare prediction, timed apart, varies ±15 % from call to call on a shared"
          "\n2-core machine). 'dagster+model': the run itself and the alias lookup; 'around predict': volume"
          "\nassembly, the index reads, SEG build/encode/archive/index, statistics, preview, Delta MERGEs.")
    print("\na burst: one run over the studies' partition range (what the incoming sensor requests for studies"
          "\nthat arrive together), against bare nnU-Net on the same volumes one after the other")
    print(f"{'volume (z×y×x)':16s} {'studies':>7s} {'run':>7s} {'per study':>9s} {'bare':>7s} {'ratio':>6s} "
          f"{'same pred.':>10s} | {'per study: dagster+model':>24s} {'around predict':>14s} {'predict in asset':>16s}")
    for size, count, run_s, bare_s, inside, predicts in bursts:
        print(f"{size:16s} {count:7d} {run_s:6.2f}s {run_s / count:8.2f}s {bare_s / count:6.2f}s {run_s / bare_s:6.2f} "
              f"{run_s / predicts:10.2f} | "
              f"{(run_s - inside) / count:23.2f}s {(inside - predicts) / count:13.2f}s {predicts / count:15.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
