// Building DOM without innerHTML: every value goes in as text, so nothing the API returns
// (device names, error messages) can become markup. No inline styles (the CSP forbids them).

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "value") el.value = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export const clear = (el) => { el.replaceChildren(); return el; };

export function table(columns, rows, { onRow, empty = "nothing yet" } = {}) {
  const head = h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : "" }, c.title)));
  const body = rows.length
    ? rows.map((r) => h("tr", { class: onRow ? "link" : "", onclick: onRow ? () => onRow(r) : undefined, dataset: r.id ? { id: r.id } : undefined },
      columns.map((c) => h("td", { class: c.num ? "num" : "" }, c.cell(r)))))
    : [h("tr", {}, h("td", { colspan: columns.length, class: "muted" }, empty))];
  return h("table", {}, h("thead", {}, head), h("tbody", {}, body));
}

export const pill = (text, cls = text) => h("span", { class: `pill ${cls}` }, text);

export function progress(p) {
  const bar = h("span");
  bar.style.width = `${Math.round(100 * Math.max(0, Math.min(1, p || 0)))}%`; // CSSOM, allowed by the CSP
  return h("div", { class: "bar", title: `${Math.round(100 * (p || 0))}%` }, bar);
}

export const pct = (a) => (a === null || a === undefined ? "–" : `${(100 * a).toFixed(2)}%`);
export const short = (hash) => (hash ? hash.slice(0, 12) : "–");
export const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "kB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export const errorBox = (err) => h("div", { class: "error", role: "alert" }, String(err.message || err));
