"""What the diffusion benchmarks share: their common arguments, the model they time (a random-weight
model of SD 1.5's architecture built on the spot, or a saved one), and small timing helpers."""

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.diffusion.loading import StableDiffusion, load_sd
from models.diffusion.textual_inversion import LearnedEmbedding, initial_vectors
from models.diffusion.tiny import build_random_sd
from models.methods.anogen import AnoGenParams
from models.methods.anogen import pipeline as anogen


def diffusion_arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="SD 1.5 size on CUDA at 512 px, 50 steps, fp16")
    parser.add_argument("--arch", choices=["tiny", "small", "sd15"], help="default: small (CPU), sd15 (--gpu)")
    parser.add_argument("--model-dir", type=Path, help="a saved diffusers-format SD directory to use instead")
    parser.add_argument("--device", help="default: cuda with --gpu, else cpu")
    parser.add_argument("--resolution", type=int, help="default: 256 (CPU), 512 (--gpu)")
    parser.add_argument("--steps", type=int, help="default: 25 (CPU), 50 (--gpu)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser


@dataclass
class BenchModel:
    sd: StableDiffusion
    resolution: int
    steps: int
    guidance: float


@contextmanager
def bench_model(args: argparse.Namespace) -> Iterator[BenchModel]:
    """The model the arguments ask for, loaded through the production loader, with the CPU and GPU defaults."""
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
        yield BenchModel(sd, resolution, steps, args.guidance)


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


def wall_and_cpu(run, device: torch.device, per: int) -> tuple[float, float]:
    """Wall and process CPU seconds of one run, each divided by `per`. On a shared CPU the CPU time
    (with one torch thread) counts the work itself, whatever else the machine is running."""
    started = time.process_time()
    wall = timed(run, device)
    return wall / per, (time.process_time() - started) / per


def anogen_runner(sd: StableDiffusion, resolution: int, steps: int, guidance: float, items):
    """AnoGen generate on `items` with an untrained embedding: the baseline the methods are timed against."""
    embedding = LearnedEmbedding([anogen.PLACEHOLDER], initial_vectors(sd, "defect", 1))
    params = AnoGenParams(resolution=resolution, num_inference_steps=steps, guidance_scale=guidance)
    return lambda: anogen.generate(sd, embedding, items, params, images_per_batch=len(items))


def target_mask(resolution: int, number: int) -> np.ndarray:
    """One of a few target masks on the normal image, each about 4% of it."""
    mask = np.zeros((resolution, resolution), bool)
    top, left = (resolution // 8) * (1 + number % 3), (resolution // 8) * (1 + number // 3 % 3)
    mask[top : top + resolution // 5, left : left + resolution // 5] = True
    return mask


def against_anogen(name: str, run_method, run_anogen, device: torch.device, batch: int, repeats: int,
                   target: float, heading=lambda: "") -> None:
    """Time `run_method` against `run_anogen` (each making `batch` images), alternately after a warm-up
    of each, and print per clock the medians per image and their ratio against `target`.
    `heading()` is read after the runs (what they did, e.g. the step re-weighting started at)."""
    run_anogen()  # warm-up: first calls allocate and pick kernels
    run_method()
    runs = {"AnoGen": [], name: []}  # (wall s, CPU s) per run
    for _ in range(repeats):  # alternate, so drifting machine load hits both alike
        for label, run in (("AnoGen", run_anogen), (name, run_method)):
            runs[label].append(wall_and_cpu(run, device, batch))
    print(f"batch {batch}{heading()}:")
    width = len(name) + 10
    clocks = ("wall", "CPU") if device.type == "cpu" else ("wall",)
    for clock, column in zip(clocks, (0, 1)):
        anogen_s, method_s = ([run[column] for run in runs[label]] for label in runs)
        anogen_median, method_median = statistics.median(anogen_s), statistics.median(method_s)
        ratio = method_median / anogen_median
        print(f"  {clock} time")
        print(f"    {'AnoGen generate':<{width}}: {anogen_median:.3f} s/image  (runs: {fmt(anogen_s)})")
        print(f"    {name + ' generate':<{width}}: {method_median:.3f} s/image = {ratio:.2f}x AnoGen "
              f"(target <= {target}: {'PASS' if ratio <= target else 'FAIL'})  (runs: {fmt(method_s)})")
    if device.type == "cuda":
        print(f"  images/s: AnoGen {1 / anogen_median:.2f}, {name} {1 / method_median:.2f}")
