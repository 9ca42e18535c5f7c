// The jobs view: the tenant's jobs newest first, live progress with an ETA, cancel, filters.

import {api, request} from "./api.js";
import {errorBox, formatAgo, formatDuration, formatTime, h, shortId} from "./dom.js";

export const ACTIVE = ["queued", "running"];
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const KINDS = ["generate", "finetune", "evaluate"];
const LIST_LIMIT = 100;
const POLL_ACTIVE_MS = 1500;
const POLL_IDLE_MS = 4000; // new jobs from other clients show up within seconds
const RATE_WINDOW_S = 60;

// Time left in a job's current stage, from the rate its progress fraction moved over the last
// minute of polls. The workers report a fraction per stage ("generating" 9/20), so a new stage
// starts a new estimate.
export class EtaTracker {
  constructor() {
    this.samples = new Map(); // job id -> {stage, points: [{t, fraction}]}
  }

  observe(job) {
    if (job.status !== "running") {
      this.samples.delete(job.id);
      return null;
    }
    const t = performance.now() / 1000;
    const {fraction, stage} = job.progress;
    let entry = this.samples.get(job.id);
    if (!entry || entry.stage !== stage || fraction < entry.points.at(-1).fraction) {
      entry = {stage, points: []};
      this.samples.set(job.id, entry);
    }
    entry.points.push({t, fraction});
    while (entry.points.length > 2 && t - entry.points[0].t > RATE_WINDOW_S) entry.points.shift();
    const first = entry.points[0];
    const last = entry.points.at(-1);
    if (last.t - first.t < 1 || last.fraction <= first.fraction) return null;
    const rate = (last.fraction - first.fraction) / (last.t - first.t);
    return (1 - last.fraction) / rate;
  }
}

export function statusBadge(status) {
  return h("span", {class: `status status-${status}`}, status);
}

// A progress bar with its stage and counts; `eta` in seconds or null.
export function progressBlock(job, eta) {
  const {fraction, stage, done, total} = job.progress;
  const percent = Math.round(fraction * 100);
  const counts = total ? ` ${done}/${total}` : "";
  let etaText = "";
  if (job.status === "running") etaText = eta === null ? "estimating…" : `≈ ${formatDuration(eta)} left`;
  return h("div", {class: "progress-block"},
    h("progress", {max: 100, value: percent, "aria-label": `${stage}: ${percent}%`}),
    h("span", {class: "progress-text"}, `${stage}${counts} · ${percent}%`),
    etaText ? h("span", {class: "eta"}, etaText) : null);
}

// A cancel button that asks once more before it cancels; `onDone()` after the API accepted it.
export function cancelButton(job, onDone, onError) {
  let armed = false;
  const button = h("button", {type: "button", class: "danger small", "data-cancel": job.id,
    "aria-label": `Cancel job ${shortId(job.id)}`}, "Cancel");
  button.addEventListener("click", async () => {
    if (!armed) {
      armed = true;
      button.textContent = "Confirm cancel";
      setTimeout(() => {
        armed = false;
        if (button.isConnected && !button.disabled) button.textContent = "Cancel";
      }, 4000);
      return;
    }
    button.disabled = true;
    button.textContent = "Cancelling…";
    try {
      await request(`/v1/jobs/${job.id}`, {method: "DELETE"});
      onDone();
    } catch (error) {
      onError(error);
    }
  });
  return button;
}

function describe(job) {
  if (job.kind === "evaluate") return `${job.generated.length} generate job(s) on dataset ${shortId(job.dataset)}`;
  const what = [job.product, job.defect].filter(Boolean).join(" / ");
  return job.kind === "generate" ? `${what} · ${job.count} pairs` : what;
}

