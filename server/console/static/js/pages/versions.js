// Versions as a lineage graph (SVG: one lane per lineage, an edge from each parent) with
// each version's accuracy, artefact sizes and the devices running it.
import { api } from "../api.js";
import { bytes, h, pct, short, table, when } from "../dom.js";

const NS = "http://www.w3.org/2000/svg"; // the SVG namespace name, not a resource fetched

function graph(versions) {
  const lanes = [...new Set(versions.map((v) => v.lineage))];
  const W = 150, H = 70, padX = 20, padY = 24, boxW = 124, boxH = 48;
  const pos = new Map(versions.map((v, i) => [v.model_hash, { x: padX + i * W, y: padY + lanes.indexOf(v.lineage) * H }]));
  const width = padX * 2 + Math.max(1, versions.length) * W, height = padY * 2 + lanes.length * H;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("id", "lineage");
  const el = (tag, attrs, text) => {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  for (const v of versions) {
    const p = pos.get(v.model_hash), q = v.parent_hash && pos.get(v.parent_hash);
    if (q) svg.append(el("path", { class: "edge", d: `M${q.x + boxW} ${q.y + boxH / 2} C${q.x + boxW + 20} ${q.y + boxH / 2}, ${p.x - 20} ${p.y + boxH / 2}, ${p.x} ${p.y + boxH / 2}` }));
  }
  for (const v of versions) {
    const p = pos.get(v.model_hash);
    const g = el("g", { class: "version", "data-number": v.number });
    g.append(el("rect", { x: p.x, y: p.y, width: boxW, height: boxH, rx: 6, class: `node${v.fleet_default ? " default" : ""}` }));
    g.append(el("text", { x: p.x + 8, y: p.y + 16 }, `v${v.number} ${v.method}`));
    g.append(el("text", { x: p.x + 8, y: p.y + 30 }, `acc ${pct(v.val_accuracy)}`));
    g.append(el("text", { x: p.x + 8, y: p.y + 43 }, `${v.devices} dev · ${v.smallest_diff_size !== null ? `diff ${bytes(v.smallest_diff_size)}` : bytes(v.full_size)}`));
    const tip = el("title", {}, `${v.model_hash}\nlineage ${v.lineage}\n${when(v.created_at)}`);
    g.append(tip);
    svg.append(g);
  }
  lanes.forEach((l, i) => svg.append(el("text", { x: 4, y: padY + i * H - 6 }, `lineage ${l}`)));
  return svg;
}

export async function render(root) {
  const versions = (await api("/console/versions?limit=200")).data;
  root.append(h("h1", {}, "Versions"), h("div", { class: "panel" }, graph(versions)));
  root.append(h("h2", {}, "Metrics"), table([
    { title: "version", cell: (v) => `v${v.number}` },
    { title: "parent", cell: (v) => h("code", {}, short(v.parent_hash)) },
    { title: "method", cell: (v) => v.method },
    { title: "lineage", cell: (v) => v.lineage },
    { title: "val acc", num: true, cell: (v) => pct(v.val_accuracy) },
    { title: "subnets", cell: (v) => v.subnet_val_accuracy.map((a) => (100 * a).toFixed(1)).join(" / ") || "–" },
    { title: "full model", num: true, cell: (v) => bytes(v.full_size) },
    { title: "smallest diff", num: true, cell: (v) => bytes(v.smallest_diff_size) },
    { title: "devices", num: true, cell: (v) => v.devices },
    { title: "published", cell: (v) => when(v.created_at) },
  ], [...versions].reverse()));
  return null;
}
