// Devices: filter by tag, state and version; one device's model, subnet, budget, learner,
// last error, samples and accuracy over time; revoke / restore for admin tokens.
import { api } from "../api.js";
import { lineChart } from "../charts.js";
import { clear, errorBox, h, pct, pill, short, table, when } from "../dom.js";

const fmtBudget = (b) => Object.entries(b || {}).map(([k, v]) => `${k}=${v}`).join(", ") || "none";
const acc = (d) => d.metrics.recent_accuracy ?? d.metrics.accuracy ?? null;
const learner = (m) => (m.learner_personal_accuracy !== undefined
  ? `personal ${pct(m.learner_personal_accuracy)}${m.learner_serving_personal ? " (serving)" : ""}` : "–");

async function loadAll() {
  const [devs, counts, versions] = await Promise.all([api("/devices?limit=1000"), api("/samples/counts"),
    api("/console/versions?limit=1000")]);
  const byHash = Object.fromEntries(versions.data.map((v) => [v.model_hash, v.number]));
  const samples = Object.fromEntries(counts.devices.map((c) => [c.device_id, c]));
  return { devs: devs.data, samples, byHash };
}

function revokeButton(ctx, d, done) {
  if (!ctx.can("admin")) return null;
  const action = d.revoked ? "restore" : "revoke";
  return h("button", { class: d.revoked ? "" : "danger", "data-action": action, onclick: async (ev) => {
    ev.stopPropagation();
    try { await api(`/devices/${d.id}/${action}`, { method: "POST" }); done(); } catch (err) {
      const box = document.getElementById("action-error");
      if (box) clear(box).append(errorBox(err));
    }
  } }, action === "revoke" ? "Revoke" : "Restore");
}

export async function render(root, ctx) {
  if (ctx.args[0]) return renderOne(root, ctx, ctx.args[0]);
  root.append(h("h1", {}, "Devices"), h("div", { id: "action-error" }));
  const { devs, samples, byHash } = await loadAll();
  const tags = [...new Set(devs.flatMap((d) => d.tags))].sort();
  const states = [...new Set(devs.map((d) => d.state))].sort();
  const vers = [...new Set(devs.map((d) => d.model_hash))];
  const sel = (id, label, values, fmt = (v) => v) => h("label", {}, label, h("select", { id },
    h("option", { value: "" }, "any"), values.map((v) => h("option", { value: v }, fmt(v)))));
  const filters = h("div", { class: "filters" }, sel("f-tag", "tag", tags), sel("f-state", "state", [...states, "online", "offline", "revoked", "behind"]),
    sel("f-version", "version", vers, (v) => (byHash[v] !== undefined ? `v${byHash[v]}` : short(v))),
    h("label", {}, "name or id", h("input", { id: "f-text", type: "search" })));
  const out = h("div", { id: "device-table" });
  root.append(filters, out);
  const draw = () => {
    const tag = document.getElementById("f-tag").value, state = document.getElementById("f-state").value;
    const version = document.getElementById("f-version").value, text = document.getElementById("f-text").value.toLowerCase();
    const rows = devs.filter((d) => (!tag || d.tags.includes(tag)) && (!version || d.model_hash === version)
      && (!text || d.name.toLowerCase().includes(text) || d.id.includes(text))
      && (!state || d.state === state || (state === "online" && d.online) || (state === "offline" && !d.online)
        || (state === "revoked" && d.revoked) || (state === "behind" && !d.up_to_date && !d.revoked)));
    clear(out).append(table([
      { title: "name", cell: (d) => d.name },
      { title: "status", cell: (d) => (d.revoked ? pill("revoked") : d.online ? pill("online", "ok") : pill("offline", "")) },
      { title: "state", cell: (d) => pill(d.state) },
      { title: "model", cell: (d) => (byHash[d.model_hash] !== undefined ? `v${byHash[d.model_hash]}` : short(d.model_hash)) + (d.up_to_date ? "" : " (behind)") },
      { title: "subnet", num: true, cell: (d) => d.active_subnet },
      { title: "budget", cell: (d) => fmtBudget(d.budget) },
      { title: "hits / misses", num: true, cell: (d) => `${d.metrics.budget_hits ?? 0} / ${d.metrics.budget_misses ?? 0}` },
      { title: "learner", cell: (d) => learner(d.metrics) },
      { title: "accuracy", num: true, cell: (d) => pct(acc(d)) },
      { title: "samples (lab./unlab.)", num: true, cell: (d) => `${samples[d.id]?.labelled ?? 0} / ${samples[d.id]?.unlabelled ?? 0}` },
      { title: "last error", cell: (d) => d.last_error || "–" },
      { title: "", cell: (d) => revokeButton(ctx, d, ctx.refresh) },
    ], rows, { onRow: (d) => { location.hash = `#/devices/${d.id}`; }, empty: "no devices match" }));
  };
  filters.addEventListener("input", draw);
  draw();
  return null;
}

