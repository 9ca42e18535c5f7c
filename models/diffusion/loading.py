"""Load a diffusers-format SD 1.5 directory once per worker process, and hand out fresh schedulers.

Every job of a process shares the loaded modules, so methods must leave them as they found them:
attention processors and extra token embeddings are installed inside `with` blocks that restore
the originals (see attention.py and textual_inversion.py). Schedulers hold per-run state, so
each job takes its own from `fresh_scheduler`.

Precision: fp16 weights on CUDA. On the CPU the weights stay fp32, and with `precision` "bf16"
(or "auto" on a CPU with native bf16, see models/precision.py) every UNet call and VAE
encode/decode runs under bf16 autocast: oneDNN's bf16 convolutions and matmuls, fp32 weights and
fp32 everywhere else (text encoder, latents between steps, the composite onto the normal image).
Callers take the UNet's and VAE's outputs with `.float()` already, so nothing else changes.
"""

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextModel, CLIPTokenizer

from models.diffusion.checks import sd_dir_problem, weight_variants
from models.errors import InputError
from models.precision import Precision, autocast_dtype


class ModelUnavailable(InputError):
    """The SD directory is missing or malformed; the message says which part."""


@dataclass(eq=False)
class StableDiffusion:
    """The loaded components of one SD 1.5 directory, on one device, in inference mode."""

    model_dir: Path
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype  # of the weights: float16 on CUDA, float32 on CPU
    autocast_dtype: torch.dtype | None = None  # bfloat16: the UNet and VAE run under CPU autocast

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_sd(model_dir: str | Path | None, device: str | None = None, precision: Precision = "fp32") -> StableDiffusion:
    """The SD model in `model_dir` on `device` (default: CUDA when present), loaded once per process
    and precision. `precision` matters on the CPU only (see the module docstring).

    Raises ModelUnavailable when the directory is not usable (the reason from `sd_dir_problem`).
    """
    problem = sd_dir_problem(str(model_dir) if model_dir else None)
    if problem:
        raise ModelUnavailable(f"this worker cannot load Stable Diffusion: {problem}")
    device = torch.device(device or default_device())
    cpu_autocast = autocast_dtype(device, precision) if device.type == "cpu" else None
    return _load(Path(model_dir).resolve(), device, cpu_autocast)


def fresh_scheduler(sd: StableDiffusion) -> DDIMScheduler:
    """A new DDIM scheduler for one job, from the model's scheduler config."""
    return DDIMScheduler.from_config(sd.scheduler_config)


def _run_under_autocast(module: torch.nn.Module, method: str, dtype: torch.dtype) -> None:
    """Make `module.<method>` run under CPU autocast to `dtype`, a fresh autocast region per call."""
    original = getattr(module, method)

    @functools.wraps(original)
    def under_autocast(*args, **kwargs):
        with torch.autocast("cpu", dtype=dtype):
            return original(*args, **kwargs)

    setattr(module, method, under_autocast)


@functools.cache
def _load(model_dir: Path, device: torch.device, cpu_autocast: torch.dtype | None) -> StableDiffusion:
    # fp16 halves memory and time on GPUs; CPUs lack fast fp16 kernels, so stay fp32 there.
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    def diffusers_model(cls, subfolder):
        variant = None if None in weight_variants(model_dir / subfolder) else "fp16"
        return cls.from_pretrained(
            model_dir, subfolder=subfolder, torch_dtype=dtype, variant=variant, local_files_only=True
        )

    unet = diffusers_model(UNet2DConditionModel, "unet")
    vae = diffusers_model(AutoencoderKL, "vae")
    text_variant = None if None in weight_variants(model_dir / "text_encoder") else "fp16"
    text_encoder = CLIPTextModel.from_pretrained(
        model_dir / "text_encoder", dtype=dtype, variant=text_variant, attn_implementation="sdpa",
        local_files_only=True,
    )
    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True)
    scheduler_config = dict(DDIMScheduler.load_config(model_dir, subfolder="scheduler", local_files_only=True))

    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    # PyTorch's scaled-dot-product attention (flash / memory-efficient kernels on CUDA) everywhere;
    # a method swaps in its own processors only on the layers it must inspect.
    unet.set_attn_processor(AttnProcessor2_0())
    vae.set_attn_processor(AttnProcessor2_0())
    if cpu_autocast is not None:
        # forward, encode and decode are what every caller uses (the UNet is called, the VAE is not)
        _run_under_autocast(unet, "forward", cpu_autocast)
        _run_under_autocast(vae, "encode", cpu_autocast)
        _run_under_autocast(vae, "decode", cpu_autocast)
    return StableDiffusion(
        model_dir=model_dir,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        device=device,
        dtype=dtype,
        autocast_dtype=cpu_autocast,
    )
