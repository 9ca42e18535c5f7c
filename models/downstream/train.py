"""Training the downstream U-Net on synthetic anomaly pairs plus normal images.

Each batch is half synthetic anomalies (with their masks) and half normal images (all-zero
masks), augmented (``data.augment``). The loss is focal loss plus soft dice. Pairs with a weak
label (AnoGen's box masks: the defect fills only part of the box) follow AnoGen's rule: inside the
box, pixels the model already calls normal with confidence >= tau get no loss.

The forward pass runs under autocast (``models.precision``): fp16 on CUDA, bf16 on CPUs with native
bf16 (``precision="auto"``), else fp32; the loss is always computed in fp32 from the logits, and
the weights and Adam state stay fp32. On CPUs with AVX-512 the network and its inputs are laid
out channels-last (``memory_format``). A checkpoint written every ``CHECKPOINT_EVERY`` steps lets a
redelivered job resume where it stopped.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from models.downstream.data import as_float, augment
from models.downstream.params import EvaluateParams
from models.downstream.unet import UNet
from models.precision import Precision, autocast_dtype

ProgressCallback = Callable[[str, int, int], None]
CHECKPOINT_EVERY = 250
FOCAL_GAMMA = 2.0


@dataclass(frozen=True)
class TrainingSet:
    """Training data at one resolution (see ``data``): N anomalies and M normal images."""

    anomalous: torch.Tensor  # uint8 (N, C, R, R)
    masks: torch.Tensor  # bool (N, 1, R, R)
    weak: torch.Tensor  # bool (N,): the mask is a box around the defect, not its outline
    normals: torch.Tensor  # uint8 (M, C, R, R)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Per-pixel focal loss: cross-entropy scaled down where the prediction is already right."""
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    probability_of_truth = torch.exp(-cross_entropy)
    return (1 - probability_of_truth) ** gamma * cross_entropy


def soft_dice_loss(probabilities: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice over the whole batch, counting only pixels with weight 1."""
    intersection = (weights * probabilities * targets).sum()
    total = (weights * probabilities).sum() + (weights * targets).sum()
    return 1 - (2 * intersection + 1) / (total + 1)


def weak_label_weights(logits: torch.Tensor, masks: torch.Tensor, weak: torch.Tensor, tau: float) -> torch.Tensor:
    """1 for every pixel, except 0 inside a weak (box) mask where P(normal) >= tau already."""
    normal_confidence = 1 - torch.sigmoid(logits.detach())
    ignored = weak[:, None, None, None] & (masks > 0.5) & (normal_confidence >= tau)
    return (~ignored).float()


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, weak: torch.Tensor, tau: float) -> torch.Tensor:
    logits = logits.float()
    weights = weak_label_weights(logits, masks, weak, tau)
    focal = (weights * focal_loss(logits, masks)).sum() / weights.sum().clamp(min=1)
    return focal + soft_dice_loss(torch.sigmoid(logits), masks, weights)


def sample_batch(data: TrainingSet, batch_size: int, generator: torch.Generator):
    """Half anomalies, half normals (all anomalies when there are no normals), drawn with replacement."""
    num_anomalous = batch_size // 2 if len(data.normals) else batch_size
    picked = torch.randint(len(data.anomalous), (num_anomalous,), generator=generator)
    images, masks, weak = data.anomalous[picked], data.masks[picked], data.weak[picked]
    num_normal = batch_size - num_anomalous
    if num_normal:
        normals = data.normals[torch.randint(len(data.normals), (num_normal,), generator=generator)]
        images = torch.cat([images, normals])
        masks = torch.cat([masks, torch.zeros(num_normal, *masks.shape[1:], dtype=torch.bool)])
        weak = torch.cat([weak, torch.zeros(num_normal, dtype=torch.bool)])
    return as_float(images), masks.float(), weak


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CPUs with AVX-512, where oneDNN's convolutions skip a layout conversion per
    layer on it (a Xeon at 256 px, batch 8: 1.46x per step in fp32, 1.18x in bf16; see
    bench.bench_downstream_step). Not on AVX2-only CPUs: there the channels-last backward of the
    convolutions and of GroupNorm is the slower one (an AVX2 EPYC: 0.83x per step in fp32). CUDA
    keeps its default layout."""
    if device.type == "cpu" and torch.backends.cpu.get_cpu_capability() == "AVX512":
        return torch.channels_last
    return torch.contiguous_format


def training_step(model: UNet, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], tau: float,
                  amp_dtype: torch.dtype | None) -> torch.Tensor:
    """One optimiser step on an augmented batch (images, masks, weak) already on the model's device;
    the forward pass under ``amp_dtype`` autocast (None: fp32), the loss in fp32."""
    images, masks, weak = batch
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(images)
    loss = segmentation_loss(logits, masks, weak, tau)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def _save_checkpoint(path: Path, state: dict) -> None:
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)  # atomic: a crash never leaves half a checkpoint


def train_segmenter(
    data: TrainingSet,
    params: EvaluateParams,
    *,
    device: torch.device,
    on_progress: ProgressCallback | None = None,
    checkpoint: Path | None = None,
    precision: Precision = "fp32",
) -> UNet:
    """Train a U-Net for ``params.train_steps`` steps; return it in eval mode on ``device``.

    ``on_progress("train", done, total)`` is called about a hundred times; it may raise to cancel.
    ``checkpoint``: a file to save to and, when it holds a run with the same params, resume from.
    ``precision``: the CPU's autocast choice (``models.precision``); CUDA always uses fp16.
    """
    if len(data.anomalous) == 0:
        raise ValueError("no anomalous training pairs")
    torch.manual_seed(params.seed)
    layout = memory_format(device)
    model = UNet(in_channels=data.anomalous.shape[1], width=params.unet_width).to(device, memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.learning_rate)
    generator = torch.Generator().manual_seed(params.seed)
    amp_dtype = autocast_dtype(device, precision)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)  # bf16 has fp32's range: no scaling
    step = 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)  # the generator lives on the CPU
        if state["params"] == params.model_dump():
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            step = state["step"]

    model.train()
    report_every = max(1, params.train_steps // 100)
    while step < params.train_steps:
        images, masks, weak = sample_batch(data, params.batch_size, generator)
        images, masks = augment(images, masks, generator)
        images = images.to(device).contiguous(memory_format=layout)
        training_step(model, optimizer, scaler, (images, masks.to(device), weak.to(device)), params.tau, amp_dtype)
        step += 1
        if checkpoint is not None and (step % CHECKPOINT_EVERY == 0 or step == params.train_steps):
            _save_checkpoint(checkpoint, {
                "params": params.model_dump(), "step": step, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
            })
        if on_progress is not None and (step % report_every == 0 or step == params.train_steps):
            on_progress("train", step, params.train_steps)
    return model.eval()


@torch.no_grad()
def predict(model: UNet, images: torch.Tensor, device: torch.device, precision: Precision = "fp32") -> np.ndarray:
    """Anomaly maps in [0, 1], float32 (B, R, R), for uint8 images (B, C, R, R)."""
    amp_dtype = autocast_dtype(device, precision)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(as_float(images).to(device).contiguous(memory_format=memory_format(device)))
    return torch.sigmoid(logits.float())[:, 0].cpu().numpy()
