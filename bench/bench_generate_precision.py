"""CPU generation in fp32 against bf16 autocast (the UNet and VAE): AnoGen generate, side by side.

Random-weight models of SD 1.5's architecture (``small``, and ``sd15`` with SD 1.5's exact
configs), each loaded twice through the production loader, ``precision="fp32"`` and ``"bf16"``,
and AnoGen's ``generate`` timed on both alternately. Also prints how far the bf16 images are from
the fp32 ones (inside the box; outside it both are the normal image, exactly).

    nice .venv/bin/python -m bench.bench_generate_precision --archs small sd15 --steps 10 --threads 2
    .venv/bin/python -m bench.bench_generate_precision --gpu     # CUDA fp16 as today (unmeasured here)
"""

import argparse
import functools
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.diffusion_setup import timed
from models.diffusion.loading import load_sd
from models.diffusion.textual_inversion import LearnedEmbedding, initial_vectors
from models.diffusion.tiny import build_random_sd
from models.methods.anogen import AnoGenParams
from models.methods.anogen import pipeline as anogen
from models.precision import cpu_has_native_bf16


def generate(sd, embedding, normal, box, params) -> Image.Image:
    return anogen.generate(sd, embedding, [(normal, box, 0)], params)[0].image


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=["small", "sd15"], choices=["tiny", "small", "sd15"])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--gpu", action="store_true", help="CUDA: one fp16 model, as the GPU path has always run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.gpu else "cpu"
    precisions = ["fp32"] if args.gpu else ["fp32", "bf16"]
    print(f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, native bf16 {cpu_has_native_bf16()}; "
          f"AnoGen, 1 image at {args.resolution} px, {args.steps} DDIM steps, guidance {args.guidance}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    params = AnoGenParams(resolution=args.resolution, num_inference_steps=args.steps, guidance_scale=args.guidance)
    normal = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.resolution,) * 2 + (3,), np.uint8))
    box = np.zeros((args.resolution, args.resolution), bool)
    box[args.resolution // 4: args.resolution // 2, args.resolution // 3: 2 * args.resolution // 3] = True
    rows = []
    for arch in args.archs:
        with tempfile.TemporaryDirectory() as scratch:
            model_dir = build_random_sd(Path(scratch) / arch, arch, resolution=args.resolution, device=device,
                                        dtype=torch.float16 if args.gpu else torch.float32)
            models = {precision: load_sd(model_dir, device, precision) for precision in precisions}
            embedding = LearnedEmbedding([anogen.PLACEHOLDER], initial_vectors(models["fp32"], "defect", 1))

            images = {precision: np.asarray(generate(models[precision], embedding, normal, box, params), np.int16)
                      for precision in precisions}  # also the warm-up
            times = {precision: [] for precision in precisions}
            for _ in range(args.repeats):
                for precision, sd in models.items():
                    job = functools.partial(generate, sd, embedding, normal, box, params)
                    times[precision].append(timed(job, sd.device))
            base = statistics.median(times["fp32"])
            for precision in precisions:
                median = statistics.median(times[precision])
                difference = np.abs(images[precision] - images["fp32"])
                rows.append((arch, precision, median, base / median, difference[box].mean(),
                             int(difference[~box].max()), times[precision]))
            print(f"  {arch} done, load average {os.getloadavg()[0]:.2f}", flush=True)
    print("\n| arch | precision | s per image (median) | speed-up vs fp32 | mean abs diff in box (0-255) "
          "| max diff outside box | runs s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for arch, precision, median, speedup, inside, outside, runs in rows:
        print(f"| {arch} | {precision} | {median:.2f} | {speedup:.2f}x | {inside:.1f} | {outside} "
              f"| {', '.join(f'{t:.2f}' for t in runs)} |")
    print(f"\nload average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {time.strftime('%H:%M')} UTC")


if __name__ == "__main__":
    main()