async function renderOne(root, ctx, id) {
  const [d, hist, counts, versions] = await Promise.all([api(`/devices/${id}`), api(`/console/devices/${id}/history`),
    api("/samples/counts"), api("/console/versions?limit=1000")]);
  const number = versions.data.find((v) => v.model_hash === d.model_hash)?.number;
  const c = counts.devices.find((x) => x.device_id === id) || { labelled: 0, unlabelled: 0 };
  const m = d.metrics;
  root.append(h("p", {}, h("a", { href: "#/devices" }, "← all devices")),
    h("h1", {}, `Device ${d.name} `, d.revoked ? pill("revoked") : d.online ? pill("online", "ok") : pill("offline", ""), " ",
      revokeButton(ctx, d, ctx.refresh)), h("div", { id: "action-error" }));
  const facts = [
    ["id", h("code", {}, d.id)], ["tags", d.tags.join(", ") || "–"], ["agent", d.agent_version || "–"],
    ["model", `${number !== undefined ? `v${number} ` : ""}${short(d.model_hash)}${d.up_to_date ? "" : ` (target ${short(d.target_model_hash)})`}`],
    ["state", pill(d.state)], ["active subnet", d.active_subnet], ["budget", fmtBudget(d.budget)],
    ["budget hits / misses", `${m.budget_hits ?? 0} / ${m.budget_misses ?? 0}`],
    ["measured latency (active subnet)", m.active_latency_ms !== undefined ? `${m.active_latency_ms.toFixed(4)} ms` : "–"],
    ["accuracy (recent labelled inputs)", pct(acc(d))], ["learner", learner(m)],
    ["samples labelled / unlabelled / pending upload", `${c.labelled} / ${c.unlabelled} / ${d.samples_pending}`],
    ["last seen", when(d.last_seen_at)], ["last error", d.last_error || "–"],
    ["rollbacks", d.rollbacks.map((r) => `${short(r.model_hash)}: ${r.reason}`).join("; ") || "none"],
  ];
  root.append(h("div", { class: "panel" }, table([{ title: "", cell: (r) => r[0] }, { title: "", cell: (r) => r[1] }], facts)));
  const grid = h("div", { class: "grid2" });
  root.append(grid);
  lineChart(grid, { title: "Accuracy over time", time: true, yRange: [0, 1],
    x: hist.data.map((p) => Date.parse(p.at) / 1000), series: [{ label: "accuracy", values: hist.data.map((p) => p.accuracy), fmt: pct }] });
  lineChart(grid, { title: "Active subnet over time", time: true,
    x: hist.data.map((p) => Date.parse(p.at) / 1000), series: [{ label: "subnet", values: hist.data.map((p) => p.active_subnet), fmt: (v) => String(v) }] });
  root.append(h("h2", {}, "All heartbeat metrics"), table([{ title: "metric", cell: (r) => r[0] }, { title: "value", num: true, cell: (r) => r[1] }],
    Object.entries(m).sort(), { empty: "no heartbeat yet" }));
  return null;
}
