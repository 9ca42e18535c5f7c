"""The training loop every fine-tune method shares: reproducible, resumable, mixed precision.

- Reproducible: step k draws all its randomness from a generator seeded by (seed, k), so a run
  gives the same result whether it ran in one go or was resumed.
- Resumable: every `checkpoints.every` steps the trainable tensors, the optimiser, the gradient
  scaler and the step go into one file in `checkpoints.folder` (atomically), and
  `checkpoints.saved()` is called (the worker copies the folder to storage). A run that finds a
  checkpoint of itself there continues from it; a checkpoint of another run is refused.
- Mixed precision: on CUDA the frozen model is fp16 (loading.py) while what is trained stays
  fp32; the loss is computed under fp16 autocast (so fp32 trainable layers meet fp16
  activations) and scaled by a GradScaler (fp16 gradients underflow). On the CPU everything is
  fp32 and neither is used.
"""

import json
import os
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from models.methods.interface import Checkpoints

CHECKPOINT_FILE = "training_checkpoint.pt"

Trainable = torch.nn.Module | torch.Tensor
# (step, that step's generator) -> the loss, or a mapping of named terms whose "total" is optimised
# (the others are reported: a method's loss terms, as they enter the total)
LossAt = Callable[[int, torch.Generator], torch.Tensor | Mapping[str, torch.Tensor]]
TOTAL = "total"
REPORTED_STEPS = 50  # the final loss values are means over this many last steps (one step's is noise)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for one training step, the same on every run and device."""
    state = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def train(
    trainables: Mapping[str, Trainable],
    optimizer: torch.optim.Optimizer,
    loss_at: LossAt,
    *,
    steps: int,
    seed: int,
    run: dict,
    device: torch.device,
    mixed_precision: bool,
    checkpoints: Checkpoints | None = None,
    on_step: Callable[[int, int], None] | None = None,
    max_grad_norm: float | None = None,
) -> dict[str, float]:
    """Optimise `trainables` (what `optimizer` holds, by name) for `steps` steps of `loss_at`; return
    the final loss values: each term's mean over the last REPORTED_STEPS steps this call ran
    ("total" for a plain loss; empty when a resumed run had no step left).

    run: what the run was made with (method settings, data shapes); a checkpoint is resumed only
    if it records the same, and the same seed. mixed_precision: fp16 autocast and loss scaling, for a fp16 frozen
    model on CUDA. on_step(done, steps) follows every step and may raise to stop.
    """
    scaler = torch.amp.GradScaler(device.type, enabled=mixed_precision)
    run_json = json.dumps({**run, "seed": seed}, sort_keys=True)
    start = _resume(checkpoints, run_json, trainables, optimizer, scaler) if checkpoints else 0
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    # Detached, still on the device: reading them each step would make the host wait for the GPU.
    recent: deque[dict[str, torch.Tensor]] = deque(maxlen=REPORTED_STEPS)
    for step in range(start, steps):
        with torch.enable_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=mixed_precision):
            terms = loss_at(step, step_generator(seed, step))
        if isinstance(terms, torch.Tensor):
            terms = {TOTAL: terms}
        loss = terms[TOTAL]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss.float()).backward()
        recent.append({name: value.detach() for name, value in terms.items()})
        if max_grad_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        done = step + 1
        if checkpoints is not None and done % checkpoints.every == 0 and done < steps:
            _write(checkpoints.folder, run_json, done, trainables, optimizer, scaler)
            checkpoints.saved()
        if on_step is not None:
            on_step(done, steps)
    return {name: float(torch.stack([values[name].float() for values in recent]).mean())
            for name in (recent[0] if recent else {})}


def _state(trainable: Trainable):
    return trainable.state_dict() if isinstance(trainable, torch.nn.Module) else trainable.detach()


def _write(folder: Path, run_json: str, step: int, trainables, optimizer, scaler) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / (CHECKPOINT_FILE + ".partial")
    torch.save({
        "run": run_json, "step": step,
        "trainables": {name: _state(trainable) for name, trainable in trainables.items()},
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
    }, partial)
    os.replace(partial, folder / CHECKPOINT_FILE)  # atomic: a crash never leaves half a checkpoint


def _resume(checkpoints: Checkpoints, run_json: str, trainables, optimizer, scaler) -> int:
    """Load a checkpoint of this run into the trainables and optimiser; the step to go on from."""
    path = checkpoints.folder / CHECKPOINT_FILE
    if not path.is_file():
        return 0
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint["run"] != run_json:
        raise ValueError(f"the checkpoint in {checkpoints.folder} belongs to a different training run; "
                         "use an empty directory")
    for name, trainable in trainables.items():
        saved = checkpoint["trainables"][name]
        if isinstance(trainable, torch.nn.Module):
            trainable.load_state_dict(saved)
        else:
            with torch.no_grad():
                trainable.copy_(saved)
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint["scaler"]:
        scaler.load_state_dict(checkpoint["scaler"])
    return int(checkpoint["step"])
