"""Choosing transplant's defaults without the test set: variants scored on a split of the exemplars.

`mvtec.exemplar_validation_split` keeps every other exemplar of each defect type as a source and
makes the others, with 100 held-out training normals, the validation set; the real test set is
never loaded. Each variant (transplant's defaults with a few params changed) makes its pairs
from the source exemplars, trains the downstream U-Net on them plus the remaining normals at
bench_downstream's budget, and is scored on the validation set, once per seed. Prints mean and
standard deviation over the seeds of pixel AP, AUPRO and pixel F1-max, overall and per defect type.

    .venv/bin/python -m bench.bench_transplant_tuning --seeds 0 1 2     # ~20 min at `small` on 2 cores
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.bench_downstream import BUDGETS, spread
from models.downstream.arms import model_free_arm
from models.downstream.evaluate import evaluate_arms, load_real_data
from models.downstream.mvtec import exemplar_validation_split, few_shot_split
from models.downstream.params import EvaluateParams
from models.methods.transplant import PLAIN_PASTE

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "defaults": {},
    "plain paste": PLAIN_PASTE,
    "augmented paste": {"blend": "paste"},
    "feather": {"blend": "feather"},
    "poisson, mixed": {"mixed": True},
    "poisson, unmatched": {"match_photometry": False},
    "poisson, no warp": {"rotation": 0.0, "elastic": 0.0},
    "feather, no warp": {"blend": "feather", "rotation": 0.0, "elastic": 0.0},
}
METRICS = ["pixel_ap", "aupro", "pixel_f1_max"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "magnetic_tile")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    budget = BUDGETS[args.budget]
    started = time.monotonic()
    split = exemplar_validation_split(few_shot_split(args.dataset))
    real = load_real_data(args.dataset, budget["params"]["resolution"], split)
    print(f"validation split: {len(real.exemplar_defects)} source exemplars, "
          f"{sum(item.defect != 'good' for item in split.test)} validation anomalies, "
          f"{sum(item.defect == 'good' for item in split.test)} validation goods, {len(split.normals)} normals; "
          f"budget {args.budget!r}: {budget}", flush=True)

    exemplars = (real.exemplar_images, real.exemplar_masks, real.exemplar_defects)
    scores = {}  # variant -> [per-seed segmentation metrics]
    for seed in args.seeds:
        params = EvaluateParams(**budget["params"], seed=seed, baselines=False, classifier=False)
        for name in args.variants:
            arm = model_free_arm(name, "transplant", real.normals, budget["pairs"], seed,
                                 params=VARIANTS[name], exemplars=exemplars)
            with tempfile.TemporaryDirectory() as out:
                metrics = evaluate_arms(real, [arm], params, Path(out), device="cpu")
            segmentation = metrics["arms"][name]["segmentation"]
            scores.setdefault(name, []).append(segmentation)
            overall = segmentation["overall"]
            print(f"  {time.monotonic() - started:6.0f} s  seed {seed} {name}: "
                  + ", ".join(f"{m} {overall[m]:.3f}" for m in METRICS), flush=True)

    defects = split.defects
    print(f"\nmean ± sd over seeds {args.seeds}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"| variant | {' | '.join(METRICS)} | {' | '.join(f'{d} pixel_ap' for d in defects)} |")
    print("|" + " --- |" * (1 + len(METRICS) + len(defects)))
    for name, runs in scores.items():
        overall = [spread([run["overall"][m] for run in runs]) for m in METRICS]
        per_defect = [spread([run["per_defect"][d]["pixel_ap"] for run in runs]) for d in defects]
        print(f"| {name} | {' | '.join(overall + per_defect)} |")
    print(f"\ntotal {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
