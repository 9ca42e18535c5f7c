// A job's stored outputs: the listing (fetched once, when first needed) and download buttons.

import {download, listAll} from "./api.js";
import {errorBox, formatBytes, h} from "./dom.js";

// Every stored output of the job, by key: fetched once, when something first needs it.
export function artifactIndex(jobId) {
  let promise = null;
  return () => {
    promise ??= listAll(`/v1/jobs/${jobId}/artifacts`).then((items) => new Map(items.map((a) => [a.key, a])));
    return promise;
  };
}

// "All files": a table of every artifact with a download button, loaded when opened.
export function filesList(jobId, files) {
  const table = h("div", {class: "files"}, h("p", {class: "muted"}, "Loading…"));
  const details = h("details", {class: "card files-card", id: "all-files"}, h("summary", {}, "All files"), table);
  details.addEventListener("toggle", async () => {
    if (!details.open || table.dataset.loaded) return;
    table.dataset.loaded = "1";
    try {
      const items = [...(await files()).values()];
      table.replaceChildren(h("table", {class: "plain"},
        h("thead", {}, h("tr", {}, h("th", {scope: "col"}, "Key"), h("th", {scope: "col"}, "Size"), h("th"))),
        h("tbody", {}, items.map((item) => h("tr", {},
          h("td", {class: "mono"}, item.key.slice(`jobs/${jobId}/`.length) || item.key),
          h("td", {}, formatBytes(item.size)),
          h("td", {}, downloadButton(item.url, item.key.split("/").pop(), "Download")))))));
    } catch (error) {
      table.replaceChildren(errorBox(error, "Could not list the files:"));
    }
  });
  return details;
}

export function downloadButton(url, filename, label, extra = {}) {
  const button = h("button", {type: "button", class: "small", ...extra}, label);
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      await download(url, filename);
    } catch (error) {
      button.after(errorBox(error, "Download failed:"));
    } finally {
      button.disabled = false;
    }
  });
  return button;
}

