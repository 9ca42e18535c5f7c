"""The one interface between the workers and every synthesis method.

A method's implementation module (named by its `SPEC.implementation`) offers, with these exact
signatures, whichever of the three its job kinds need:

    calls(request: GenerateRequest) -> list[list[Item]]
        How the job's items are grouped into calls. The method decides (a diffusion method
        batches items that share work: O2MAG's outputs of one normal image share its inversion).
        Pure and deterministic: a redelivered job is split the same way, so the calls it still
        has to make come out byte-identical to an uninterrupted run's.

    generate(request: GenerateRequest, calls: Sequence[list[Item]], on_progress) -> Iterator[list[Pair]]
        Makes the pairs of each call in turn and yields them, one list per call, in order, so the
        worker stores each call's pairs as soon as they exist. Work shared by the calls of one
        job (a loaded model, an inverted reference) lives in the generator, made once.

    finetune(request: FinetuneRequest, on_progress) -> dict
        Learns an adapter from the exemplars into `request.adapter_dir` (safetensors + a JSON
        config), checkpointing through `request.checkpoints` so a redelivered job resumes.
        Returns a short summary for the job's result.

`on_progress(stage, done, total)` may raise to cancel the job; methods call it between steps.
During generation, the stage GENERATING reports the steps of the current call; any other stage
(e.g. "optimising the text embedding") is shown as it is. A problem the user can fix is raised
as `models.errors.InputError`.

Every method keeps the label contract (`label_contract_violation`): outside its written mask,
plus a blend band of at most LABEL_BAND pixels, a pair's image is its normal image, exactly, and
every connected component of the mask has changed. The worker checks every pair before writing it.
"""

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from scipy import ndimage

from models.masks.sampling import foreground_mask, sample_target_mask
from models.methods.params import MaskSpec, StrictModel

GENERATING = "generating"
LABEL_BAND = 3  # pixels beyond the written mask a blend may touch
NORMALS_KEPT = 16  # decoded normal images a job holds at a time

ProgressCallback = Callable[[str, int, int], None]  # (stage, done, total); may raise to cancel


def pair_seed(job_seed: int, index: int) -> int:
    """The seed of pair `index` of a job: deterministic, in [0, 2**32)."""
    return int(np.random.SeedSequence([job_seed, index]).generate_state(1)[0])


@dataclass(frozen=True)
class Exemplar:
    """An uploaded image: an anomaly with its mask, or a normal image (mask None)."""

    id: str
    image: Image.Image  # "L" or "RGB"
    mask: np.ndarray | None  # bool (H, W)
    product: str
    defect: str | None


class NormalImages(Sequence):
    """The job's normal images by position, decoded when first used. At most `keep` stay decoded
    (least recently used go first), so a job's memory does not grow with its list of normals."""

    def __init__(self, ids: Sequence[str], load: Callable[[str], Image.Image], keep: int = NORMALS_KEPT):
        self.ids, self._load, self._keep = list(ids), load, keep
        self._decoded: OrderedDict[int, tuple[Image.Image, list]] = OrderedDict()

    @classmethod
    def in_memory(cls, images: Sequence[Image.Image]) -> "NormalImages":
        return cls([str(i) for i in range(len(images))], lambda i: images[int(i)], keep=len(images))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, position: int) -> Image.Image:
        return self._entry(position)[0]

    def foreground(self, position: int) -> np.ndarray:
        """bool (H, W): where the product is on this normal image (computed once while decoded)."""
        image, foreground = self._entry(position)
        if not foreground:
            foreground.append(foreground_mask(image))
        return foreground[0]

    def _entry(self, position: int) -> tuple[Image.Image, list]:
        if not -len(self.ids) <= position < len(self.ids):
            raise IndexError(position)
        position %= len(self.ids)
        if position in self._decoded:
            self._decoded.move_to_end(position)
        else:
            self._decoded[position] = (self._load(self.ids[position]), [])
            while len(self._decoded) > self._keep:
                self._decoded.popitem(last=False)
        return self._decoded[position]


