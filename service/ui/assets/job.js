// One job: its live status, then what it made (a pair gallery, an evaluation, an adapter).

import {api, ImageLoader} from "./api.js";
import {errorBox, formatDuration, formatTime, h, shortId} from "./dom.js";
import {evaluation} from "./evaluate.js";
import {artifactIndex, filesList} from "./files.js";
import {gallery} from "./gallery.js";
import {ACTIVE, cancelButton, EtaTracker, progressBlock, statusBadge} from "./jobs.js";

const POLL_MS = 1500;
const KIND_TITLES = {generate: "Generate job", finetune: "Fine-tune job", evaluate: "Evaluate job"};

function facts(job) {
  const rows = [
    job.kind !== "evaluate" ? ["Method", job.method] : null,
    ["Product", job.product || "–"],
    job.kind === "generate" ? ["Defect", job.defect] : null,
    job.kind === "generate" ? ["Pairs asked", job.count] : null,
    job.kind !== "evaluate" ? ["Seed", job.seed] : null,
    job.adapter ? ["Adapter", h("a", {href: `/ui/jobs/${job.adapter}`, class: "mono"}, shortId(job.adapter))] : null,
    job.dataset ? ["Dataset", h("span", {class: "mono"}, shortId(job.dataset))] : null,
    job.generated?.length ? ["Evaluates", job.generated.map((id) =>
      h("a", {href: `/ui/jobs/${id}`, class: "mono sep"}, shortId(id)))] : null,
    ["Created", formatTime(job.created_at)],
    job.started_at ? ["Started", formatTime(job.started_at)] : null,
    job.finished_at ? ["Finished", formatTime(job.finished_at)] : null,
    job.finished_at && job.started_at ? ["Took", formatDuration(job.finished_at - job.started_at)] : null,
  ].filter(Boolean);
  return h("dl", {class: "facts"}, rows.map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]));
}

// One line for the head of the page; everything else in a details element below it.
function summaryLine(job) {
  const parts = [
    job.method,
    [job.product, job.defect].filter(Boolean).join(" / "),
    job.kind === "generate" ? `${job.count} pairs` : null,
    job.kind === "evaluate" ? `${job.generated.length} generate job(s)` : null,
    job.kind !== "evaluate" ? `seed ${job.seed}` : null,
    `created ${formatTime(job.created_at)}`,
    job.finished_at && job.started_at ? `took ${formatDuration(job.finished_at - job.started_at)}` : null,
  ];
  return h("p", {class: "summary-line"}, parts.filter(Boolean).join(" · "));
}

function requestDetails(job) {
  const request = {params: job.params, masks: job.masks, exemplars: job.exemplars, normals: job.normals};
  return h("details", {class: "request"}, h("summary", {}, "Details and request"), facts(job),
    h("pre", {class: "json"}, JSON.stringify(request, null, 2)));
}

export function jobView(main, {params: [jobId], query, navigate}) {
  const loader = new ImageLoader();
  const files = artifactIndex(jobId);
  const eta = new EtaTracker();
  let timer = null;
  let stopped = false;
  let shownBody = null;
  let child = null;
  let lastStatus = null;

  const title = h("h1", {}, `Job ${shortId(jobId)}`);
  const status = h("span", {class: "head-status"});
  const actions = h("div", {class: "actions"});
  const progress = h("div", {class: "head-progress"});
  const details = h("div", {class: "head-details"});
  const problem = h("div", {"aria-live": "polite"});
  const body = h("div", {class: "job-body"});
  main.append(
    h("p", {class: "crumbs"}, h("a", {href: "/ui/jobs"}, "Jobs"), " / ", h("span", {class: "mono"}, shortId(jobId))),
    h("section", {class: "card job-head"}, h("div", {class: "page-head"}, h("div", {}, title, status), actions),
      progress, details),
    problem, body);

  function renderHead(job) {
    title.textContent = `${KIND_TITLES[job.kind] || "Job"} ${shortId(job.id)}`;
    title.title = job.id;
    status.replaceChildren(statusBadge(job.status));
    progress.replaceChildren(progressBlock(job, eta.observe(job)));
    if (job.status !== lastStatus) {
      lastStatus = job.status;
      details.replaceChildren(summaryLine(job), requestDetails(job));
      actions.replaceChildren(ACTIVE.includes(job.status)
        ? cancelButton(job, poll, (error) => problem.replaceChildren(errorBox(error, "Cancel failed:"))) : "");
      problem.replaceChildren(job.error ? errorBox(job.error, `The job ${job.status}:`) : "");
    }
  }

  function renderBody(job) {
    shownBody = job.status;
    const context = {loader, files, query, navigate};
    if (job.status === "succeeded" && job.kind === "generate") child = gallery(body, job, context);
    else if (job.status === "succeeded" && job.kind === "evaluate") child = evaluation(body, job, context);
    else if (job.status === "succeeded" && job.kind === "finetune") {
      body.append(h("section", {class: "card"}, h("h2", {}, "Adapter"),
        h("p", {}, `The adapter is stored under adapters/${job.id}/. Generate jobs of ${job.method} use it.`),
        h("a", {class: "button primary", href: `/ui/new?method=${job.method}&adapter=${job.id}`},
          "New generate job with this adapter")));
    }
    body.append(filesList(job.id, files));
  }

  async function poll() {
    clearTimeout(timer);
    let job;
    try {
      job = await api(`/v1/jobs/${jobId}`);
    } catch (error) {
      if (stopped || error.status === 401) return;
      if (error.status === 404) {
        problem.replaceChildren(errorBox({message: `There is no job ${jobId} for this key: it does not exist, ` +
          "or another tenant's key made it.", code: error.code}));
        progress.replaceChildren();
        return;
      }
      problem.replaceChildren(errorBox(error, "Could not load the job:"));
      timer = setTimeout(poll, POLL_MS * 4);
      return;
    }
    if (stopped) return;
    renderHead(job);
    if (ACTIVE.includes(job.status)) timer = setTimeout(poll, POLL_MS);
    else if (shownBody === null) renderBody(job);
  }

  poll();
  return {
    title: `Job ${shortId(jobId)}`,
    teardown() {
      stopped = true;
      clearTimeout(timer);
      child?.teardown?.();
      loader.release();
    },
  };
}
