"""Transplant, model-free: the exemplars' real defects, augmented and blended onto normal images.

Copy-Paste (Ghiasi et al., CVPR 2021) showed that pasting real instances is a strong
segmentation augmentation; NSA (Schlueter et al., ECCV 2022) blends pasted patches with Poisson
image editing so they look natural; PRN (Zhang et al., CVPR 2023) extends real anomalies by
augmentation. This method does all three with the few real defects a factory has: no weights.

Torch-free: the method's spec and params. The synthesis is in `method.py`.
"""

from typing import Literal

from pydantic import Field, model_validator

from models.methods.params import MAX_JITTER_SCALE, FloatRange, StrictModel, check_ordered
from models.methods.spec import MethodSpec

LABEL_BAND = 3  # models.methods.interface.LABEL_BAND (that module imports numpy; this one may not)
MAX_DEFECTS_PER_IMAGE = 16


class TransplantParams(StrictModel):
    """Real exemplar defects cut with their surroundings, augmented, matched and blended in."""

    components: Literal["each", "whole"] = Field(
        default="each",
        description="each: one connected component of an exemplar's mask at a time; whole: the whole mask",
    )
    context_margin: int = Field(
        default=8, ge=1, le=64,
        description="pixels of the defect's surroundings cut with it (at the destination's scale): the "
        "gradients Poisson blending keeps near the border, and the ring photometric matching compares",
    )
    scale: FloatRange = Field(
        default=(0.8, 1.25), description="defect size relative to the exemplar's, per image side; within (0, 4]"
    )
    rotation: float = Field(default=20.0, ge=0, le=180, description="max |angle| of a random rotation, degrees")
    flip: bool = Field(default=True, description="random horizontal and vertical flips")
    elastic: float = Field(default=1.5, ge=0, le=16, description="max displacement of a smooth elastic warp, pixels")
    placement: Literal["near", "anywhere"] = Field(
        default="near",
        description="with the mask source 'native': near: within max_shift of the exemplar defect's own "
        "position (objects: where a defect occurs matters); anywhere: at a random place (textures). "
        "Other mask sources (exemplar, box, given) put each defect into their mask instead.",
    )
    max_shift: float = Field(
        default=0.15, ge=0, le=1, description="near: largest shift, as a fraction of the image side"
    )
    defects_per_image: tuple[int, int] = Field(default=(1, 1), description="range of defects put on one image")
    match_photometry: bool = Field(
        default=True, description="match mean and contrast of the defect's surroundings to the destination's"
    )
    gain_jitter: float = Field(default=0.0, ge=0, le=0.5, description="random intensity gain in [1 - j, 1 + j]")
    blend: Literal["poisson", "feather", "paste"] = Field(
        default="poisson",
        description="poisson: OpenCV seamless cloning; feather: an alpha ramp over blend_margin; paste: hard",
    )
    mixed: bool = Field(
        default=False, description="poisson: keep the stronger of defect and destination gradients (textured surfaces)"
    )
    blend_margin: int = Field(
        default=LABEL_BAND, ge=0, le=LABEL_BAND,
        description="pixels beyond the defect mask that blending may change; all others stay the normal image's",
    )

    @model_validator(mode="after")
    def _check(self):
        check_ordered(self.scale, "scale")
        if not (0 < self.scale[0] and self.scale[1] <= MAX_JITTER_SCALE):
            raise ValueError(f"scale must lie in (0, {MAX_JITTER_SCALE:g}]")
        low, high = self.defects_per_image
        if not 1 <= low <= high <= MAX_DEFECTS_PER_IMAGE:
            raise ValueError(f"defects_per_image must satisfy 1 <= low <= high <= {MAX_DEFECTS_PER_IMAGE}")
        return self


# The geometric augmentation switched off: the defect as it is, only rescaled to the image.
NO_AUGMENTATION = {"scale": (1.0, 1.0), "rotation": 0.0, "flip": False, "elastic": 0.0}
# The evaluate job's exemplar baseline: the whole mask pasted as it is, at a random place.
PLAIN_PASTE = {**NO_AUGMENTATION, "components": "whole", "placement": "anywhere", "match_photometry": False,
               "blend": "paste"}


SPEC = MethodSpec(
    name="transplant",
    family="model-free",
    summary="Transplant: the exemplars' real defects, augmented, photometrically matched and Poisson-blended",
    params=TransplantParams,
    kinds=("generate",),
    mask_sources=("native", "exemplar", "box", "given"),
    default_mask_source="native",
    implementation="models.methods.transplant.method",
    generate_needs_references=True,
)
