"""Writing a generate job's outputs in the layout of DESIGN section 3:

    jobs/<id>/images/<defect>/<n>.png, jobs/<id>/masks/<defect>/<n>_mask.png,
    jobs/<id>/manifest.json, jobs/<id>/preview.png

and, for the web page's grid, a 256 px thumbnail of each: jobs/<id>/thumbs/<defect>/<n>.jpg and
<n>_mask.png (made here from the pixels in memory, a few ms a pair, rather than by the API
decoding the full PNG for every view).

Keys depend only on the job and the pair index, so a redelivered job overwrites, never duplicates.
"""

import json

import numpy as np
from PIL import Image

from models.preview import contact_sheet
from models.thumbnails import THUMBNAIL_SIDE, thumbnail
from workers.context import JobContext
from workers.metrics import PAIRS_GENERATED

PREVIEW_PAIRS = 16


class GenerateOutputs:
    def __init__(self, context: JobContext):
        self.context = context
        self.defect = context.job["defect"]
        self.entries: list[dict] = []
        self.preview: list[tuple[Image.Image, np.ndarray]] = []

    def add(
        self, index: int, image: Image.Image, mask: np.ndarray, refined_mask: np.ndarray | None = None, **entry
    ) -> None:
        """Store pair `index`; `entry` (seed, source normal, ...) goes into the manifest. A refined
        mask (where a weakly labelled image really changed) goes beside, outside the MVTec folders."""
        image_path = f"images/{self.defect}/{index}.png"
        mask_path = f"masks/{self.defect}/{index}_mask.png"
        mask_image = Image.fromarray(mask, mode="L")
        self.context.put_png(self.context.prefix + image_path, image)
        self.context.put_png(self.context.prefix + mask_path, mask_image)
        for path, picture, is_mask in (
            (f"thumbs/{self.defect}/{index}.jpg", image, False),
            (f"thumbs/{self.defect}/{index}_mask.png", mask_image, True),
        ):
            data, media_type = thumbnail(picture, THUMBNAIL_SIDE, mask=is_mask)
            self.context.storage.put(self.context.prefix + path, data, media_type)
        if refined_mask is not None:
            entry["refined_mask"] = f"refined_masks/{self.defect}/{index}_mask.png"
            self.context.put_png(self.context.prefix + entry["refined_mask"], Image.fromarray(refined_mask, mode="L"))
        self.entries.append({"index": index, "image": image_path, "mask": mask_path, **entry})
        if len(self.preview) < PREVIEW_PAIRS:
            self.preview.append((image, mask))
        PAIRS_GENERATED.labels(self.context.job["method"]).inc()

    def finish(self) -> dict:
        job = self.context.job
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
            "pairs": sorted(self.entries, key=lambda e: e["index"]),
        }
        prefix = self.context.prefix
        self.context.storage.put(prefix + "manifest.json", json.dumps(manifest, indent=1).encode(), "application/json")
        if self.preview:
            self.context.put_png(prefix + "preview.png", contact_sheet(self.preview))
        return {
            "pairs": len(self.entries),
            "prefix": prefix,
            "manifest": prefix + "manifest.json",
            "preview": prefix + "preview.png",
            "thumbnails": prefix + "thumbs/",
            "thumbnail_side": THUMBNAIL_SIDE,
        }
