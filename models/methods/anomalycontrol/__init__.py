"""AnomalyControl (He, Liu, Zhao, "Learning Cross-modal Semantic Features for Controllable Anomaly
Synthesis"), fine-tune: cross-modal semantic features of a text-image reference from a frozen
BLIP-2 Q-Former, focused on the defect by a few guidance steps (ASEA), steer SD 1.5 through a
decoupled cross-attention adapter (SGA); the reference may show any product.

Torch-free: the method's spec and params. The model code is in `pipeline.py` (with `csm.py`, the
BLIP-2 side, and `sga.py`, the adapter), the job interface in `method.py`.
"""

from pydantic import Field, model_validator

from models.methods.params import FadeRing, FinetuneParams, ablation_field
from models.methods.spec import Component, MethodSpec

# What the paper ablates ("w/o ASEA", "w/o SGA"). Both act while images are made: a generate job can
# drop either; a fine-tune job naming one trains (or, for SGA, skips training) without it, and every
# generate job on that adapter drops it too.
COMPONENTS = (
    Component("asea", "anomaly-semantic enhanced attention: guidance steps that focus the Q-Former's features C' "
              "on the reference's defect (ablated: C' straight from the Q-Former, as with asea_steps 0)", "generate"),
    Component("sga", "semantic guided adapter: C' enters every cross-attention layer of the UNet beside the text "
              "(ablated: the plain SD UNet with the text alone, as with gamma 0)",
              "generate"),
)


class AnomalyControlParams(FinetuneParams):
    """AnomalyControl: BLIP-2 cross-modal features (CSM + ASEA) through a decoupled cross-attention adapter (SGA)."""

    num_inference_steps: int = Field(default=30, ge=1, le=1000, description="generate: DDIM steps (the paper's 30)")
    guidance_scale: float = Field(default=7.5, ge=1.0, le=30.0, description="generate: the paper's scale, 7.5")
    train_steps: int = Field(default=2000, ge=1, le=100_000,
                             description="fine-tune: AdamW steps (the paper: 30K on all of MVTec AD)")
    learning_rate: float = Field(default=1e-4, gt=0, le=1.0, description="fine-tune: AdamW learning rate")
    batch_size: int = Field(default=4, ge=1, le=64, description="fine-tune: images per step")
    weight_decay: float = Field(default=0.01, ge=0, le=1.0, description="fine-tune: AdamW weight decay")
    cfg_dropout: tuple[float, float, float] = Field(
        default=(0.05, 0.05, 0.05),
        description="fine-tune: share of training images that drop the text alone, the cross-modal features "
        "alone (set to zeros), and both, so that classifier-free guidance has its unconditional prediction",
    )
    gamma: float | None = Field(
        default=None, ge=0.0, le=4.0,
        description="weight of the adapter's attention beside the text's (0: the plain SD UNet); fine-tune: "
        "default 1 (the paper's), recorded in the adapter; generate: default the adapter's",
    )
    asea_steps: int = Field(default=3, ge=0, le=50,
                            description="ASEA: gradient steps on the guidance variable (the paper's T_g = 3)")
    asea_step_size: float = Field(
        default=0.1, gt=0, le=10.0,
        description="ASEA: each step moves the guidance variable by this fraction of the visual embeddings' "
        "RMS along the energy's normalised gradient (the paper gives no step size)",
    )
    prompt: str | None = Field(
        default=None, min_length=1, max_length=300,
        description="generate: the targeted prompt; default 'a photo of a {product} with {defect}' with the "
        "job's product and each reference's defect",
    )
    mask_dilation: FadeRing = 3
    ablate: ablation_field(COMPONENTS)

    @model_validator(mode="after")
    def _check(self):
        if sum(self.cfg_dropout) > 1 or min(self.cfg_dropout) < 0:
            raise ValueError("cfg_dropout: three shares in [0, 1] that sum to at most 1")
        return self


SPEC = MethodSpec(
    name="anomalycontrol",
    family="fine-tune",
    summary="AnomalyControl: cross-modal semantic features of a text-image reference (any product) from a frozen "
    "BLIP-2 Q-Former, focused on the defect (ASEA), steer SD 1.5 through a decoupled cross-attention adapter "
    "(SGA) fine-tuned on the exemplars; blended latent diffusion on normal images",
    params=AnomalyControlParams,
    kinds=("finetune", "generate"),
    mask_sources=("exemplar", "box", "given"),
    default_mask_source="exemplar",
    implementation="models.methods.anomalycontrol.method",
    weights=("SD_MODEL_DIR", "BLIP2_MODEL_DIR"),
    generate_needs_references=True,
    components=COMPONENTS,
    trained_components=("sga",),
)
