"""GroundingAnomaly ("Spatially-Grounded Diffusion for Few-Shot Anomaly Synthesis", arXiv 2604.08301),
fine-tune: a per-pixel semantic map (product, background and one token per defect type) encoded by
ConvNeXt-Tiny (the SCM) grounds SD 1.5 through GLIGEN-style gated self-attention in every UNet
transformer block (the GSM), with LoRA on the UNet's own attention; trained on anomalous exemplars
and normal images mixed (MNT); generation starts from the noised normal image (NDI). A textual
inversion learnt on the exemplar masks gives the `learned` mask source.

Torch-free: the method's spec and params. The model code is in `pipeline.py` (with `scm.py`, the
semantic map and its encoder, and `gsm.py`, the gated blocks and LoRA), the job interface in `method.py`.
"""

from pydantic import Field

from models.methods.params import FadeRing, FinetuneParams, NormalBackground, ablation_field
from models.methods.spec import Component, MethodSpec

# The paper's ablation rows. The grounding's architecture (scm, sff) is fixed when the adapter is
# trained, so those are named on the fine-tune job; its adapter carries them into every generate job.
COMPONENTS = (
    Component("scm", "the semantic map encoded by ConvNeXt: ablated, GLIGEN's box grounding instead (one token "
              "per box: the product's and the defect's bounding boxes with their learned tokens)", "finetune"),
    Component("sff", "multi-stage semantic feature fusion: ablated, the grounding tokens come from ConvNeXt's "
              "last stage alone", "finetune"),
    Component("gsm", "the gated self-attention grounding in every transformer block: ablated, no grounding at "
              "all (prompt and LoRA only)", "generate"),
    Component("lora", "LoRA on the UNet's own attention: ablated, none trained or applied", "generate"),
    Component("mnt", "normal mixing in training: ablated, every batch is exemplars only", "finetune"),
    Component("ndi", "normal-prior start: ablated, generation starts from pure noise over the full schedule "
              "(the normal image still kept outside the mask)", "generate"),
)


class GroundingAnomalyParams(FinetuneParams):
    """GroundingAnomaly: semantic-map grounding (SCM + gated self-attention) with LoRA, normal-prior start."""

    num_inference_steps: int = Field(
        default=50, ge=1, le=1000,
        description="generate: DDIM steps of the full schedule; NDI runs the last `strength` share of them",
    )
    guidance_scale: float = Field(default=7.5, ge=1.0, le=30.0, description="generate: classifier-free guidance")
    train_steps: int = Field(default=2000, ge=1, le=100_000, description="fine-tune: AdamW steps of the GSM/SCM/LoRA")
    learning_rate: float = Field(default=5e-5, gt=0, le=1.0,
                                 description="fine-tune: AdamW learning rate of the LoRA and ConvNeXt "
                                 "(GLIGEN's fine-tuning rate, 5e-5)")
    grounding_learning_rate: float = Field(
        default=1e-3, gt=0, le=1.0,
        description="fine-tune: AdamW learning rate of the new layers (the gates and fusers, the SFF, the stem "
        "and the map's tokens), as GLIGEN trains its new layers apart: Adam moves a gate by about one learning "
        "rate a step, so at the LoRA's 5e-5 the gates stay nearly shut over 2000 steps and the grounding can "
        "hardly act (tiny test models, 2000 steps: mean |tanh(gamma)| 0.05 at 5e-5, 0.22 at 1e-3)",
    )
    batch_size: int = Field(default=4, ge=1, le=64, description="fine-tune: images per step")
    lora_rank: int = Field(default=8, ge=1, le=128,
                           description="fine-tune: rank of the LoRA on the UNet's own attention projections")
    normal_fraction: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="fine-tune: share of each batch drawn from the normal images (MNT); the rest are exemplars",
    )
    cfg_dropout: float = Field(
        default=0.1, ge=0.0, le=1.0,
        description="fine-tune: share of steps trained unconditionally (empty prompt, gated blocks off), "
        "GLIGEN's 10%, so that guidance has the unconditional prediction it uses",
    )
    mask_train_steps: int = Field(
        default=500, ge=1, le=100_000,
        description="fine-tune: textual-inversion steps of each defect type's mask embedding (the 'learned' source)",
    )
    strength: float = Field(
        default=0.7, ge=0.0, le=1.0,
        description="generate: NDI, the share of the schedule the normal image is noised to; 0 returns it",
    )
    background: NormalBackground = "normal"
    mask_dilation: FadeRing = 3
    ablate: ablation_field(COMPONENTS)

    def learns_from_normals(self) -> bool:
        return "mnt" not in self.ablate and self.normal_fraction > 0


SPEC = MethodSpec(
    name="groundinganomaly",
    family="fine-tune",
    summary="GroundingAnomaly: a per-pixel semantic map (product / defect tokens) encoded by ConvNeXt-Tiny grounds "
    "SD 1.5 through gated self-attention in every transformer block, with LoRA, fine-tuned on exemplars and "
    "normals mixed; generation starts from the noised normal image; masks from the exemplars or learnt",
    params=GroundingAnomalyParams,
    kinds=("finetune", "generate"),
    mask_sources=("exemplar", "learned", "box", "given"),
    default_mask_source="exemplar",
    implementation="models.methods.groundinganomaly.method",
    weights=("SD_MODEL_DIR", "CONVNEXT_MODEL_DIR"),
    finetune_needs_normals=True,
    finetune_learns_defect_types=True,
    components=COMPONENTS,
    trained_components=("gsm", "lora"),
)
