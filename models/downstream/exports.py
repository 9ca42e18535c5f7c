"""A generate job's pairs as datasets for detectors: COCO instance segmentation and YOLO segmentation.

Both are zips written one file at a time, so a large job is never all in memory (COCO's JSON,
a few hundred bytes an instance, is written last).

Instances are the connected regions of a pair's mask (8-connected): a mask with three separate
defects is three objects to a detector, as it would be to an annotator.

- COCO (the layout pycocotools, Detectron2 and MMDetection read): ``annotations.json`` with one
  category per defect type, each instance's mask as compressed RLE (exactly the mask, holes
  included), its bbox and area; images under ``images/``. Normal images are images without
  annotations, which detectors use as negatives.
- YOLO segmentation (Ultralytics' layout): ``data.yaml``, ``images/train/`` and
  ``labels/train/<stem>.txt`` with one line per instance, ``<class> x1 y1 x2 y2 ...``, the outer
  contour's vertices normalised to [0, 1]. A polygon cannot hold a hole, so a ring-shaped defect
  is labelled filled. Normal images have empty label files.
"""

import io
import json
import zipfile
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import BinaryIO

import cv2
import numpy as np
from PIL import Image

Pair = tuple[str, bytes, bytes]  # (file name as the job stores it, e.g. images/crack/0.png, image PNG, mask PNG)
Normal = tuple[str, bytes]  # (file name, image)


def rle_encode(mask: np.ndarray) -> dict:
    """COCO's compressed RLE of a boolean mask: run lengths over the column-major pixels, starting
    with a run of zeros, written as COCO's string (LEB128-like, each run as a delta to the one two
    before it). What pycocotools.mask.encode returns."""
    height, width = mask.shape
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    chars = []
    for i, run in enumerate(runs):
        value = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            c = value & 0x1F
            value >>= 5
            more = value != -1 if c & 0x10 else value != 0
            chars.append(chr((c | 0x20 if more else c) + 48))
    return {"size": [height, width], "counts": "".join(chars)}


def instances(mask: np.ndarray) -> list[np.ndarray]:
    """The mask's 8-connected regions, each as a boolean mask, in label order."""
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return [labels == label for label in range(1, count)]


def _mask(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("L")) >= 128


def _size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        return image.size


def _flat_name(name: str) -> str:
    """images/crack/12.png -> crack_12.png: one folder per split, as YOLO expects."""
    path = PurePosixPath(name)
    return f"{path.parent.name}_{path.name}"


def write_coco_zip(pairs: Iterable[Pair], out: str | BinaryIO, defect: str, normals: Iterable[Normal] = ()) -> dict:
    """Returns the counts: images, annotations."""
    images, annotations = [], []
    category = {"id": 1, "name": defect, "supercategory": "defect"}
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:  # PNGs do not compress further

        def add_image(file_name: str, png: bytes) -> int:
            width, height = _size(png)
            images.append({"id": len(images) + 1, "file_name": file_name, "width": width, "height": height})
            zf.writestr(file_name, png)
            return len(images)

        for name, image_png, mask_png in pairs:
            image_id = add_image(name, image_png)
            for region in instances(_mask(mask_png)):
                ys, xs = np.nonzero(region)
                x0, y0 = int(xs.min()), int(ys.min())
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": category["id"],
                        "segmentation": rle_encode(region),
                        "area": int(region.sum()),
                        "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                        "iscrowd": 0,
                    }
                )
        for name, png in normals:
            add_image(f"images/good/{PurePosixPath(name).name}", png)
        coco = {
            "info": {"description": f"synthetic {defect} defects", "version": "1.0"},
            "images": images,
            "annotations": annotations,
            "categories": [category],
        }
        zf.writestr("annotations.json", json.dumps(coco))
    return {"images": len(images), "annotations": len(annotations)}


def polygons(mask: np.ndarray) -> list[np.ndarray]:
    """The outer contour of each region as an (n, 2) array of x, y pixel coordinates (n >= 3)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1, 2) for c in contours if len(c) >= 3]


def _yolo_lines(mask: np.ndarray) -> str:
    height, width = mask.shape
    lines = []
    for polygon in polygons(mask):
        coords = " ".join(f"{x / width:.6f} {y / height:.6f}" for x, y in polygon.tolist())
        lines.append(f"0 {coords}")
    return "\n".join(lines) + ("\n" if lines else "")


def write_yolo_zip(pairs: Iterable[Pair], out: str | BinaryIO, defect: str, normals: Iterable[Normal] = ()) -> dict:
    """Returns the counts: images, instances."""
    counts = {"images": 0, "instances": 0}
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:

        def add(file_name: str, png: bytes, labels: str) -> None:
            zf.writestr(f"images/train/{file_name}", png)
            zf.writestr(f"labels/train/{PurePosixPath(file_name).stem}.txt", labels)
            counts["images"] += 1
            counts["instances"] += labels.count("\n")

        for name, image_png, mask_png in pairs:
            add(_flat_name(name), image_png, _yolo_lines(_mask(mask_png)))
        for name, png in normals:
            add(f"good_{PurePosixPath(name).name}", png, "")
        zf.writestr(
            "data.yaml",
            "# Ultralytics YOLO segmentation. Every pair is in train; point `val` at real defect images.\n"
            f"path: .\ntrain: images/train\nval: images/train\nnames:\n  0: {json.dumps(defect)}\n",
        )
    return counts
