"""The evaluate job's parameters: pydantic only, no torch (the API validates requests with it)."""

from pydantic import Field

from models.methods.params import StrictModel


class EvaluateParams(StrictModel):
    """How the downstream segmenter (and defect classifier) of every arm is trained and scored."""

    train_steps: int = Field(default=1000, ge=1, le=100_000, description="optimiser steps per arm")
    resolution: int = Field(
        default=256, ge=32, le=1024, multiple_of=16, description="square size images are resized to"
    )
    batch_size: int = Field(default=8, ge=2, le=128, description="images per step, half of them anomalous")
    learning_rate: float = Field(default=1e-3, gt=0, le=1.0, description="Adam learning rate")
    seed: int = Field(default=0, ge=0, lt=2**32, description="seed of initialisation, sampling and augmentation")
    tau: float = Field(
        default=0.9, ge=0.5, le=1.0,
        description="weak labels (box masks): pixels inside the box that the model already calls "
        "normal with at least this confidence get no loss",
    )
    unet_width: int = Field(default=16, ge=8, le=128, multiple_of=8, description="channels of the first U-Net level")
    baselines: bool = Field(
        default=True,
        description="also train on model-free DRAEM anomalies and on the real exemplars pasted onto normals",
    )
    baseline_pairs: int = Field(default=200, ge=1, le=10_000, description="pairs made for each baseline arm")
    classifier: bool = Field(
        default=True, description="train a defect-type classifier per arm and report its accuracy on real anomalies"
    )
