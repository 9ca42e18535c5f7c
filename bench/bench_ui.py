"""The web page on a generate job of 1,000 pairs: time to first paint, time until the first
screenful of pairs is drawn (thumbnails and mask outlines), and the bytes downloaded until then.

A real service (API, worker, Redis) makes the job; a real headless Chromium with a fresh profile
(an empty cache) opens /ui/jobs/<id>, each run in a new browser. Times come from the page's own
Performance API (navigation start = 0); bytes are the transfer sizes of every response that ended
before the first screenful was complete. The same screenful as full-size images is printed beside
it; then, for pairs of several sizes, a screenful of thumbnails made by the API on request against
the ones the worker wrote beside the pairs.

    .venv/bin/python -m bench.bench_ui [--count 1000] [--size 256] [--runs 5]
"""

import argparse
import os
import platform
import statistics
import time

import httpx
import numpy as np
from PIL import Image

from bench.common import png, running_service
from tests.browser import start_chromium, stop_chromium

# Resolves when every pair cell on screen shows its thumbnail and (mask mode "outline") its
# outline: the first screenful as a person sees it. Returns its time and what was downloaded.
FIRST_SCREENFUL = """
const done = arguments[arguments.length - 1];
function onScreen(cell) {
  const box = cell.getBoundingClientRect();
  return box.bottom > 0 && box.top < innerHeight;
}
function complete() {
  const cells = [...document.querySelectorAll(".cell")].filter(onScreen);
  return cells.length > 0 && cells.every((cell) => {
    const img = cell.querySelector("img"), canvas = cell.querySelector("canvas");
    return img.complete && img.naturalWidth > 0 && !canvas.hidden && canvas.width > 0;
  }) && cells;
}
function check() {
  const cells = complete();
  if (!cells) return requestAnimationFrame(check);
  const at = performance.now();
  const navigation = performance.getEntriesByType("navigation")[0];
  const resources = performance.getEntriesByType("resource").filter((e) => e.responseEnd <= at);
  const paint = Object.fromEntries(performance.getEntriesByType("paint").map((e) => [e.name, e.startTime]));
  done({
    screenful_ms: at, first_paint_ms: paint["first-paint"], first_contentful_paint_ms: paint["first-contentful-paint"],
    cells: cells.length, document_bytes: navigation.transferSize,
    resources: resources.map((e) => ({name: e.name, bytes: e.transferSize, body: e.encodedBodySize})),
  });
}
check();
"""


def kind_of(url: str) -> str:
    if "/ui/assets/" in url:
        return "page files (js, css, icon)"
    if ("thumb=" in url or "/thumbs/" in url) and "_mask.png" in url:
        return "mask thumbnails"
    if "thumb=" in url or "/thumbs/" in url:
        return "image thumbnails"
    return "API JSON"


def one_run(base: str, job_id: str, width: int, height: int) -> dict:
    driver = start_chromium(width, height)
    try:
        driver.set_script_timeout(120)
        driver.get(f"{base}/ui/jobs/{job_id}")
        return driver.execute_async_script(FIRST_SCREENFUL)
    finally:
        stop_chromium(driver)


def report(label: str, runs: list[dict], sizes: dict[str, int], job_id: str) -> None:
    def median(key):
        return statistics.median(run[key] for run in runs)

    by_kind: dict[str, list[int]] = {}
    for run in runs:
        totals = {"document": run["document_bytes"]}
        for resource in run["resources"]:
            kind = kind_of(resource["name"])
            totals[kind] = totals.get(kind, 0) + resource["bytes"]
        for kind, total in totals.items():
            by_kind.setdefault(kind, []).append(total)
    total_bytes = statistics.median(r["document_bytes"] + sum(e["bytes"] for e in r["resources"]) for r in runs)
    cells = runs[0]["cells"]
    full = sum(sizes[f"jobs/{job_id}/images/stain/{i}.png"] + sizes[f"jobs/{job_id}/masks/stain/{i}_mask.png"]
               for i in range(cells))
    print(f"\n{label}, {len(runs)} cold runs (fresh profile each), medians:")
    print(f"  first paint {median('first_paint_ms'):.0f} ms, first contentful paint "
          f"{median('first_contentful_paint_ms'):.0f} ms")
    print(f"  first screenful ({cells} pairs with outlines) complete at {median('screenful_ms'):.0f} ms "
          f"(min {min(r['screenful_ms'] for r in runs):.0f}, max {max(r['screenful_ms'] for r in runs):.0f})")
    print(f"  downloaded until then: {total_bytes / 1024:.0f} KiB in "
          f"{statistics.median(len(r['resources']) + 1 for r in runs):.0f} responses")
    for kind, values in sorted(by_kind.items()):
        print(f"    {kind:28s} {statistics.median(values) / 1024:7.1f} KiB")
    print(f"  the same {cells} pairs as full-size PNGs (image + mask): {full / 1024:.0f} KiB")


