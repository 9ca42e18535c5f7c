"""Downstream segmentation on real defects: transplant (Poisson, feather), paste, draem, cutpaste, draem + transplant.

On the magnetic-tile dataset (MVTec layout, few-shot split from its README: per defect type the
first third of the sorted files are the exemplars, the rest and test/good the test set), each arm
trains a U-Net on its synthetic pairs plus the 700 real normal images and is scored on the real
test set, with the same budget for every arm. The arms:

- transplant: the transplant method with its defaults (augmented, matched, Poisson-blended);
- transplant-feather: the same with `blend: "feather"`, the variant that scored best on the
  exemplar validation split (bench.bench_transplant_tuning);
- paste: transplant as a plain paste, no augmentation (the evaluate job's `baseline_exemplars`);
- draem, cutpaste: the model-free methods with their defaults;
- draem+transplant: both sets in one, as an evaluate job combines two generate jobs.

Prints one row per arm overall and one per arm and defect type: pixel and image AUROC / AP /
F1-max, AUPRO, classification accuracy, the seconds spent making the pairs, training and in all;
each arm's row is printed as soon as it is scored (a long run that is stopped keeps the rows it
has); writes each arm's metrics.json and report.html under --out/seed<N>/<arm>/. With several
`--seeds` the tables give each number's mean ± standard deviation over them: at the `small`
budget one seed's pixel AP moves by ±0.02-0.03, as much as the arms differ.

    .venv/bin/python -m bench.bench_downstream --budget small --no-classifier --seeds 0 1 2
    .venv/bin/python -m bench.bench_downstream --budget medium --no-classifier   # ~30 min on 2 cores
    .venv/bin/python -m bench.bench_downstream --budget full --gpu
"""

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from models.downstream.arms import combine_arms, exemplar_paste_arm, model_free_arm
from models.downstream.evaluate import evaluate_arms, load_real_data
from models.downstream.params import EvaluateParams

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = {
    "small": {"pairs": 100, "params": {"train_steps": 400, "resolution": 128, "batch_size": 8, "unet_width": 8}},
    # What fits ~30 minutes on 2 cores (bf16): twice the pairs and steps, at 256 px, where thin cracks keep their width.
    "medium": {"pairs": 200, "params": {"train_steps": 800, "resolution": 256, "batch_size": 8, "unet_width": 8}},
    "full": {"pairs": 500, "params": {"train_steps": 3000, "resolution": 256, "batch_size": 16, "unet_width": 16}},
}
ARMS = ["transplant", "transplant-feather", "paste", "draem", "cutpaste", "draem+transplant"]
COLUMNS = ["pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro", "image_auroc", "image_ap", "image_f1_max"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "magnetic_tile")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--gpu", action="store_true", help="the same as --device cuda")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one run per seed (the pairs and the training); several give mean ± sd")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="the CPU's autocast, as DOWNSTREAM_PRECISION (auto: bf16 where native)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=ARMS,
                        help="evaluate only these arms (several runs can share a machine's cores)")
    parser.add_argument("--no-classifier", action="store_true",
                        help="skip the defect-type classifiers (segmentation metrics stay the same)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "downstream")
    args = parser.parse_args()
    budget = BUDGETS[args.budget]
    started = time.monotonic()
    real = load_real_data(args.dataset, budget["params"]["resolution"])
    runs = {}  # arm -> [(its metrics, seconds making its pairs)] per seed
    for seed in args.seeds:
        params = EvaluateParams(**budget["params"], seed=seed, baselines=False, classifier=not args.no_classifier)
        for name, (arm, making_seconds) in _arms(real, budget["pairs"], seed, args.arms).items():
            metrics = evaluate_arms(real, [arm], params, args.out / f"seed{seed}" / name,
                                    device="cuda" if args.gpu else args.device, precision=args.precision)
            runs.setdefault(name, []).append((metrics["arms"][name], making_seconds))
            print(f"  {time.monotonic() - started:7.1f} s  seed {seed} "
                  + _overall_row(name, *runs[name][-1]), flush=True)

    training = next(iter(runs.values()))[0][0]["training"]
    print(f"\n{platform.node()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, device {training['device']}, "
          f"{training['precision']}; budget '{args.budget}': {params.train_steps} steps x batch {params.batch_size} "
          f"at {params.resolution} px, U-Net width {params.unet_width}, {budget['pairs']} pairs per method; "
          f"seeds {args.seeds} (mean ± sd over them); "
          f"load average {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    print(f"test set: {metrics['dataset']['test_images']}, normals {metrics['dataset']['normal_images']}\n")
    print(f"| arm | pairs | {' | '.join(COLUMNS)} | class. acc | make s | train s | wall s |")
    print("|" + " --- |" * (len(COLUMNS) + 6))
    for name, arm_runs in runs.items():
        print(_overall_row(name, *_mean_run(arm_runs)))
    print(f"\n| arm | defect | {' | '.join(COLUMNS)} |")
    print("|" + " --- |" * (len(COLUMNS) + 2))
    for name, arm_runs in runs.items():
        for defect in arm_runs[0][0]["segmentation"]["per_defect"]:
            cells = [spread([arm["segmentation"]["per_defect"][defect][c] for arm, _ in arm_runs]) for c in COLUMNS]
            print(f"| {name} | {defect} | {' | '.join(cells)} |")
    print(f"\ntotal {time.monotonic() - started:.0f} s; reports: {args.out}/seed<N>/<arm>/report.html")


def _arms(real, pairs: int, seed: int, wanted: list[str]) -> dict:
    """name -> (arm, seconds spent making its pairs) for the arms in ``wanted``, made at ``seed``."""
    exemplars = (real.exemplar_images, real.exemplar_masks, real.exemplar_defects)
    makers = {
        "transplant": lambda: model_free_arm("transplant", "transplant", real.normals, pairs, seed,
                                             exemplars=exemplars),
        "transplant-feather": lambda: model_free_arm("transplant-feather", "transplant", real.normals, pairs, seed,
                                                     params={"blend": "feather"}, exemplars=exemplars),
        "paste": lambda: exemplar_paste_arm("paste", real.normals, *exemplars, pairs, seed),
        "draem": lambda: model_free_arm("draem", "draem", real.normals, pairs, seed),
        "cutpaste": lambda: model_free_arm("cutpaste", "cutpaste", real.normals, pairs, seed),
    }
    needed = set(wanted) | ({"draem", "transplant"} if "draem+transplant" in wanted else set())
    made = {}
    for name, make in makers.items():
        if name in needed:
            begun = time.monotonic()
            made[name] = (make(), time.monotonic() - begun)
    if "draem+transplant" in wanted:
        made["draem+transplant"] = (combine_arms("draem+transplant", [made["draem"][0], made["transplant"][0]]),
                                    made["draem"][1] + made["transplant"][1])
    return {name: made[name] for name in ARMS if name in wanted}


def _mean_run(arm_runs: list[tuple[dict, float]]) -> tuple[dict, float]:
    """One run's shape whose numbers are "mean ± sd" strings over the seeds' runs (or the one value)."""
    first = arm_runs[0][0]
    overall = {c: spread([arm["segmentation"]["overall"][c] for arm, _ in arm_runs]) for c in COLUMNS}
    accuracies = [arm["classification"]["accuracy"] for arm, _ in arm_runs if arm["classification"]]
    return ({"pairs": first["pairs"], "segmentation": {"overall": overall},
             "classification": {"accuracy": spread(accuracies)} if accuracies else None,
             "training": {"train_seconds": statistics.mean(arm["training"]["train_seconds"] for arm, _ in arm_runs)},
             "wall_seconds": statistics.mean(arm["wall_seconds"] for arm, _ in arm_runs)},
            statistics.mean(seconds for _, seconds in arm_runs))


def _overall_row(name: str, arm: dict, making_seconds: float) -> str:
    overall = arm["segmentation"]["overall"]
    accuracy = arm["classification"]["accuracy"] if arm["classification"] else None
    cells = [_cell(overall[c]) for c in COLUMNS] + [_cell(accuracy)]
    return (f"| {name} | {arm['pairs']} | {' | '.join(cells)} | {making_seconds:.0f} "
            f"| {arm['training']['train_seconds']:.0f} | {arm['wall_seconds'] + making_seconds:.0f} |")


def _cell(value: float | str | None) -> str:
    return "-" if value is None else value if isinstance(value, str) else f"{value:.3f}"


def spread(values: list[float]) -> str:
    """A metric over seeds: "mean ± sample sd" (the value alone for one seed)."""
    if len(values) < 2:
        return _cell(values[0])
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


if __name__ == "__main__":
    main()
