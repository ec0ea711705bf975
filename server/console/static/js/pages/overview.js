// Fleet overview: device states, versions in use, and the charts over rounds (accuracy,
// cumulative bytes against full models, bytes and delivery time per round, subnet accuracy
// against the latency measured on the devices).
import { api } from "../api.js";
import { lineChart, scatter } from "../charts.js";
import { bytes, h, pct, short, table } from "../dom.js";

const card = (k, v, id) => h("div", { class: "card", id }, h("div", { class: "v" }, v), h("div", { class: "k" }, k));

export async function render(root) {
  const [fleet, stats, subnets] = await Promise.all([api("/console/fleet"), api("/console/rounds?limit=200"),
    api("/console/subnets")]);
  root.append(h("h1", {}, "Fleet overview"),
    h("div", { class: "cards", id: "fleet-cards" },
      card("devices", fleet.devices, "c-devices"), card("online", fleet.online, "c-online"),
      card("up to date", fleet.up_to_date, "c-current"), card("behind", fleet.behind, "c-behind"),
      card("rolled back", fleet.rolled_back, "c-rolled-back"), card("revoked", fleet.revoked, "c-revoked"),
      card("latest version", fleet.latest_version ?? "–", "c-latest"),
      card("samples labelled", fleet.samples_labelled, "c-labelled"),
      card("samples unlabelled", fleet.samples_unlabelled, "c-unlabelled")));
  root.append(h("h2", {}, "Versions in use"), table([
    { title: "version", cell: (v) => (v.number === null ? "unknown" : `v${v.number}`) },
    { title: "model hash", cell: (v) => h("code", {}, short(v.model_hash)) },
    { title: "devices", num: true, cell: (v) => v.devices },
  ], fleet.versions_in_use, { empty: "no devices yet" }));

  const rounds = stats.data.filter((r) => r.status === "done");
  const x = rounds.map((_, i) => i + 1);
  let dpu = 0, full = 0;
  const cumSent = [], cumFull = [];
  for (const r of rounds) {
    dpu += r.bytes_sent; full += r.full_equivalent_bytes || 0;
    cumSent.push(dpu); cumFull.push(full);
  }
  root.append(h("h2", {}, `Over rounds (${rounds.length} published)`));
  const grid = h("div", { class: "grid2", id: "charts" });
  root.append(grid);
  lineChart(grid, { title: "Validation accuracy", x, yRange: [0, 1], series: [
    { label: "new version", values: rounds.map((r) => r.val_accuracy), fmt: pct },
    { label: "version before", values: rounds.map((r) => r.base_val_accuracy), fmt: pct }] });
  lineChart(grid, { title: "Cumulative bytes sent (shipped vs full models)", x, yLabel: "bytes", series: [
    { label: "shipped (diffs, DPU)", values: cumSent, fmt: bytes },
    { label: "full models", values: cumFull, fmt: bytes }] });
  lineChart(grid, { title: "Bytes sent per round (log scale)", x, yLabel: "bytes", log: true, series: [
    { label: "shipped", values: rounds.map((r) => r.bytes_sent || null), bars: true, fmt: bytes },
    { label: "as full models", values: rounds.map((r) => r.full_equivalent_bytes || null), fmt: bytes }] });
  lineChart(grid, { title: "Delivery time per round (publish to last device)", x, yLabel: "seconds", series: [
    { label: "seconds", values: rounds.map((r) => r.delivery_s), bars: true, fmt: (v) => `${v.toFixed(2)} s` }] });
  scatter(grid, { title: "Subnet accuracy against measured latency", xLabel: "latency on the device (ms)",
    yLabel: "validation accuracy", points: subnets.data.filter((p) => p.val_accuracy !== null).map((p) => ({
      x: p.latency_ms, y: p.val_accuracy, label: `${p.name}: subnet ${p.active_subnet}, ${p.latency_ms.toFixed(3)} ms, ${pct(p.val_accuracy)}`,
    })) });
  const timer = setInterval(async () => { // the counters refresh; charts follow on the next visit
    try {
      const f = await api("/console/fleet");
      for (const [id, v] of [["c-devices", f.devices], ["c-online", f.online], ["c-current", f.up_to_date],
        ["c-behind", f.behind], ["c-rolled-back", f.rolled_back], ["c-revoked", f.revoked]]) {
        const el = document.querySelector(`#${id} .v`);
        if (el) el.textContent = v;
      }
    } catch { /* a failed refresh keeps the last figures */ }
  }, 5000);
  return () => clearInterval(timer);
}
