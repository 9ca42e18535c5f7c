"""CADiff (Tong et al., AAAI 2026, "Context-Aware Diffusion for Controllable Anomaly Generation"),
fine-tune: learnt context and anomaly tokens (CTP), a ControlNet on the mask with SAIM fusion
(SSC), trained on every defect type of one product at once; generation with intensity-controlled
attention re-weighting (IAR) on normal images.

Torch-free: the method's spec and params. The model code is in `pipeline.py` (with `control.py`,
the ControlNet + SAIM, `losses.py`, the training losses and augmentation, and `iar.py`, the
re-weighting), the job interface in `method.py`.
"""

import math

from pydantic import Field, model_validator

from models.methods.params import (
    FadeRing,
    FinetuneParams,
    NormalBackground,
    ablation_field,
    check_ordered,
)
from models.methods.spec import Component, MethodSpec

# The paper's ablation rows (w/o CTP, w/o SSC, w/o SAIM, w/o IAR, w/o L_loc, w/o L_contrastive).
COMPONENTS = (
    Component("ctp_tokens", "the learnt context and anomaly tokens (CTP); ablated, the prompt's tokens keep their "
              "initializer embeddings (the product's name; initializer_token for every defect type)", "generate"),
    Component("controlnet", "the ControlNet on the mask (SSC's spatial control, SAIM included); ablated, the plain "
              "UNet with the prompt alone, the mask only bounding where the generated region is kept", "generate"),
    Component("saim", "SAIM's interaction of each ControlNet residual with the UNet's skip feature (cross-attention "
              "and MLP); ablated, the residuals are added to the skips as plain ControlNet adds them", "generate"),
    Component("iar", "intensity-controlled attention re-weighting inside the mask (masked focus attention with the "
              "delayed focus scheduler); ablated, plain attention and no intensity", "generate"),
    Component("loc_loss", "L_loc, the tokens' cross-attention maps pulled onto their masks", "finetune"),
    Component("contrastive_loss", "L_contrastive, NT-Xent over the tokens' attention-pooled features", "finetune"),
)
PAPER_EPOCHS = 1000  # the paper trains 1000 epochs (at batch 16)
MAX_DEFAULT_TRAIN_STEPS = 10_000  # the default's cap (reached at 40 images at batch 4): no default run of days


class CADiffParams(FinetuneParams):
    """CADiff: context-aware prompt tokens, ControlNet + SAIM on the mask, intensity-controlled re-weighting."""

    guidance_scale: float = Field(default=7.5, ge=1.0, le=30.0,
                                  description="generate: classifier-free guidance (not in the paper)")
    train_steps: int | None = Field(
        default=None, ge=1, le=100_000,
        description=f"fine-tune: AdamW steps; default: the paper's {PAPER_EPOCHS} epochs over the exemplars and "
        f"normal images at batch_size, ceil({PAPER_EPOCHS} * images / batch_size), capped at "
        f"{MAX_DEFAULT_TRAIN_STEPS}",
    )
    learning_rate: float = Field(default=1e-5, gt=0, le=1.0,
                                 description="fine-tune: constant AdamW learning rate of ControlNet and SAIM "
                                 "(the paper's 1e-5)")
    token_learning_rate: float = Field(
        default=5e-3, gt=0, le=1.0,
        description="fine-tune: AdamW learning rate of the prompt tokens (not in the paper: at 1e-5 they barely move)",
    )
    batch_size: int = Field(default=4, ge=1, le=64, description="fine-tune: images per step (the paper: 16)")
    weight_decay: float = Field(default=0.01, ge=0, le=1.0,
                                description="fine-tune: AdamW weight decay of ControlNet and SAIM")
    loc_weight: float = Field(default=0.001, ge=0, le=10.0, description="fine-tune: gamma, the weight of L_loc")
    contrastive_weight: float = Field(default=0.0005, ge=0, le=10.0,
                                      description="fine-tune: beta, the weight of L_contrastive")
    temperature: float = Field(default=0.1, gt=0, le=10.0,
                               description="fine-tune: NT-Xent temperature (not in the paper)")
    initializer_token: str = Field(default="anomaly", min_length=1, max_length=64,
                                   description="fine-tune: the word every anomaly token starts from")
    rotation: float = Field(default=15.0, ge=0, le=180,
                            description="fine-tune augmentation: max |rotation| in degrees")
    crop: tuple[float, float] = Field(
        default=(0.8, 1.0),
        description="fine-tune augmentation: the side of the random crop as a fraction of the image's, within "
        "(0, 1]; the crop is placed at a random translation inside the image",
    )
    intensity: tuple[float, float] = Field(
        default=(0.5, 1.5), description="generate: the range each pair's anomaly intensity w is drawn from"
    )
    alpha_threshold: float = Field(
        default=0.75, ge=0, le=1.0,
        description="generate: re-weighting starts at the first step whose focus (share of the mask where the "
        "anomaly token's 16x16 attention is above its mean) exceeds this (1: never)",
    )
    background: NormalBackground = "normal"
    mask_dilation: FadeRing = 3
    ablate: ablation_field(COMPONENTS)

    @model_validator(mode="after")
    def _check(self):
        check_ordered(self.crop, "crop")
        check_ordered(self.intensity, "intensity")
        if not (0 < self.crop[0] and self.crop[1] <= 1):
            raise ValueError("crop must lie in (0, 1]")
        if not (0 <= self.intensity[0] and self.intensity[1] <= 10):
            raise ValueError("intensity must lie in [0, 10]")
        return self

    def for_training_set(self, exemplars: int, normals: int) -> "CADiffParams":
        """`train_steps`, if not given: the paper's epochs over every training image (the normals
        are trained on too), capped."""
        if self.train_steps is not None:
            return self
        steps = math.ceil(PAPER_EPOCHS * (exemplars + normals) / self.batch_size)
        return self.model_copy(update={"train_steps": min(steps, MAX_DEFAULT_TRAIN_STEPS)})


SPEC = MethodSpec(
    name="cadiff",
    family="fine-tune",
    summary="CADiff: a context token for the product and an anomaly token per defect type, learnt jointly "
    "with a ControlNet on the mask (SAIM fusion) from all of one product's exemplars; generation with "
    "intensity-controlled attention re-weighting inside the mask, on normal images",
    params=CADiffParams,
    kinds=("finetune", "generate"),
    mask_sources=("exemplar", "box", "given"),
    default_mask_source="exemplar",
    implementation="models.methods.cadiff.method",
    weights=("SD_MODEL_DIR",),
    finetune_learns_defect_types=True,
    components=COMPONENTS,
    trained_components=("ctp_tokens", "controlnet"),
)
