"""Request schemas shared by the methods (mask sampling, the diffusion knobs): pydantic only, no torch.

Each method's own params model lives in its package's `__init__.py`. The API validates a job
against these before it queues anything, so they must stay importable in the slim API image.
Unknown names are rejected (``extra="forbid"``): a typo is a 422, not a silently ignored knob.
"""

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

FloatRange = tuple[float, float]
# Mask specs arrive inside the job body, which is validated as Python objects: these keep "3" or
# true from passing for a number there (method params are validated strictly as JSON at submit).
StrictRange = tuple[StrictFloat, StrictFloat]
Pixel = Annotated[StrictInt, Field(ge=0, le=1 << 16)]
# Aspect ratios (width / height) beyond these are slivers one pixel wide at any image size.
ASPECT_LIMITS = (0.01, 100.0)
MAX_JITTER_SCALE = 4.0  # times the exemplar's own size: bounds the patch a jittered mask is drawn on


# Generate knobs of the methods that paint a generated region into the normal image
# (models.diffusion.images.fade_into_normal): declared once, so they read alike in every schema.
FadeRing = Annotated[int, Field(
    ge=0, le=64,
    description="generate: the generated region fades into the normal image across a ring this many pixels "
    "wide on the target mask's border, at most 3 of them outside it; beyond that every pixel is the normal's",
)]
NormalBackground = Annotated[Literal["normal"], Field(
    description="generate: 'normal' keeps the normal image outside the (faded) mask. The paper's 'generated' "
    "whole image is refused: its pixels outside the mask would not be the normal image's, and every pair's "
    "label promises they are (the Python pipeline still makes it, for studies)",
)]


class StrictModel(BaseModel):
    # Unknown names are a 422; so are infinities and NaN, which no knob means.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def check_unique(values: Sequence, name: str) -> None:
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has repeated entries")


def _unique_names(names: list[str]) -> list[str]:
    check_unique(names, "ablate")
    return names


def ablation_field(components: Sequence):
    """The type of a method's `ablate` param: a set of the names of its components (spec.Component),
    so an unknown or repeated name is a 422 (listing the known ones), and the web page shows them
    as checkboxes."""
    names = tuple(component.name for component in components)
    return Annotated[list[Literal[names]], AfterValidator(_unique_names), Field(
        default_factory=list, max_length=len(names),
        description="components to run without, as the paper's ablation rows do: " + ", ".join(names)
        + " (GET /v1/methods says what each does and whether a generate job can drop it)",
    )]


def check_ordered(rng: FloatRange, name: str) -> None:
    if rng[0] > rng[1]:
        raise ValueError(f"{name}: the lower bound {rng[0]} is above the upper bound {rng[1]}")


def check_within(rng: FloatRange, name: str, low: float, high: float) -> None:
    if not (low <= rng[0] and rng[1] <= high):
        raise ValueError(f"{name} must lie in [{low:g}, {high:g}]")


class MaskSpec(StrictModel):
    """Where the defects go: the ``masks`` object of a job request."""

    source: Literal["native", "exemplar", "box", "given", "learned"] | None = Field(
        default=None,
        description="native: the method's own mask generator (Perlin blobs for draem, CutPaste "
        "patches for cutpaste); exemplar: the exemplar masks with a random affine jitter, placed "
        "inside the product's foreground; box: rectangles; given: the masks of the exemplars "
        "listed in `masks`, used as they are; learned: masks sampled from the mask model a fine-tune "
        "job learnt (methods that have one). Default: the method's `default_mask_source`.",
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
        check_ordered(self.scale, "scale")
        check_ordered(self.box_area, "box_area")
        check_ordered(self.box_aspect, "box_aspect")
        if not (0 < self.scale[0] and self.scale[1] <= MAX_JITTER_SCALE):
            raise ValueError(f"scale must lie in (0, {MAX_JITTER_SCALE:g}]")
        if not (0 < self.box_area[0] and self.box_area[1] <= 1):
            raise ValueError("box_area must lie in (0, 1]")
        check_within(self.box_aspect, "box_aspect", *ASPECT_LIMITS)
        for box in self.boxes or []:
            x0, y0, x1, y1 = box
            if x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
                raise ValueError(f"box {list(box)} is not (x0, y0, x1, y1) with x0 < x1 and y0 < y1")
        if self.source == "given" and not self.masks:
            raise ValueError("source 'given' needs `masks`: a list of exemplar ids")
        if self.source == "box" and self.boxes == []:
            raise ValueError("`boxes` is empty: omit it for random boxes")
        return self


class DiffusionParams(StrictModel):
    """Knobs every diffusion method shares."""

    resolution: int = Field(default=512, ge=64, le=1024, multiple_of=8, description="model-side square size")
    num_inference_steps: int = Field(default=50, ge=1, le=1000)
    guidance_scale: float = Field(default=7.5, ge=1.0, le=30.0)


class FinetuneParams(DiffusionParams):
    """The fine-tune knobs every fine-tune method shares; each sets its defaults."""

    train_steps: int = Field(default=1000, ge=1, le=100_000, description="fine-tune: optimiser steps")
    learning_rate: float = Field(default=1e-4, gt=0, le=1.0, description="fine-tune: learning rate")
    batch_size: int = Field(default=4, ge=1, le=64, description="fine-tune: images per step")

    def learns_from_normals(self) -> bool:
        """Whether a fine-tune with these params trains on normal images (for a method whose spec
        says its fine-tunes do: one may leave them out, e.g. by ablating its normal mixing)."""
        return True

    def for_training_set(self, exemplars: int, normals: int) -> "FinetuneParams":
        """These params with the defaults that depend on the training set filled in: a method whose
        paper gives its schedule in epochs derives `train_steps` from the number of images. The API
        stores the result, so a job's record and progress show the steps it will run."""
        return self
