"""AnoGen (Gui et al., arXiv 2505.09263), fine-tune: a defect embedding learnt from 1-3 exemplars,
then box inpainting on normal images.

Torch-free: the method's spec and params. The model code is in `pipeline.py`, the job interface
in `method.py`.
"""

from pydantic import Field

from models.methods.params import FinetuneParams
from models.methods.spec import MethodSpec


class AnoGenParams(FinetuneParams):
    """AnoGen (arXiv 2505.09263): a learnt defect embedding and box-blended latent inpainting."""

    guidance_scale: float = Field(default=10.0, ge=1.0, le=30.0, description="generate: the paper's scale, 10")
    train_steps: int = Field(default=6000, ge=1, le=100_000, description="fine-tune: optimiser steps")
    learning_rate: float = Field(default=0.005, gt=0, le=1.0, description="fine-tune: Adam learning rate")
    batch_size: int = Field(default=4, ge=1, le=64, description="fine-tune: images per step")
    initializer_token: str = Field(default="defect", min_length=1, description="word the embedding starts from")
    masked_loss: bool = Field(default=True, description="fine-tune: weight the loss by the exemplar mask")
    refined_mask: bool = Field(default=False, description="generate: also write a mask of where the image changed")


SPEC = MethodSpec(
    name="anogen",
    family="fine-tune",
    summary="AnoGen: a defect embedding learnt from 1-3 exemplars; DDIM inpainting of a box on normal "
    "images (the mask written is the box: a weak label)",
    params=AnoGenParams,
    kinds=("finetune", "generate"),
    mask_sources=("exemplar", "box", "given"),
    default_mask_source="exemplar",
    implementation="models.methods.anogen.method",
    weights=("SD_MODEL_DIR",),
)
