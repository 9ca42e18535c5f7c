"""Speed of AnoGen generation, on random-weight models of SD 1.5's architecture.

CPU (default): AnoGen `generate` against diffusers' own StableDiffusionPipeline built from the
same loaded components, same size, steps and guidance, timed alternately in one run. Target:
AnoGen costs at most 1.1x the pipeline (its extra work: encoding the normal image, blending
outside the box every step, compositing in pixel space).

    .venv/bin/python -m bench.bench_anogen [--arch small] [--resolution 256] [--steps 25] [--repeats 3]

On a small shared CPU pass `--threads 1`: two threads contending with other processes thrash.

GPU (`--gpu`): SD 1.5-sized UNet/VAE/text encoder with random weights, 512x512, 50 DDIM steps,
guidance 7.5, fp16 + SDPA (the production loader): images/s at batch 1, 4 and 8, AnoGen and
the pipeline. Target: 4 images/s on an H100.

    .venv/bin/python -m bench.bench_anogen --gpu

`--model-dir` reuses a saved model (a real SD 1.5 works too) instead of building one.
"""

import statistics

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from bench.diffusion_setup import bench_model, diffusion_arguments, fmt, timed
from models.diffusion.loading import StableDiffusion, fresh_scheduler
from models.diffusion.textual_inversion import LearnedEmbedding, initial_vectors
from models.methods.anogen import AnoGenParams
from models.methods.anogen import pipeline as anogen

PROMPT = "a photo of a defect"
TARGET_RATIO = 1.10
TARGET_GPU_IMAGES_PER_SECOND = 4.0


def main() -> None:
    parser = diffusion_arguments(__doc__)
    parser.add_argument("--batches", default="1,4,8", help="--gpu: batch sizes")
    args = parser.parse_args()
    with bench_model(args) as model:
        if args.gpu:
            batches = [int(size) for size in args.batches.split(",")]
            throughput(model.sd, model.resolution, model.steps, model.guidance, batches, args.repeats)
        else:
            compare_with_pipeline(model.sd, model.resolution, model.steps, model.guidance, args.repeats)


def compare_with_pipeline(sd: StableDiffusion, resolution: int, steps: int, guidance: float, repeats: int) -> None:
    run_anogen, run_pipeline = runners(sd, resolution, steps, guidance, batch=1)
    run_anogen()  # warm-up: first calls allocate and pick kernels
    run_pipeline()
    anogen_times, pipeline_times = [], []
    for _ in range(repeats):  # alternate, so drifting machine load hits both alike
        anogen_times.append(timed(run_anogen, sd.device))
        pipeline_times.append(timed(run_pipeline, sd.device))
    anogen_s, pipeline_s = statistics.median(anogen_times), statistics.median(pipeline_times)
    ratio = anogen_s / pipeline_s
    print(f"AnoGen generate        : median {anogen_s:.3f} s  (runs: {fmt(anogen_times)})")
    print(f"StableDiffusionPipeline: median {pipeline_s:.3f} s  (runs: {fmt(pipeline_times)})")
    verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
    print(f"ratio AnoGen / pipeline: {ratio:.3f}  (target <= {TARGET_RATIO}: {verdict})")


def throughput(sd, resolution, steps, guidance, batches, repeats) -> None:
    print(f"{'batch':>5} {'AnoGen img/s':>13} {'pipeline img/s':>15}")
    for batch in batches:
        run_anogen, run_pipeline = runners(sd, resolution, steps, guidance, batch)
        run_anogen()
        run_pipeline()
        anogen_s = statistics.median(timed(run_anogen, sd.device) for _ in range(repeats))
        pipeline_s = statistics.median(timed(run_pipeline, sd.device) for _ in range(repeats))
        print(f"{batch:>5} {batch / anogen_s:>13.2f} {batch / pipeline_s:>15.2f}")
    if sd.device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; "
              f"target: {TARGET_GPU_IMAGES_PER_SECOND} img/s on an H100")


def runners(sd: StableDiffusion, resolution: int, steps: int, guidance: float, batch: int):
    """Two zero-argument callables making `batch` images each: AnoGen, and diffusers' pipeline."""
    embedding = LearnedEmbedding([anogen.PLACEHOLDER], initial_vectors(sd, "defect", 1))
    params = AnoGenParams(resolution=resolution, num_inference_steps=steps, guidance_scale=guidance)
    normal = Image.fromarray(np.random.default_rng(0).integers(0, 256, (resolution, resolution, 3), np.uint8))
    box = np.zeros((resolution, resolution), bool)
    box[resolution // 4 : resolution // 2, resolution // 3 : 2 * resolution // 3] = True
    items = [(normal, box, seed) for seed in range(batch)]
    pipeline = StableDiffusionPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
        scheduler=fresh_scheduler(sd), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)

    def run_anogen():
        anogen.generate(sd, embedding, items, params, images_per_batch=batch)

    def run_pipeline():
        pipeline(PROMPT, height=resolution, width=resolution, num_inference_steps=steps, guidance_scale=guidance,
                 num_images_per_prompt=batch, generator=torch.Generator().manual_seed(0))

    return run_anogen, run_pipeline


if __name__ == "__main__":
    main()
