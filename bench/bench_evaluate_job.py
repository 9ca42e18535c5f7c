"""A whole evaluate job on the CPU, phase by phase: this checkout against another (e.g. main's code).

The job is what the metrics worker runs, minus the storage round trips: load the real
magnetic-tile data, make three arms (DRAEM and CutPaste pairs made in the job, and the exemplar
copy-paste arm), then ``evaluate_arms``: train a U-Net per arm (and the defect-type classifier on
the exemplar arm, the one with defect types), score the real test set, write metrics.json and
report.html. Each run is a fresh process; with ``--before DIR`` the runs alternate between DIR's
code and this checkout's (the machine is shared and noisy). A checkout without a ``precision``
setting runs as it is (fp32); this one with ``--precision`` (default auto: bf16 where native).

Training is linear in the steps, but not through zero (each arm's first steps also build oneDNN's
kernels), so with two step counts (``--steps 30 90``) the job at ``--target-steps`` is extrapolated
from the marginal cost of a step, the difference of the two runs' times over the difference of their
steps, plus what the shorter run spent besides. With one step count the whole time is scaled.

    git archive main | tar -x -C /tmp/before
    nice .venv/bin/python -m bench.bench_evaluate_job --before /tmp/before --steps 300     # ~1 h on 2 cores
    nice .venv/bin/python -m bench.bench_evaluate_job --before /tmp/before --steps 30 90   # ~20 min
"""

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ["load data", "make arms", "train", "classifier", "score", "report"]


def one_job(args) -> dict:
    """Run the job in this process with whatever ``models`` is importable; seconds per phase."""
    import models
    from models.downstream.arms import exemplar_paste_arm, model_free_arm
    from models.downstream.evaluate import evaluate_arms, load_real_data
    from models.downstream.params import EvaluateParams

    params = EvaluateParams(train_steps=args.steps[0], resolution=args.resolution, batch_size=args.batch,
                            unet_width=args.width, seed=0, baselines=False)
    seconds = dict.fromkeys(PHASES, 0.0)
    started = time.monotonic()
    real = load_real_data(args.dataset, params.resolution)
    seconds["load data"] = time.monotonic() - started
    arms = [
        model_free_arm("draem", "draem", real.normals, args.pairs, params.seed),
        model_free_arm("cutpaste", "cutpaste", real.normals, args.pairs, params.seed),
        exemplar_paste_arm("exemplars", real.normals, real.exemplar_images, real.exemplar_masks,
                           real.exemplar_defects, args.pairs, params.seed),
    ]
    seconds["make arms"] = time.monotonic() - started - seconds["load data"]
    last = [time.monotonic()]

    def progress(stage: str, done: int, total: int) -> None:
        # Stages run one after another, so each lasts from the previous stage's end to its own.
        if done == total:
            now = time.monotonic()
            seconds[stage.rsplit(": ", 1)[-1]] += now - last[0]
            last[0] = now

    extra = {"precision": args.precision} if "precision" in inspect.signature(evaluate_arms).parameters else {}
    with tempfile.TemporaryDirectory() as out:
        metrics = evaluate_arms(real, arms, params, Path(out), device="cpu", on_progress=progress, **extra)
    return {
        "code": str(Path(models.__file__).parent.parent), "seconds": seconds,
        "total": time.monotonic() - started, "precision": metrics["arms"]["draem"]["training"]["precision"],
        "pixel_ap": {name: arm["segmentation"]["overall"]["pixel_ap"] for name, arm in metrics["arms"].items()},
        "load": os.getloadavg()[0],
    }


def run_in(code_dir: Path, argv: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code_dir))
    done = subprocess.run([sys.executable, __file__, "--one", *argv], env=env, cwd=code_dir,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _argv(args, steps: int) -> list[str]:
    values = {**vars(args), "steps": steps}
    return [f"--{name.replace('_', '-')}={values[name]}"
            for name in ("dataset", "steps", "resolution", "batch", "width", "pairs", "precision")]


def _stepped(result: dict) -> float:
    return result["seconds"]["train"] + result["seconds"]["classifier"]


def _extrapolated(runs: list[tuple[int, dict]], target: int) -> tuple[float, float]:
    """(seconds per step, total seconds at `target` steps) of one checkout's runs (medians per step count)."""
    by_steps = {}
    for steps, result in runs:
        by_steps.setdefault(steps, []).append(result)
    medians = {steps: (statistics.median(_stepped(r) for r in results), statistics.median(r["total"] for r in results))
               for steps, results in by_steps.items()}
    counts = sorted(medians)
    short = counts[0]
    if len(counts) == 1:
        per_step = medians[short][0] / short
    else:
        long = counts[-1]
        per_step = (medians[long][0] - medians[short][0]) / (long - short)
    return per_step, medians[short][1] + per_step * (target - short)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "magnetic_tile")
    parser.add_argument("--steps", type=int, nargs="+", default=[300], help="one or two step counts")
    parser.add_argument("--target-steps", type=int, default=300)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--before", type=Path, help="another checkout to time against, alternately")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_job(args)))
        return

    checkouts = ([("before", args.before)] if args.before else []) + [("after", ROOT)]
    print(f"{os.cpu_count()} CPU cores; evaluate job: 3 arms x {args.steps} steps x batch {args.batch} at "
          f"{args.resolution} px, U-Net width {args.width}, {args.pairs} pairs per arm; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for _ in range(args.repeats):
        for steps in args.steps:
            for label, code_dir in checkouts:
                result = run_in(code_dir.resolve(), _argv(args, steps))
                rows.append((label, steps, result))
                print(f"  {label} at {steps} steps: {result['code']}, {result['precision']}, {result['total']:.0f} s, "
                      f"pixel AP {result['pixel_ap']}, load {result['load']:.2f}", flush=True)

    print(f"\n| run | steps | {' s | '.join(PHASES)} s | total s |")
    print("|" + " --- |" * (len(PHASES) + 3))
    for label, steps, result in rows:
        seconds = result["seconds"]
        print(f"| {label} ({result['precision']}) | {steps} | {' | '.join(f'{seconds[p]:.1f}' for p in PHASES)} "
              f"| {result['total']:.0f} |")
    print(f"\n| run | s per step (train + classifier) | total at {args.target_steps} steps s |")
    print("| --- | --- | --- |")
    estimates = {}
    for label, _ in checkouts:
        per_step, at_target = _extrapolated([(steps, result) for run, steps, result in rows if run == label],
                                            args.target_steps)
        estimates[label] = at_target
        print(f"| {label} | {per_step:.2f} | {at_target:.0f} |")
    if "before" in estimates:
        print(f"\nafter / before at {args.target_steps} steps: {estimates['after'] / estimates['before']:.0%}")
    print(f"\nload average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
