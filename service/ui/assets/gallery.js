// A generate job's pairs: a paged grid of thumbnails with mask overlays, and a large view of
// one pair (normal | synthetic | mask, with its manifest entry).
//
// The grid needs nothing but the job: pair n is images/<defect>/<n>.png and
// masks/<defect>/<n>_mask.png (the output layout of the REST contract), with 256 px thumbnails
// of both in thumbs/<defect>/ (jobs stored before those were written: the API scales the pair on
// request), so the first screenful costs the job record and the thumbnails on screen. The
// manifest (seed, source normal per pair) and the file listing (presigned URLs on S3) are
// fetched when the large view first needs them.

import {api, artifactUrl, exemplarUrl, ImageLoader} from "./api.js";
import {errorBox, h, replace} from "./dom.js";
import {downloadButton} from "./files.js";
import {drawMask, maskModeControl, readMask, savedMaskMode} from "./masks.js";

export const PAGE_SIZE = 100;
const THUMB = 256;
const OVERLAY_SIDE = 1024;

export function pairKeys(job, index) {
  const prefix = `jobs/${job.id}/`;
  return {image: `${prefix}images/${job.defect}/${index}.png`, mask: `${prefix}masks/${job.defect}/${index}_mask.png`};
}

// URLs of pair `index`'s thumbnails: the ones the worker wrote, or the API's on request.
function thumbnailUrls(job, index) {
  const keys = pairKeys(job, index);
  if (job.result?.thumbnail_side >= THUMB) {
    const folder = `jobs/${job.id}/thumbs/${job.defect}/${index}`;
    return {image: artifactUrl(job.id, `${folder}.jpg`), mask: artifactUrl(job.id, `${folder}_mask.png`)};
  }
  return {image: artifactUrl(job.id, keys.image, THUMB), mask: artifactUrl(job.id, keys.mask, THUMB)};
}

