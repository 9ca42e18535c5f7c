"""Every method, by name, built from the method packages. Torch-free: the API uses it.

Adding a method: its package under models/methods/ (see models/methods/README.md) and its name here.
"""

from importlib import import_module

from models.methods.spec import MethodSpec

PACKAGES = ("draem", "cutpaste", "anogen", "o2mag", "anomalycontrol", "cadiff", "groundinganomaly", "transplant")

METHODS: dict[str, MethodSpec] = {
    spec.name: spec for spec in (import_module(f"models.methods.{package}").SPEC for package in PACKAGES)
}


def implementation(spec: MethodSpec):
    """The module with the method's finetune / generate (models.methods.interface): imported on
    the worker that runs the job, never by the API."""
    return import_module(spec.implementation)


def generate_all(spec: MethodSpec, request, on_progress=None) -> list:
    """Every pair of a GenerateRequest, in index order, made here in memory (evaluate baselines,
    benchmarks): the method's own calls, as a worker would make them."""
    method = implementation(spec)
    report = on_progress or (lambda _stage, _done, _total: None)
    pairs = [pair for call in method.generate(request, method.calls(request), report) for pair in call]
    return sorted(pairs, key=lambda pair: pair.index)
