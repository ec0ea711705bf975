// Samples: counts per device and label, and the unlabelled ones as images, labelled in bulk
// with the keyboard (operate): arrows move, a digit sets the label, Enter saves them all in one
// POST /samples/labels (all or nothing).
import { api, imageUrl } from "../api.js";
import { append, clear, errorBox, h, table } from "../dom.js";

const PAGE = 48;

export async function render(root, ctx) {
  const [counts, latest] = await Promise.all([api("/samples/counts"), api("/models/latest")]);
  const classes = latest.arch.num_classes;
  const canLabel = ctx.can("operate");
  root.append(h("h1", {}, "Samples"),
    h("p", {}, `${counts.labelled} labelled, ${counts.unlabelled} unlabelled, ${counts.total} in all.`),
    table([{ title: "device", cell: (c) => h("code", {}, c.device_id.slice(0, 12)) },
      { title: "labelled", num: true, cell: (c) => c.labelled }, { title: "unlabelled", num: true, cell: (c) => c.unlabelled },
      { title: "per label", cell: (c) => Object.entries(c.by_label).map(([k, v]) => `${k}:${v}`).join(" ") }], counts.devices,
    { empty: "no samples yet" }));
  const status = h("div", { id: "label-status" });
  const grid = h("div", { class: "samples", id: "sample-grid", tabindex: "0" });
  const save = canLabel ? h("button", { class: "primary", id: "save-labels", disabled: true }, "Save labels (Enter)") : null;
  append(root, [h("h2", {}, "Unlabelled"),
    canLabel ? h("p", { class: "muted" }, "Click a sample or use ", h("span", { class: "kbd" }, "← →"), " to select, type its label (",
      classes <= 10 ? `0–${classes - 1}` : "digits, then Space", "), ", h("span", { class: "kbd" }, "Enter"), " saves every label at once.")
      : h("p", { class: "muted" }, "Your token is read-only: labelling needs the operate scope."),
    status, save, grid]);
  const urls = [];
  const page = await api(`/samples?labelled=false&limit=${PAGE}`);
  const tiles = page.data.map((s) => ({ s, label: null, el: null }));
  let sel = 0, typed = "";
  const paint = () => {
    tiles.forEach((t, i) => {
      t.el.classList.toggle("sel", canLabel && i === sel);
      t.el.classList.toggle("pending", t.label !== null);
      t.el.querySelector(".lab").textContent = t.label !== null ? String(t.label) : (i === sel && typed ? `${typed}…` : "");
    });
    if (save) save.disabled = !tiles.some((t) => t.label !== null);
  };
  for (const [i, t] of tiles.entries()) {
    const img = h("img", { alt: `sample ${t.s.sample_id.slice(0, 8)}` });
    t.el = h("div", { class: "sample", dataset: { sample: t.s.sample_id }, onclick: () => { sel = i; typed = ""; paint(); grid.focus(); } },
      img, h("div", { class: "lab" }));
    grid.append(t.el);
    imageUrl(`/console/samples/${t.s.sample_id}/image.png`).then((u) => { urls.push(u); img.src = u; })
      .catch(() => { img.alt = "not an image"; });
  }
  if (!tiles.length) grid.append(h("p", { class: "muted" }, "every sample is labelled"));
  const submit = async () => {
    const labels = tiles.filter((t) => t.label !== null).map((t) => ({ sample_id: t.s.sample_id, device_id: t.s.device_id, label: t.label }));
    if (!labels.length) return;
    try {
      const res = await api("/samples/labels", { method: "POST", body: { labels } });
      clear(status).append(h("div", { class: "notice", id: "labels-saved" }, `saved ${res.updated} labels`));
      for (const t of tiles.filter((x) => x.label !== null)) { t.el.remove(); }
      tiles.splice(0, tiles.length, ...tiles.filter((x) => x.label === null));
      sel = 0;
      paint();
    } catch (err) { clear(status).append(errorBox(err)); }
  };
  if (save) save.addEventListener("click", submit);
  const setLabel = (value) => {
    if (!Number.isInteger(value) || value < 0 || value >= classes) {
      clear(status).append(errorBox(new Error(`label ${value} is not in [0, ${classes})`)));
      return;
    }
    tiles[sel].label = value;
    typed = "";
    sel = Math.min(sel + 1, tiles.length - 1);
  };
  grid.addEventListener("keydown", (ev) => {
    if (!canLabel || !tiles.length) return;
    if (ev.key === "ArrowRight") sel = Math.min(sel + 1, tiles.length - 1);
    else if (ev.key === "ArrowLeft") sel = Math.max(sel - 1, 0);
    else if (/^[0-9]$/.test(ev.key)) {
      typed += ev.key;
      if (classes <= 10) setLabel(Number(typed));
    } else if ((ev.key === " " || ev.key === "Tab") && typed) setLabel(Number(typed));
    else if (ev.key === "Backspace") { if (typed) typed = typed.slice(0, -1); else tiles[sel].label = null; }
    else if (ev.key === "Enter") { submit(); } else return;
    ev.preventDefault();
    paint();
  });
  if (tiles.length) { paint(); grid.focus(); }
  return () => urls.forEach((u) => URL.revokeObjectURL(u));
}
