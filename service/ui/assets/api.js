// The REST API as the page uses it: the Bearer key, JSON errors, images as blob URLs.

const KEY_STORAGE = "synth.apiKey";

// "bearer" when the service has API keys (the page asks for one), "loopback" when it has none.
const AUTH_MODE = document.querySelector('meta[name="synth-auth"]')?.content || "bearer";

export const auth = {
  required: AUTH_MODE === "bearer",
  // sessionStorage: the key lives as long as this tab, and never in a URL or a cookie.
  get key() {
    return sessionStorage.getItem(KEY_STORAGE);
  },
  set(key) {
    sessionStorage.setItem(KEY_STORAGE, key);
  },
  clear() {
    sessionStorage.removeItem(KEY_STORAGE);
  },
};

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let unauthorizedHandler = () => {};

// Called with the ApiError when the API refuses the key (it was revoked, or mistyped).
export function onUnauthorized(handler) {
  unauthorizedHandler = handler;
}

function headers(key = auth.key) {
  return key ? {Authorization: `Bearer ${key}`} : {};
}

async function errorOf(response) {
  let detail = null;
  try {
    detail = (await response.json()).error;
  } catch {
    // not JSON: a proxy's page, say
  }
  return new ApiError(response.status, detail?.code || `http_${response.status}`,
    detail?.message || `${response.status} ${response.statusText}`);
}

// A raw response from the API, or an ApiError. `key` overrides the stored key (the key prompt).
export async function request(path, {method = "GET", json, body, signal, key} = {}) {
  const init = {method, headers: headers(key), signal};
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.body = body;
  }
  const response = await fetch(path, init);
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401 && key === undefined) unauthorizedHandler(error);
    throw error;
  }
  return response;
}

export async function api(path, options) {
  return (await request(path, options)).json();
}

// Every item of a list, following `next_cursor` where the API pages it.
export async function listAll(path, options) {
  const items = [];
  let url = path;
  for (;;) {
    const page = await api(url, options);
    items.push(...page.items);
    if (!page.next_cursor) return items;
    url = `${path}${path.includes("?") ? "&" : "?"}cursor=${encodeURIComponent(page.next_cursor)}`;
  }
}

export function isApiUrl(url) {
  return new URL(url, location.href).origin === location.origin;
}

export function artifactUrl(jobId, key, thumb) {
  const path = key.split("/").map(encodeURIComponent).join("/");
  return `/v1/jobs/${jobId}/artifacts/${path}${thumb ? `?thumb=${thumb}` : ""}`;
}

export function exemplarUrl(id, which = "image", thumb) {
  return `/v1/exemplars/${id}/${which}${thumb ? `?thumb=${thumb}` : ""}`;
}

// Image sources for one view. API URLs are fetched with the key and shown as blob URLs; other
// URLs (presigned S3) are used as they are. At most `parallel` fetches run at once, so the
// images on screen are not stuck behind a page of others; release() frees them all.
export class ImageLoader {
  constructor(parallel = 6) {
    this.parallel = parallel;
    this.running = 0;
    this.waiting = [];
    this.urls = new Map(); // source URL -> Promise of a blob URL
    this.controller = new AbortController();
  }

  load(url) {
    if (!isApiUrl(url)) return Promise.resolve(url);
    if (!this.urls.has(url)) {
      const promise = new Promise((resolve, reject) => this.waiting.push({url, resolve, reject}));
      promise.catch(() => this.urls.delete(url)); // a failed image may be asked for again
      this.urls.set(url, promise);
      this.pump();
    }
    return this.urls.get(url);
  }

  pump() {
    while (this.running < this.parallel && this.waiting.length) {
      const {url, resolve, reject} = this.waiting.shift();
      this.running += 1;
      request(url, {signal: this.controller.signal})
        .then((response) => response.blob())
        .then((blob) => resolve(URL.createObjectURL(blob)), reject)
        .finally(() => {
          this.running -= 1;
          this.pump();
        });
    }
  }

  release() {
    this.controller.abort();
    this.waiting = [];
    for (const promise of this.urls.values()) {
      promise.then((url) => URL.revokeObjectURL(url), () => {});
    }
    this.urls.clear();
  }
}

// Save a file: a plain link where the browser can fetch it alone (presigned, or no key needed),
// else fetched with the key into a blob first.
export async function download(url, filename) {
  const link = document.createElement("a");
  link.download = filename;
  if (!isApiUrl(url) || !auth.key) {
    link.href = url;
    link.rel = "noopener";
    // A browser ignores `download` on another origin's URL (presigned S3) and opens it instead:
    // in a new tab, so this page stays.
    if (!isApiUrl(url)) link.target = "_blank";
    document.body.append(link);
    link.click();
    link.remove();
    return;
  }
  const blob = await (await request(url)).blob();
  link.href = URL.createObjectURL(blob);
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
}

// Open a document (report.html) in a new tab, with the key where it needs one.
export async function openInTab(url) {
  if (!isApiUrl(url) || !auth.key) {
    window.open(url, "_blank", "noopener");
    return;
  }
  const tab = window.open("", "_blank");
  const blob = await (await request(url)).blob();
  const blobUrl = URL.createObjectURL(blob);
  if (tab) tab.location = blobUrl;
  setTimeout(() => URL.revokeObjectURL(blobUrl), 60_000);
}
