// Uploads (drag and drop) and the new generate job form. The API checks everything; its JSON
// errors are shown next to the field they name.

import {api, ApiError, exemplarUrl, ImageLoader, listAll} from "./api.js";
import {errorBox, h, replace} from "./dom.js";
import {drawMask, readMask} from "./masks.js";
import {schemaForm} from "./schemaform.js";

const THUMB = 128;
const PICKER_SHOWN = 300; // thumbnails drawn before "show all"
const PRODUCT_STORAGE = "synth.product";
const MASK_NAME = /mask|_gt\b|ground.?truth|label/i;

// Which form field an API error is about. Messages name it first ("count: ...",
// "normals: no exemplar with id ...", "masks.source: ..."); some codes only ever mean one field.
const FIELD_OF_CODE = {
  unknown_method: "method", method_unavailable: "method", unsupported_kind: "method",
  count_too_large: "count", normals_required: "normals", exemplars_required: "exemplars",
  references_required: "exemplars", unsupported_mask_source: "masks", adapter_required: "adapter",
  adapter_not_ready: "adapter", invalid_params: "params",
};
const FORM_FIELDS = ["method", "adapter", "exemplars", "normals", "count", "seed", "masks", "params"];

export function fieldErrors(error, paramNames) {
  const fields = {};
  const params = {};
  for (const message of error.message.split("; ")) {
    const part = message.replace(/^request: /, ""); // a check of the whole object names no field
    const named = /^([A-Za-z_][\w]*)(?:[.[][^:]*)?: (.*)$/.exec(part);
    let field = FIELD_OF_CODE[error.code];
    if (error.code === "invalid_params") {
      const param = named && paramNames.includes(named[1]) ? named[1]
        : paramNames.find((name) => new RegExp(`\\b${name}\\b`).test(part));
      if (param) {
        params[param] = [params[param], named && named[1] === param ? named[2] : part].filter(Boolean).join("; ");
        continue;
      }
    } else if (named && FORM_FIELDS.includes(named[1])) {
      field = named[1];
    }
    if (field) fields[field] = [fields[field], part].filter(Boolean).join("; ");
  }
  return {fields, params};
}

function dropZone({id, label, multiple, onFiles, children}) {
  const zone = h("div", {class: "dropzone", id}, h("p", {class: "drop-label"}, label), children);
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    const files = [...(event.dataTransfer?.files || [])].filter((f) => f.type.startsWith("image/") || /\.(png|jpe?g|bmp|tiff?)$/i.test(f.name));
    if (files.length) onFiles(multiple ? files : files.slice(0, 2));
  });
  return zone;
}

function setFile(input, file) {
  const transfer = new DataTransfer();
  if (file) transfer.items.add(file);
  input.files = transfer.files;
  input.dispatchEvent(new Event("change"));
}

async function uploadExemplar({image, mask, product, defect}) {
  const body = new FormData();
  body.append("image", image);
  body.append("product", product);
  if (mask) {
    body.append("mask", mask);
    body.append("defect", defect);
  }
  return api("/v1/exemplars", {method: "POST", body});
}

