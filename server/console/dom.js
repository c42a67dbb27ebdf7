// Small DOM and formatting helpers shared by the panels.

/** An element: h("button", {class: "x", onclick: f, "aria-label": "..."}, "text", child). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key in el && !key.includes("-")) el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== undefined && child !== null && child !== false) el.append(child);
  }
  return el;
}

export const $ = (selector, root = document) => root.querySelector(selector);

/** Sets text only when it changed, so live regions and selections are left alone. */
export function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

/** Says `text` to screen readers through the page's polite live region. */
export function announce(text) {
  const region = document.getElementById("announcer");
  if (!region) return;
  region.textContent = "";
  window.setTimeout(() => { region.textContent = text; }, 30);
}

/** Shows `message` (or nothing) in an error element; its role="alert" has it read out. */
export function showError(el, message) {
  el.textContent = message || "";
  el.hidden = !message;
}

export const fmt = {
  int(n) {
    return n === null || n === undefined || Number.isNaN(n) ? "—" : Math.round(n).toLocaleString("en-US");
  },
  bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return `${n >= 100 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
  },
  seconds(s) {
    if (s === null || s === undefined || !Number.isFinite(s)) return "—";
    if (s < 0.001) return `${(s * 1e6).toFixed(0)} µs`;
    if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 2 : s < 0.1 ? 1 : 0)} ms`;
    if (s < 120) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
    return `${(s / 60).toFixed(1)} min`;
  },
  ago(unixSeconds) {
    if (!unixSeconds) return "never";
    const s = Math.max(0, Date.now() / 1000 - unixSeconds);
    if (s < 5) return "just now";
    if (s < 90) return `${Math.round(s)} s ago`;
    if (s < 5400) return `${Math.round(s / 60)} min ago`;
    if (s < 172800) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} d ago`;
  },
  rate(n) {
    if (n === null || n === undefined || !Number.isFinite(n)) return "—";
    return n >= 100 ? Math.round(n).toLocaleString("en-US") : n.toFixed(n >= 10 ? 1 : 2);
  },
  pct(x) {
    return x === null || x === undefined || !Number.isFinite(x) ? "—" : `${(x * 100).toFixed(x < 0.1 ? 1 : 0)}%`;
  },
  time(unixSeconds) {
    return unixSeconds ? new Date(unixSeconds * 1000).toLocaleString() : "—";
  },
};
