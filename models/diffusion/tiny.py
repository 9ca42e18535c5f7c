"""Random-weight Stable Diffusion models of SD 1.5's architecture, built in code.

Tests and benchmarks cannot download SD 1.5, so they build a model with the same classes
(UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDIMScheduler), random
weights and a byte-level BPE vocabulary written here, save it with `save_pretrained` into a
diffusers-format directory and load it through the production loader, exactly like the real one.

Sizes: "tiny" for unit tests (milliseconds per UNet call), "small" for CPU benchmarks (SD's
shape at a quarter of its widths, so the UNet/VAE/text-encoder cost ratios stay SD-like), and
"sd15" with SD 1.5's exact configs for GPU throughput benchmarks.
"""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# Words the vocabulary merges into single tokens: the AnoGen initializer and a few prompt words.
# Everything else still tokenizes, byte by byte.
VOCABULARY_WORDS = ("a", "photo", "of", "the", "defect")
MAX_PROMPT_TOKENS = 77  # CLIP's context length

# SD 1.5's scheduler (the DDIM-compatible settings diffusers uses for it).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

_SD15_UNET = {
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 64,
}
_SD15_VAE = {
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "scaling_factor": 0.18215,
    "sample_size": 512,
}

ARCHITECTURES = {
    "tiny": {
        "unet": {**_SD15_UNET, "block_out_channels": (16, 16, 32, 32), "layers_per_block": 1,
                 "attention_head_dim": 2, "cross_attention_dim": 32, "norm_num_groups": 8},
        "vae": {**_SD15_VAE, "block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 4},
        "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "projection_dim": 32},
    },
    "small": {
        "unet": {**_SD15_UNET, "block_out_channels": (64, 128, 256, 256), "layers_per_block": 2,
                 "attention_head_dim": 8, "cross_attention_dim": 192, "norm_num_groups": 32},
        "vae": {**_SD15_VAE, "block_out_channels": (32, 64, 128, 128), "layers_per_block": 2, "norm_num_groups": 32},
        "text_encoder": {"hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 12,
                         "num_attention_heads": 12, "projection_dim": 192},
    },
    "sd15": {
        "unet": {**_SD15_UNET, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
                 "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32},
        "vae": {**_SD15_VAE, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32},
        "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                         "num_attention_heads": 12, "projection_dim": 768, "vocab_size": 49408},
    },
}


def build_tiny_sd(path: str | Path, resolution: int = 64) -> Path:
    """A tiny random SD for unit tests, saved at `path`; its UNet's default size matches `resolution`."""
    return build_random_sd(path, "tiny", resolution=resolution)


def build_random_sd(
    path: str | Path,
    architecture: str = "tiny",
    *,
    resolution: int = 512,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Build a random-weight SD of one of `ARCHITECTURES` and save it in diffusers format at `path`.

    `device` only speeds up building (SD 1.5-sized initialisation is quick on a GPU); `dtype`
    float16 halves the files. Returns the directory.
    """
    spec = ARCHITECTURES[architecture]
    path = Path(path)
    torch.manual_seed(seed)

    tokenizer = _write_and_load_tokenizer(path / "tokenizer")
    text_config = CLIPTextConfig(
        **{"vocab_size": len(tokenizer), **spec["text_encoder"]},
        max_position_embeddings=MAX_PROMPT_TOKENS,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.device(device):
        unet = UNet2DConditionModel(**{**spec["unet"], "sample_size": resolution // 8})
        vae = AutoencoderKL(**{**spec["vae"], "sample_size": resolution})
        text_encoder = CLIPTextModel(text_config)
    if dtype != torch.float32:
        unet, vae, text_encoder = unet.to(dtype), vae.to(dtype), text_encoder.to(dtype)

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)
    return path


def _write_and_load_tokenizer(folder: Path) -> CLIPTokenizer:
    """Write a CLIP-style byte-level BPE vocabulary (vocab.json, merges.txt) and load it."""
    alphabet = _byte_alphabet()
    merges: list[tuple[str, str]] = []
    for word in VOCABULARY_WORDS:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:  # merge left to right until the word is one token
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            symbols = [pair[0] + pair[1], *symbols[2:]]

    tokens = [*alphabet, *(char + "</w>" for char in alphabet), *(a + b for a, b in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}), encoding="utf-8")
    merge_lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_PROMPT_TOKENS)


def _byte_alphabet() -> list[str]:
    """Byte-level BPE's 256 symbols: printable bytes stand for themselves, the rest map above U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {byte: chr(byte) for byte in printable}
    for offset, byte in enumerate(b for b in range(256) if b not in symbols):
        symbols[byte] = chr(256 + offset)
    return [symbols[byte] for byte in range(256)]
