// The page's entry: the key prompt, the routes under /ui, and in-page navigation.

import {auth, onUnauthorized, request} from "./api.js";
import {clear, errorBox, h} from "./dom.js";
import {jobView} from "./job.js";
import {jobsView} from "./jobs.js";
import {methodsView} from "./methods.js";
import {newJobView} from "./newjob.js";

const ROUTES = [
  {pattern: /^\/ui\/?$/, redirect: "/ui/jobs"},
  {pattern: /^\/ui\/jobs\/?$/, view: jobsView, nav: "jobs"},
  {pattern: /^\/ui\/jobs\/([^/]+)\/?$/, view: jobView, nav: "jobs"},
  {pattern: /^\/ui\/new\/?$/, view: newJobView, nav: "new"},
  {pattern: /^\/ui\/methods\/?$/, view: methodsView, nav: "methods"},
];

const main = document.getElementById("main");
let current = null;

// Go to `url` inside the page. {replace}: replace the history entry; {render: false}: only
// record the URL (a view that updates itself, such as a filter or a gallery page).
export function navigate(url, {replace = false, render = true} = {}) {
  if (replace) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  if (render) show();
}

function leave() {
  current?.teardown?.();
  current = null;
}

function renderSession() {
  const session = document.getElementById("session");
  clear(session);
  if (auth.required && auth.key) {
    session.append(h("button", {type: "button", class: "small ghost", id: "forget-key", onclick: () => {
      auth.clear();
      show();
    }}, "Forget key"));
  }
}

function keyPrompt(reason) {
  leave();
  clear(main);
  renderSession();
  document.title = "API key · Anomaly synthesis";
  const input = h("input", {id: "api-key", type: "password", autocomplete: "off", spellcheck: "false",
    required: true, "aria-describedby": "api-key-help api-key-error"});
  const error = h("p", {id: "api-key-error", class: "field-error", role: "alert"}, reason || "");
  const submit = h("button", {type: "submit", class: "primary"}, "Continue");
  main.append(h("section", {class: "card narrow key-prompt"},
    h("h1", {}, "API key"),
    h("p", {id: "api-key-help"}, "This service needs an API key. It is kept for this browser tab only " +
      "(sessionStorage) and sent as the Authorization header of every call."),
    h("form", {onsubmit: async (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) {
        error.textContent = "Enter your API key.";
        return;
      }
      submit.disabled = true;
      error.textContent = "Checking the key…";
      try {
        await request("/v1/jobs?limit=1", {key});
        auth.set(key);
        show();
      } catch (failure) {
        error.replaceChildren(failure.status === 401
          ? `That key was not accepted: ${failure.message} (${failure.code}). Check it and try again.`
          : `The service could not be reached: ${failure.message}`);
        submit.disabled = false;
        input.select();
      }
    }},
    h("label", {for: "api-key", class: "field-label"}, "Key"), input, error, submit)));
  input.focus();
}

onUnauthorized((error) => {
  auth.clear();
  keyPrompt(`Your key is no longer accepted: ${error.message} (${error.code}). Enter a valid key.`);
});

function notFound() {
  main.append(h("section", {class: "card narrow"}, h("h1", {}, "Page not found"),
    h("p", {}, "There is no page at ", h("code", {}, location.pathname), ". Try the ",
      h("a", {href: "/ui/jobs"}, "jobs"), " list.")));
}

function show() {
  leave();
  if (auth.required && !auth.key) {
    keyPrompt();
    return;
  }
  renderSession();
  clear(main);
  const path = location.pathname;
  const route = ROUTES.find((r) => r.pattern.test(path));
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (route && link.dataset.nav === route.nav) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (!route) {
    notFound();
    document.title = "Not found · Anomaly synthesis";
    return;
  }
  if (route.redirect) {
    navigate(route.redirect, {replace: true});
    return;
  }
  const params = path.match(route.pattern).slice(1).map(decodeURIComponent);
  const query = new URLSearchParams(location.search);
  try {
    current = route.view(main, {params, query, navigate});
    document.title = `${current?.title || "Anomaly synthesis"} · Anomaly synthesis`;
  } catch (error) {
    main.append(errorBox(error, "This page failed:"));
  }
}

// Links inside /ui navigate in the page; others (downloads, /docs, new tabs) behave as links do.
document.addEventListener("click", (event) => {
  const link = event.target.closest("a[href]");
  if (!link || event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey
      || event.altKey || link.target || link.hasAttribute("download")) return;
  const url = new URL(link.href);
  if (url.origin !== location.origin || !url.pathname.startsWith("/ui")) return;
  event.preventDefault();
  navigate(url.pathname + url.search);
  main.focus({preventScroll: true});
  window.scrollTo(0, 0);
});

window.addEventListener("popstate", show);
show();
