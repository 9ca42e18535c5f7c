"""DRAEM (Zavrtanik et al., ICCV 2021), model-free: Perlin-noise masks filled with a texture.

Torch-free: the method's spec and params. The synthesis is in `method.py`.
"""

from typing import Literal

from pydantic import Field, model_validator

from models.methods.params import FloatRange, StrictModel, check_ordered
from models.methods.spec import MethodSpec


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
        check_ordered(self.opacity, "opacity")
        if not (0 < self.opacity[0] and self.opacity[1] <= 1):
            raise ValueError("opacity must lie in (0, 1]")
        if not (0 <= self.perlin_scale[0] <= self.perlin_scale[1] <= 8):
            raise ValueError("perlin_scale must satisfy 0 <= low <= high <= 8")
        return self


SPEC = MethodSpec(
    name="draem",
    family="model-free",
    summary="DRAEM: Perlin-noise masks filled with a texture blended at a random opacity",
    params=DraemParams,
    kinds=("generate",),
    mask_sources=("native", "exemplar", "box", "given"),
    default_mask_source="native",
    implementation="models.methods.draem.method",
)
