"""Defect-type classification: do the synthetic defects look like their real type?

A small CNN learns to tell the defect types apart from synthetic images only and is then asked
to name the type of each real test anomaly. High accuracy means each type's synthetic images carry
what distinguishes that type in reality.
"""

import torch
from torch import nn
from torch.nn import functional as F

from models.downstream.data import as_float, augment
from models.downstream.params import EvaluateParams
from models.downstream.train import ProgressCallback, memory_format
from models.downstream.unet import conv_block
from models.precision import Precision, autocast_dtype


class DefectClassifier(nn.Module):
    """Four conv blocks, each halving the size, then global average pooling and a linear layer."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        widths = [width * 2**level for level in range(4)]
        self.blocks = nn.ModuleList(
            conv_block(c_in, c_out) for c_in, c_out in zip([in_channels] + widths[:-1], widths)
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        for block in self.blocks:
            x = F.max_pool2d(block(x), 2)
        return self.head(x.mean(dim=(2, 3)))


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    params: EvaluateParams,
    *,
    device: torch.device,
    on_progress: ProgressCallback | None = None,
    precision: Precision = "fp32",
) -> DefectClassifier:
    """Train on uint8 images (N, C, R, R) with class indices (N,) for ``params.train_steps`` steps.

    The network is small, so on CUDA it trains in fp32; on the CPU it follows ``precision`` like
    the segmenter (``models.precision``), the loss in fp32.
    """
    amp_dtype = autocast_dtype(device, precision) if device.type == "cpu" else None
    layout = memory_format(device)
    torch.manual_seed(params.seed)
    model = DefectClassifier(images.shape[1], num_classes, params.unet_width).to(device, memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.learning_rate)
    generator = torch.Generator().manual_seed(params.seed)
    report_every = max(1, params.train_steps // 100)
    model.train()
    for step in range(1, params.train_steps + 1):
        picked = torch.randint(len(images), (params.batch_size,), generator=generator)
        batch = as_float(images[picked])
        batch, _ = augment(batch, torch.zeros_like(batch[:, :1]), generator)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(batch.to(device).contiguous(memory_format=layout))
        loss = F.cross_entropy(logits.float(), labels[picked].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_progress is not None and (step % report_every == 0 or step == params.train_steps):
            on_progress("classifier", step, params.train_steps)
    return model.eval()


@torch.no_grad()
def predict_classes(model: DefectClassifier, images: torch.Tensor, device: torch.device,
                    precision: Precision = "fp32") -> torch.Tensor:
    """Class index (N,) of each uint8 image (N, C, R, R)."""
    amp_dtype = autocast_dtype(device, precision) if device.type == "cpu" else None
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(as_float(images).to(device).contiguous(memory_format=memory_format(device)))
    return logits.float().argmax(dim=1).cpu()


def classification_accuracy(predicted: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict:
    """Overall accuracy and accuracy per true class, all in [0, 1]."""
    correct = predicted == labels
    per_class = {
        name: float(correct[labels == index].float().mean())
        for index, name in enumerate(class_names) if (labels == index).any()
    }
    return {"accuracy": float(correct.float().mean()), "per_defect": per_class, "test_images": len(labels)}
