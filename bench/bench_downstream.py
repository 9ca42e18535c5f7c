"""Downstream segmentation on real defects: draem, cutpaste, exemplars-only and their combination.

On the magnetic-tile dataset (MVTec layout, few-shot split from its README: per defect type the
first third of the sorted files are the exemplars, the rest and test/good the test set), each arm
trains a U-Net on its synthetic pairs plus the 700 real normal images and is scored on the real
test set. Prints one row per arm: pixel and image AUROC / AP / F1-max, AUPRO, classification
accuracy, training budget and wall time; writes metrics.json and report.html under --out.

    .venv/bin/python -m bench.bench_downstream --budget small     # about 10 minutes on 2 CPU cores
    .venv/bin/python -m bench.bench_downstream --budget full --device cuda
"""

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from models.downstream.arms import combine_arms, exemplar_paste_arm, model_free_arm
from models.downstream.evaluate import evaluate_arms, load_real_data
from models.downstream.params import EvaluateParams

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = {
    "small": {"pairs": 100, "params": {"train_steps": 400, "resolution": 128, "batch_size": 8, "unet_width": 8}},
    "full": {"pairs": 500, "params": {"train_steps": 3000, "resolution": 256, "batch_size": 16, "unet_width": 16}},
}
COLUMNS = ["pixel_auroc", "pixel_ap", "pixel_f1_max", "image_auroc", "image_ap", "image_f1_max", "aupro"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "magnetic_tile")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "downstream")
    args = parser.parse_args()
    budget = BUDGETS[args.budget]
    params = EvaluateParams(**budget["params"], seed=args.seed, baselines=False)
    started = time.monotonic()

    real = load_real_data(args.dataset, params.resolution)
    arms = [
        model_free_arm("draem", "draem", real.normals, budget["pairs"], params.seed),
        model_free_arm("cutpaste", "cutpaste", real.normals, budget["pairs"], params.seed),
        exemplar_paste_arm("exemplars", real.normals, real.exemplar_images, real.exemplar_masks,
                           real.exemplar_defects, budget["pairs"], params.seed),
    ]
    arms.append(combine_arms("combined", arms))
    print(f"data and {len(arms)} arms ready in {time.monotonic() - started:.1f} s", flush=True)

    def progress(stage, done, total):
        if done == total:
            print(f"  {time.monotonic() - started:7.1f} s  {stage} done", flush=True)

    metrics = evaluate_arms(real, arms, params, args.out, device=args.device, on_progress=progress)

    device = metrics["arms"]["draem"]["training"]["device"]
    print(f"\n{platform.node()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, device {device}; "
          f"budget '{args.budget}': {params.train_steps} steps x batch {params.batch_size} at "
          f"{params.resolution} px, U-Net width {params.unet_width}, {budget['pairs']} pairs per model-free arm")
    print(f"test set: {metrics['dataset']['test_images']}, normals {metrics['dataset']['normal_images']}\n")
    print(f"| arm | pairs | {' | '.join(COLUMNS)} | class. acc | train s | wall s |")
    print("|" + " --- |" * (len(COLUMNS) + 5))
    for name, arm in metrics["arms"].items():
        overall = arm["segmentation"]["overall"]
        accuracy = arm["classification"]["accuracy"] if arm["classification"] else None
        cells = [f"{overall[c]:.3f}" for c in COLUMNS] + [f"{accuracy:.3f}" if accuracy is not None else "-"]
        print(f"| {name} | {arm['pairs']} | {' | '.join(cells)} | {arm['training']['train_seconds']:.0f} "
              f"| {arm['wall_seconds']:.0f} |")
    print(f"\ntotal {time.monotonic() - started:.0f} s; report: {args.out / 'report.html'}")


if __name__ == "__main__":
    main()
