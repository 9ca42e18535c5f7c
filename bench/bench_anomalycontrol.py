"""Speed of AnomalyControl generation, on random-weight models of SD 1.5's and BLIP-2's architectures.

What is compared: AnomalyControl's generate per image (blended latent DDIM with SGA, one more
attention per cross-attention layer) against an AnoGen generate at the same size, steps (30, the
paper's) and guidance, timed alternately in one run. CSM + ASEA (the BLIP-2 ViT once, the
Q-Former T_g + 1 times) runs once per reference, so it is timed apart and amortised over the
outputs of one call (a worker's call holds up to 8 outputs of one reference). Target:
AnomalyControl costs at most 1.2x AnoGen per image. On the CPU both wall and process CPU time
are reported: with `--threads 1` on a shared machine the CPU time is the steadier measure.

CPU (default): "small" SD (SD's shape at a quarter of its widths) at 256 px and a "small" BLIP-2
(a narrow ViT at 224 px, 32 queries, a Q-Former as wide as the small SD's cross-attention).

    .venv/bin/python -m bench.bench_anomalycontrol [--arch small] [--resolution 256] [--steps 30] [--repeats 3]

On a small shared CPU pass `--threads 1`: two threads contending with other processes thrash.

GPU (`--gpu`): SD 1.5-sized UNet/VAE/text encoder with random weights, 512x512, fp16 + SDPA (the
production loader), and BLIP-2 at blip2-itm-vit-g's size (ViT-g, 32 queries, 768-wide Q-Former)
with random weights, fp32 as in production: the same table at batch 1 and 8, with images/s and
peak memory.

    .venv/bin/python -m bench.bench_anomalycontrol --gpu

`--model-dir` / `--blip2-dir` reuse saved models (real SD 1.5 and blip2-itm-vit-g work too).
"""

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.diffusion_setup import anogen_runner, bench_model, diffusion_arguments, fmt, target_mask, wall_and_cpu
from models.diffusion.loading import StableDiffusion
from models.diffusion.tiny_blip2 import build_random_blip2
from models.methods.anomalycontrol import AnomalyControlParams
from models.methods.anomalycontrol import pipeline as anomalycontrol
from models.methods.anomalycontrol.csm import TEXT_TEMPLATE, Blip2, load_blip2
from models.methods.anomalycontrol.sga import SemanticGuidedAdapter

TARGET_RATIO = 1.2
OUTPUTS_PER_CALL = 8  # models.methods.anomalycontrol.method.PAIRS_PER_CALL: what one CSM serves


def main() -> None:
    parser = diffusion_arguments(__doc__)
    parser.set_defaults(steps=30)
    parser.add_argument("--blip2-arch", choices=["tiny", "small", "blip2"], help="default: small (CPU), blip2 (--gpu)")
    parser.add_argument("--blip2-dir", type=Path, help="a saved BLIP-2 directory to use instead")
    parser.add_argument("--batches", help="images per UNet batch to time; default: 1 (CPU), 1,8 (--gpu)")
    args = parser.parse_args()
    batches = [int(size) for size in (args.batches or ("1,8" if args.gpu else "1")).split(",")]
    with bench_model(args) as model, tempfile.TemporaryDirectory() as scratch:
        blip2 = bench_blip2(args, model.sd.device, Path(scratch))
        compare_with_anogen(model.sd, blip2, model.resolution, model.steps, model.guidance, batches, args.repeats)


def bench_blip2(args, device: torch.device, scratch: Path) -> Blip2:
    """The BLIP-2 the arguments ask for, loaded through the production loader."""
    blip2_dir = args.blip2_dir
    if blip2_dir is None:
        arch = args.blip2_arch or ("blip2" if args.gpu else "small")
        started = time.perf_counter()
        blip2_dir = build_random_blip2(scratch / arch, arch, device=str(device))
        print(f"built a random {arch!r} BLIP-2 in {time.perf_counter() - started:.1f} s")
    blip2 = load_blip2(blip2_dir, device)
    millions = sum(p.numel() for p in blip2.model.parameters()) / 1e6
    print(f"BLIP-2 {blip2.model_dir.name}: {millions:.1f}M parameters, fp32, {blip2.num_queries} queries, "
          f"Q-Former width {blip2.width}, patch grid {blip2.patch_grid}")
    return blip2


