"""Speed of GroundingAnomaly generation, on random-weight models of SD 1.5's and ConvNeXt-Tiny's architectures.

What is compared: GroundingAnomaly's generate per image (the SCM once per image, then NDI: DDIM
over the last `strength` share of the schedule, each step one UNet call with the gated blocks and
LoRA for the conditional prediction and one with LoRA alone for the unconditional) against an
AnoGen generate at the same size, full-schedule steps and guidance, timed alternately in one run.
Target: GroundingAnomaly costs at most 1.0x AnoGen per image at strength 0.7. On the CPU both wall
and process CPU time are reported: with `--threads 1` on a shared machine the CPU time is the
steadier measure.

CPU (default): "small" SD (SD's shape at a quarter of its widths) at 256 px and a "small" ConvNeXt
(ConvNeXt-Tiny's depths at a quarter of its widths).

    .venv/bin/python -m bench.bench_groundinganomaly [--arch small] [--resolution 256] [--steps 25] [--strength 0.7]

GPU (`--gpu`): SD 1.5-sized UNet/VAE/text encoder with random weights, 512x512, fp16 + SDPA (the
production loader), and ConvNeXt-Tiny's exact config with random weights (fp32, as in production):
the same table at batch 1 and 8, with images/s and peak memory.

    .venv/bin/python -m bench.bench_groundinganomaly --gpu

`--model-dir` / `--convnext-dir` reuse saved models (real SD 1.5 and convnext-tiny-224 work too).
"""

import tempfile
import time
from pathlib import Path

import torch

from bench.bench_anomalycontrol import scene
from bench.diffusion_setup import against_anogen, anogen_runner, bench_model, diffusion_arguments, target_mask
from models.diffusion.loading import StableDiffusion
from models.diffusion.textual_inversion import LearnedEmbedding, initial_vectors
from models.diffusion.tiny_convnext import build_random_convnext
from models.methods.groundinganomaly import GroundingAnomalyParams
from models.methods.groundinganomaly import pipeline as grounding
from models.methods.groundinganomaly.gsm import GatedBlocks, lora_config
from models.methods.groundinganomaly.scm import SpatialConditioning, load_convnext

TARGET_RATIO = 1.0


def main() -> None:
    parser = diffusion_arguments(__doc__)
    parser.add_argument("--strength", type=float, default=0.7, help="NDI strength (default 0.7, the method's)")
    parser.add_argument("--convnext-arch", choices=["tiny", "small", "convnext-tiny"],
                        help="default: small (CPU), convnext-tiny (--gpu)")
    parser.add_argument("--convnext-dir", type=Path, help="a saved ConvNextModel directory to use instead")
    parser.add_argument("--batches", help="images per UNet batch to time; default: 1 (CPU), 1,8 (--gpu)")
    args = parser.parse_args()
    batches = [int(size) for size in (args.batches or ("1,8" if args.gpu else "1")).split(",")]
    with bench_model(args) as model, tempfile.TemporaryDirectory() as scratch:
        convnext_dir = args.convnext_dir
        if convnext_dir is None:
            arch = args.convnext_arch or ("convnext-tiny" if args.gpu else "small")
            convnext_dir = build_random_convnext(Path(scratch) / arch, arch)
            print(f"built a random {arch!r} ConvNeXt")
        adapter = random_adapter(model.sd, str(convnext_dir))
        compare_with_anogen(model.sd, adapter, model.resolution, model.steps, model.guidance, args.strength,
                            batches, args.repeats)


def random_adapter(sd: StableDiffusion, convnext_dir: str) -> grounding.LoadedAdapter:
    """Untrained SCM, GSM and LoRA of the sizes a fine-tune makes (the cost does not depend on the values)."""
    convnext = load_convnext(convnext_dir, sd.device)
    width = sd.unet.config.cross_attention_dim
    tokens = torch.cat([initial_vectors(sd, word, 1) for word in ("background", "tile", "crack")])
    scm = SpatialConditioning(tokens, convnext, width).to(sd.device).eval()
    gated = GatedBlocks(sd.unet, width).to(sd.device).eval()
    millions = sum(p.numel() for p in convnext.parameters()) / 1e6
    print(f"ConvNeXt {millions:.1f}M parameters, hidden sizes {convnext.config.hidden_sizes}; "
          f"{len(gated.blocks)} gated blocks; LoRA rank 8")
    masks = LearnedEmbedding([grounding.token_names(["crack"])[2]], tokens[2:])
    return grounding.LoadedAdapter(scm, gated, lora_config(8), None, masks, {"product": "tile", "defects": ["crack"]})


def compare_with_anogen(sd: StableDiffusion, adapter, resolution: int, steps: int, guidance: float, strength: float,
                        batches: list[int], repeats: int) -> None:
    params = GroundingAnomalyParams(resolution=resolution, num_inference_steps=steps, guidance_scale=guidance,
                                    strength=strength)
    _, normal = scene(resolution)
    print(f"{steps} steps in the schedule; NDI at strength {strength} runs {int(steps * strength)} of them")
    for batch in batches:
        items = [(normal, target_mask(resolution, n), n) for n in range(batch)]
        run_anogen = anogen_runner(sd, resolution, steps, guidance, items)

        def run_grounding(items=items):
            grounding.generate(sd, adapter, items, params, defect="crack")

        against_anogen("GroundingAnomaly", run_grounding, run_anogen, sd.device, batch, repeats, TARGET_RATIO)
    if sd.device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - started:.0f} s")
