"""Attaching trainable parts to the shared model, and the files an adapter is saved as.

The loaded SD modules are shared by every job of a worker process (loading.py). A method that
attaches trainable parts to them (LoRA layers through peft, attention processors such as
diffusers' IP-Adapter one, GLIGEN's gated blocks, projection modules) does so inside
`restored_after(sd.unet, ...)`: on exit, also on an exception, every module is exactly as it was
on entry, so the next job sees no trace. A ControlNet is a separate model fed beside the UNet and
needs no restoring.

Adapter folders (`adapters/<job id>/`) hold safetensors files in the library formats where one
exists (textual-inversion `learned_embeds.safetensors`, `ControlNetModel.save_pretrained`, peft
LoRA), so a user can load them in plain diffusers, and one `adapter_config.json`: which method
made it, from which base model, and what the method needs to use it again.
"""

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from models.errors import InputError

CONFIG_FILE = "adapter_config.json"
_FINGERPRINT_BYTES = 1 << 20  # of each weight file: enough to tell checkpoints apart, cheap to read


@contextmanager
def restored_after(*models: torch.nn.Module) -> Iterator[None]:
    """Inside the block anything may be attached to `models`; on exit each of their modules has
    its own attributes, child modules, parameters, buffers, hooks and attention processor back,
    and every parameter its `requires_grad`.

    Weights are not copied (that would cost a model's size per job): the block must not change
    existing weights in place, which attaching LoRA, processors or new blocks never does.
    """
    snapshots = []
    for model in models:
        for module in model.modules():
            # The attributes as they are, and the registries' contents one level deep (child
            # modules, parameters, hooks): on exit each registry is the same object as before,
            # refilled, since a hook handle made before the block holds that object.
            attributes = dict(vars(module))
            registries = {key: dict(value) for key, value in attributes.items() if type(value) in (dict, OrderedDict)}
            snapshots.append((module, attributes, registries))
    flags = [(parameter, parameter.requires_grad) for model in models for parameter in model.parameters()]
    try:
        yield
    finally:
        for module, attributes, registries in snapshots:
            vars(module).clear()
            vars(module).update(attributes)
            for key, contents in registries.items():
                attributes[key].clear()
                attributes[key].update(contents)
        for parameter, requires_grad in flags:
            parameter.requires_grad_(requires_grad)


def model_fingerprint(model_dir: str | Path) -> str:
    """A short hash naming a checkpoint directory's contents: its JSON configs and, per weight file,
    its size and first megabyte. Adapters record it, so one trained on another base model is refused."""
    root = Path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if path.suffix == ".json":
            digest.update(f"{relative}\n".encode() + path.read_bytes())
        elif path.suffix in (".safetensors", ".bin"):
            with path.open("rb") as file:
                digest.update(f"{relative} {path.stat().st_size}\n".encode() + file.read(_FINGERPRINT_BYTES))
    return digest.hexdigest()[:16]


def write_adapter_config(folder: Path, method: str, **config) -> None:
    """`adapter_config.json`: the method that made the adapter and what it needs to use it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps({"method": method, **config}, indent=2), encoding="utf-8")


def ablated_components(params, adapter_config: dict | None = None) -> list[str]:
    """The components a job runs without, sorted: its own `params.ablate` and, for a generate job,
    those its adapter's fine-tune ablated (recorded as `ablate` in the adapter's config)."""
    return sorted({*params.ablate, *((adapter_config or {}).get("ablate") or ())})


def read_adapter_config(folder: Path, method: str) -> dict:
    """The config of an adapter made by `method`; InputError for a missing or foreign adapter."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"the adapter has no {CONFIG_FILE}: it is not a finished fine-tune's output")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("method") != method:
        raise InputError(f"the adapter was made by method {config.get('method')!r}, not {method!r}")
    return config


def check_base_model(config: dict, key: str, model_dir: str | Path, setting: str) -> None:
    """Refuse an adapter trained against another checkpoint than the one configured in `setting`."""
    trained_on, here = config.get(key), model_fingerprint(model_dir)
    if trained_on is not None and trained_on != here:
        raise InputError(
            f"the adapter was trained on another {setting} checkpoint (fingerprint {trained_on}, this "
            f"worker's is {here}); fine-tune again on this model or point {setting} at the original"
        )