export function jobsView(main, {query, navigate}) {
  const filters = {status: query.get("status") || "", kind: query.get("kind") || ""};
  const eta = new EtaTracker();
  const rows = new Map();
  let timer = null;
  let stopped = false;

  const select = (name, label, options) => h("label", {class: "filter"}, label,
    h("select", {id: `filter-${name}`, onchange: (event) => {
      filters[name] = event.target.value;
      const params = new URLSearchParams(Object.entries(filters).filter(([, v]) => v));
      navigate(`/ui/jobs${params.size ? `?${params}` : ""}`, {replace: true, render: false});
      refresh();
    }}, h("option", {value: ""}, "all"), options.map((o) => h("option", {value: o, selected: o === filters[name]}, o))));

  const message = h("div", {class: "messages", "aria-live": "polite"});
  const body = h("tbody");
  const table = h("table", {class: "jobs"},
    h("thead", {}, h("tr", {},
      ["Created", "Job", "Kind", "Method", "What", "Status", "Progress", ""].map((c) => h("th", {scope: "col"}, c)))),
    body);
  const empty = h("p", {class: "muted", id: "jobs-empty", hidden: true});
  const footer = h("p", {class: "muted small", hidden: true}, `Showing the newest ${LIST_LIMIT} jobs that match.`);

  main.append(
    h("div", {class: "page-head"},
      h("h1", {}, "Jobs"),
      h("a", {class: "button primary", href: "/ui/new"}, "New generate job")),
    h("form", {class: "filters", role: "search", onsubmit: (e) => e.preventDefault()},
      select("status", "Status", STATUSES), select("kind", "Kind", KINDS),
      h("span", {class: "muted small live-note", id: "live-note"}, "")),
    message,
    h("div", {class: "table-scroll"}, table),
    empty, footer);

  function renderRow(job) {
    const estimate = eta.observe(job);
    const cells = [
      h("td", {title: formatTime(job.created_at)}, formatAgo(job.created_at)),
      h("td", {}, h("a", {href: `/ui/jobs/${job.id}`, class: "mono"}, shortId(job.id))),
      h("td", {}, job.kind),
      h("td", {}, job.method || "–"),
      h("td", {class: "what"}, describe(job)),
      h("td", {}, statusBadge(job.status)),
      h("td", {class: "progress-cell"}, progressBlock(job, estimate)),
      h("td", {}, ACTIVE.includes(job.status)
        ? cancelButton(job, refresh, (error) => message.replaceChildren(errorBox(error, "Cancel failed:")))
        : null),
    ];
    let row = rows.get(job.id);
    if (!row) {
      row = h("tr", {"data-job": job.id});
      rows.set(job.id, row);
    }
    // Keep a cancel button that is waiting for its confirmation (and its focus) across polls.
    const keep = row.querySelector("button[data-cancel]");
    if (keep && ACTIVE.includes(job.status) && keep.textContent !== "Cancel") cells[7] = h("td", {}, keep);
    row.replaceChildren(...cells);
    row.dataset.status = job.status;
    return row;
  }

  async function refresh() {
    clearTimeout(timer);
    if (stopped) return;
    const params = new URLSearchParams({limit: LIST_LIMIT});
    for (const [name, value] of Object.entries(filters)) if (value) params.set(name, value);
    let jobs = [];
    try {
      jobs = (await api(`/v1/jobs?${params}`)).items;
      message.replaceChildren();
    } catch (error) {
      if (error.status === 401 || stopped) return;
      message.replaceChildren(errorBox(error, "Could not load the jobs:"));
      timer = setTimeout(refresh, POLL_IDLE_MS);
      return;
    }
    if (stopped) return;
    const seen = new Set(jobs.map((j) => j.id));
    for (const id of rows.keys()) if (!seen.has(id)) rows.delete(id);
    body.replaceChildren(...jobs.map(renderRow));
    table.dataset.loaded = "1";
    empty.hidden = jobs.length > 0;
    empty.replaceChildren(filters.status || filters.kind ? "No jobs match these filters."
      : h("span", {}, "No jobs yet. Upload exemplars and normal images and start one on ",
        h("a", {href: "/ui/new"}, "New job"), "."));
    footer.hidden = jobs.length < LIST_LIMIT;
    const active = jobs.some((j) => ACTIVE.includes(j.status));
    document.getElementById("live-note").textContent = active ? "updating live" : "";
    timer = setTimeout(refresh, active ? POLL_ACTIVE_MS : POLL_IDLE_MS);
  }

  const onVisible = () => {
    if (!document.hidden) refresh();
    else clearTimeout(timer);
  };
  document.addEventListener("visibilitychange", onVisible);
  refresh();
  return {
    title: "Jobs",
    teardown() {
      stopped = true;
      clearTimeout(timer);
      document.removeEventListener("visibilitychange", onVisible);
    },
  };
}
