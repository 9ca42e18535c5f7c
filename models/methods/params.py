"""Request schemas of every method and of mask sampling: pydantic only, no torch.

The API validates a job against these before it queues anything, so they must stay importable
in the slim API image. Unknown names are rejected (``extra="forbid"``): a typo is a 422, not a
silently ignored knob.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

FloatRange = tuple[float, float]
# Mask specs arrive inside the job body, which is validated as Python objects: these keep "3" or
# true from passing for a number there (method params are validated strictly as JSON at submit).
StrictRange = tuple[StrictFloat, StrictFloat]
Pixel = Annotated[StrictInt, Field(ge=0, le=1 << 16)]
# Aspect ratios (width / height) beyond these are slivers one pixel wide at any image size.
ASPECT_LIMITS = (0.01, 100.0)
MAX_JITTER_SCALE = 4.0  # times the exemplar's own size: bounds the patch a jittered mask is drawn on


class StrictModel(BaseModel):
    # Unknown names are a 422; so are infinities and NaN, which no knob means.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _ordered(rng: FloatRange, name: str) -> None:
    if rng[0] > rng[1]:
        raise ValueError(f"{name}: the lower bound {rng[0]} is above the upper bound {rng[1]}")


def _within(rng: FloatRange, name: str, low: float, high: float) -> None:
    if not (low <= rng[0] and rng[1] <= high):
        raise ValueError(f"{name} must lie in [{low:g}, {high:g}]")


class MaskSpec(StrictModel):
    """Where the defects go: the ``masks`` object of a job request."""

    source: Literal["native", "exemplar", "box", "given"] | None = Field(
        default=None,
        description="native: the method's own mask generator (Perlin blobs for draem, CutPaste "
        "patches for cutpaste); exemplar: the exemplar masks with a random affine jitter, placed "
        "inside the product's foreground; box: rectangles; given: the masks of the exemplars "
        "listed in `masks`, used as they are. Default: the method's `default_mask_source`.",
    )
    scale: StrictRange = Field(default=(0.75, 1.25), description="exemplar jitter: scale range, within (0, 4]")
    rotation: StrictFloat = Field(default=180.0, ge=0, le=180, description="exemplar jitter: max |angle| in degrees")
    box_area: StrictRange = Field(default=(0.01, 0.06), description="box: area as a fraction of the image")
    box_aspect: StrictRange = Field(
        default=(0.3, 3.3), description="box: width/height ratio range, within [0.01, 100]"
    )
    boxes: list[tuple[Pixel, Pixel, Pixel, Pixel]] | None = Field(
        default=None,
        max_length=10_000,
        description="box: fixed boxes (x0, y0, x1, y1) in pixels, used in turn; inside every normal image",
    )
    masks: list[Annotated[StrictStr, Field(max_length=64)]] = Field(
        default_factory=list, max_length=1000, description="given: exemplar ids whose masks are used"
    )
    inside_foreground: StrictBool = Field(
        default=True, description="keep targets on the product, not its background"
    )

    @model_validator(mode="after")
    def _check(self):
        _ordered(self.scale, "scale")
        _ordered(self.box_area, "box_area")
        _ordered(self.box_aspect, "box_aspect")
        if not (0 < self.scale[0] and self.scale[1] <= MAX_JITTER_SCALE):
            raise ValueError(f"scale must lie in (0, {MAX_JITTER_SCALE:g}]")
        if not (0 < self.box_area[0] and self.box_area[1] <= 1):
            raise ValueError("box_area must lie in (0, 1]")
        _within(self.box_aspect, "box_aspect", *ASPECT_LIMITS)
        for box in self.boxes or []:
            x0, y0, x1, y1 = box
            if x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
                raise ValueError(f"box {list(box)} is not (x0, y0, x1, y1) with x0 < x1 and y0 < y1")
        if self.source == "given" and not self.masks:
            raise ValueError("source 'given' needs `masks`: a list of exemplar ids")
        if self.source == "box" and self.boxes == []:
            raise ValueError("`boxes` is empty: omit it for random boxes")
        return self


class DraemParams(StrictModel):
    """DRAEM-style synthesis: a texture blended into the mask with a random opacity."""

    texture: Literal["auto", "normals", "noise"] = Field(
        default="auto",
        description="normals: an augmented crop of the product's own normal images; noise: "
        "procedural Perlin texture; auto: either, at random",
    )
    opacity: FloatRange = Field(default=(0.2, 1.0), description="texture opacity range (DRAEM: 1 - beta)")
    perlin_scale: tuple[int, int] = Field(default=(0, 6), description="native masks: Perlin scale exponents")
    perlin_threshold: float = Field(default=0.5, gt=0, lt=1, description="native masks: noise threshold")

    @model_validator(mode="after")
    def _check(self):
        _ordered(self.opacity, "opacity")
        if not (0 < self.opacity[0] and self.opacity[1] <= 1):
            raise ValueError("opacity must lie in (0, 1]")
        if not (0 <= self.perlin_scale[0] <= self.perlin_scale[1] <= 8):
            raise ValueError("perlin_scale must satisfy 0 <= low <= high <= 8")
        return self


class CutPasteParams(StrictModel):
    """CutPaste: a patch of the image itself, jittered and pasted elsewhere."""

    variant: Literal["cutpaste", "scar", "mixed"] = Field(
        default="mixed", description="cutpaste: large rectangles; scar: thin rotated strips; mixed: either"
    )
    area: FloatRange = Field(default=(0.02, 0.15), description="native patches: area fraction range")
    aspect: FloatRange = Field(default=(0.3, 3.3), description="native patches: width/height range, in [0.01, 100]")
    scar_width: tuple[int, int] = Field(default=(2, 16), description="scar width in pixels at 256 px, at most 256")
    scar_length: tuple[int, int] = Field(default=(10, 25), description="scar length in pixels at 256 px, at most 512")
    color_jitter: float = Field(default=0.1, ge=0, le=1, description="brightness/contrast jitter of the patch")

    @model_validator(mode="after")
    def _check(self):
        _ordered(self.area, "area")
        _ordered(self.aspect, "aspect")
        if not (0 < self.area[0] and self.area[1] <= 1):
            raise ValueError("area must lie in (0, 1]")
        _within(self.aspect, "aspect", *ASPECT_LIMITS)
        # At most the whole 256 px reference side wide, and its diagonal and more long.
        for name, most in (("scar_width", 256), ("scar_length", 512)):
            low, high = getattr(self, name)
            if not 1 <= low <= high <= most:
                raise ValueError(f"{name} must satisfy 1 <= low <= high <= {most}")
        return self


class DiffusionParams(StrictModel):
    """Knobs every diffusion method shares (DESIGN section 3 names them)."""

    resolution: int = Field(default=512, ge=64, le=1024, multiple_of=8, description="model-side square size")
    num_inference_steps: int = Field(default=50, ge=1, le=1000)
    guidance_scale: float = Field(default=7.5, ge=1.0, le=30.0)


class AnoGenParams(DiffusionParams):
    """AnoGen (arXiv 2505.09263): a learnt defect embedding and box-blended latent inpainting."""

    guidance_scale: float = Field(default=10.0, ge=1.0, le=30.0, description="generate: the paper's scale, 10")
    train_steps: int = Field(default=6000, ge=1, le=100_000, description="fine-tune: optimiser steps")
    learning_rate: float = Field(default=0.005, gt=0, le=1.0, description="fine-tune: Adam learning rate")
    batch_size: int = Field(default=4, ge=1, le=64, description="fine-tune: images per step")
    initializer_token: str = Field(default="defect", min_length=1, description="word the embedding starts from")
    masked_loss: bool = Field(default=True, description="fine-tune: weight the loss by the exemplar mask")
    refined_mask: bool = Field(default=False, description="generate: also write a mask of where the image changed")


class O2MAGParams(DiffusionParams):
    """O2MAG (arXiv 2603.18093): training-free tri-branch attention grafting from one reference anomaly.

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
        description="the generated region fades into the normal image over this many pixels around the target "
        "mask; beyond them every pixel is the normal image's",
    )
    target_noise: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="share (in standard deviation) of fresh noise from the item's seed in the target's start "
        "inside the mask; 0: the paper's start, the normal image's inverted noise, and no dependence on the seed",
    )

    @model_validator(mode="after")
    def _check(self):
        _ordered(self.dae_window, "dae_window")
        if not (0 <= self.dae_window[0] and self.dae_window[1] <= 1):
            raise ValueError("dae_window must lie in [0, 1]")
        if len(set(self.graft_resolutions)) != len(self.graft_resolutions):
            raise ValueError("graft_resolutions has repeated entries")
        return self


PARAMS_BY_METHOD: dict[str, type[StrictModel]] = {
    "draem": DraemParams,
    "cutpaste": CutPasteParams,
    "anogen": AnoGenParams,
    "o2mag": O2MAGParams,
}
