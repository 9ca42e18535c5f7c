"""Downstream segmentation on real defects: transplant, plain paste, draem, cutpaste, draem + transplant.

On the magnetic-tile dataset (MVTec layout, few-shot split from its README: per defect type the
first third of the sorted files are the exemplars, the rest and test/good the test set), each arm
trains a U-Net on its synthetic pairs plus the 700 real normal images and is scored on the real
test set, with the same budget for every arm. The arms:

- transplant: the transplant method with its defaults (augmented, matched, Poisson-blended);
- paste: transplant as a plain paste, no augmentation (the evaluate job's `baseline_exemplars`);
- draem, cutpaste: the model-free methods with their defaults;
- draem+transplant: both sets in one, as an evaluate job combines two generate jobs.

Prints one row per arm overall and one per arm and defect type: pixel and image AUROC / AP /
F1-max, AUPRO, classification accuracy, the seconds spent making the pairs, training and in all;
each arm's row is printed as soon as it is scored (a long run that is stopped keeps the rows it
has); writes each arm's metrics.json and report.html under --out/<arm>/.

    .venv/bin/python -m bench.bench_downstream --budget small --no-classifier  # 10-35 min an arm on 2 busy cores
    .venv/bin/python -m bench.bench_downstream --budget medium   # twice small's training: meant for ~30 min; unmeasured
    .venv/bin/python -m bench.bench_downstream --budget full --gpu
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
    "medium": {"pairs": 200, "params": {"train_steps": 800, "resolution": 128, "batch_size": 8, "unet_width": 8}},
    "full": {"pairs": 500, "params": {"train_steps": 3000, "resolution": 256, "batch_size": 16, "unet_width": 16}},
}
ARMS = ["transplant", "paste", "draem", "cutpaste", "draem+transplant"]
COLUMNS = ["pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro", "image_auroc", "image_ap", "image_f1_max"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "magnetic_tile")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--gpu", action="store_true", help="the same as --device cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=ARMS,
                        help="evaluate only these arms (several runs can share a machine's cores)")
    parser.add_argument("--no-classifier", action="store_true",
                        help="skip the defect-type classifiers (segmentation metrics stay the same)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "downstream")
    args = parser.parse_args()
    budget = BUDGETS[args.budget]
    params = EvaluateParams(**budget["params"], seed=args.seed, baselines=False, classifier=not args.no_classifier)
    started = time.monotonic()

    real = load_real_data(args.dataset, params.resolution)
    pairs, seed = budget["pairs"], params.seed
    exemplars = (real.exemplar_images, real.exemplar_masks, real.exemplar_defects)
    makers = {
        "transplant": lambda: model_free_arm("transplant", "transplant", real.normals, pairs, seed,
                                             exemplars=exemplars),
        "paste": lambda: exemplar_paste_arm("paste", real.normals, *exemplars, pairs, seed),
        "draem": lambda: model_free_arm("draem", "draem", real.normals, pairs, seed),
        "cutpaste": lambda: model_free_arm("cutpaste", "cutpaste", real.normals, pairs, seed),
    }
    arms, making_seconds = [], {}
    for name, make in makers.items():
        made = time.monotonic()
        arms.append(make())
        making_seconds[name] = time.monotonic() - made
    by_name = {arm.name: arm for arm in arms}
    arms.append(combine_arms("draem+transplant", [by_name["draem"], by_name["transplant"]]))
    making_seconds["draem+transplant"] = making_seconds["draem"] + making_seconds["transplant"]
    print(f"data and {len(arms)} arms ready in {time.monotonic() - started:.1f} s", flush=True)

    def progress(stage, done, total):
        if done == total:
            print(f"  {time.monotonic() - started:7.1f} s  {stage} done", flush=True)

    results = {}
    for arm in (arm for arm in arms if arm.name in args.arms):
        metrics = evaluate_arms(real, [arm], params, args.out / arm.name, device="cuda" if args.gpu else args.device,
                                on_progress=progress)
        results[arm.name] = metrics["arms"][arm.name]
        print("  " + _overall_row(arm.name, results[arm.name], making_seconds[arm.name]), flush=True)

    device = next(iter(results.values()))["training"]["device"]
    print(f"\n{platform.node()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, device {device}; "
          f"budget '{args.budget}': {params.train_steps} steps x batch {params.batch_size} at "
          f"{params.resolution} px, U-Net width {params.unet_width}, {pairs} pairs per method; "
          f"load average {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    print(f"test set: {metrics['dataset']['test_images']}, normals {metrics['dataset']['normal_images']}\n")
    print(f"| arm | pairs | {' | '.join(COLUMNS)} | class. acc | make s | train s | wall s |")
    print("|" + " --- |" * (len(COLUMNS) + 6))
    for name, arm in results.items():
        print(_overall_row(name, arm, making_seconds[name]))
    print(f"\n| arm | defect | {' | '.join(COLUMNS)} |")
    print("|" + " --- |" * (len(COLUMNS) + 2))
    for name, arm in results.items():
        for defect, values in arm["segmentation"]["per_defect"].items():
            print(f"| {name} | {defect} | {' | '.join(_cell(values[c]) for c in COLUMNS)} |")
    print(f"\ntotal {time.monotonic() - started:.0f} s; reports: {args.out}/<arm>/report.html")


def _overall_row(name: str, arm: dict, making_seconds: float) -> str:
    overall = arm["segmentation"]["overall"]
    accuracy = arm["classification"]["accuracy"] if arm["classification"] else None
    cells = [_cell(overall[c]) for c in COLUMNS] + [_cell(accuracy)]
    return (f"| {name} | {arm['pairs']} | {' | '.join(cells)} | {making_seconds:.0f} "
            f"| {arm['training']['train_seconds']:.0f} | {arm['wall_seconds'] + making_seconds:.0f} |")


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
