// The REST client of the console: the operator token (sessionStorage, this tab only) sent as
// "Authorization: Bearer", JSON in and out, the API's {"detail"} as the error message, and a
// server-sent-events reader over fetch() (EventSource cannot send the Authorization header).

const KEY = "edgeloop.token";
export const API = "/api/v1";
export const SCOPES = ["read", "operate", "admin"];

export const token = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (t) => sessionStorage.setItem(KEY, t),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail || `HTTP ${status}`);
    this.status = status;
  }
}

function headers(json) {
  const h = { Authorization: `Bearer ${token.get()}` };
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function failure(resp) {
  const text = await resp.text();
  let detail = text;
  try { detail = JSON.parse(text).detail ?? text; } catch { /* not JSON: keep the text */ }
  if (resp.status === 401) window.dispatchEvent(new CustomEvent("edgeloop:unauthorized", { detail }));
  return new ApiError(resp.status, typeof detail === "string" ? detail : JSON.stringify(detail));
}

export async function api(path, { method = "GET", body } = {}) {
  const resp = await fetch(API + path, {
    method, headers: headers(body !== undefined), body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!resp.ok) throw await failure(resp);
  return resp.status === 204 ? null : resp.json();
}

// An authorised image as an object URL (the caller revokes it).
export async function imageUrl(path) {
  const resp = await fetch(API + path, { headers: headers(false) });
  if (!resp.ok) throw await failure(resp);
  return URL.createObjectURL(await resp.blob());
}

export function allows(have, need) {
  return SCOPES.indexOf(have) >= SCOPES.indexOf(need);
}

// Follows a text/event-stream: onEvent(name, data) for each message (data parsed as JSON),
// reconnecting after the server's "retry" delay until stop() is called.
export function subscribe(path, onEvent, onState = () => {}) {
  const ctrl = new AbortController();
  let retryMs = 2000;
  (async () => {
    while (!ctrl.signal.aborted) {
      try {
        const resp = await fetch(API + path, { headers: { ...headers(false), Accept: "text/event-stream" }, signal: ctrl.signal });
        if (!resp.ok) throw await failure(resp);
        onState("live");
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            let event = "message";
            const data = [];
            for (const line of block.split("\n")) {
              if (line.startsWith(":")) continue; // keep-alive comment
              const colon = line.indexOf(":");
              const field = colon < 0 ? line : line.slice(0, colon);
              const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
              if (field === "event") event = val;
              else if (field === "data") data.push(val);
              else if (field === "retry" && /^\d+$/.test(val)) retryMs = Number(val);
            }
            if (data.length) onEvent(event, JSON.parse(data.join("\n")));
          }
        }
      } catch (err) {
        if (ctrl.signal.aborted) return;
        onState(err instanceof ApiError && err.status === 401 ? "unauthorized" : "reconnecting");
        if (err instanceof ApiError && err.status < 500 && err.status !== 429) return; // will not get better
      }
      if (!ctrl.signal.aborted) {
        onState("reconnecting");
        await new Promise((r) => setTimeout(r, retryMs));
      }
    }
  })();
  return () => ctrl.abort();
}