export function gallery(container, job, {loader, files, query, navigate}) {
  const total = job.result?.pairs ?? 0;
  const pages = Math.max(1, Math.ceil(total / PAGE_SIZE));
  let page = Math.min(pages, Math.max(1, parseInt(query.get("page"), 10) || 1));
  let mode = savedMaskMode();
  let pageLoader = new ImageLoader();
  const masks = new Map(); // pair index -> Promise of its mask thumbnail's pixels
  const manifest = () => (manifest.promise ??= api(artifactUrl(job.id, `jobs/${job.id}/manifest.json`)));

  const grid = h("ul", {class: "pair-grid", id: "pair-grid", "aria-label": "pairs"});
  const pagers = [h("nav", {class: "pager", "aria-label": "pages of pairs"}),
    h("nav", {class: "pager", "aria-label": "pages of pairs, bottom"})];
  const observer = new IntersectionObserver((entries) => {
    for (const entry of entries) {
      if (!entry.isIntersecting) continue;
      observer.unobserve(entry.target);
      loadCell(entry.target);
    }
  }, {rootMargin: "200px 0px"});
  const viewer = pairViewer(job, {loader, files, manifest, total, getMode: () => mode,
    onClose: (index) => {
      setUrl({pair: null});
      grid.querySelector(`[data-index="${index}"]`)?.focus();
    },
    onShow: (index) => setUrl({pair: index})});

  const zip = `${job.product || "dataset"}-${job.id}.zip`;
  container.append(h("section", {class: "card gallery"},
    h("div", {class: "gallery-head"},
      h("h2", {}, `${total} pairs`),
      h("div", {class: "downloads"},
        downloadButton(`/v1/jobs/${job.id}/export`, zip, "MVTec zip", {id: "download-zip"}),
        downloadButton(artifactUrl(job.id, `jobs/${job.id}/manifest.json`), "manifest.json", "manifest.json"),
        downloadButton(artifactUrl(job.id, `jobs/${job.id}/preview.png`), "preview.png", "preview.png")),
      maskModeControl(h, mode, setMode)),
    pagers[0], grid, pagers[1]));

  function setUrl(changes) {
    const params = new URLSearchParams(location.search);
    for (const [name, value] of Object.entries(changes)) {
      if (value === null || (name === "page" && value === 1)) params.delete(name);
      else params.set(name, value);
    }
    navigate(`${location.pathname}${params.size ? `?${params}` : ""}`, {replace: true, render: false});
  }

  function setMode(value) {
    mode = value;
    grid.dataset.mask = mode;
    for (const cell of grid.querySelectorAll(".cell[data-loaded]")) overlay(cell);
  }

  function overlay(cell) {
    const canvas = cell.querySelector("canvas");
    if (mode === "off") {
      canvas.hidden = true;
      return;
    }
    const index = Number(cell.dataset.index);
    if (!masks.has(index)) {
      masks.set(index, pageLoader.load(thumbnailUrls(job, index).mask).then(readMask));
    }
    masks.get(index).then((mask) => drawMask(canvas, mask, mode), () => {});
  }

  // The thumbnail and its mask are fetched side by side; each is drawn when it arrives.
  function loadCell(cell) {
    const index = Number(cell.dataset.index);
    const image = cell.querySelector("img");
    cell.dataset.loaded = "1";
    overlay(cell);
    pageLoader.load(thumbnailUrls(job, index).image).then((url) => {
      image.src = url;
    }, (error) => {
      if (error.name !== "AbortError") cell.querySelector(".caption").append(" (not available)");
    });
  }

  function renderPager(nav) {
    const go = (target) => h("button", {type: "button", class: "small", disabled: target < 1 || target > pages,
      onclick: () => showPage(target)}, target < page ? "‹ Previous" : "Next ›");
    const first = (page - 1) * PAGE_SIZE;
    const picker = h("select", {"aria-label": "page", onchange: (event) => showPage(Number(event.target.value))},
      Array.from({length: pages}, (_, i) => h("option", {value: i + 1, selected: i + 1 === page}, `page ${i + 1}`)));
    replace(nav, go(page - 1),
      h("span", {class: "page-info"}, `pairs ${first}–${Math.min(total, first + PAGE_SIZE) - 1} of ${total}`),
      pages > 1 ? picker : null, go(page + 1));
  }

  function showPage(target) {
    page = target;
    setUrl({page});
    pageLoader.release();
    pageLoader = new ImageLoader();
    masks.clear();
    observer.disconnect();
    const first = (page - 1) * PAGE_SIZE;
    const cells = [];
    for (let index = first; index < Math.min(total, first + PAGE_SIZE); index += 1) {
      const cell = h("button", {type: "button", class: "cell", "data-index": index,
        "aria-label": `pair ${index}: open the large view`, onclick: () => viewer.show(index)},
      h("span", {class: "frame"}, h("img", {alt: `synthetic image ${index}`, decoding: "async"}),
        h("canvas", {class: "overlay", hidden: true, "aria-hidden": "true"})),
      h("span", {class: "caption"}, `#${index}`));
      cells.push(h("li", {}, cell));
      observer.observe(cell);
    }
    grid.replaceChildren(...cells);
    grid.dataset.mask = mode;
    pagers.forEach(renderPager);
  }

  // Arrow keys move between pairs; Enter or Space opens one.
  grid.addEventListener("keydown", (event) => {
    const cells = [...grid.querySelectorAll(".cell")];
    const at = cells.indexOf(document.activeElement);
    if (at < 0) return;
    const columns = Math.max(1, cells.filter((c) => c.offsetTop === cells[0].offsetTop).length);
    const step = {ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns, ArrowUp: -columns}[event.key];
    if (!step) return;
    event.preventDefault();
    cells[Math.min(cells.length - 1, Math.max(0, at + step))].focus();
  });

  if (total === 0) {
    grid.replaceWith(h("p", {class: "muted"}, "This job made no pairs."));
  } else {
    showPage(page);
    const pair = parseInt(query.get("pair"), 10);
    if (pair >= 0 && pair < total) viewer.show(pair);
  }

  return {
    teardown() {
      observer.disconnect();
      pageLoader.release();
      viewer.close();
    },
  };
}

