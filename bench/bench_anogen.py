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

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from models.diffusion.loading import StableDiffusion, fresh_scheduler, load_sd
from models.diffusion.textual_inversion import LearnedEmbedding, initial_vectors
from models.diffusion.tiny import build_random_sd
from models.methods import anogen
from models.methods.params import AnoGenParams

PROMPT = "a photo of a defect"
TARGET_RATIO = 1.10
TARGET_GPU_IMAGES_PER_SECOND = 4.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="SD 1.5 size on CUDA: images/s at several batch sizes")
    parser.add_argument("--arch", choices=["tiny", "small", "sd15"], help="default: small (CPU), sd15 (--gpu)")
    parser.add_argument("--model-dir", type=Path, help="a saved diffusers-format SD directory to use instead")
    parser.add_argument("--device", help="default: cuda with --gpu, else cpu")
    parser.add_argument("--resolution", type=int, help="default: 256 (CPU), 512 (--gpu)")
    parser.add_argument("--steps", type=int, help="default: 25 (CPU), 50 (--gpu)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batches", default="1,4,8", help="--gpu: batch sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    arch = args.arch or ("sd15" if args.gpu else "small")
    device = args.device or ("cuda" if args.gpu else "cpu")
    resolution = args.resolution or (512 if args.gpu else 256)
    steps = args.steps or (50 if args.gpu else 25)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir
        if model_dir is None:
            started = time.perf_counter()
            model_dir = build_random_sd(
                Path(scratch) / arch, arch, resolution=resolution, device=device,
                dtype=torch.float16 if device == "cuda" else torch.float32,
            )
            print(f"built a random {arch!r} model in {time.perf_counter() - started:.1f} s")
        sd = load_sd(model_dir, device=device)
        print(describe(sd, resolution, steps, args.guidance))
        if args.gpu:
            batches = [int(size) for size in args.batches.split(",")]
            throughput(sd, resolution, steps, args.guidance, batches, args.repeats)
        else:
            compare_with_pipeline(sd, resolution, steps, args.guidance, args.repeats)


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


def timed(run, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def describe(sd: StableDiffusion, resolution: int, steps: int, guidance: float) -> str:
    millions = {name: sum(p.numel() for p in getattr(sd, name).parameters()) / 1e6
                for name in ("unet", "vae", "text_encoder")}
    sizes = ", ".join(f"{name} {count:.1f}M" for name, count in millions.items())
    hardware = torch.cuda.get_device_name(sd.device) if sd.device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    return (f"model {sd.model_dir.name}: {sizes} parameters; {sd.dtype}, {hardware}\n"
            f"{resolution}x{resolution}, {steps} DDIM steps, guidance {guidance}")


def fmt(times: list[float]) -> str:
    return ", ".join(f"{t:.3f}" for t in times)


if __name__ == "__main__":
    main()
