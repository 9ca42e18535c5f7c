"""Does bf16 autocast cost the downstream segmenter accuracy? fp32 against bf16 on magnetic tile.

The shared magnetic-tile bench (``bench.bench_downstream``: its budgets and its four arms) run at
each seed twice, in fp32 and under bf16 autocast, alternately in one process (same arms, same
seed, only the precision differs). Prints each run's pixel AP and AUPRO per arm as it finishes,
then per arm and precision the mean and seed-to-seed standard deviation, and the bf16 - fp32
difference of the means. Each run's metrics.json is kept under --out/<precision>-seed<N>/.

    nice .venv/bin/python -m bench.bench_downstream_precision --budget small --seeds 0 1 2
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bench.bench_downstream import BUDGETS, spread
from models.downstream.arms import combine_arms, exemplar_paste_arm, model_free_arm
from models.downstream.evaluate import evaluate_arms, load_real_data
from models.downstream.params import EvaluateParams

ROOT = Path(__file__).resolve().parent.parent
METRICS = ["pixel_ap", "aupro"]


def arms_for(real, pairs: int, seed: int) -> list:
    arms = [
        model_free_arm("draem", "draem", real.normals, pairs, seed),
        model_free_arm("cutpaste", "cutpaste", real.normals, pairs, seed),
        exemplar_paste_arm("exemplars", real.normals, real.exemplar_images, real.exemplar_masks,
                           real.exemplar_defects, pairs, seed),
    ]
    return arms + [combine_arms("combined", arms)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "magnetic_tile")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="one of them: a run to compare later with another process's (summary.json)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "downstream_precision")
    args = parser.parse_args()
    budget = BUDGETS[args.budget]
    started = time.monotonic()
    real = load_real_data(args.dataset, budget["params"]["resolution"])
    results = {}  # (precision, arm, metric) -> values over seeds
    for seed in args.seeds:
        params = EvaluateParams(**budget["params"], seed=seed, baselines=False)
        arms = arms_for(real, budget["pairs"], seed)
        for precision in args.precisions:
            run_started = time.monotonic()
            metrics = evaluate_arms(real, arms, params, args.out / f"{precision}-seed{seed}", device="cpu",
                                    precision=precision)
            cells = []
            for name, arm in metrics["arms"].items():
                overall = arm["segmentation"]["overall"]
                for metric in METRICS:
                    results.setdefault((precision, name, metric), []).append(overall[metric])
                cells.append(f"{name} AP {overall['pixel_ap']:.3f} AUPRO {overall['aupro']:.3f}")
            print(f"seed {seed} {precision} ({arm['training']['precision']}, "
                  f"{time.monotonic() - run_started:.0f} s, load {os.getloadavg()[0]:.2f}): {'; '.join(cells)}",
                  flush=True)

    params = budget["params"]
    print(f"\nbudget '{args.budget}': {params['train_steps']} steps x batch {params['batch_size']} at "
          f"{params['resolution']} px, U-Net width {params['unet_width']}, {budget['pairs']} pairs per arm; "
          f"seeds {args.seeds}; mean ± standard deviation over seeds\n")
    (args.out / "summary.json").write_text(json.dumps({f"{p}/{a}/{m}": v for (p, a, m), v in results.items()}))
    if len(args.precisions) < 2:
        return
    print("| arm | fp32 pixel AP | bf16 pixel AP | Δ AP | fp32 AUPRO | bf16 AUPRO | Δ AUPRO |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in metrics["arms"]:
        cells = []
        for metric in METRICS:
            fp32, bf16 = results[("fp32", name, metric)], results[("bf16", name, metric)]
            cells += [spread(fp32), spread(bf16), f"{statistics.mean(bf16) - statistics.mean(fp32):+.3f}"]
        print(f"| {name} | {' | '.join(cells)} |")
    print(f"\ntotal {time.monotonic() - started:.0f} s; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
