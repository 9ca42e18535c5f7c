"""O2MAG (One-to-More, CVPR 2026, arXiv 2603.18093), training-free: reference anomalies grafted into
target masks on normal images by tri-branch self-attention control.

Torch-free: the method's spec and params. The model code is in `pipeline.py`, the job interface
in `method.py`.
"""

from typing import Literal

from pydantic import Field, model_validator

from models.methods.params import DiffusionParams, FloatRange, check_ordered
from models.methods.spec import MethodSpec


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

    @model_validator(mode="after")
    def _check(self):
        check_ordered(self.dae_window, "dae_window")
        if not (0 <= self.dae_window[0] and self.dae_window[1] <= 1):
            raise ValueError("dae_window must lie in [0, 1]")
        if len(set(self.graft_resolutions)) != len(self.graft_resolutions):
            raise ValueError("graft_resolutions has repeated entries")
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
)
