// Calls to the Quiver API with the session's key; errors carry the server's own message.

const KEY_NAME = "quiver.key";

export const session = {
  get key() { return sessionStorage.getItem(KEY_NAME) || ""; },
  set key(value) {
    if (value) sessionStorage.setItem(KEY_NAME, value);
    else sessionStorage.removeItem(KEY_NAME);
  },
};

export class ApiError extends Error {
  constructor(status, message, body = null) {
    super(message);
    this.status = status;
    this.code = body?.error?.code ?? null;
    this.param = body?.error?.param ?? null;
  }
}

function headers(extra = {}) {
  const out = { ...extra };
  if (session.key) out.Authorization = `Bearer ${session.key}`;
  return out;
}

async function errorOf(response) {
  let body = null;
  let message = `The server answered ${response.status} ${response.statusText}.`;
  try {
    body = await response.json();
    if (typeof body?.error?.message === "string") message = body.error.message;
  } catch { /* not JSON: keep the status line */ }
  if (response.status === 401) window.dispatchEvent(new CustomEvent("quiver:unauthorized", { detail: message }));
  return new ApiError(response.status, message, body);
}

async function send(path, init) {
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, `The server could not be reached (${error.message}).`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

/** method + path -> the JSON answer (or text with {text: true}); ApiError otherwise. */
export async function request(method, path, { json, form, signal, text = false } = {}) {
  const init = { method, headers: headers(), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;
  }
  const response = await send(path, init);
  return text ? response.text() : response.json();
}

export const api = {
  get: (path, options) => request("GET", path, options),
  post: (path, json, options) => request("POST", path, { ...options, json }),
  delete: (path, options) => request("DELETE", path, options),
  upload: (path, form, options) => request("POST", path, { ...options, form }),
};

/** The status `path` answers with the session's key (0 when unreachable): how the page learns what a key opens. */
export async function probe(path) {
  try {
    return (await fetch(path, { headers: headers() })).status;
  } catch {
    return 0;
  }
}

/** Streams a chat completion: yields each chunk object of the server-sent events until [DONE]. */
export async function* streamChat(body, signal) {
  const response = await send("/v1/chat/completions", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const data = eventData(buffer.slice(0, end));
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        if (data === null) continue;
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk.error.message || "The stream failed.", chunk);
        yield chunk;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/** The joined `data:` lines of one event (null for comments and pings). */
function eventData(raw) {
  const lines = raw.split(/\r?\n/).filter((line) => line.startsWith("data:"));
  if (!lines.length) return null;
  return lines.map((line) => line.slice(5).replace(/^ /, "")).join("\n");
}