@dataclass(frozen=True)
class Item:
    """One pair to make: its number in the job, its seed, its normal image and its reference."""

    index: int
    seed: int
    normal: int  # position in request.normals
    reference: int  # position in request.exemplars (0 when there are none)


def job_items(count: int, job_seed: int, normals: int, references: int) -> list[Item]:
    """The pairs of a job. Normal images are used in turn; references are spread over them in
    turn too, changing after each round of normals, so every normal meets every reference."""
    return [
        Item(index, pair_seed(job_seed, index), index % normals, (index // normals) % max(1, references))
        for index in range(count)
    ]


def batched(items: Sequence[Item], size: int) -> list[list[Item]]:
    """Calls of up to `size` items, in order."""
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


class Cache(Protocol):
    """Files a method keeps between jobs (O2MAG's AGO embedding), by key; the worker's lives in
    storage, per tenant and method."""

    def load(self, key: str, path: Path) -> bool:
        """Copy the file cached under `key` to `path`; False if there is none."""

    def save(self, key: str, path: Path) -> None:
        """Cache the file at `path` under `key`."""


class DirectoryCache:
    """A Cache in a local folder (tests and benchmarks)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def load(self, key: str, path: Path) -> bool:
        source = self.folder / key
        if not source.is_file():
            return False
        Path(path).write_bytes(source.read_bytes())
        return True

    def save(self, key: str, path: Path) -> None:
        target = self.folder / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(path).read_bytes())


@dataclass
class GenerateRequest:
    """Everything a generate job gives its method."""

    params: StrictModel  # the method's params model, validated
    masks: MaskSpec  # `source` resolved to the method's default when the job named none
    exemplars: list[Exemplar]  # anomaly exemplars: references, and shapes for the 'exemplar' source
    given_masks: list[np.ndarray]  # for the 'given' source
    normals: NormalImages
    items: list[Item]  # every pair of the job, in index order
    product: str | None = None  # the job's product (default: its exemplars' or normals')
    defect: str | None = None  # the defect type the job makes (default: its first exemplar's)
    adapter_dir: Path | None = None  # a fine-tune job's adapter, for methods that need one
    cache: Cache | None = None
    weight_dirs: dict[str, str | None] = field(default_factory=dict)  # setting name -> local directory
    device: str | None = None
    precision: str = "fp32"  # on the CPU: auto, fp32 or bf16 (models/precision.py), for load_sd

    def target_mask(
        self,
        item: Item,
        rng: np.random.Generator | None = None,
        *,
        exemplar_masks: Sequence[np.ndarray] | None = None,
        native: Callable[[np.random.Generator, tuple[int, int]], np.ndarray] | None = None,
        learned: Callable[[np.random.Generator], np.ndarray] | None = None,
    ) -> np.ndarray:
        """bool (H, W): where `item`'s defect goes on its normal image, from the job's mask source.

        rng: the item's generator, for a method that draws more from it (default: a new one from
        the item's seed). exemplar_masks: the shapes the 'exemplar' source jitters (default: every
        exemplar's). native: the method's own mask generator, for the 'native' source.
        """
        normal = self.normals[item.normal]
        foreground = self.normals.foreground(item.normal) if self.masks.inside_foreground else None
        return sample_target_mask(
            self.masks,
            self.masks.source,
            rng if rng is not None else np.random.default_rng(item.seed),
            (normal.height, normal.width),
            foreground=foreground,
            exemplar_masks=[e.mask for e in self.exemplars] if exemplar_masks is None else exemplar_masks,
            given_masks=self.given_masks,
            index=item.index,
            native=native,
            learned=learned,
        )


@dataclass
class Checkpoints:
    """Where a fine-tune writes its checkpoints, how often, and whom it tells: the worker copies
    the folder to storage on `saved()`, and fills it from storage before a redelivered job starts."""

    folder: Path
    every: int = 250  # steps
    saved: Callable[[], None] = lambda: None


@dataclass
class FinetuneRequest:
    """Everything a fine-tune job gives its method."""

    params: StrictModel
    exemplars: list[Exemplar]
    normals: NormalImages
    seed: int
    adapter_dir: Path  # write the adapter here
    checkpoints: Checkpoints
    weight_dirs: dict[str, str | None] = field(default_factory=dict)
    device: str | None = None


@dataclass
class Pair:
    """One synthetic image and its label."""

    index: int  # the item's
    image: Image.Image  # same size and mode as the item's normal image
    mask: np.ndarray  # (H, W), uint8 0/255 or bool: the written label
    seed: int
    weak_label: bool = False  # the mask covers the defect loosely (a box), not its outline
    # More masks beside the label, e.g. {"refined_mask": ...}: written under <name>s/<defect>/<n>_mask.png
    extra_masks: dict[str, np.ndarray] = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # added to the pair's manifest entry

    @property
    def mask_u8(self) -> np.ndarray:
        return (np.asarray(self.mask) > 0).astype(np.uint8) * 255


def changed_pixels(image: Image.Image, normal: Image.Image) -> np.ndarray:
    """bool (H, W): where `image` differs from `normal` (same size and mode) in any channel."""
    changed = np.asarray(image) != np.asarray(normal)
    return changed.any(axis=2) if changed.ndim == 3 else changed


def unpainted_components(
    mask: np.ndarray, changed: np.ndarray
) -> Iterator[tuple[int, tuple[slice, slice], np.ndarray]]:
    """The 8-connected components of `mask` with no `changed` pixel: (number, bounding box, the
    component's pixels within the box) each."""
    components, _ = ndimage.label(mask, np.ones((3, 3), bool))
    for number, box in enumerate(ndimage.find_objects(components), start=1):
        component = components[box] == number
        if not changed[box][component].any():
            yield number, box, component


def painted_part(mask: np.ndarray, image: Image.Image, normal: Image.Image) -> np.ndarray:
    """bool (H, W): `mask` without its components where `image` is `normal` exactly. A blend that
    rounds back to the normal's values on a one-pixel speck painted nothing there, and the label must
    not claim a defect that is not in the image."""
    painted = np.asarray(mask) > 0
    for _, box, component in unpainted_components(painted, changed_pixels(image, normal)):
        painted[box][component] = False
    return painted


def label_contract_violation(normal: Image.Image, pair: Pair, band: int = LABEL_BAND) -> str | None:
    """None when `pair` keeps the label contract on `normal`, else what breaks it: the image must
    have the normal image's size and mode, the mask its size, every pixel farther than `band`
    pixels (chessboard distance) from the mask must be the normal image's, exactly, and every
    connected component of the mask (8-connected) must have a pixel that differs from it: one
    with none labels a defect that was never painted."""
    if pair.image.size != normal.size or pair.image.mode != normal.mode:
        return (f"pair {pair.index}: the image is {pair.image.mode} {pair.image.size}, its normal image "
                f"{normal.mode} {normal.size}")
    mask = np.asarray(pair.mask) > 0
    if mask.shape != (normal.height, normal.width):
        return f"pair {pair.index}: the mask is {mask.shape[::-1]}, its normal image {normal.size}"
    near = ndimage.binary_dilation(mask, np.ones((3, 3), bool), iterations=band) if band else mask
    changed = changed_pixels(pair.image, normal)
    outside = np.count_nonzero(changed & ~near)
    if outside:
        return (f"pair {pair.index}: {outside} pixels farther than {band} px from the written mask differ "
                "from the normal image")
    for number, (rows, cols), component in unpainted_components(mask, changed):
        return (f"pair {pair.index}: component {number} of the written mask ({np.count_nonzero(component)} px, "
                f"bounding box x0, y0, x1, y1 = {cols.start}, {rows.start}, {cols.stop}, {rows.stop}) is "
                "the normal image exactly: the label marks a defect that was not painted")
    return None
