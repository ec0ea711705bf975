// Enrollment tokens (admin): create one (its secret is shown once), list, revoke; and the
// audit log's latest entries, where every console action appears under the token's name.
import { api } from "../api.js";
import { clear, errorBox, h, pill, table, when } from "../dom.js";

export async function render(root) {
  root.append(h("h1", {}, "Enrollment tokens"));
  const out = h("div", { id: "enroll-result" });
  const name = h("input", { id: "e-name", name: "name", required: true, placeholder: "site-a batch 3" });
  const tags = h("input", { id: "e-tags", name: "tags", placeholder: "lab, site-a" });
  const uses = h("input", { id: "e-uses", name: "max_uses", type: "number", min: "1", value: "10" });
  const hours = h("input", { id: "e-hours", name: "hours", type: "number", min: "1", value: "24" });
  const reenroll = h("input", { id: "e-reenroll", type: "checkbox" });
  const form = h("form", { class: "panel inline", id: "enroll-form" }, h("label", {}, "name", name), h("label", {}, "tags", tags),
    h("label", {}, "max uses", uses), h("label", {}, "expires in (hours)", hours),
    h("label", { class: "check" }, reenroll, " may re-enrol others' devices"),
    h("button", { class: "primary", type: "submit", id: "e-submit" }, "Create token"));
  const list = h("div", { id: "enroll-list" });
  const audit = h("div", { id: "audit-list" });
  root.append(form, out, h("h2", {}, "Tokens"), list, h("h2", {}, "Audit log (latest 30)"), audit);
  const draw = async () => {
    const [tokens, events] = await Promise.all([api("/enrollment-tokens"), api("/audit?limit=30")]);
    clear(list).append(table([
      { title: "name", cell: (t) => t.name }, { title: "status", cell: (t) => pill(t.status, t.status === "active" ? "ok" : "bad") },
      { title: "uses", num: true, cell: (t) => `${t.uses} / ${t.max_uses}` }, { title: "tags", cell: (t) => t.tags.join(", ") || "–" },
      { title: "expires", cell: (t) => when(t.expires_at) },
      { title: "", cell: (t) => (t.status === "revoked" ? null : h("button", { class: "danger", onclick: async () => {
        try { await api(`/enrollment-tokens/${t.id}`, { method: "DELETE" }); draw(); } catch (err) { clear(out).append(errorBox(err)); }
      } }, "Revoke")) },
    ], tokens.data, { empty: "no enrollment tokens" }));
    clear(audit).append(table([
      { title: "when", cell: (e) => when(e.at) }, { title: "who", cell: (e) => e.token_name }, { title: "action", cell: (e) => e.action },
      { title: "target", cell: (e) => e.target }, { title: "status", num: true, cell: (e) => e.status ?? "?" },
      { title: "detail", cell: (e) => e.detail }], events.data));
  };
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { name: name.value.trim(), tags: tags.value.split(",").map((s) => s.trim()).filter(Boolean),
      max_uses: Number(uses.value), expires_in_s: Math.round(Number(hours.value) * 3600), reenroll: reenroll.checked };
    try {
      const t = await api("/enrollment-tokens", { method: "POST", body });
      clear(out).append(h("div", { class: "notice" }, "Created. Give this to the agents as EDGELOOP_AGENT_ENROLLMENT_TOKEN; it is not shown again: ",
        h("code", { id: "enroll-secret" }, t.token)));
      draw();
    } catch (err) { clear(out).append(errorBox(err)); }
  });
  await draw();
  return null;
}
