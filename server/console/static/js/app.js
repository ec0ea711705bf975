// The console's shell: login (a token pasted once, kept in sessionStorage), the navigation, and
// a hash router (#/page/arg) that renders one page at a time and stops its streams on leave.
import { api, ApiError, allows, token } from "./api.js";
import { clear, errorBox, h } from "./dom.js";
import * as overview from "./pages/overview.js";
import * as devices from "./pages/devices.js";
import * as rounds from "./pages/rounds.js";
import * as versions from "./pages/versions.js";
import * as samples from "./pages/samples.js";
import * as enrollment from "./pages/enrollment.js";

const PAGES = [
  ["overview", "Overview", overview, "read"],
  ["devices", "Devices", devices, "read"],
  ["rounds", "Rounds", rounds, "read"],
  ["versions", "Versions", versions, "read"],
  ["samples", "Samples", samples, "read"],
  ["enrollment", "Enrollment", enrollment, "admin"],
];

const main = document.getElementById("main");
let me = null;
let cleanup = null;

function loginPage(message) {
  clear(document.getElementById("nav"));
  clear(document.getElementById("who"));
  const input = h("input", { type: "password", id: "token", name: "token", autocomplete: "off", placeholder: "elop_…", required: true });
  const status = h("div");
  const form = h("form", { class: "login panel", id: "login" },
    h("h1", {}, "Sign in to the EdgeLoop console"),
    h("p", { class: "muted" }, "Paste an operator token (edgeloop server token create, or <data dir>/operator-token). ",
      "It stays in this browser tab only and is sent as Authorization: Bearer."),
    h("label", {}, "Operator token", input), h("p", {}, h("button", { class: "primary", type: "submit" }, "Sign in")),
    status, message ? errorBox(message) : null);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    token.set(input.value.trim());
    try {
      me = await api("/whoami");
      if (!location.hash || location.hash === "#/login") location.hash = "#/overview"; // hashchange routes
      else route();
    } catch (err) {
      token.clear();
      clear(status).append(errorBox(err));
    }
  });
  clear(main).append(form);
  input.focus();
}

function shell() {
  const nav = clear(document.getElementById("nav"));
  for (const [id, title, , need] of PAGES) {
    if (allows(me.scope, need)) nav.append(h("a", { href: `#/${id}`, id: `nav-${id}` }, title));
  }
  clear(document.getElementById("who")).append(
    h("span", { id: "whoami" }, `${me.name} · `, h("strong", { id: "scope" }, me.scope)),
    h("button", { id: "logout", onclick: () => { token.clear(); me = null; location.hash = "#/login"; route(); } }, "Sign out"));
}

let generation = 0;

async function route() {
  const gen = ++generation;
  if (cleanup) { cleanup(); cleanup = null; }
  if (!token.get()) return loginPage();
  if (!me) {
    try { me = await api("/whoami"); } catch (err) { token.clear(); return loginPage(err instanceof ApiError ? err : null); }
  }
  shell();
  const [name = "overview", ...args] = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  const page = PAGES.find(([id]) => id === name) || PAGES[0];
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.id === `nav-${page[0]}`);
  // Each visit renders into its own container: a slower, superseded render fills a detached one.
  const root = h("div", { class: "page", id: `page-${page[0]}` });
  main.replaceChildren(root);
  const ctx = { me, can: (need) => allows(me.scope, need), args: args.map(decodeURIComponent), refresh: route };
  try {
    const stop = (await page[2].render(root, ctx)) || null;
    if (gen === generation) cleanup = stop;
    else if (stop) stop(); // another route() came after this one: stop its streams and timers
  } catch (err) {
    root.append(errorBox(err));
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("edgeloop:unauthorized", (ev) => { token.clear(); me = null; loginPage(ev.detail); });
route();
