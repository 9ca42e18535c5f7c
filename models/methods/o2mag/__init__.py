"""O2MAG (One-to-More, CVPR 2026, arXiv 2603.18093), training-free: reference anomalies grafted into
target masks on normal images by tri-branch self-attention control.

Torch-free: the method's spec and params. The model code is in `pipeline.py`, the job interface
in `method.py`.
"""

from typing import Literal

from pydantic import Field, model_validator

from models.methods.params import DiffusionParams, FloatRange, ablation_field, check_ordered, check_unique
from models.methods.spec import Component, MethodSpec

# What the paper ablates: TriAG's two grafted attention sources, AGO and DAE. All act while images
# are made (there is no fine-tune), so a generate job can drop any of them.
COMPONENTS = (
    Component("graft", "TriAG's reference branch: inside the target mask the target's self-attention takes the "
              "reference's keys/values inside its mask (ablated: the target attends to its own tokens there)",
              "generate"),
    Component("background", "TriAG's normal branch: outside the target mask the target's self-attention takes the "
              "normal image's keys/values (ablated: the target attends to its own tokens there)", "generate"),
    Component("ago", "Anomaly-Guided Optimisation of the text embedding on the reference inside its mask "
              "(ablated: the prompt's own embedding, as with ago_steps 0)", "generate"),
    Component("dae", "Dual Attention Enhancement: the target's self- and cross-attention outputs inside the mask "
              "scaled by dae_factor over dae_window (ablated: no scaling, as with dae_factor 1)", "generate"),
)


class O2MAGParams(DiffusionParams):
    """O2MAG (arXiv 2603.18093): training-free tri-branch attention grafting from reference anomalies.

    One DDIM schedule of `num_inference_steps` serves the inversions and the sampling: the
    target retraces the normal image's inverted path, which needs the same timesteps.
    """

    prompt: str = Field(default="a photo of a defect", min_length=1,
                        description="text whose embedding AGO starts from (naming the defect can help)")
    ago_steps: int = Field(default=500, ge=0, le=5000,
                           description="AGO: Adam steps on the text embedding (0: use the prompt as it is)")
    ago_learning_rate: float = Field(default=3e-3, gt=0, le=1.0, description="AGO: Adam learning rate")
    graft_resolutions: list[Literal[8, 16, 32, 64]] = Field(
        default=[32, 64], min_length=1,
        description="decoder self-attention layers that graft keys/values, by their feature-map side at "
        "512 px (64: the full latent; 8: the middle block); the same layers at any resolution",
    )
    graft_start: float = Field(
        default=0.08, ge=0.0, lt=1.0,
        description="where grafting starts, as a fraction of the schedule (0.08: from step 4 of 50 on)",
    )
    dae_factor: float = Field(default=1.5, ge=1.0, le=4.0,
                              description="DAE: attention output scale inside the target mask (1: off)")
    dae_window: FloatRange = Field(
        default=(0.3, 0.7), description="DAE: the steps it acts on, as fractions of the schedule (0: first step)"
    )
    mask_dilation: int = Field(
        default=4, ge=0, le=64,
        description="the generated region fades into the normal image across a ring this many pixels wide on "
        "the target mask's border, at most 3 of them outside it; beyond the ring every pixel is the normal image's",
    )
    target_noise: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="share (in standard deviation) of fresh noise from the item's seed in the target's start "
        "inside the mask; 0: the paper's start, the normal image's inverted noise, and no dependence on the seed",
    )

    ablate: ablation_field(COMPONENTS)

    @model_validator(mode="after")
    def _check(self):
        check_ordered(self.dae_window, "dae_window")
        if not (0 <= self.dae_window[0] and self.dae_window[1] <= 1):
            raise ValueError("dae_window must lie in [0, 1]")
        check_unique(self.graft_resolutions, "graft_resolutions")
        return self


SPEC = MethodSpec(
    name="o2mag",
    family="training-free",
    summary="O2MAG: reference anomalies grafted into target masks on normal images by tri-branch "
    "self-attention control (AGO text optimisation, DAE attention boost); no fine-tune job",
    params=O2MAGParams,
    kinds=("generate",),
    mask_sources=("exemplar", "box", "given"),
    default_mask_source="exemplar",
    implementation="models.methods.o2mag.method",
    weights=("SD_MODEL_DIR",),
    generate_needs_references=True,
    components=COMPONENTS,
)
