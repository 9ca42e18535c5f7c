"""What a synthesis method declares about itself, torch-free: the API validates jobs against it
and lists it under /v1/methods; the workers find its code through it.

Each method is one package, `models/methods/<name>/`: its `__init__.py` holds the `SPEC` and the
params model (pydantic only, so the slim API image can import it), and the module named by
`SPEC.implementation` holds the code that runs on a worker, with the functions of
`models.methods.interface`.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from models.methods.params import StrictModel
from models.weights import missing_weights

Family = Literal["model-free", "fine-tune", "training-free"]
JobKind = Literal["finetune", "generate"]


@dataclass(frozen=True)
class Component:
    """A part of a method that its paper ablates: `params.ablate` names it to run the method without
    it, as the paper's ablation rows do.

    `acts_in` says where dropping it takes effect. "generate": it acts while images are made (a
    ControlNet, a re-weighting, a start from the normal image), so a generate job drops it; a
    fine-tune job may name it too, and then its adapter is trained without it and every generate job
    using that adapter drops it as well. "finetune": it acts only in training (a loss term, a batch
    mix), so only a fine-tune job can drop it.
    """

    name: str
    summary: str
    acts_in: JobKind


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: Family
    summary: str
    params: type[StrictModel]
    kinds: tuple[JobKind, ...]  # job kinds it serves
    mask_sources: tuple[str, ...]
    default_mask_source: str
    implementation: str  # module with its finetune / generate (see models.methods.interface)
    weights: tuple[str, ...] = ()  # settings naming the local weight directories it needs
    # Generate jobs take anomaly exemplars as the references they copy from (at least one).
    generate_needs_references: bool = False
    # Fine-tune jobs learn from normal images of the product as well as the exemplars.
    finetune_needs_normals: bool = False
    # A fine-tune job learns every defect type of one product among its exemplars (one adapter for
    # them all): its exemplars must show one product, and a generate job's `defect` must be one the
    # adapter learnt.
    finetune_learns_defect_types: bool = False
    # The parts its paper ablates; its params' `ablate` takes their names (params.ablation_field).
    components: tuple[Component, ...] = ()
    # The components a fine-tune learns: with every one of them ablated it would learn nothing.
    trained_components: tuple[str, ...] = ()

    def unavailable_reason(self, weight_dirs: Mapping[str, str | None]) -> str | None:
        """None when the method can run with these weight settings, else every reason it cannot."""
        return "; ".join(missing_weights(self.weights, weight_dirs)) or None

    def ablation_problem(self, ablate: Sequence[str], kind: JobKind) -> str | None:
        """None when a `kind` job may drop the components `ablate` names, else why not. Unknown
        names are refused by the params model (its `ablate` lists the known ones)."""
        acts_in = {component.name: component.acts_in for component in self.components}
        training_only = [name for name in ablate if kind == "generate" and acts_in.get(name) == "finetune"]
        if training_only:
            return (f"params.ablate: {', '.join(training_only)} act only in training; ablate "
                    f"{'it' if len(training_only) == 1 else 'them'} on the fine-tune job, whose adapter "
                    "then carries that into every generate job")
        if kind == "finetune" and self.trained_components and set(self.trained_components) <= set(ablate):
            return (f"params.ablate: with {', '.join(self.trained_components)} ablated a {self.name} fine-tune "
                    "has nothing to learn; fine-tune with them and ablate them on the generate jobs instead")
        return None
