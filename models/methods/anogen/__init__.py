"""AnoGen (Gui et al., arXiv 2505.09263), fine-tune: a defect embedding learnt from 1-3 exemplars,
then box inpainting on normal images.

Torch-free: the method's spec and params. The model code is in `pipeline.py`, the job interface
in `method.py`.
"""

from pydantic import Field, model_validator

from models.methods.params import FinetuneParams, ablation_field
from models.methods.spec import Component, MethodSpec

# What the paper's ablations take away: the learnt embedding itself (generating with the plain
# initializer word instead) and the mask that focuses its loss on the defect.
COMPONENTS = (
    Component("embedding", "the learnt defect embedding in the generation prompt (ablated: the initializer word's "
              "own embedding)", "generate"),
    Component("masked_loss", "the exemplar masks weighting the textual-inversion loss, so the embedding learns the "
              "defect rather than the product around it (ablated: the plain loss over the whole image)", "finetune"),
)


class AnoGenParams(FinetuneParams):
    """AnoGen (arXiv 2505.09263): a learnt defect embedding and box-blended latent inpainting."""

    guidance_scale: float = Field(default=10.0, ge=1.0, le=30.0, description="generate: the paper's scale, 10")
    train_steps: int = Field(default=6000, ge=1, le=100_000, description="fine-tune: optimiser steps")
    learning_rate: float = Field(default=0.005, gt=0, le=1.0, description="fine-tune: Adam learning rate")
    batch_size: int = Field(default=4, ge=1, le=64, description="fine-tune: images per step")
    initializer_token: str = Field(default="defect", min_length=1, description="word the embedding starts from")
    masked_loss: bool = Field(
        default=True, description="fine-tune: weight the loss by the exemplar mask; false is the same as "
        "ablate: [masked_loss] (kept for earlier jobs: the two must agree, and each is set from the other)",
    )
    refined_mask: bool = Field(default=False, description="generate: also write a mask of where the image changed")
    ablate: ablation_field(COMPONENTS)

    @model_validator(mode="after")
    def _check(self):
        """`ablate` is what the pipeline reads; `masked_loss`, the knob earlier jobs had, is kept in step
        with it (a stored job with masked_loss false loads as ablating it), and a contradiction is refused."""
        ablated = "masked_loss" in self.ablate
        if ablated and self.masked_loss and "masked_loss" in self.model_fields_set:
            raise ValueError("masked_loss is true but ablate names masked_loss: say one or the other")
        if not self.masked_loss and not ablated:
            self.ablate = [*self.ablate, "masked_loss"]
        self.masked_loss = "masked_loss" not in self.ablate
        return self


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
    components=COMPONENTS,
    trained_components=("embedding",),  # a fine-tune without it would learn nothing: refused at submit
)
