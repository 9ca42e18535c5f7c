// Mask overlays drawn on a canvas laid over an image: an outline, or a translucent fill with
// its outline. The mask comes as an image (a thumbnail through the API: same origin, so its
// pixels can be read).

export const MASK_MODES = ["outline", "fill", "off"];
const MODE_STORAGE = "synth.maskMode";
const COLOUR = [255, 32, 96];

export function savedMaskMode() {
  const mode = localStorage.getItem(MODE_STORAGE);
  return MASK_MODES.includes(mode) ? mode : "outline";
}

export function saveMaskMode(mode) {
  localStorage.setItem(MODE_STORAGE, mode);
}

// The mask at `url` as {width, height, inside: Uint8Array (1 inside the defect)}.
export async function readMask(url) {
  const image = new Image();
  image.src = url;
  await image.decode();
  const canvas = document.createElement("canvas");
  canvas.width = image.naturalWidth;
  canvas.height = image.naturalHeight;
  const context = canvas.getContext("2d", {willReadFrequently: true});
  context.drawImage(image, 0, 0);
  const rgba = context.getImageData(0, 0, canvas.width, canvas.height).data;
  const inside = new Uint8Array(canvas.width * canvas.height);
  for (let i = 0; i < inside.length; i += 1) inside[i] = rgba[i * 4] > 127 ? 1 : 0;
  return {width: canvas.width, height: canvas.height, inside};
}

// Paint `mask` onto `canvas` in `mode`. The outline is two pixels wide: the defect's own border
// pixels and the ones just outside, so it shows on any background.
export function drawMask(canvas, mask, mode) {
  canvas.hidden = mode === "off";
  if (mode === "off" || !mask) return;
  const {width, height, inside} = mask;
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(width, height);
  const data = pixels.data;
  const at = (x, y) => (x < 0 || y < 0 || x >= width || y >= height ? 0 : inside[y * width + x]);
  for (let y = 0; y < height; y += 1) {
    for (let x = 0; x < width; x += 1) {
      const here = at(x, y);
      const edge = here !== at(x - 1, y) || here !== at(x + 1, y) || here !== at(x, y - 1) || here !== at(x, y + 1);
      let alpha = 0;
      if (edge) alpha = 255;
      else if (here && mode === "fill") alpha = 110;
      if (alpha) {
        const i = (y * width + x) * 4;
        data[i] = COLOUR[0];
        data[i + 1] = COLOUR[1];
        data[i + 2] = COLOUR[2];
        data[i + 3] = alpha;
      }
    }
  }
  context.putImageData(pixels, 0, 0);
}

// A segmented control choosing the mask mode; `onChange(mode)`.
export function maskModeControl(h, mode, onChange, idPrefix = "mask-mode") {
  const group = h("fieldset", {class: "segmented", id: idPrefix},
    h("legend", {}, "Mask overlay"),
    MASK_MODES.map((value) => h("label", {},
      h("input", {type: "radio", name: idPrefix, value, checked: value === mode,
        onchange: () => {
          saveMaskMode(value);
          onChange(value);
        }}),
      h("span", {}, value))));
  return h("span", {class: "mask-control"}, h("span", {"aria-hidden": "true"}, "mask"), group);
}