def surface(rng, size: int) -> np.ndarray:
    """An RGB product surface: smooth shading plus fine grain, as photographs of parts have (pure
    noise would make every PNG and JPEG unrealistically large)."""
    coarse = Image.fromarray(rng.integers(70, 190, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    grain = rng.normal(0, 6, (size, size, 3))
    return np.clip(np.asarray(coarse, np.float64) + grain, 0, 255).astype(np.uint8)


def make_job(client, rng, count: int, size: int) -> str:
    """A draem generate job of `count` RGB pairs at size x size, run to the end."""
    normals = [
        client.post("/v1/exemplars", files={"image": ("n.png", png(surface(rng, size)))},
                    data={"product": "bench"}).json()["id"]
        for _ in range(4)
    ]
    mask = np.zeros((size, size), np.uint8)
    mask[size // 3: size // 2, size // 3: 2 * size // 3] = 255
    exemplar = client.post(
        "/v1/exemplars",
        files={"image": ("a.png", png(surface(rng, size))), "mask": ("m.png", png(mask))},
        data={"product": "bench", "defect": "stain"},
    ).json()["id"]
    job_id = client.post("/v1/jobs", json={"kind": "generate", "method": "draem", "count": count, "normals": normals,
                                           "exemplars": [exemplar], "masks": {"source": "exemplar"}}).json()["id"]
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.5)
    assert job["status"] == "succeeded", job
    return job_id


def compare_thumbnail_sources(client, job_id: str, size: int, pairs: int, rounds: int) -> None:
    """One screenful of thumbnails through the API, made on request (?thumb=256) against the ones
    the worker wrote (thumbs/), fetched one after the other as the page does, alternating rounds."""
    base = f"/v1/jobs/{job_id}/artifacts/jobs/{job_id}"
    sources = {
        "on request (?thumb=256)": [f"{base}/images/stain/{i}.png?thumb=256" for i in range(pairs)]
        + [f"{base}/masks/stain/{i}_mask.png?thumb=256" for i in range(pairs)],
        "written by the worker": [f"{base}/thumbs/stain/{i}.jpg" for i in range(pairs)]
        + [f"{base}/thumbs/stain/{i}_mask.png" for i in range(pairs)],
    }
    timings: dict[str, list[float]] = {name: [] for name in sources}
    for _ in range(rounds):
        for name, urls in sources.items():
            start = time.perf_counter()
            for url in urls:
                assert client.get(url).status_code == 200
            timings[name].append((time.perf_counter() - start) * 1000)
    print(f"\n{pairs} pairs at {size}x{size}: thumbnails of a screenful (images + masks), {rounds} rounds, medians:")
    for name, values in timings.items():
        print(f"  {name:26s} {statistics.median(values):7.0f} ms  ({statistics.median(values) / pairs:.1f} ms a pair)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compare-sizes", type=int, nargs="*", default=[512, 1024])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with running_service(with_worker=True) as base:
        client = httpx.Client(base_url=base, timeout=60)
        started = time.perf_counter()
        job_id = make_job(client, rng, args.count, args.size)
        made = time.perf_counter() - started
        print(f"{args.count}-pair draem job at {args.size}x{args.size} RGB made in {made:.0f} s")
        sizes = {a["key"]: a["size"] for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]}
        for label, (width, height) in (("laptop 1366x768", (1366, 768)), ("tablet 820x1180", (820, 1180))):
            runs = [one_run(base, job_id, width, height) for _ in range(args.runs)]
            report(label, runs, sizes, job_id)
        for size in [args.size, *args.compare_sizes]:
            small_job = job_id if size == args.size else make_job(client, rng, 24, size)
            compare_thumbnail_sources(client, small_job, size, 24, rounds=5)
    print(f"\n{platform.node()} ({os.cpu_count()} cores, shared), {platform.processor() or platform.machine()}")


if __name__ == "__main__":
    main()
