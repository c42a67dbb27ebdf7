// The adapters panel: every registered adapter, refreshed every few seconds, and the admin actions.

import { api } from "./api.js";
import { $, announce, fmt, h, setText, showError } from "./dom.js";
import { metrics } from "./metrics.js";

const POLL_MS = 3000;
const MAX_ROWS = 500;  // more than this: narrow the filter
const COLUMNS = [
  ["name", "Name"], ["state", "State"], ["tier", "Tier"], ["rank", "Rank"], ["targets", "Targets"],
  ["size", "Size"], ["requests", "Requests"], ["tokens", "Tokens"], ["last_used", "Last used"],
  ["load", "Load"], ["actions", "Actions"],
];
const ACTIONS = {
  promote: { label: "Promote", busy: "Promoting…", done: "promoted to a pinned GPU slot" },
  demote: { label: "Demote", busy: "Demoting…", done: "demoted to host memory" },
  delete: { label: "Delete", busy: "Deleting…", done: "deleted" },
};

function shortTargets(targets) {
  return targets.map((t) => t.replace(/_proj$/, "")).join(", ") || "—";
}

export function adaptersPanel() {
  const tbody = $("#adapters-table tbody");
  const summary = $("#adapters-summary");
  const updated = $("#adapters-updated");
  const listError = $("#adapters-error");
  const actionError = $("#action-error");
  const more = $("#adapters-more");
  const filter = $("#adapter-filter");
  const stateFilter = $("#adapter-state");
  const form = $("#register-form");
  const nameInput = $("#adapter-name");
  const sourceInput = $("#adapter-source");
  const registerError = $("#register-error");
  const registerButton = $("#register-btn");
  const rows = new Map();  // name -> {tr, cells, buttons}
  const loadTimes = new Map();  // name -> {what, seconds}, measured here for actions taken here
  let adapters = [];
  let timer = null;
  let visible = false;

  async function refresh() {
    try {
      adapters = (await api.get("/v1/adapters")).data;
      showError(listError, "");
      setText(updated, `Updated ${new Date().toLocaleTimeString()}`);
    } catch (error) {
      showError(listError, `Could not list the adapters: ${error.message}`);
    }
    render();
  }

  function schedule() {
    window.clearTimeout(timer);
    if (visible) timer = window.setTimeout(async () => { await refresh(); schedule(); }, POLL_MS);
  }

  function makeRow(name) {
    const tr = h("tr", { "data-name": name });
    const cells = {};
    for (const [key, label] of COLUMNS) {
      const cell = h(key === "name" ? "th" : "td", { "data-col": key, "data-label": label,
                                                   scope: key === "name" ? "row" : undefined });
      cells[key] = cell;
      tr.append(cell);
    }
    cells.name.append(h("span", { class: "adapter-name", text: name }), h("span", { class: "adapter-error" }));
    cells.state.append(h("span", { class: "badge" }));
    const buttons = {};
    for (const [kind, action] of Object.entries(ACTIONS)) {
      buttons[kind] = h("button", { type: "button", class: `small ${kind === "delete" ? "danger" : ""}`,
                                    text: action.label, "aria-label": `${action.label} ${name}`,
                                    onclick: () => act(kind, name, buttons[kind]) });
      cells.actions.append(buttons[kind]);
    }
    return { tr, cells, buttons };
  }

  function update(row, info, tokens) {
    const { cells, buttons } = row;
    const badge = cells.state.firstChild;
    setText(badge, info.state);
    badge.className = `badge state-${info.state}`;
    row.tr.dataset.state = info.state;
    const errorText = info.error ? info.error : (info.warnings || []).join(" ");
    setText(cells.name.lastChild, errorText);
    cells.name.lastChild.className = info.error ? "adapter-error" : "adapter-warning";
    setText(cells.tier, info.tier);
    setText(cells.rank, info.rank ?? "—");
    setText(cells.targets, shortTargets(info.targets || []));
    cells.targets.title = (info.targets || []).join(", ");
    setText(cells.size, fmt.bytes(info.size_bytes));
    setText(cells.requests, fmt.int(info.requests));
    setText(cells.tokens, tokens === undefined ? "—" : fmt.int(tokens));
    setText(cells.last_used, fmt.ago(info.last_used));
    // The server's own timings of the latest loads (disk -> host memory, host -> GPU slot); a
    // register or promote done from this page also shows how long the whole call took.
    const served = info.load_ms || {};
    const parts = [];
    if (served.disk !== undefined) parts.push(`disk ${fmt.seconds(served.disk / 1000)}`);
    if (served.host !== undefined) parts.push(`GPU ${fmt.seconds(served.host / 1000)}`);
    const load = loadTimes.get(info.id);
    if (load) parts.push(`${load.what} ${fmt.seconds(load.seconds)}`);
    setText(cells.load, parts.length ? parts.join(" · ") : "—");
    buttons.promote.hidden = info.pinned || info.state === "failed";
    buttons.demote.hidden = !info.pinned;
  }

  function render() {
    const needle = filter.value.trim().toLowerCase();
    const state = stateFilter.value;
    const matching = adapters.filter((a) => (!needle || a.id.toLowerCase().includes(needle))
                                           && (!state || a.state === state));
    const shown = matching.slice(0, MAX_ROWS);
    const tokens = metrics.tokensByAdapter();
    const keep = new Set(shown.map((a) => a.id));
    for (const [name, row] of rows) {
      if (!keep.has(name)) { row.tr.remove(); rows.delete(name); }
    }
    let previous = null;
    for (const info of shown) {
      let row = rows.get(info.id);
      if (!row) { row = makeRow(info.id); rows.set(info.id, row); }
      update(row, info, tokens.get(info.id));
      const expected = previous ? previous.nextSibling : tbody.firstChild;
      if (expected !== row.tr) tbody.insertBefore(row.tr, expected);
      previous = row.tr;
    }
    more.hidden = matching.length <= shown.length;
    setText(more, `${matching.length - shown.length} more adapters match: narrow the filter to see them.`);
    if (!adapters.length && !tbody.firstChild) {
      tbody.append(h("tr", { class: "empty-row" }, h("td", { colspan: COLUMNS.length, text: "No adapters yet." })));
    } else if (adapters.length) {
      tbody.querySelector(".empty-row")?.remove();
    }
    setText(summary, summaryText());
  }

  function summaryText() {
    const count = (state) => adapters.filter((a) => a.state === state).length;
    const parts = [`${fmt.int(adapters.length)} adapters`, `${count("pinned")} pinned`,
                   `${count("gpu") + count("pinned")} on the GPU`, `${count("host")} in host memory`];
    if (count("failed")) parts.push(`${count("failed")} failed`);
    const last = metrics.history[metrics.history.length - 1];
    if (last?.slotsTotal) parts.push(`GPU slots ${fmt.int(last.slotsUsed)}/${fmt.int(last.slotsTotal)}`);
    const loads = metrics.loadTimes();
    const mean = (tier, label) => (loads[tier]?.count ? `${label} ${fmt.seconds(loads[tier].mean)}` : null);
    const means = [mean("disk", "disk → host"), mean("host", "host → GPU")].filter(Boolean);
    if (means.length) parts.push(`mean load ${means.join(", ")}`);
    return parts.join(" · ");
  }

  async function act(kind, name, button) {
    const action = ACTIONS[kind];
    if (kind === "delete" && !window.confirm(`Delete the adapter ${name}? Requests in flight finish first.`)) return;
    button.disabled = true;
    setText(button, action.busy);
    const started = performance.now();
    try {
      const path = `/v1/adapters/${encodeURIComponent(name)}`;
      if (kind === "delete") await api.delete(path);
      else await api.post(`${path}/${kind}`);
      if (kind === "promote") loadTimes.set(name, { what: "promote", seconds: (performance.now() - started) / 1000 });
      showError(actionError, "");
      announce(`${name} ${action.done}.`);
    } catch (error) {
      showError(actionError, `${action.label} ${name}: ${error.message}`);
    } finally {
      button.disabled = false;
      setText(button, action.label);
      await refresh();
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = nameInput.value.trim();
    const source = sourceInput.value.trim();
    nameInput.removeAttribute("aria-invalid");
    sourceInput.removeAttribute("aria-invalid");
    registerButton.disabled = true;
    const started = performance.now();
    try {
      const info = await api.post("/v1/adapters", { name, source });
      loadTimes.set(name, { what: "register", seconds: (performance.now() - started) / 1000 });
      showError(registerError, "");
      form.reset();
      announce(`Registered ${name}: ${info.state}.`);
    } catch (error) {
      showError(registerError, error.message);
      const field = error.param === "source" ? sourceInput : error.param === "name" ? nameInput : null;
      field?.setAttribute("aria-invalid", "true");
    } finally {
      registerButton.disabled = false;
      await refresh();
    }
  });
  filter.addEventListener("input", render);
  stateFilter.addEventListener("change", render);

  return {
    show() { visible = true; refresh().then(schedule); },
    hide() { visible = false; window.clearTimeout(timer); },
  };
}
