"""report.html: the metrics as tables, ROC and PR curves, and example predictions on real images.

Plots are PNG files beside the HTML (matplotlib, headless), and the HTML carries them too, as
data URIs: report.html is one self-contained file that opens correctly as a download, through the
API behind a key, or from a presigned S3 URL, where links to its neighbours would break. No
server, no scripts.
"""

import base64
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the headless backend
import numpy as np
from PIL import Image

from models.downstream.metrics import Curves, f1_max_threshold

METRIC_NAMES = ["pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro", "image_auroc", "image_ap", "image_f1_max"]


@dataclass(frozen=True)
class Example:
    """A real test image with the model's anomaly map and the true mask, as small thumbnails."""

    defect: str
    image: np.ndarray  # uint8 (H, W) or (H, W, 3)
    anomaly_map: np.ndarray  # float (H, W) in [0, 1]
    gt_mask: np.ndarray  # bool (H, W)


def _file_stem(arm: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", arm)


def _plot_curves(path: Path, title: str, lines: Mapping[str, tuple[np.ndarray, np.ndarray]],
                 x_label: str, y_label: str) -> None:
    figure, axes = plt.subplots(figsize=(5, 4.5))
    for arm, (x, y) in lines.items():
        axes.plot(x, y, label=arm)
    axes.set(title=title, xlabel=x_label, ylabel=y_label, xlim=(0, 1), ylim=(0, 1.02))
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _example_grid(path: Path, examples: Sequence[Example], threshold: float | None) -> None:
    """One row per example: image | anomaly map (jet colours) | predicted mask | true mask."""
    def rgb(panel: np.ndarray) -> np.ndarray:
        return np.repeat(panel[:, :, None], 3, axis=2) if panel.ndim == 2 else panel

    rows = []
    for example in examples:
        predicted = example.anomaly_map >= threshold if threshold is not None else np.zeros_like(example.gt_mask)
        heat = (matplotlib.colormaps["jet"](example.anomaly_map)[:, :, :3] * 255).astype(np.uint8)
        panels = [rgb(example.image), heat, rgb(predicted.astype(np.uint8) * 255),
                  rgb(example.gt_mask.astype(np.uint8) * 255)]
        framed = [np.pad(panel, ((2, 2), (2, 2), (0, 0)), constant_values=255) for panel in panels]
        rows.append(np.concatenate(framed, axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def _image(path: Path, alt: str) -> str:
    """An <img> carrying the PNG at `path` inline."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" title="{html.escape(path.name)}">'


def _format(value) -> str:
    if value is None:
        return "&ndash;"
    return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(f"<td>{_format(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(output_dir: Path, metrics: dict, curves: Mapping[str, tuple[Curves, Curves]],
                 examples: Mapping[str, Sequence[Example]]) -> Path:
    """Write report.html and its PNGs. ``curves``: arm -> (pixel curves, image curves)."""
    for level, index in (("pixel", 0), ("image", 1)):
        roc = {arm: pair[index].roc() for arm, pair in curves.items()}
        _plot_curves(output_dir / f"{level}_roc.png", f"{level} ROC", roc, "false-positive rate", "true-positive rate")
        recall_precision = {}
        for arm, pair in curves.items():
            precision, recall = pair[index].precision_recall()
            recall_precision[arm] = (recall, precision)
        _plot_curves(output_dir / f"{level}_pr.png", f"{level} precision-recall", recall_precision,
                     "recall", "precision")

    arms = metrics["arms"]
    sections = [
        "<h1>Downstream evaluation</h1>",
        ("<p>A segmentation U-Net was trained on each arm's synthetic pairs plus the real normal images, "
         "then scored on the real test set (the last two thirds of each defect type, plus test/good).</p>"),
        "<h2>Overall</h2>",
        _table(["arm", "pairs", *METRIC_NAMES, "classification", "train s"], [
            [name, arm["pairs"], *(arm["segmentation"]["overall"][m] for m in METRIC_NAMES),
             (arm["classification"] or {}).get("accuracy"), round(arm["training"]["train_seconds"])]
            for name, arm in arms.items()
        ]),
        "<p>" + " ".join(_image(output_dir / f"{level}_{kind}.png", f"{level} {kind}")
                         for level in ("pixel", "image") for kind in ("roc", "pr")) + "</p>",
    ]
    for name, arm in arms.items():
        stem = _file_stem(name)
        threshold = f1_max_threshold(curves[name][0])
        if examples[name]:
            _example_grid(output_dir / f"examples_{stem}.png", examples[name], threshold)
        fidelity = arm["mask_fidelity"] or {}
        generation = arm["generation"]
        sections += [
            f"<h2>{html.escape(name)} ({html.escape(arm['kind'])}, {arm['pairs']} pairs)</h2>",
            _table(["defect type", *METRIC_NAMES], [
                [defect, *(values[m] for m in METRIC_NAMES)]
                for defect, values in arm["segmentation"]["per_defect"].items()
            ]),
            _table(["classification accuracy", "mask leakage", "mask fill", "inception score", "IC-LPIPS"], [[
                (arm["classification"] or {}).get("accuracy", arm["classification_reason"]),
                fidelity.get("leakage"), fidelity.get("fill"),
                generation["inception_score"] if generation["inception_score"] is not None
                else generation["inception_score_reason"],
                generation["ic_lpips"] if generation["ic_lpips"] is not None else generation["ic_lpips_reason"],
            ]]),
            "<p>Training: " + html.escape(", ".join(f"{k} {v}" for k, v in arm["training"].items())) + "</p>",
            f"<p>Real test images ({', '.join(html.escape(e.defect) for e in examples[name])}), left to right: "
            f"image, anomaly map, predicted mask (map &ge; {_format(threshold)}, the pixel F1-max threshold), "
            f"true mask.<br>{_image(output_dir / f'examples_{stem}.png', f'examples of {name}')}</p>"
            if examples[name] else "",
        ]
    for name, reason in metrics["skipped_arms"].items():
        sections.append(f"<p>Skipped {html.escape(name)}: {html.escape(reason)}</p>")

    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{margin:4px}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Downstream evaluation</title>"
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>")
    path = output_dir / "report.html"
    path.write_text(page)
    return path
