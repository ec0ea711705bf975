// Rounds: trigger one (operate), follow every round live over server-sent events, cancel a
// queued one; one round's progress, per-subnet accuracy, bytes per device and the chain of
// artefacts each device was sent.
import { api, subscribe } from "../api.js";
import { lineChart } from "../charts.js";
import { bytes, clear, errorBox, h, pct, pill, progress, short, table, when } from "../dom.js";

const TERMINAL = new Set(["done", "skipped", "failed"]);

function cancelButton(ctx, r, onError) {
  if (!ctx.can("operate") || r.status !== "queued") return null;
  return h("button", { class: "danger", "data-action": "cancel", onclick: async (ev) => {
    ev.stopPropagation();
    try { await api(`/rounds/${r.id}/cancel`, { method: "POST" }); } catch (err) { onError(err); }
  } }, "Cancel");
}

function roundForm(methods, onError, onCreated) {
  const method = h("select", { id: "r-method", name: "method" }, methods.data.map((m) =>
    h("option", { value: m.name, selected: m.default }, m.name)));
  const kind = h("select", { id: "r-cohort", name: "cohort" }, h("option", { value: "all" }, "all devices"),
    h("option", { value: "tag" }, "devices with tag"), h("option", { value: "device_ids" }, "device ids"));
  const arg = h("input", { id: "r-cohort-arg", name: "cohort_arg", placeholder: "tag, or ids separated by commas" });
  const scope = h("select", { id: "r-scope", name: "data_scope" }, h("option", { value: "cohort" }, "cohort's samples"),
    h("option", { value: "all" }, "every sample"));
  const params = h("textarea", { id: "r-params", name: "params", spellcheck: "false" }, "{}");
  const help = h("p", { class: "muted", id: "r-params-help" });
  const showHelp = () => {
    const m = methods.data.find((x) => x.name === method.value);
    const props = Object.entries(m?.params_schema?.properties || {});
    help.textContent = props.length ? `params of ${m.name}: ${props.map(([k, v]) => `${k}${v.default !== undefined ? `=${JSON.stringify(v.default)}` : ""}`).join(", ")}` : "";
  };
  method.addEventListener("change", showHelp);
  showHelp();
  const form = h("form", { class: "panel", id: "round-form" }, h("h2", {}, "Trigger a round"),
    h("div", { class: "inline" }, h("label", {}, "method", method), h("label", {}, "cohort", kind), h("label", {}, "tag / ids", arg),
      h("label", {}, "train on", scope)),
    h("label", {}, "params (JSON, validated by the server)", params), help,
    h("p", {}, h("button", { class: "primary", type: "submit", id: "r-submit" }, "Start round")));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    let body;
    try {
      const p = JSON.parse(params.value || "{}");
      const cohort = kind.value === "all" ? { all: true } : kind.value === "tag" ? { tag: arg.value.trim() }
        : { device_ids: arg.value.split(",").map((s) => s.trim()).filter(Boolean) };
      body = { method: method.value, cohort, params: p, data_scope: scope.value };
    } catch (err) {
      onError(new Error(`params: not JSON (${err.message})`));
      return;
    }
    try {
      const r = await api("/rounds", { method: "POST", body });
      onCreated(r);
    } catch (err) { onError(err); }
  });
  return form;
}

export async function render(root, ctx) {
  if (ctx.args[0]) return renderOne(root, ctx, ctx.args[0]);
  root.append(h("h1", {}, "Rounds"));
  const err = h("div", { id: "round-error" });
  const showError = (e) => clear(err).append(errorBox(e));
  if (ctx.can("operate")) {
    const methods = await api("/rounds/methods");
    root.append(roundForm(methods, showError, (r) => { clear(err); location.hash = `#/rounds/${r.id}`; }));
  }
  root.append(err);
  const live = h("span", { class: "muted", id: "live" }, "connecting…");
  const list = h("div", { id: "round-list" });
  root.append(h("h2", {}, "Recent rounds ", live), list);
  const draw = (page) => clear(list).append(table([
    { title: "created", cell: (r) => when(r.created_at) },
    { title: "status", cell: (r) => pill(r.status) },
    { title: "progress", cell: (r) => h("div", {}, progress(r.progress), h("span", { class: "muted" }, r.progress_message)) },
    { title: "method", cell: (r) => r.method },
    { title: "cohort", cell: (r) => r.lineage },
    { title: "val acc", num: true, cell: (r) => pct(r.metrics.val_accuracy) },
    { title: "devices", num: true, cell: (r) => r.devices_total },
    { title: "", cell: (r) => cancelButton(ctx, r, showError) },
  ], page.data, { onRow: (r) => { location.hash = `#/rounds/${r.id}`; }, empty: "no rounds yet" }));
  draw(await api("/rounds?limit=20"));
  return subscribe("/events", (event, data) => { if (event === "rounds") draw(data); }, (s) => { live.textContent = s; });
}

