// Charts: uPlot (vendored, docs/console.md) for series over rounds or time, and a small SVG
// scatter for accuracy against latency (one point per device).
import uPlot from "../vendor/uplot/uPlot.esm.js";
import { h } from "./dom.js";

const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];

// series: [{label, values, bars?, fmt?}], x: numbers (round numbers or Unix seconds if time)
// y: a fixed range, a log scale (bytes from full models to 1 % diffs), or from 0 for bars.
function yScale(range, log, bars) {
  if (range) return { range };
  if (log) { // whole decades around the data, so a 1 % diff still shows as a bar above the floor
    return { distr: 3, log: 10, range: (u, min, max) => [10 ** Math.floor(Math.log10(min || 1)), 10 ** Math.ceil(Math.log10(max || 10))] };
  }
  return bars ? { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } : {};
}

export function lineChart(container, { title, x, series, time = false, yLabel = "", height = 220, yRange, log = false }) {
  const box = h("div", { class: "panel chart", "data-chart": title }, h("h2", {}, title));
  container.append(box);
  if (!x.length) {
    box.append(h("p", { class: "muted" }, "no data yet"));
    return null;
  }
  const width = Math.max(320, (box.clientWidth || 560) - 32);
  const fmt = series[0].fmt || ((v) => String(v));
  // Categories (rounds, devices) sit on whole numbers with half a step either side, so one
  // point is still drawn in the middle rather than on an empty auto-ranged axis.
  const xScale = time ? { time: true } : { time: false, range: [Math.min(...x) - 0.5, Math.max(...x) + 0.5] };
  const opts = {
    width, height, scales: { x: xScale, y: yScale(yRange, log, series.some((s) => s.bars)) },
    axes: [{ incrs: time ? undefined : [1, 2, 5, 10, 20, 50, 100] },
      { label: yLabel, size: 80, values: (u, ticks) => ticks.map((t) => fmt(t)) }],
    legend: { live: false },
    series: [{ label: time ? "time" : "round" }, ...series.map((s, i) => ({
      label: s.label, stroke: COLOURS[i % COLOURS.length], width: 2,
      fill: s.bars ? `${COLOURS[i % COLOURS.length]}55` : undefined,
      paths: s.bars ? uPlot.paths.bars({ size: [0.6, 60] }) : undefined,
      points: { show: !s.bars }, spanGaps: true,
      value: (u, v) => (v === null || v === undefined ? "–" : (s.fmt ? s.fmt(v) : v.toFixed(3))),
    }))],
  };
  return new uPlot(opts, [x, ...series.map((s) => s.values)], box);
}

// points: [{x, y, label}]; draws axes with a few ticks and one dot per point.
export function scatter(container, { title, points, xLabel, yLabel, width = 560, height = 260 }) {
  const NS = "http://www.w3.org/2000/svg"; // the SVG namespace name, not a resource fetched
  const box = h("div", { class: "panel chart", "data-chart": title }, h("h2", {}, title));
  container.append(box);
  if (!points.length) {
    box.append(h("p", { class: "muted" }, "no device reports a measured latency yet"));
    return;
  }
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const el = (tag, attrs, text) => {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.append(e);
    return e;
  };
  const pad = { l: 56, r: 16, t: 10, b: 40 };
  const xs = points.map((p) => p.x), ys = points.map((p) => p.y);
  const [x0, x1] = [0, Math.max(...xs) * 1.1 || 1];
  const [y0, y1] = [Math.max(0, Math.min(...ys) - 0.05), Math.min(1, Math.max(...ys) + 0.05)];
  const sx = (v) => pad.l + ((v - x0) / (x1 - x0 || 1)) * (width - pad.l - pad.r);
  const sy = (v) => height - pad.b - ((v - y0) / (y1 - y0 || 1)) * (height - pad.t - pad.b);
  for (let i = 0; i <= 4; i++) {
    const xv = x0 + ((x1 - x0) * i) / 4, yv = y0 + ((y1 - y0) * i) / 4;
    el("line", { x1: sx(xv), x2: sx(xv), y1: pad.t, y2: height - pad.b, class: "grid" });
    el("line", { x1: pad.l, x2: width - pad.r, y1: sy(yv), y2: sy(yv), class: "grid" });
    el("text", { x: sx(xv), y: height - pad.b + 14, "text-anchor": "middle" }, xv.toPrecision(2));
    el("text", { x: pad.l - 6, y: sy(yv) + 4, "text-anchor": "end" }, `${(100 * yv).toFixed(0)}%`);
  }
  el("text", { x: (pad.l + width - pad.r) / 2, y: height - 6, "text-anchor": "middle" }, xLabel);
  el("text", { x: 12, y: height / 2, transform: `rotate(-90 12 ${height / 2})`, "text-anchor": "middle" }, yLabel);
  for (const p of points) {
    const dot = el("circle", { cx: sx(p.x), cy: sy(p.y), r: 5, class: "dot" });
    const tip = document.createElementNS(NS, "title");
    tip.textContent = p.label;
    dot.append(tip);
  }
  box.append(svg);
}
