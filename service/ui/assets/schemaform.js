// A method's params_schema (the JSON schema pydantic writes) as form fields. value() returns
// only what differs from the defaults, so the API's defaults stay the API's. Nothing is checked
// here: the API checks, and setErrors() shows what it said next to each field.

import {h} from "./dom.js";

const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

function constraints(schema) {
  const bounds = [["minimum", "≥"], ["exclusiveMinimum", ">"], ["maximum", "≤"], ["exclusiveMaximum", "<"]];
  const parts = bounds.filter(([key]) => schema[key] !== undefined).map(([key, sign]) => `${sign} ${schema[key]}`);
  if (schema.multipleOf) parts.push(`multiple of ${schema.multipleOf}`);
  if (schema.default !== undefined) parts.push(`default ${JSON.stringify(schema.default)}`);
  return parts.join(", ");
}

function numberInput(schema, id, value, label) {
  return h("input", {id, type: "number", inputmode: schema.type === "integer" ? "numeric" : "decimal",
    step: schema.multipleOf ?? (schema.type === "integer" ? 1 : "any"), value: value ?? "",
    "aria-label": label});
}

// One field: {element, read() -> value | undefined (not set), write(value)}.
function field(name, schema, id) {
  // `T | None` with a null default ("the API decides", e.g. from the training set): a T field left
  // empty, so nothing is sent unless the user fills it in.
  const kinds = schema.anyOf || [];
  const some = kinds.filter((s) => s.type !== "null");
  if (kinds.length === 2 && some.length === 1) {
    return field(name, {...some[0], title: schema.title, default: schema.default ?? undefined}, id);
  }
  const label = schema.title || name;
  const initial = schema.default;
  if (schema.type === "boolean") {
    const input = h("input", {id, type: "checkbox", checked: Boolean(initial)});
    return {control: input, inline: true, read: () => input.checked, write: (v) => (input.checked = Boolean(v))};
  }
  if (schema.enum) {
    const select = h("select", {id}, schema.enum.map((v) => h("option", {value: v, selected: v === initial}, v)));
    return {control: select, read: () => select.value, write: (v) => (select.value = v)};
  }
  if (schema.type === "integer" || schema.type === "number") {
    const input = numberInput(schema, id, initial, label);
    return {control: input, read: () => (input.value === "" ? undefined : Number(input.value)),
      write: (v) => (input.value = v ?? "")};
  }
  if (schema.type === "string") {
    const input = h("input", {id, type: "text", value: initial ?? ""});
    return {control: input, read: () => input.value, write: (v) => (input.value = v ?? "")};
  }
  if (schema.type === "array" && schema.prefixItems) { // a tuple: low and high of a range, say
    const names = schema.prefixItems.length === 2 ? ["low", "high"] : schema.prefixItems.map((_, i) => `${i + 1}`);
    const inputs = schema.prefixItems.map((item, i) =>
      numberInput(item, i ? `${id}-${i}` : id, initial?.[i], `${label} ${names[i]}`));
    return {control: h("span", {class: "tuple"}, inputs.map((input, i) => [h("span", {class: "muted small"}, names[i]), input])),
      read: () => (inputs.some((i) => i.value === "") ? undefined : inputs.map((i) => Number(i.value))),
      write: (v) => inputs.forEach((input, i) => (input.value = v?.[i] ?? ""))};
  }
  if (schema.type === "array" && schema.items?.enum) { // a set of choices
    const boxes = schema.items.enum.map((v, i) => h("input", {type: "checkbox", value: v, id: i ? `${id}-${i}` : id,
      checked: (initial || []).includes(v)}));
    return {control: h("span", {class: "choices"}, boxes.map((box) => h("label", {}, box, ` ${box.value}`))),
      read: () => boxes.filter((b) => b.checked).map((b) => (typeof schema.items.enum[0] === "number" ? Number(b.value) : b.value)),
      write: (v) => boxes.forEach((box) => (box.checked = (v || []).map(String).includes(box.value)))};
  }
  // Anything else is written as JSON.
  const area = h("textarea", {id, rows: 2, class: "mono"}, initial === undefined ? "" : JSON.stringify(initial));
  return {control: area, read: () => {
    if (area.value.trim() === "") return undefined;
    try {
      return JSON.parse(area.value);
    } catch {
      return area.value; // sent as it is: the API says what is wrong with it
    }
  }, write: (v) => (area.value = v === undefined ? "" : JSON.stringify(v))};
}

// {element, value(), setValues(object), setErrors({name: message}), names}
export function schemaForm(schema, idPrefix) {
  const fields = new Map();
  const rows = [];
  for (const [name, property] of Object.entries(schema.properties || {})) {
    const id = `${idPrefix}-${name}`;
    const made = field(name, property, id);
    const error = h("p", {class: "field-error", id: `${id}-error`, "data-error-for": name});
    const help = h("p", {class: "help", id: `${id}-help`},
      [property.description, constraints(property)].filter(Boolean).join(" · "));
    const controls = made.control.matches("input, select, textarea") ? [made.control] : [...made.control.querySelectorAll("input")];
    for (const control of controls) control.setAttribute("aria-describedby", `${id}-help ${id}-error`);
    const label = h("label", {for: id, class: "field-label"}, property.title || name, h("code", {class: "param-name"}, name));
    rows.push(h("div", {class: `field${made.inline ? " inline" : ""}`, "data-param": name}, label, made.control, help, error));
    fields.set(name, {...made, error, default: property.default});
  }
  const element = h("div", {class: "schema-form"}, rows);
  return {
    element,
    names: [...fields.keys()],
    value() {
      const params = {};
      for (const [name, f] of fields) {
        const value = f.read();
        if (value !== undefined && !same(value, f.default)) params[name] = value;
      }
      return params;
    },
    setValues(values) {
      for (const [name, value] of Object.entries(values || {})) fields.get(name)?.write(value);
    },
    // Returns the names it placed; an error for a name it does not have is left to the caller.
    setErrors(errors) {
      const placed = [];
      for (const [name, f] of fields) {
        f.error.textContent = errors[name] || "";
        f.control.closest(".field").classList.toggle("invalid", Boolean(errors[name]));
        if (errors[name]) placed.push(name);
      }
      return placed;
    },
  };
}