async function renderOne(root, ctx, id) {
  root.append(h("p", {}, h("a", { href: "#/rounds" }, "← all rounds")));
  const head = h("div", { id: "round-head" });
  const body = h("div", { id: "round-body" });
  const chain = h("div", { id: "round-chain" });
  const err = h("div", { id: "round-error" });
  const live = h("span", { class: "muted", id: "live" }, "connecting…");
  root.append(head, err, body, h("h2", {}, "Artefacts delivered"), chain);
  let lastDelivery = "";
  const draw = async (r) => {
    clear(head).append(h("h1", {}, `Round ${short(r.id)} `, h("span", { id: "round-status" }, pill(r.status)), " ", live),
      h("div", { class: "panel" }, progress(r.progress), h("p", {}, h("span", { id: "round-progress" }, `${Math.round(100 * r.progress)}%`),
        " · ", r.progress_message || "–", r.reason ? h("span", { class: "error" }, r.reason) : null),
      h("p", { class: "muted" }, `${r.method} · cohort ${r.lineage} · created ${when(r.created_at)} · finished ${when(r.finished_at)}`),
      cancelButton(ctx, r, (e) => clear(err).append(errorBox(e)))));
    const m = r.metrics || {};
    clear(body);
    const facts = [["validation accuracy", `${pct(m.base_val_accuracy)} → ${pct(m.val_accuracy)}`],
      ["labelled samples (train / val)", `${m.labelled_samples ?? "–"} (${m.train_samples ?? "–"} / ${m.val_samples ?? "–"})`],
      ["full model", bytes(m.full_model_bytes)], ["devices on version / probation / total", `${r.devices_on_version} / ${r.devices_on_probation} / ${r.devices_total}`],
      ["published", r.model_hash ? h("code", {}, short(r.model_hash)) : "–"]];
    body.append(h("div", { class: "panel" }, table([{ title: "", cell: (x) => x[0] }, { title: "", cell: (x) => x[1] }], facts)));
    const grid = h("div", { class: "grid2" });
    body.append(grid);
    const subnets = m.subnet_val_accuracy || [];
    lineChart(grid, { title: "Validation accuracy per subnet", x: subnets.map((_, i) => i), yRange: [0, 1],
      series: [{ label: "accuracy", values: subnets, bars: true, fmt: pct }] });
    lineChart(grid, { title: "Bytes per device", x: r.devices.map((_, i) => i), series: [
      { label: "bytes sent", values: r.devices.map((d) => d.bytes_sent), bars: true, fmt: bytes }] });
    body.append(h("h2", {}, "Devices"), table([
      { title: "device", cell: (d) => h("a", { href: `#/devices/${d.device_id}` }, short(d.device_id)) },
      { title: "state", cell: (d) => pill(d.state) },
      { title: "on version", cell: (d) => (d.on_version ? "yes" : "no") },
      { title: "bytes sent", num: true, cell: (d) => bytes(d.bytes_sent) },
      { title: "vs full model", num: true, cell: (d) => (m.full_model_bytes ? pct(d.bytes_sent / m.full_model_bytes) : "–") },
    ], r.devices, { empty: "no devices targeted yet" }));
    if (r.rollbacks.length) body.append(h("h2", {}, "Rollbacks"), table([
      { title: "device", cell: (x) => short(x.device_id) }, { title: "reason", cell: (x) => x.reason }], r.rollbacks));
    const key = JSON.stringify(r.devices.map((d) => [d.bytes_sent, d.on_version]));
    if (key !== lastDelivery && r.model_hash) {
      lastDelivery = key;
      const del = await api(`/console/rounds/${r.id}/deliveries`);
      clear(chain).append(table([
        { title: "device", cell: (d) => d.name || short(d.device_id) },
        { title: "chain", cell: (d) => d.chain.map((a) => `${a.kind} ${short(a.base_model_hash)}→${short(a.target_model_hash)} (${bytes(a.size)}${a.completed ? "" : ", partial"})`).join("  ⇒  ") || "–" },
        { title: "bytes", num: true, cell: (d) => bytes(d.bytes_sent) },
        { title: "delivery", num: true, cell: (d) => (d.delivery_s === null ? "–" : `${d.delivery_s.toFixed(2)} s`) },
      ], del.data, { empty: "nothing delivered yet" }));
    } else if (!r.model_hash) {
      clear(chain).append(h("p", { class: "muted" }, TERMINAL.has(r.status) ? "nothing published" : "not published yet"));
    }
  };
  await draw(await api(`/rounds/${id}`));
  return subscribe(`/events?round_id=${encodeURIComponent(id)}`, (event, data) => {
    if (event === "round") draw(data).catch((e) => clear(err).append(errorBox(e)));
  }, (s) => { live.textContent = s; });
}
