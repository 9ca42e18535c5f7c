"""Speed of O2MAG generation, on random-weight models of SD 1.5's architecture.

What is compared: O2MAG's sampling (three branches batched into one UNet call per step) against
an AnoGen generate at the same size, steps and guidance, per image. The inversions (the reference
once per call, each normal image once per call) are timed apart and amortised over the outputs
that share them; AGO is timed apart too (it runs once per reference and is cached across jobs).
O2MAG is timed with one output per normal image (the worst case: R and N serve one target) and
with `--targets` outputs on one normal image (R and N shared by all of them in each UNet call).
Target: O2MAG's sampling costs at most 3.3x AnoGen per image.

CPU (default): "small" architecture (SD's shape at a quarter of its widths), 256 px, 25 steps.

    .venv/bin/python -m bench.bench_o2mag [--arch small] [--resolution 256] [--steps 25] [--repeats 3]

On a small shared CPU pass `--threads 1`: two threads contending with other processes thrash.

GPU (`--gpu`): SD 1.5-sized UNet/VAE/text encoder with random weights, 512x512, 50 DDIM steps,
guidance 7.5, fp16 + SDPA (the production loader): the same table, with images/s.

    .venv/bin/python -m bench.bench_o2mag --gpu

`--model-dir` reuses a saved model (a real SD 1.5 works too) instead of building one.
"""

import statistics
import time

import numpy as np
import torch
from PIL import Image

from bench.diffusion_setup import bench_model, diffusion_arguments, fmt, target_mask, timed
from models.diffusion.generation import GenerateItem
from models.diffusion.loading import StableDiffusion
from models.diffusion.textual_inversion import LearnedEmbedding, initial_vectors
from models.methods.anogen import AnoGenParams
from models.methods.anogen import pipeline as anogen
from models.methods.o2mag import O2MAGParams
from models.methods.o2mag import pipeline as o2mag

TARGET_RATIO = 3.3
AGO_TIMED_STEPS = 3


def main() -> None:
    parser = diffusion_arguments(__doc__)
    parser.add_argument("--targets", type=int, default=4, help="outputs on one normal image, batched together")
    args = parser.parse_args()
    with bench_model(args) as model:
        compare_with_anogen(model.sd, model.resolution, model.steps, model.guidance, args.targets, args.repeats)


def compare_with_anogen(sd: StableDiffusion, resolution: int, steps: int, guidance: float, targets: int,
                        repeats: int) -> None:
    params = O2MAGParams(resolution=resolution, num_inference_steps=steps, guidance_scale=guidance,
                         ago_steps=AGO_TIMED_STEPS)
    reference, reference_mask, normal = scene(resolution)
    embedding = o2mag.optimize_embedding(sd, reference, reference_mask, params.model_copy(update={"ago_steps": 0}),
                                         seed=0)
    one = [GenerateItem(normal, target_mask(resolution, 0), 0)]
    many = [GenerateItem(normal, target_mask(resolution, n), n) for n in range(targets)]
    run_anogen = anogen_runner(sd, resolution, steps, guidance, normal)

    def run_o2mag(items):
        return o2mag_phases(sd, reference, reference_mask, items, params, embedding, targets)

    run_anogen()  # warm-up: first calls allocate and pick kernels
    run_o2mag(one)
    anogen_s, one_runs, many_runs = [], [], []
    for _ in range(repeats):  # alternate, so drifting machine load hits all alike
        anogen_s.append(timed(run_anogen, sd.device))
        one_runs.append(run_o2mag(one))
        many_runs.append(run_o2mag(many))
    ago_s = timed(lambda: o2mag.optimize_embedding(sd, reference, reference_mask, params, seed=0), sd.device)

    anogen_median = statistics.median(anogen_s)
    print(f"{'AnoGen generate, 1 image':<34}: {anogen_median:.3f} s/image  (runs: {fmt(anogen_s)})")
    for label, runs, count in (("1 output per normal", one_runs, 1), (f"{targets} outputs on one normal", many_runs,
                                                                       targets)):
        inversion = statistics.median(run[0] for run in runs)
        sampling = statistics.median(run[1] for run in runs) / count
        ratio = sampling / anogen_median
        verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
        amortised = inversion / count + sampling
        print(f"{'O2MAG, ' + label:<34}: sampling {sampling:.3f} s/image = {ratio:.2f}x AnoGen "
              f"(target <= {TARGET_RATIO}: {verdict}) (runs: {fmt([run[1] / count for run in runs])})")
        print(f"{'':<34}  inversions {inversion:.3f} s per call; with them amortised {amortised:.3f} s/image"
              + (f" = {1 / amortised:.2f} images/s" if sd.device.type == "cuda" else ""))
    if sd.device.type == "cuda":
        print(f"AnoGen: {1 / anogen_median:.2f} images/s at batch 1; O2MAG sampling alone: "
              f"{1 / statistics.median(run[1] for run in one_runs):.2f} images/s (1 per normal), "
              f"{targets / statistics.median(run[1] for run in many_runs):.2f} images/s ({targets} per normal); "
              f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"AGO: {ago_s / AGO_TIMED_STEPS:.3f} s/step (reference encoding included), so about "
          f"{ago_s / AGO_TIMED_STEPS * 500:.0f} s for the paper's 500 steps, once per reference (cached)")


def o2mag_phases(sd, reference, reference_mask, items, params, embedding, targets) -> tuple[float, float]:
    """(seconds to the end of the inversions, seconds of sampling, decoding and compositing) of one call."""
    marks = {}

    def on_progress(stage, done, total):
        marks[stage] = time.perf_counter()
        if stage == "invert" and sd.device.type == "cuda":
            torch.cuda.synchronize()
            marks[stage] = time.perf_counter()

    if sd.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    o2mag.generate(sd, reference, reference_mask, items, params, embedding=embedding, targets_per_call=targets,
                   on_progress=on_progress)
    if sd.device.type == "cuda":
        torch.cuda.synchronize()
    finished = time.perf_counter()
    return marks["invert"] - started, finished - marks["invert"]


def anogen_runner(sd: StableDiffusion, resolution: int, steps: int, guidance: float, normal: Image.Image):
    embedding = LearnedEmbedding([anogen.PLACEHOLDER], initial_vectors(sd, "defect", 1))
    params = AnoGenParams(resolution=resolution, num_inference_steps=steps, guidance_scale=guidance)
    box = target_mask(resolution, 0)
    return lambda: anogen.generate(sd, embedding, [(normal, box, 0)], params, images_per_batch=1)


def scene(resolution: int) -> tuple[Image.Image, np.ndarray, Image.Image]:
    """A reference image with a defect mask covering about 3% of it, and a normal image."""
    rng = np.random.default_rng(0)
    reference = Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), np.uint8))
    normal = Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), np.uint8))
    mask = np.zeros((resolution, resolution), bool)
    mask[resolution // 3 : resolution // 2, 2 * resolution // 5 : 3 * resolution // 5] = True
    return reference, mask, normal


if __name__ == "__main__":
    main()
