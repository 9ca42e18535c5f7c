"""Is this a usable Stable Diffusion 1.5 directory? Answered without importing torch.

The API lists a diffusion method as `available: false` with the reason this module gives, and
refuses its jobs at submit time, so it must stay importable in the slim API image: standard
library only.
"""

import json
from pathlib import Path

# Weight file names: diffusers models write `diffusion_pytorch_model.*`, transformers `model.*` (or the
# legacy `pytorch_model.bin`); large ones are sharded behind an `.index.json`; `.fp16.` marks the variant.
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def weight_variants(component_dir: Path) -> set[str | None]:
    """The weight variants a component folder holds: None (standard) and/or "fp16"; empty if none."""
    variants: set[str | None] = set()
    for stem in _WEIGHT_STEMS:
        for suffix in _WEIGHT_SUFFIXES:
            if (component_dir / f"{stem}{suffix}").is_file():
                variants.add(None)
            if (component_dir / f"{stem}.fp16{suffix}").is_file():
                variants.add("fp16")
    return variants


def read_json_object(path: Path) -> tuple[dict | None, str | None]:
    if not path.is_file():
        return None, f"{path} is missing"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"{path} is not valid JSON ({error})"
    if not isinstance(data, dict):
        return None, f"{path} is not a JSON object"
    return data, None


def sd_dir_problem(path: str | None) -> str | None:
    """None when `path` looks like a usable diffusers-format SD 1.5 directory, else why not.

    Checks what the loader needs (configs, weights, tokenizer files, a DDIM-compatible epsilon
    scheduler, matching text widths); it does not read the weights themselves.
    """
    if not path:
        return "SD_MODEL_DIR is not set: point it at a diffusers-format Stable Diffusion 1.5 directory"
    root = Path(path)
    if not root.is_dir():
        return f"SD_MODEL_DIR {root} is not a directory"

    _, problem = read_json_object(root / "model_index.json")
    if problem:
        return f"{problem}: not a diffusers-format pipeline directory"

    configs: dict[str, dict] = {}
    for component in ("unet", "vae", "text_encoder"):
        config, problem = read_json_object(root / component / "config.json")
        if problem:
            return problem
        configs[component] = config
        if not weight_variants(root / component):
            return f"{root / component} has no weights (*.safetensors or *.bin)"

    tokenizer = root / "tokenizer"
    has_bpe_files = (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file()
    if not (has_bpe_files or (tokenizer / "tokenizer.json").is_file()):
        return f"{tokenizer} needs vocab.json and merges.txt (or tokenizer.json)"

    scheduler, problem = read_json_object(root / "scheduler" / "scheduler_config.json")
    if problem:
        return problem
    if scheduler.get("prediction_type", "epsilon") != "epsilon":
        return f"the scheduler predicts {scheduler['prediction_type']!r}; SD 1.5 methods need 'epsilon'"
    if "num_train_timesteps" not in scheduler or "beta_schedule" not in scheduler:
        return f"{root / 'scheduler' / 'scheduler_config.json'} lacks num_train_timesteps or beta_schedule"

    blocks = [*configs["unet"].get("down_block_types", ()), *configs["unet"].get("up_block_types", ()),
              configs["unet"].get("mid_block_type", "UNetMidBlock2DCrossAttn") or "none"]  # None: no mid block
    if not any("CrossAttn" in block for block in blocks):
        return (f"the UNet in {root / 'unet'} has no cross-attention block: the prompt, and every method's "
                "conditioning through it, would never reach the image")
    cross_width = configs["unet"].get("cross_attention_dim")
    text_width = configs["text_encoder"].get("hidden_size")
    if cross_width != text_width:
        return (
            f"the UNet's cross_attention_dim ({cross_width}) does not match the text encoder's "
            f"hidden_size ({text_width})"
        )
    return None