def compare_with_anogen(sd: StableDiffusion, blip2: Blip2, resolution: int, steps: int, guidance: float,
                        batches: list[int], repeats: int) -> None:
    params = AnomalyControlParams(resolution=resolution, num_inference_steps=steps, guidance_scale=guidance)
    reference, normal = scene(resolution)
    adapter = anomalycontrol.LoadedAdapter(
        SemanticGuidedAdapter.from_unet(sd.unet, blip2.width, blip2.num_queries).to(sd.dtype),
        {"templates": {"text": TEXT_TEMPLATE, "target": anomalycontrol.TARGET_TEMPLATE}},
    )

    def run_csm():
        return anomalycontrol.reference_features(blip2, reference, params)

    features = run_csm()  # warm-up too
    print(f"ASEA energy {features.energies[0]:.4f} -> {features.energies[-1]:.4f} in {params.asea_steps} steps")
    for batch in batches:
        items = [(normal, target_mask(resolution, n), n) for n in range(batch)]
        run_anogen = anogen_runner(sd, resolution, steps, guidance, items)

        def run_anomalycontrol(items=items):
            anomalycontrol.generate(sd, blip2, adapter, reference, items, params, prompt="a photo of a tile with crack",
                                    features=features, images_per_batch=len(items))

        run_anogen()  # warm-up: first calls allocate and pick kernels
        run_anomalycontrol()
        runs = {"anogen": [], "anomalycontrol": [], "csm": []}  # (wall s, CPU s) per run
        for _ in range(repeats):  # alternate, so drifting machine load hits all alike
            for name, run, per in (("anogen", run_anogen, batch), ("anomalycontrol", run_anomalycontrol, batch),
                                   ("csm", run_csm, 1)):
                runs[name].append(wall_and_cpu(run, sd.device, per))
        print(f"batch {batch}:")
        clocks = ("wall", "CPU") if sd.device.type == "cpu" else ("wall",)
        for clock, column in zip(clocks, (0, 1)):
            anogen_s, control_s, csm_s = ([run[column] for run in runs[name]] for name in runs)
            anogen_median, control_median, csm = (statistics.median(x) for x in (anogen_s, control_s, csm_s))
            ratio = control_median / anogen_median
            amortised = control_median + csm / OUTPUTS_PER_CALL
            amortised_ratio = amortised / anogen_median
            print(f"  {clock} time")
            print(f"    {'AnoGen generate':<32}: {anogen_median:.3f} s/image  (runs: {fmt(anogen_s)})")
            print(f"    {'AnomalyControl generate':<32}: {control_median:.3f} s/image = {ratio:.2f}x AnoGen "
                  f"(target <= {TARGET_RATIO}: {'PASS' if ratio <= TARGET_RATIO else 'FAIL'})  "
                  f"(runs: {fmt(control_s)})")
            print(f"    {'CSM + ASEA, once per reference':<32}: {csm:.3f} s  (runs: {fmt(csm_s)}); amortised over "
                  f"{OUTPUTS_PER_CALL} outputs {amortised:.3f} s/image = {amortised_ratio:.2f}x AnoGen "
                  f"({'PASS' if amortised_ratio <= TARGET_RATIO else 'FAIL'})")
        if sd.device.type == "cuda":
            print(f"  images/s: AnoGen {1 / anogen_median:.2f}, AnomalyControl {1 / control_median:.2f} "
                  f"({1 / amortised:.2f} with CSM amortised)")
    if sd.device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def scene(resolution: int) -> tuple[anomalycontrol.Reference, Image.Image]:
    """A reference with a defect mask covering about 3% of it, and a normal image."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), np.uint8))
    normal = Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), np.uint8))
    mask = np.zeros((resolution, resolution), bool)
    mask[resolution // 3 : resolution // 2, 2 * resolution // 5 : 3 * resolution // 5] = True
    return anomalycontrol.Reference(image, mask, "tile", "crack"), normal


if __name__ == "__main__":
    main()
