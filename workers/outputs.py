"""Writing a generate job's outputs in the layout of docs/api.md (Storage layout):

    jobs/<id>/images/<defect>/<n>.png, jobs/<id>/masks/<defect>/<n>_mask.png,
    jobs/<id>/manifest.json, jobs/<id>/preview.png

and, for the web page's grid, a 256 px thumbnail of each: jobs/<id>/thumbs/<defect>/<n>.jpg and
<n>_mask.png (made here from the pixels in memory, a few ms a pair, rather than by the API
decoding the full PNG for every view).

Keys depend only on the job and the pair index, so a redelivered job overwrites, never duplicates.
Each stored pair also leaves its manifest entry under jobs/<id>/checkpoint/pairs/ (written last,
so it marks the pair complete): a redelivered job keeps those pairs and makes only the others.
Every pair is checked against the label contract before anything of it is written.
"""

import io
import json

import numpy as np
from PIL import Image

from models.methods.interface import Item, NormalImages, Pair, label_contract_violation
from models.preview import contact_sheet
from models.thumbnails import THUMBNAIL_SIDE, thumbnail
from workers.context import JobContext
from workers.metrics import PAIRS_GENERATED

PREVIEW_PAIRS = 16


class LabelContractBroken(RuntimeError):
    """A method changed pixels outside its written mask (a bug in the method): the job fails
    rather than writing a wrong label."""


class GenerateOutputs:
    def __init__(self, context: JobContext, normals: NormalImages):
        self.context, self.normals = context, normals
        self.defect = context.job["defect"]
        self.entries_prefix = context.prefix + "checkpoint/pairs/"
        self.stored = {int(obj.key[len(self.entries_prefix) :].removesuffix(".json"))
                       for obj in context.storage.list(self.entries_prefix)}
        self.entries: dict[int, dict] = {}

    def has_all(self, items: list[Item]) -> bool:
        """Whether every item's pair is stored already (by an earlier delivery of this job)."""
        return all(item.index in self.stored for item in items)

    def add(self, pair: Pair, item: Item) -> None:
        """Check pair `item.index` against the label contract, then store it and its manifest entry."""
        violation = label_contract_violation(self.normals[item.normal], pair)
        if violation:
            raise LabelContractBroken(f"{self.context.job['method']} broke the label contract: {violation}")
        index = pair.index
        entry = {"index": index, "image": f"images/{self.defect}/{index}.png",
                 "mask": f"masks/{self.defect}/{index}_mask.png", "seed": pair.seed,
                 "normal": self.normals.ids[item.normal], "weak_label": pair.weak_label, **pair.details}
        mask_image = Image.fromarray(pair.mask_u8, mode="L")
        self.context.put_png(self.context.prefix + entry["image"], pair.image)
        self.context.put_png(self.context.prefix + entry["mask"], mask_image)
        for path, picture, is_mask in (
            (f"thumbs/{self.defect}/{index}.jpg", pair.image, False),
            (f"thumbs/{self.defect}/{index}_mask.png", mask_image, True),
        ):
            data, media_type = thumbnail(picture, THUMBNAIL_SIDE, mask=is_mask)
            self.context.storage.put(self.context.prefix + path, data, media_type)
        for name, extra in pair.extra_masks.items():
            entry[name] = f"{name}s/{self.defect}/{index}_mask.png"
            mask = (np.asarray(extra) > 0).astype(np.uint8) * 255
            self.context.put_png(self.context.prefix + entry[name], Image.fromarray(mask, mode="L"))
        self.context.storage.put(self.entries_prefix + f"{index}.json", json.dumps(entry).encode(), "application/json")
        self.entries[index] = entry
        self.stored.add(index)
        PAIRS_GENERATED.labels(self.context.job["method"]).inc()

    def finish(self) -> dict:
        job, storage, prefix = self.context.job, self.context.storage, self.context.prefix
        for index in self.stored - set(self.entries):  # pairs an earlier delivery stored
            self.entries[index] = json.loads(storage.get(self.entries_prefix + f"{index}.json"))
        pairs = [self.entries[index] for index in sorted(self.entries)]
        manifest = {
            "job": job["id"],
            "method": job["method"],
            "product": job["product"],
            "defect": self.defect,
            "seed": job["seed"],
            "params": job["params"],
            "masks": job["masks"],
            "exemplars": job["exemplars"],
            "normals": job["normals"],
            "adapter": job["adapter"],
            "pairs": pairs,
        }
        storage.put(prefix + "manifest.json", json.dumps(manifest, indent=1).encode(), "application/json")
        if pairs:
            shown = [(self._stored_image(e["image"]), np.asarray(self._stored_image(e["mask"])))
                     for e in pairs[:PREVIEW_PAIRS]]
            self.context.put_png(prefix + "preview.png", contact_sheet(shown))
        storage.delete_prefix(prefix + "checkpoint/")
        return {
            "pairs": len(pairs),
            "prefix": prefix,
            "manifest": prefix + "manifest.json",
            "preview": prefix + "preview.png",
            "thumbnails": prefix + "thumbs/",
            "thumbnail_side": THUMBNAIL_SIDE,
        }

    def _stored_image(self, path: str) -> Image.Image:
        image = Image.open(io.BytesIO(self.context.storage.get(self.context.prefix + path)))
        image.load()
        return image