export function newJobView(main, {query, navigate}) {
  const thumbs = new ImageLoader();
  const observer = new IntersectionObserver((entries) => {
    for (const entry of entries) {
      if (!entry.isIntersecting) continue;
      observer.unobserve(entry.target);
      loadThumb(entry.target);
    }
  }, {rootMargin: "200px 0px"});
  let exemplars = [];
  let methods = [];
  let finetunes = [];
  const chosen = {exemplars: new Set(), normals: new Set()};
  const showAll = {exemplars: false, normals: false};
  let params = null;

  // -- product -----------------------------------------------------------------------------
  const productList = h("datalist", {id: "products"});
  const product = h("input", {id: "product", type: "text", list: "products", autocomplete: "off",
    value: query.get("product") || localStorage.getItem(PRODUCT_STORAGE) || "",
    "aria-describedby": "product-help product-error", oninput: () => {
      localStorage.setItem(PRODUCT_STORAGE, product.value.trim());
      renderPickers();
    }});
  const productError = h("p", {class: "field-error", id: "product-error"});

  // -- uploads -----------------------------------------------------------------------------
  const exemplarImage = h("input", {id: "exemplar-image", type: "file", accept: "image/*,.tif,.tiff,.bmp"});
  const exemplarMask = h("input", {id: "exemplar-mask", type: "file", accept: "image/*,.tif,.tiff,.bmp"});
  const defect = h("input", {id: "defect", type: "text", autocomplete: "off", placeholder: "e.g. crack"});
  const exemplarStatus = h("div", {class: "upload-status", id: "exemplar-status", "aria-live": "polite"});
  const uploadButton = h("button", {type: "button", id: "upload-exemplar", onclick: () => sendExemplar()},
    "Upload exemplar");
  const normalInput = h("input", {id: "normal-files", type: "file", multiple: true,
    accept: "image/*,.tif,.tiff,.bmp", onchange: () => sendNormals([...normalInput.files])});
  const normalStatus = h("ul", {class: "upload-status", id: "normal-status", "aria-live": "polite"});

  function needProduct() {
    const name = product.value.trim();
    productError.textContent = name ? "" : "Name the product first: uploads are filed under it.";
    if (!name) product.focus();
    return name;
  }

  function takeExemplarFiles(files) {
    const sorted = [...files].sort((a, b) => Number(MASK_NAME.test(a.name)) - Number(MASK_NAME.test(b.name)));
    setFile(exemplarImage, sorted[0]);
    if (sorted[1]) setFile(exemplarMask, sorted[1]);
    if (!defect.value && sorted[0]) defect.value = (sorted[0].name.match(/^[A-Za-z]+/) || [""])[0].toLowerCase();
  }

  async function sendExemplar() {
    const name = needProduct();
    if (!name) return;
    const [image, mask] = [exemplarImage.files[0], exemplarMask.files[0]];
    if (!image || !mask) {
      exemplarStatus.replaceChildren(errorBox({message: "Choose or drop the defect image and its mask."}));
      return;
    }
    uploadButton.disabled = true;
    exemplarStatus.replaceChildren(h("p", {class: "muted"}, `Uploading ${image.name}…`));
    try {
      const record = await uploadExemplar({image, mask, product: name, defect: defect.value.trim()});
      exemplars.unshift(record);
      chosen.exemplars.add(record.id);
      exemplarStatus.replaceChildren(h("p", {class: "ok"}, `Uploaded ${image.name} as a ${record.defect} exemplar ` +
        `(${record.width}×${record.height}); it is selected below.`));
      setFile(exemplarImage, null);
      setFile(exemplarMask, null);
      renderPickers();
    } catch (error) {
      exemplarStatus.replaceChildren(errorBox(error, `${image.name}:`));
    } finally {
      uploadButton.disabled = false;
    }
  }

  async function sendNormals(files) {
    const name = needProduct();
    if (!name || !files.length) return;
    for (const file of files) {
      const line = h("li", {}, `${file.name}: uploading…`);
      normalStatus.append(line);
      try {
        const record = await uploadExemplar({image: file, product: name});
        exemplars.unshift(record);
        chosen.normals.add(record.id);
        line.className = "ok";
        line.textContent = `${file.name}: uploaded (${record.width}×${record.height})`;
      } catch (error) {
        line.replaceChildren(errorBox(error, `${file.name}:`));
      }
    }
    normalInput.value = "";
    renderPickers();
  }

  const uploads = h("section", {class: "card uploads"},
    h("h2", {}, "Upload"),
    h("div", {class: "field"}, h("label", {for: "product", class: "field-label"}, "Product"), product, productList,
      h("p", {class: "help", id: "product-help"}, "Uploads are filed under this product; the pickers below show its images."),
      productError),
    h("div", {class: "upload-zones"},
      dropZone({id: "drop-exemplar", label: "Drop a defect image and its mask here (the file named …mask… is the mask), " +
        "or choose them:", multiple: false, onFiles: takeExemplarFiles, children: [
        h("div", {class: "field"}, h("label", {for: "exemplar-image", class: "field-label"}, "Defect image"), exemplarImage),
        h("div", {class: "field"}, h("label", {for: "exemplar-mask", class: "field-label"}, "Mask"), exemplarMask),
        h("div", {class: "field"}, h("label", {for: "defect", class: "field-label"}, "Defect type"), defect),
        uploadButton, exemplarStatus]}),
      dropZone({id: "drop-normals", label: "Drop normal images here (as many as you like), or choose them:",
        multiple: true, onFiles: sendNormals, children: [
          h("div", {class: "field"}, h("label", {for: "normal-files", class: "field-label"}, "Normal images"), normalInput),
          normalStatus]})));

  // -- the job form ------------------------------------------------------------------------
  const errors = Object.fromEntries(FORM_FIELDS.map((name) =>
    [name, h("p", {class: "field-error", id: `${name}-error`, "data-error-for": name})]));
  const method = h("select", {id: "method", "aria-describedby": "method-help method-error", onchange: () => methodChanged()});
  const methodHelp = h("p", {class: "help", id: "method-help"});
  const adapter = h("select", {id: "adapter", "aria-describedby": "adapter-error"});
  const adapterField = h("div", {class: "field", hidden: true}, h("label", {for: "adapter", class: "field-label"},
    "Adapter (a succeeded fine-tune job)"), adapter, errors.adapter);
  const count = h("input", {id: "count", type: "number", min: 1, step: 1, value: "20", inputmode: "numeric",
    "aria-describedby": "count-error"});
  const seed = h("input", {id: "seed", type: "number", min: 0, step: 1, placeholder: "random", inputmode: "numeric",
    "aria-describedby": "seed-help seed-error"});
  const maskSource = h("select", {id: "mask-source", "aria-describedby": "masks-help masks-error"});
  const exemplarPicker = h("div", {class: "picker", id: "exemplar-picker"});
  const normalPicker = h("div", {class: "picker", id: "normal-picker"});
  const exemplarCount = h("span", {class: "muted small", id: "exemplar-count"});
  const normalCount = h("span", {class: "muted small", id: "normal-count"});
  const paramsSlot = h("div", {id: "params"});
  const formError = h("div", {id: "form-error", "aria-live": "assertive"});
  const submit = h("button", {type: "submit", class: "primary", id: "submit-job"}, "Start job");

  const selectButtons = (kind) => h("span", {class: "select-buttons"},
    h("button", {type: "button", class: "small ghost", onclick: () => selectAll(kind, true)}, "Select all"),
    h("button", {type: "button", class: "small ghost", onclick: () => selectAll(kind, false)}, "None"));

  const form = h("form", {class: "card job-form", id: "job-form", novalidate: true, onsubmit: (e) => send(e)},
    h("h2", {}, "New generate job"),
    h("div", {class: "field"}, h("label", {for: "method", class: "field-label"}, "Method"), method, methodHelp, errors.method),
    adapterField,
    h("fieldset", {class: "field", id: "exemplars", "aria-describedby": "exemplars-error"},
      h("legend", {}, "Defect exemplars ", exemplarCount), selectButtons("exemplars"), exemplarPicker, errors.exemplars),
    h("fieldset", {class: "field", id: "normals", "aria-describedby": "normals-error"},
      h("legend", {}, "Normal images ", normalCount), selectButtons("normals"), normalPicker, errors.normals),
    h("div", {class: "row"},
      h("div", {class: "field"}, h("label", {for: "count", class: "field-label"}, "Pairs"), count, errors.count),
      h("div", {class: "field"}, h("label", {for: "seed", class: "field-label"}, "Seed"), seed,
        h("p", {class: "help", id: "seed-help"}, "empty: drawn at submit and recorded"), errors.seed),
      h("div", {class: "field"}, h("label", {for: "mask-source", class: "field-label"}, "Mask source"), maskSource,
        h("p", {class: "help", id: "masks-help"}, "where the defects go"), errors.masks)),
    h("details", {class: "params", open: true}, h("summary", {}, "Method parameters"), paramsSlot, errors.params),
    formError, submit);

  main.append(h("div", {class: "page-head"}, h("h1", {}, "New generate job")),
    h("div", {class: "new-job"}, uploads, form));

  // -- pickers -----------------------------------------------------------------------------
  function loadThumb(item) {
    const record = exemplars.find((e) => e.id === item.dataset.id);
    if (!record) return;
    thumbs.load(exemplarUrl(record.id, "image", THUMB)).then((url) => (item.querySelector("img").src = url), () => {});
    if (record.kind === "anomaly") {
      thumbs.load(exemplarUrl(record.id, "mask", THUMB)).then(readMask)
        .then((mask) => drawMask(item.querySelector("canvas"), mask, "outline"), () => {});
    }
  }

  function visible(kind) {
    const name = product.value.trim();
    const wanted = kind === "exemplars" ? "anomaly" : "normal";
    return exemplars.filter((e) => e.kind === wanted && (!name || e.product === name));
  }

  function selectAll(kind, on) {
    for (const record of visible(kind)) on ? chosen[kind].add(record.id) : chosen[kind].delete(record.id);
    renderPickers();
  }

  function renderPicker(kind, picker, counter) {
    const items = visible(kind);
    const ids = new Set(items.map((e) => e.id));
    for (const id of chosen[kind]) if (!ids.has(id)) chosen[kind].delete(id); // chosen for another product
    counter.textContent = `(${chosen[kind].size} of ${items.length} selected)`;
    if (!items.length) {
      picker.replaceChildren(h("p", {class: "muted"}, kind === "exemplars"
        ? "No defect exemplars for this product yet: upload one above." : "No normal images for this product yet: upload some above."));
      return;
    }
    const shown = showAll[kind] ? items : items.slice(0, PICKER_SHOWN);
    replace(picker, h("ul", {class: "pick-grid"}, shown.map((record) => {
      const box = h("input", {type: "checkbox", value: record.id, checked: chosen[kind].has(record.id),
        "aria-label": `${record.kind === "anomaly" ? record.defect : "normal"} ${record.id.slice(0, 8)}`,
        onchange: () => {
          box.checked ? chosen[kind].add(record.id) : chosen[kind].delete(record.id);
          counter.textContent = `(${chosen[kind].size} of ${items.length} selected)`;
        }});
      const item = h("label", {class: "pick", "data-id": record.id}, box,
        h("span", {class: "frame"}, h("img", {alt: ""}), h("canvas", {class: "overlay", hidden: true})),
        h("span", {class: "caption"}, record.kind === "anomaly" ? record.defect : record.id.slice(0, 8),
          h("span", {class: "muted small"}, ` ${record.width}×${record.height}`)));
      observer.observe(item);
      return h("li", {}, item);
    })), items.length > shown.length ? h("button", {type: "button", class: "small ghost", onclick: () => {
      showAll[kind] = true;
      renderPicker(kind, picker, counter);
    }}, `Show all ${items.length}`) : null);
  }

  function renderPickers() {
    const products = [...new Set(exemplars.map((e) => e.product))].sort();
    productList.replaceChildren(...products.map((p) => h("option", {value: p})));
    renderPicker("exemplars", exemplarPicker, exemplarCount);
    renderPicker("normals", normalPicker, normalCount);
  }

  // -- method --------------------------------------------------------------------------------
  function methodChanged(initialParams) {
    const chosenMethod = methods.find((m) => m.name === method.value);
    if (!chosenMethod) return;
    methodHelp.textContent = `${chosenMethod.family}: ${chosenMethod.summary}`;
    replace(maskSource, h("option", {value: ""}, `method default (${chosenMethod.default_mask_source})`),
      chosenMethod.mask_sources.map((s) => h("option", {value: s}, s)));
    const needsAdapter = chosenMethod.family === "fine-tune";
    adapterField.hidden = !needsAdapter;
    const usable = finetunes.filter((j) => j.method === chosenMethod.name);
    adapter.replaceChildren(...(usable.length
      ? usable.map((j) => h("option", {value: j.id, selected: j.id === query.get("adapter")},
        `${j.id.slice(0, 8)} · ${j.product || ""} ${j.defect || ""}`))
      : [h("option", {value: ""}, `no succeeded ${chosenMethod.name} fine-tune job`)]));
    params = schemaForm(chosenMethod.params_schema, "param");
    if (initialParams) params.setValues(initialParams);
    paramsSlot.replaceChildren(params.element);
  }

  // -- submit --------------------------------------------------------------------------------
  function showErrors(error) {
    const {fields, params: paramErrors} = fieldErrors(error, params?.names || []);
    for (const [name, element] of Object.entries(errors)) element.textContent = fields[name] || "";
    for (const name of FORM_FIELDS) {
      const control = {method, adapter, count, seed, masks: maskSource}[name];
      if (control) control.setAttribute("aria-invalid", fields[name] ? "true" : "false");
    }
    const placed = params ? params.setErrors(paramErrors) : [];
    const anywhere = Object.keys(fields).length + placed.length;
    formError.replaceChildren(errorBox(anywhere ? {message: "The job was not started: see the marked fields.",
      code: error.code} : error, anywhere ? "" : "The job was not started:"));
    const first = form.querySelector(".field-error:not(:empty)");
    first?.closest(".field")?.querySelector("input, select, textarea")?.focus();
  }

  async function send(event) {
    event.preventDefault();
    const body = {kind: "generate", method: method.value, exemplars: [...chosen.exemplars], normals: [...chosen.normals],
      params: params ? params.value() : {}};
    if (count.value !== "") body.count = Number(count.value);
    if (seed.value !== "") body.seed = Number(seed.value);
    if (maskSource.value) body.masks = {source: maskSource.value};
    if (!adapterField.hidden && adapter.value) body.adapter = adapter.value;
    submit.disabled = true;
    formError.replaceChildren(h("p", {class: "muted"}, "Submitting…"));
    try {
      const accepted = await api("/v1/jobs", {method: "POST", json: body});
      navigate(`/ui/jobs/${accepted.id}`);
    } catch (error) {
      if (error instanceof ApiError) showErrors(error);
      else formError.replaceChildren(errorBox(error, "The job was not started:"));
    } finally {
      submit.disabled = false;
    }
  }

  // -- load ----------------------------------------------------------------------------------
  Promise.all([api("/v1/methods"), listAll("/v1/exemplars"),
    listAll("/v1/jobs?kind=finetune&status=succeeded&limit=1000")]).then(([methodList, exemplarList, finetuneList]) => {
    methods = methodList.items.filter((m) => m.kinds.includes("generate"));
    exemplars = exemplarList;
    finetunes = finetuneList;
    if (!product.value && exemplars.length) product.value = exemplars[0].product;
    const wanted = query.get("method") || "draem";
    method.replaceChildren(...methods.map((m) => h("option", {value: m.name, disabled: !m.available,
      selected: m.name === wanted}, m.available ? `${m.name} (${m.family})` : `${m.name}: not available (${m.reason})`)));
    let initial = null;
    try {
      initial = query.get("params") ? JSON.parse(query.get("params")) : null;
    } catch {
      initial = null;
    }
    methodChanged(initial);
    renderPickers();
  }, (error) => {
    if (error.status !== 401) form.prepend(errorBox(error, "Could not load methods and uploads:"));
  });

  return {
    title: "New job",
    teardown() {
      observer.disconnect();
      thumbs.release();
    },
  };
}
