"""Are the local weights a method needs there? Answered without importing torch.

Weights are never downloaded: each is a local directory named by a setting. The API lists a
method whose weights are missing as `available: false` with every reason, and refuses its jobs,
so this module must stay importable in the slim API image: standard library only. The checks look
at what the loaders read (configs, weight files, tokenizer and processor files), not the weights
themselves.
"""

from collections.abc import Callable, Mapping
from pathlib import Path

from models.diffusion.checks import read_json_object, sd_dir_problem, weight_variants


def convnext_dir_problem(path: str | None) -> str | None:
    """None when `path` holds a transformers ConvNextModel (config + weights), else why not."""
    if not path:
        return "CONVNEXT_MODEL_DIR is not set: point it at a transformers ConvNextModel directory (ConvNeXt-Tiny)"
    root = Path(path)
    if not root.is_dir():
        return f"CONVNEXT_MODEL_DIR {root} is not a directory"
    config, problem = read_json_object(root / "config.json")
    if problem:
        return problem
    if config.get("model_type") != "convnext":
        return f"CONVNEXT_MODEL_DIR {root} holds a {config.get('model_type')!r} model, not 'convnext'"
    if not weight_variants(root):
        return f"CONVNEXT_MODEL_DIR {root} has no weights (model.safetensors or pytorch_model.bin)"
    return None


def blip2_dir_problem(path: str | None) -> str | None:
    """None when `path` holds a transformers BLIP-2 model with its tokenizer and image processor."""
    if not path:
        return "BLIP2_MODEL_DIR is not set: point it at a transformers BLIP-2 directory (weights, tokenizer, processor)"
    root = Path(path)
    if not root.is_dir():
        return f"BLIP2_MODEL_DIR {root} is not a directory"
    config, problem = read_json_object(root / "config.json")
    if problem:
        return problem
    if config.get("model_type") != "blip-2":
        return f"BLIP2_MODEL_DIR {root} holds a {config.get('model_type')!r} model, not 'blip-2'"
    architectures = config.get("architectures") or ["Blip2ForImageTextRetrieval"]
    if "Blip2ForImageTextRetrieval" not in architectures:
        return (f"BLIP2_MODEL_DIR {root} holds a {architectures[0]}: AnomalyControl needs the Q-Former with text "
                "input of an image-text matching checkpoint (Blip2ForImageTextRetrieval, e.g. blip2-itm-vit-g)")
    if not weight_variants(root):
        return f"BLIP2_MODEL_DIR {root} has no weights (model.safetensors or pytorch_model.bin)"
    if not ((root / "vocab.txt").is_file() or (root / "tokenizer.json").is_file()):
        return f"BLIP2_MODEL_DIR {root} has no tokenizer (vocab.txt or tokenizer.json)"
    if not (root / "preprocessor_config.json").is_file():
        return f"BLIP2_MODEL_DIR {root} has no image processor (preprocessor_config.json)"
    return None


# Setting name -> its check. Every name is a field of service.settings.Settings.
WEIGHT_CHECKS: dict[str, Callable[[str | None], str | None]] = {
    "SD_MODEL_DIR": sd_dir_problem,
    "CONVNEXT_MODEL_DIR": convnext_dir_problem,
    "BLIP2_MODEL_DIR": blip2_dir_problem,
}


def missing_weights(needed: tuple[str, ...], weight_dirs: Mapping[str, str | None]) -> list[str]:
    """Why each of the `needed` weight settings cannot be used; empty when all can."""
    return [problem for name in needed if (problem := WEIGHT_CHECKS[name](weight_dirs.get(name)))]
