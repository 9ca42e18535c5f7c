"""CutPaste (Li et al., CVPR 2021), model-free: a patch of the image itself, pasted elsewhere.

Torch-free: the method's spec and params. The synthesis is in `method.py`.
"""

from typing import Literal

from pydantic import Field, model_validator

from models.methods.params import ASPECT_LIMITS, FloatRange, StrictModel, check_ordered, check_within
from models.methods.spec import MethodSpec


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
        check_ordered(self.area, "area")
        check_ordered(self.aspect, "aspect")
        if not (0 < self.area[0] and self.area[1] <= 1):
            raise ValueError("area must lie in (0, 1]")
        check_within(self.aspect, "aspect", *ASPECT_LIMITS)
        # At most the whole 256 px reference side wide, and its diagonal and more long.
        for name, most in (("scar_width", 256), ("scar_length", 512)):
            low, high = getattr(self, name)
            if not 1 <= low <= high <= most:
                raise ValueError(f"{name} must satisfy 1 <= low <= high <= {most}")
        return self


SPEC = MethodSpec(
    name="cutpaste",
    family="model-free",
    summary="CutPaste: a patch (or thin scar) of the image itself, jittered and pasted elsewhere",
    params=CutPasteParams,
    kinds=("generate",),
    mask_sources=("native", "exemplar", "box", "given"),
    default_mask_source="native",
    implementation="models.methods.cutpaste.method",
)
