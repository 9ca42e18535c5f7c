"""Request schemas shared by the methods (mask sampling, the diffusion knobs): pydantic only, no torch.

Each method's own params model lives in its package's `__init__.py`. The API validates a job
against these before it queues anything, so they must stay importable in the slim API image.
Unknown names are rejected (``extra="forbid"``): a typo is a 422, not a silently ignored knob.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FloatRange = tuple[float, float]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_ordered(rng: FloatRange, name: str) -> None:
    if rng[0] > rng[1]:
        raise ValueError(f"{name}: the lower bound {rng[0]} is above the upper bound {rng[1]}")


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
    scale: FloatRange = Field(default=(0.75, 1.25), description="exemplar jitter: scale range")
    rotation: float = Field(default=180.0, ge=0, le=180, description="exemplar jitter: max |angle| in degrees")
    box_area: FloatRange = Field(default=(0.01, 0.06), description="box: area as a fraction of the image")
    box_aspect: FloatRange = Field(default=(0.3, 3.3), description="box: width/height ratio range")
    boxes: list[tuple[int, int, int, int]] | None = Field(
        default=None, description="box: fixed boxes (x0, y0, x1, y1) in pixels, used in turn"
    )
    masks: list[str] = Field(default_factory=list, description="given: exemplar ids whose masks are used")
    inside_foreground: bool = Field(default=True, description="keep targets on the product, not its background")

    @model_validator(mode="after")
    def _check(self):
        check_ordered(self.scale, "scale")
        check_ordered(self.box_area, "box_area")
        check_ordered(self.box_aspect, "box_aspect")
        if not 0 < self.scale[0]:
            raise ValueError("scale must be positive")
        if not (0 < self.box_area[0] and self.box_area[1] <= 1):
            raise ValueError("box_area must lie in (0, 1]")
        if not 0 < self.box_aspect[0]:
            raise ValueError("box_aspect must be positive")
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
    """Knobs every diffusion method shares (DESIGN section 3 names them)."""

    resolution: int = Field(default=512, ge=64, le=1024, multiple_of=8, description="model-side square size")
    num_inference_steps: int = Field(default=50, ge=1, le=1000)
    guidance_scale: float = Field(default=7.5, ge=1.0, le=30.0)


class FinetuneParams(DiffusionParams):
    """The fine-tune knobs every fine-tune method shares (DESIGN section 3); each sets its defaults."""

    train_steps: int = Field(default=1000, ge=1, le=100_000, description="fine-tune: optimiser steps")
    learning_rate: float = Field(default=1e-4, gt=0, le=1.0, description="fine-tune: learning rate")
    batch_size: int = Field(default=4, ge=1, le=64, description="fine-tune: images per step")
