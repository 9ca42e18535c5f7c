// The methods view: each method's family, whether it can run here (and why not), and its
// parameters as a form that starts a generate job with them.

import {api} from "./api.js";
import {errorBox, h} from "./dom.js";
import {schemaForm} from "./schemaform.js";

export function methodsView(main, {navigate}) {
  const list = h("div", {class: "methods"}, h("p", {class: "muted"}, "Loading…"));
  main.append(h("div", {class: "page-head"}, h("h1", {}, "Methods")), list);

  api("/v1/methods").then(({items}) => {
    list.replaceChildren(...items.map((method) => {
      const form = schemaForm(method.params_schema, `method-${method.name}`);
      const canGenerate = method.available && method.kinds.includes("generate");
      const start = h("button", {type: "button", class: "primary", disabled: !canGenerate,
        onclick: () => {
          const params = new URLSearchParams({method: method.name});
          const values = form.value();
          if (Object.keys(values).length) params.set("params", JSON.stringify(values));
          navigate(`/ui/new?${params}`);
        }}, "New generate job with these parameters");
      return h("article", {class: "card method", id: `method-${method.name}`},
        h("div", {class: "page-head"},
          h("h2", {}, method.name, " ", h("span", {class: `family family-${method.family}`}, method.family)),
          h("span", {class: method.available ? "available" : "unavailable"},
            method.available ? "available" : "not available")),
        method.available ? null : h("p", {class: "reason"}, method.reason),
        h("p", {}, method.summary),
        h("dl", {class: "facts"},
          h("dt", {}, "Jobs"), h("dd", {}, method.kinds.join(", ")),
          h("dt", {}, "Weights"), h("dd", {}, method.weights?.length ? method.weights.join(", ") : "none needed"),
          h("dt", {}, "Mask sources"), h("dd", {}, method.mask_sources.map((source) =>
            source === method.default_mask_source ? `${source} (default)` : source).join(", "))),
        method.components?.length ? h("details", {class: "components"},
          h("summary", {}, `Components its paper ablates (${method.components.length})`),
          h("dl", {class: "facts"}, method.components.map((c) => [
            h("dt", {}, h("code", {}, c.name)),
            h("dd", {}, c.summary, h("span", {class: "muted small"},
              c.acts_in === "finetune" ? " · ablated on the fine-tune job" : " · ablated on a generate or fine-tune job")),
          ]))) : null,
        h("details", {open: true}, h("summary", {}, `Parameters (${form.names.length})`), form.element,
          method.params_schema.description ? h("p", {class: "muted small"}, method.params_schema.description) : null),
        h("div", {class: "actions"}, start,
          method.kinds.includes("finetune") ? h("span", {class: "muted small"},
            " Fine-tune jobs are submitted through the API (POST /v1/jobs, kind finetune).") : null));
    }));
  }, (error) => list.replaceChildren(errorBox(error, "Could not load the methods:")));
  return {title: "Methods"};
}
