"""Speed of CADiff generation, on random-weight models of SD 1.5's architecture.

What is compared: CADiff's generate per image (blended latent DDIM with the ControlNet on the
mask, SAIM at each of its residuals, and IAR) against an AnoGen generate at the same model size,
resolution, steps and guidance, timed alternately in one run. The ControlNet adds roughly half a
UNet per step (its down and mid blocks); target: CADiff costs at most 1.6x AnoGen per image.

IAR is timed at its costliest: intensity 1.5 and `alpha_threshold` 0, so it re-weights every
cross-attention layer from step 1 on (explicit attention beside SDPA on the conditional half).
A fresh ControlNet + SAIM (`SpatialControl.from_unet`) stands in for a trained one: the cost
does not depend on the weights. On the CPU both wall and process CPU time are reported: with
`--threads 1` on a shared machine the CPU time is the steadier measure.

CPU (default): "small" SD (SD's shape at a quarter of its widths) at 256 px.

    .venv/bin/python -m bench.bench_cadiff [--arch small] [--resolution 256] [--steps 25] [--repeats 3] [--threads 1]

GPU (`--gpu`): SD 1.5-sized UNet/VAE/text encoder with random weights, 512x512, 50 steps, fp16 +
SDPA (the production loader), the ControlNet and SAIM in fp16 as generation loads them: the same
table at batch 1 and 8, with images/s and peak memory.

    .venv/bin/python -m bench.bench_cadiff --gpu

`--model-dir` reuses a saved model (real SD 1.5 works too).
"""


import numpy as np
import torch
from PIL import Image

from bench.diffusion_setup import against_anogen, anogen_runner, bench_model, diffusion_arguments, target_mask
from models.diffusion.loading import StableDiffusion
from models.diffusion.textual_inversion import LearnedEmbedding, initial_vectors
from models.methods.cadiff import CADiffParams
from models.methods.cadiff import pipeline as cadiff
from models.methods.cadiff.control import SpatialControl

TARGET_RATIO = 1.6


def main() -> None:
    parser = diffusion_arguments(__doc__)
    parser.add_argument("--batches", help="images per UNet batch to time; default: 1 (CPU), 1,8 (--gpu)")
    args = parser.parse_args()
    batches = [int(size) for size in (args.batches or ("1,8" if args.gpu else "1")).split(",")]
    with bench_model(args) as model:
        compare_with_anogen(model.sd, model.resolution, model.steps, model.guidance, batches, args.repeats)


def compare_with_anogen(sd: StableDiffusion, resolution: int, steps: int, guidance: float, batches: list[int],
                        repeats: int) -> None:
    params = CADiffParams(resolution=resolution, num_inference_steps=steps, guidance_scale=guidance,
                          intensity=(1.5, 1.5), alpha_threshold=0.0)
    tokens = [cadiff.CONTEXT_TOKEN, cadiff.ANOMALY_TOKEN.format(0)]
    embedding = LearnedEmbedding(tokens, torch.cat([initial_vectors(sd, "tile", 1), initial_vectors(sd, "anomaly", 1)]))
    control = SpatialControl.from_unet(sd.unet, sd.vae_scale_factor).to(sd.dtype).eval().requires_grad_(False)
    millions = sum(p.numel() for p in control.controlnet.parameters()) / 1e6
    saim_millions = sum(p.numel() for p in control.saim.parameters()) / 1e6
    print(f"ControlNet {millions:.1f}M parameters, SAIM {saim_millions:.1f}M in {len(control.saim)} modules")
    adapter = cadiff.CADiffAdapter(embedding, control, {"crack": tokens[1]}, {"template": cadiff.PROMPT_TEMPLATE})
    normal = Image.fromarray(np.random.default_rng(0).integers(0, 256, (resolution, resolution, 3), np.uint8))
    for batch in batches:
        items = [(normal, target_mask(resolution, n), n) for n in range(batch)]
        run_anogen = anogen_runner(sd, resolution, steps, guidance, items)
        reweighted = []

        def run_cadiff(items=items, reweighted=reweighted):
            results = cadiff.generate(sd, adapter, items, params, defect="crack", images_per_batch=len(items))
            reweighted.append(results[0].details["reweighted_from_step"])

        against_anogen("CADiff", run_cadiff, run_anogen, sd.device, batch, repeats, TARGET_RATIO,
                       heading=lambda reweighted=reweighted: f" (IAR re-weighting from step {reweighted[-1]})")
    if sd.device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
