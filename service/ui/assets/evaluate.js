// An evaluate job: the metrics table (one row per arm, the best value of each column marked),
// the ROC and PR plots inline, example predictions, and report.html.

import {api, artifactUrl, openInTab} from "./api.js";
import {errorBox, formatNumber, h, replace} from "./dom.js";
import {downloadButton} from "./files.js";

// [key, heading, how to read it from an arm, whether higher is better]
const COLUMNS = [
  ["pixel_auroc", "pixel AUROC", (a) => a.segmentation.overall.pixel_auroc, true],
  ["image_auroc", "image AUROC", (a) => a.segmentation.overall.image_auroc, true],
  ["pixel_ap", "pixel AP", (a) => a.segmentation.overall.pixel_ap, true],
  ["image_ap", "image AP", (a) => a.segmentation.overall.image_ap, true],
  ["pixel_f1_max", "pixel F1-max", (a) => a.segmentation.overall.pixel_f1_max, true],
  ["image_f1_max", "image F1-max", (a) => a.segmentation.overall.image_f1_max, true],
  ["aupro", "AUPRO", (a) => a.segmentation.overall.aupro, true],
  ["classification", "class. accuracy", (a) => a.classification?.accuracy ?? null, true],
  ["leakage", "mask leakage", (a) => a.mask_fidelity?.leakage ?? null, false],
  ["fill", "mask fill", (a) => a.mask_fidelity?.fill ?? null, true],
];
const PER_DEFECT = ["pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro", "image_auroc", "image_ap", "image_f1_max"];
const PLOTS = [["pixel_roc", "pixel ROC"], ["pixel_pr", "pixel precision-recall"], ["image_roc", "image ROC"],
  ["image_pr", "image precision-recall"]];

const fileStem = (arm) => arm.replace(/[^A-Za-z0-9_.-]/g, "_");

// The best value of each column (highest, or lowest where lower is better); nulls take no part.
export function bestValues(arms) {
  const best = {};
  for (const [key, , read, higher] of COLUMNS) {
    const values = arms.map(read).filter((v) => v !== null && v !== undefined);
    best[key] = values.length ? (higher ? Math.max(...values) : Math.min(...values)) : null;
  }
  return best;
}

function metricsTable(metrics) {
  const names = Object.keys(metrics.arms);
  const arms = names.map((n) => metrics.arms[n]);
  const best = bestValues(arms);
  return h("div", {class: "table-scroll"}, h("table", {class: "metrics", id: "metrics-table"},
    h("caption", {}, "Each arm: a segmentation U-Net trained on its pairs plus the real normal images, scored on " +
      "the real test set. ★ marks the best value of each column (lowest for mask leakage)."),
    h("thead", {}, h("tr", {}, h("th", {scope: "col"}, "arm"), h("th", {scope: "col"}, "pairs"),
      COLUMNS.map(([, heading, , higher]) => h("th", {scope: "col"}, heading, higher ? "" : " ↓")))),
    h("tbody", {}, names.map((name, row) => h("tr", {"data-arm": name},
      h("th", {scope: "row"}, name, h("span", {class: "muted small"}, ` ${arms[row].kind}`)),
      h("td", {}, arms[row].pairs),
      COLUMNS.map(([key, heading, read]) => {
        const value = read(arms[row]);
        const isBest = value !== null && value !== undefined && best[key] !== null
          && Math.abs(value - best[key]) < 1e-12 && names.length > 1;
        return h("td", {class: isBest ? "best" : "", "data-column": key, title: isBest ? `best ${heading}` : null},
          formatNumber(value), isBest ? h("span", {class: "best-mark", "aria-label": "best"}, " ★") : null);
      }))))));
}

function perDefect(name, arm) {
  return h("details", {}, h("summary", {}, `${name}: per defect type`),
    h("div", {class: "table-scroll"}, h("table", {class: "plain"},
      h("thead", {}, h("tr", {}, h("th", {scope: "col"}, "defect"), PER_DEFECT.map((m) => h("th", {scope: "col"}, m)))),
      h("tbody", {}, Object.entries(arm.segmentation.per_defect).map(([defect, values]) => h("tr", {},
        h("th", {scope: "row"}, defect), PER_DEFECT.map((m) => h("td", {}, formatNumber(values[m]))))))),
    arm.classification === null ? h("p", {class: "muted small"}, `Classification: ${arm.classification_reason}`) : null));
}

export function evaluation(container, job, {loader, files}) {
  const prefix = `jobs/${job.id}/`;
  const section = h("section", {class: "card evaluation"}, h("h2", {}, "Downstream evaluation"),
    h("p", {class: "muted"}, "Loading metrics…"));
  container.append(section);

  (async () => {
    try {
      const [metrics, all] = await Promise.all([api(artifactUrl(job.id, `${prefix}metrics.json`)), files()]);
      const urlOf = (name) => all.get(prefix + name)?.url || artifactUrl(job.id, prefix + name);
      const figure = (name, caption) => {
        const image = h("img", {alt: caption, class: "plot", "data-plot": name});
        loader.load(urlOf(`${name}.png`)).then((src) => (image.src = src),
          (error) => image.replaceWith(errorBox(error, `${caption}:`)));
        return h("figure", {class: "plot-figure"}, image, h("figcaption", {}, caption));
      };
      const names = Object.keys(metrics.arms);
      replace(section,
        h("div", {class: "gallery-head"}, h("h2", {}, "Downstream evaluation"),
          h("div", {class: "downloads"},
            h("button", {type: "button", class: "small", id: "open-report",
              onclick: () => openInTab(urlOf("report.html"))}, "Open report.html"),
            downloadButton(urlOf("report.html"), "report.html", "Download report.html"),
            downloadButton(urlOf("metrics.json"), "metrics.json", "metrics.json"))),
        metricsTable(metrics),
        Object.keys(metrics.skipped_arms || {}).length ? h("ul", {class: "muted"},
          Object.entries(metrics.skipped_arms).map(([n, reason]) => h("li", {}, `Skipped ${n}: ${reason}`))) : null,
        h("h3", {}, "Curves"),
        h("div", {class: "plots"}, PLOTS.map(([name, caption]) => figure(name, caption))),
        h("h3", {}, "Per defect type and example predictions"),
        names.map((name) => [perDefect(name, metrics.arms[name]),
          all.has(`${prefix}examples_${fileStem(name)}.png`)
            ? h("div", {class: "plots"}, figure(`examples_${fileStem(name)}`,
              `${name}: real test images; left to right image, anomaly map, predicted mask, true mask`))
            : null]));
    } catch (error) {
      section.replaceChildren(errorBox(error, "Could not load the evaluation:"));
    }
  })();
  return {};
}