// The large view: a modal dialog (Esc closes it, focus stays inside), ← and → step through pairs.
function pairViewer(job, {loader, files, manifest, total, getMode, onClose, onShow}) {
  let index = null;
  let shown = 0; // which show() call the images on screen belong to
  const title = h("h2", {id: "pair-title"});
  const panel = (name, label) => {
    const image = h("img", {alt: `${label} image`, class: `pair-${name}`});
    const figure = h("figure", {class: "panel"}, h("span", {class: "frame"}, image), h("figcaption", {}, label));
    return {figure, image};
  };
  const normal = panel("normal", "normal (source)");
  const synthetic = panel("synthetic", "synthetic");
  const mask = panel("mask", "mask");
  const canvas = h("canvas", {class: "overlay", hidden: true, "aria-hidden": "true"});
  synthetic.figure.querySelector(".frame").append(canvas);
  const entryList = h("dl", {class: "facts manifest-entry"});
  const fileButtons = h("div", {class: "downloads"});
  const problem = h("div");
  const step = (delta) => index !== null && index + delta >= 0 && index + delta < total && show(index + delta);
  const dialog = h("dialog", {class: "pair-view", "aria-labelledby": "pair-title"},
    h("div", {class: "pair-head"}, title,
      h("div", {class: "actions"},
        h("button", {type: "button", class: "small", id: "pair-previous", onclick: () => step(-1)}, "‹ Previous"),
        h("button", {type: "button", class: "small", id: "pair-next", onclick: () => step(1)}, "Next ›"),
        h("button", {type: "button", class: "small", id: "pair-close", onclick: () => dialog.close()}, "Close"))),
    h("div", {class: "panels"}, normal.figure, synthetic.figure, mask.figure),
    problem,
    h("div", {class: "pair-info"},
      h("section", {}, h("h3", {}, "Manifest entry"), entryList),
      h("section", {}, h("h3", {}, "Files"), fileButtons)));
  dialog.addEventListener("keydown", (event) => {
    if (event.target.closest("select, input, textarea")) return;
    if (event.key === "ArrowRight") step(1);
    if (event.key === "ArrowLeft") step(-1);
  });
  dialog.addEventListener("close", () => {
    const closed = index;
    index = null;
    if (closed !== null) onClose(closed);
  });
  document.body.append(dialog);

  async function show(target) {
    index = target;
    const call = ++shown;
    const keys = pairKeys(job, target);
    title.textContent = `Pair #${target} (${target + 1} of ${total})`;
    for (const image of [normal.image, synthetic.image, mask.image]) image.removeAttribute("src");
    canvas.hidden = true;
    problem.replaceChildren();
    entryList.replaceChildren(h("dd", {class: "muted"}, "Loading…"));
    if (!dialog.open) dialog.showModal();
    onShow(target);
    try {
      const [all, pairsManifest] = await Promise.all([files(), manifest()]);
      if (call !== shown) return;
      const entry = pairsManifest.pairs.find((p) => p.index === target) || {};
      const urlOf = (key) => all.get(key)?.url || artifactUrl(job.id, key);
      const put = (image, url) => loader.load(url).then((src) => call === shown && (image.src = src));
      const loads = [put(synthetic.image, urlOf(keys.image)), put(mask.image, urlOf(keys.mask))];
      if (entry.normal) loads.push(put(normal.image, exemplarUrl(entry.normal)));
      if (getMode() !== "off") {
        loads.push(loader.load(artifactUrl(job.id, keys.mask, OVERLAY_SIDE)).then(readMask)
          .then((pixels) => call === shown && drawMask(canvas, pixels, getMode())));
      }
      const rows = [["index", entry.index], ["seed", entry.seed], ["source normal", entry.normal],
        ["weak label", entry.weak_label], ["refined mask", entry.refined_mask], ["image", entry.image],
        ["mask", entry.mask], ["method", pairsManifest.method], ["params", JSON.stringify(pairsManifest.params)],
        ["mask spec", JSON.stringify(pairsManifest.masks)]];
      entryList.replaceChildren(...rows.filter(([, v]) => v !== undefined && v !== null)
        .flatMap(([term, value]) => [h("dt", {}, term), h("dd", {class: "mono", "data-field": term}, String(value))]));
      replace(fileButtons,
        downloadButton(urlOf(keys.image), `${target}.png`, "synthetic image"),
        downloadButton(urlOf(keys.mask), `${target}_mask.png`, "mask"),
        entry.normal ? downloadButton(exemplarUrl(entry.normal), `${entry.normal}.png`, "normal image") : null);
      await Promise.all(loads);
    } catch (error) {
      if (call === shown && error.name !== "AbortError") problem.replaceChildren(errorBox(error, "Could not load the pair:"));
    }
  }

  return {
    show,
    close() {
      index = null; // leaving the page: no URL or focus to restore
      if (dialog.open) dialog.close();
      dialog.remove();
    },
  };
}
