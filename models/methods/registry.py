"""Which methods exist, what they need and whether they can run here. Torch-free: the API uses it."""

from dataclasses import dataclass

from models.methods.params import PARAMS_BY_METHOD, StrictModel


@dataclass(frozen=True)
class MethodInfo:
    name: str
    family: str  # "model-free" | "fine-tune" | "training-free"
    kinds: tuple[str, ...]  # job kinds it serves
    default_mask_source: str
    mask_sources: tuple[str, ...]
    needs_sd: bool
    summary: str

    @property
    def params_model(self) -> type[StrictModel]:
        return PARAMS_BY_METHOD[self.name]

    def unavailable_reason(self, sd_model_dir: str | None) -> str | None:
        """None when the method can run with these settings, else why not."""
        if not self.needs_sd:
            return None
        from models.diffusion.checks import sd_dir_problem

        return sd_dir_problem(sd_model_dir)


ALL_SOURCES = ("native", "exemplar", "box", "given")

METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo(
            "draem", "model-free", ("generate",), "native", ALL_SOURCES, False,
            "DRAEM: Perlin-noise masks filled with a texture blended at a random opacity",
        ),
        MethodInfo(
            "cutpaste", "model-free", ("generate",), "native", ALL_SOURCES, False,
            "CutPaste: a patch (or thin scar) of the image itself, jittered and pasted elsewhere",
        ),
        MethodInfo(
            "anogen", "fine-tune", ("finetune", "generate"), "exemplar", ("exemplar", "box", "given"), True,
            "AnoGen: a defect embedding learnt from 1-3 exemplars; DDIM inpainting of a box on normal "
            "images (the mask written is the box: a weak label)",
        ),
        MethodInfo(
            "o2mag", "training-free", ("generate",), "exemplar", ("exemplar", "box", "given"), True,
            "O2MAG: one reference anomaly grafted into target masks on normal images by tri-branch "
            "self-attention control (AGO text optimisation, DAE attention boost); no fine-tune job",
        ),
    )
}
