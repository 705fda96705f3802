"""nnU-Net training and prediction through kaapana_assets on a CUDA device: the check for a GPU node.

    python bench/gpu.py [--device cuda] [--cases 8] [--epochs 4] [--iterations 20] [--no-compile] [--out FILE]

What a GPU node runs, without the Dagster layer around it (that layer does not depend on
the device): nnU-Net's fingerprint, plan and preprocess of synthetic CT cases;
`nnunet.train` on the device with the AdamW "tiny" schedule, from given initial weights
and with FedProx's proximal term (what a site's federated round runs); `package_model`;
`load_predictor` on the device and on the CPU. It prints, and writes as JSON to `--out`:

- Dice of the device's prediction against the truth on held-out cases;
- agreement (Dice) between the device's and the CPU's prediction of the same model;
- prediction time of a realistic 100×256² volume on the device, with nnU-Net's
  `perform_everything_on_device` off (what `load_predictor` sets) and on, and on the CPU.

Needs torch with CUDA, nnunetv2 and SimpleITK; no Dagster, no network.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LIVER = 1


def synthetic_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A noisy CT-like volume (HU) with one ellipsoid organ, and its label volume (z, y, x)."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    centre = [n * rng.uniform(0.4, 0.6) for n in shape]
    radii = [n * rng.uniform(0.2, 0.3) for n in shape]
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip((z, y, x), centre, radii, strict=True)) <= 1.0
    hu = rng.normal(-80.0, 25.0, shape).astype(np.float32)
    hu[inside] += 150.0
    return hu, inside.astype(np.uint8)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--big-slices", type=int, default=100, help="slices of the timed 256² volume")
    parser.add_argument("--no-compile", action="store_true", help="nnUNet_compile=f (no torch.compile)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.no_compile:
        os.environ["nnUNet_compile"] = "f"

    import SimpleITK as sitk
    import torch

    from kaapana_assets import nnunet

    report: dict = {"torch": torch.__version__, "device": args.device,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "nnunet_device_auto": str(nnunet.device_for("auto"))}
    rng = np.random.default_rng(0)
    spacing_zyx = (2.5, 0.9, 0.9)
    cases = []
    truths = []
    for i in range(args.cases + 2):
        hu, label = synthetic_case(rng, (32, 96, 96))
        image, mask = sitk.GetImageFromArray(hu), sitk.GetImageFromArray(label)
        for img in (image, mask):
            img.SetSpacing(spacing_zyx[::-1])
        if i < args.cases:
            cases.append(nnunet.Case(f"case_{i:03d}", image, mask, f"patient-{i}"))
        else:
            truths.append((hu, label))

    with tempfile.TemporaryDirectory() as tmp:
        paths = nnunet.NnunetPaths(Path(tmp))
        dataset_id = 1
        nnunet.write_raw_dataset(paths.raw / nnunet.dataset_name(dataset_id, "gpu"), cases, {"liver": LIVER})
        t0 = time.perf_counter()
        _, plans = nnunet.plan_and_preprocess(paths, dataset_id, processes=4)
        report["plan_preprocess_s"] = round(time.perf_counter() - t0, 1)
        names = [c.name for c in cases]
        split = {"train": names[:-2], "val": names[-2:]}
        schedule = nnunet.Schedule.preset(nnunet.SchedulePreset.TINY, epochs=args.epochs,
                                          iterations_per_epoch=args.iterations,
                                          proximal_mu=0.01, seed=0)
        dataset_json = json.loads((paths.raw / nnunet.dataset_name(dataset_id, "gpu") / "dataset.json").read_text())
        initial = nnunet.initial_network_weights(nnunet.with_width(plans, schedule.base_features), dataset_json, seed=0)
        t0 = time.perf_counter()
        result = nnunet.train(paths, dataset_id, schedule, split, args.device, initial_weights=initial)
        report["train_s"] = round(time.perf_counter() - t0, 1)
        report["epochs"] = [{k: round(v, 4) for k, v in e.items()} for e in result.epochs]
        folder = nnunet.package_model(result, Path(tmp) / "model")

        device_predictor = nnunet.load_predictor(folder, args.device)
        cpu_predictor = nnunet.load_predictor(folder, "cpu")
        dice_truth, agreement = [], []
        for hu, label in truths:
            on_device = nnunet.predict(device_predictor, hu, spacing_zyx)
            on_cpu = nnunet.predict(cpu_predictor, hu, spacing_zyx)
            dice_truth.append(nnunet.dice(on_device, label, LIVER))
            agreement.append(nnunet.dice(on_device, on_cpu, LIVER))
        report["dice_vs_truth"] = [round(d, 4) for d in dice_truth]
        report["device_vs_cpu_dice"] = [round(d, 4) for d in agreement]

        big, _ = synthetic_case(rng, (args.big_slices, 256, 256))
        big_spacing = (2.5, 0.7, 0.7)

        def timed(predictor, repeats: int = 3) -> float:
            nnunet.predict(predictor, big, big_spacing)  # warm-up (cuDNN autotune, allocator)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                nnunet.predict(predictor, big, big_spacing)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            return round(min(times), 3)

        timing = f"predict_{args.big_slices}x256x256_s"
        report[timing] = {"device, everything on device off (ours)": timed(device_predictor)}
        device_predictor.perform_everything_on_device = True
        report[timing]["device, everything on device on"] = timed(device_predictor)
        report[timing]["cpu"] = timed(cpu_predictor, repeats=1)

    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    ok = min(report["dice_vs_truth"]) > 0.5 and min(report["device_vs_cpu_dice"]) > 0.98
    print("OK" if ok else "FAILED: the device's model or prediction is off")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
