// The playground: one prompt to the base model and up to four adapters, streamed side by side,
// each token shaded by its probability; hovering, tapping or arrowing onto one shows the top-k.

import { api, streamChat } from "./api.js";
import { $, announce, fmt, h, setText, showError } from "./dom.js";

const HEAT = [[0.9, 4], [0.6, 3], [0.3, 2], [0.1, 1], [0, 0]];  // probability at least -> class h<n>

function heatClass(logprob) {
  const p = Math.exp(logprob);
  return `h${HEAT.find(([floor]) => p >= floor)[1]}`;
}

/** A token as it can be seen: spaces, newlines and tabs made visible. */
function visible(token) {
  return token.replace(/ /g, "␣").replace(/\n/g, "⏎").replace(/\t/g, "⇥") || "∅";
}

const tip = {
  el: null,
  owner: null,  // the span shown
  show(span, entry) {
    this.el ??= $("#tok-tip");
    this.owner = span;
    const p = Math.exp(entry.logprob);
    const alternatives = entry.top_logprobs || [];
    const most = Math.max(...alternatives.map((alt) => Math.exp(alt.logprob)), 1e-9);
    const rows = alternatives.map((alt) => {
      const share = Math.exp(alt.logprob);
      const bar = h("span", { class: "bar", "aria-hidden": "true" });
      bar.style.setProperty("--share", String(share / most));  // relative to the likeliest alternative
      return h("tr", { class: alt.token === entry.token ? "chosen" : "" },
        h("td", {}, h("code", { text: visible(alt.token) })), h("td", { class: "bar-cell" }, bar),
        h("td", { class: "num", text: fmt.pct(share) }), h("td", { class: "num", text: alt.logprob.toFixed(2) }));
    });
    const head = h("p", { class: "tip-head" }, h("code", { text: visible(entry.token) }),
      ` probability ${fmt.pct(p)}, logprob ${entry.logprob.toFixed(2)}`);
    const table = rows.length ? h("table", {},
      h("caption", { text: `Top ${rows.length} alternatives` }),
      h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "Token" }), h("th", { scope: "col", text: "" }),
        h("th", { scope: "col", text: "p" }), h("th", { scope: "col", text: "logprob" }))),
      h("tbody", {}, rows)) : h("p", { class: "muted", text: "No alternatives were asked for." });
    this.el.replaceChildren(head, table);
    this.el.hidden = false;
    const box = span.getBoundingClientRect();
    const width = this.el.offsetWidth;
    const height = this.el.offsetHeight;
    const left = Math.min(Math.max(8, box.left), window.innerWidth - width - 8);
    const below = box.bottom + 6;
    const top = below + height > window.innerHeight - 8 ? Math.max(8, box.top - height - 6) : below;
    this.el.style.left = `${left}px`;
    this.el.style.top = `${top}px`;
  },
  hide() {
    if (this.el) this.el.hidden = true;
    this.owner = null;
  },
};

/** One model's column: its streamed tokens and what the stream said about itself. */
class Answer {
  constructor(model, index) {
    this.model = model;
    this.entries = [];
    this.spans = [];
    this.selected = -1;
    this.decoder = new TextDecoder("utf-8");
    const title = `answer-${index}-title`;
    this.meta = h("p", { class: "meta", text: "Waiting for the first token…" });
    this.body = h("div", {
      class: "tokens", tabindex: "0", role: "group", "aria-live": "polite", "aria-busy": "true",
      "aria-labelledby": title, "aria-describedby": "heat-legend",
    });
    this.el = h("section", { class: "answer card", "data-model": model, "data-state": "streaming",
                             "aria-labelledby": title },
      h("h2", { id: title, text: model }), this.meta, this.body);
    this.body.addEventListener("keydown", (event) => this.onKey(event));
    this.body.addEventListener("mouseover", (event) => {
      const index = Number(event.target.dataset?.index);
      if (event.target.classList?.contains("tok")) tip.show(event.target, this.entries[index]);
    });
    this.body.addEventListener("mouseleave", () => {
      if (this.selected >= 0) this.select(this.selected); else tip.hide();
    });
    this.body.addEventListener("click", (event) => {
      if (event.target.classList?.contains("tok")) this.select(Number(event.target.dataset.index));
    });
    this.body.addEventListener("blur", () => { this.select(-1); });
  }

  addToken(entry) {
    const bytes = entry.bytes ? Uint8Array.from(entry.bytes) : new TextEncoder().encode(entry.token);
    const span = h("span", { class: `tok ${heatClass(entry.logprob)}`, "data-index": this.entries.length,
                             "data-logprob": entry.logprob.toFixed(4),
                             text: this.decoder.decode(bytes, { stream: true }) });
    this.entries.push(entry);
    this.spans.push(span);
    this.body.append(span);
  }

  select(index) {
    this.spans[this.selected]?.classList.remove("sel");
    this.selected = index;
    if (index < 0 || !this.spans[index]) { tip.hide(); return; }
    this.spans[index].classList.add("sel");
    this.spans[index].scrollIntoView({ block: "nearest" });
    tip.show(this.spans[index], this.entries[index]);
  }

  onKey(event) {
    const last = this.spans.length - 1;
    const moves = { ArrowRight: this.selected + 1, ArrowDown: this.selected + 1, ArrowLeft: this.selected - 1,
                    ArrowUp: this.selected - 1, Home: 0, End: last };
    if (event.key === "Escape") { this.select(-1); return; }
    if (!(event.key in moves) || last < 0) return;
    event.preventDefault();
    this.select(Math.min(Math.max(moves[event.key], 0), last));
  }

  async stream(request, signal) {
    const started = performance.now();
    let first = null;
    let finish = null;
    let usage = null;
    try {
      for await (const chunk of streamChat({ ...request, model: this.model }, signal)) {
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices?.[0];
        if (!choice) continue;
        const entries = choice.logprobs?.content || [];
        for (const entry of entries) this.addToken(entry);
        if (!entries.length && choice.delta?.content) this.body.append(choice.delta.content);
        if (first === null && (entries.length || choice.delta?.content)) first = performance.now();
        if (choice.finish_reason) finish = choice.finish_reason;
        setText(this.meta, `Streaming… ${this.entries.length} tokens`);
      }
      const seconds = (performance.now() - started) / 1000;
      const tokens = usage?.completion_tokens ?? this.entries.length;
      const ttft = first === null ? null : (first - started) / 1000;
      const rate = first !== null && tokens > 1 ? (tokens - 1) / ((performance.now() - first) / 1000) : null;
      setText(this.meta, `${finish ?? "done"} · ${tokens} tokens · first token ${fmt.seconds(ttft)} · `
        + `${fmt.rate(rate)} tok/s · ${fmt.seconds(seconds)}`);
      this.el.dataset.state = "done";
      this.el.dataset.finish = finish ?? "";
    } catch (error) {
      if (error.name === "AbortError") {
        setText(this.meta, `Stopped after ${this.entries.length} tokens.`);
        this.el.dataset.state = "stopped";
      } else {
        setText(this.meta, "Failed.");
        this.el.append(h("p", { class: "error", role: "alert", text: error.message }));
        this.el.dataset.state = "error";
      }
    } finally {
      const rest = this.decoder.decode();
      if (rest) this.body.append(rest);
      this.body.setAttribute("aria-busy", "false");
    }
  }
}

export function playgroundPanel() {
  const form = $("#play-form");
  const prompt = $("#prompt");
  const useBase = $("#use-base");
  const baseName = $("#base-name");
  const adapterInputs = [1, 2, 3, 4].map((i) => $(`#adapter-${i}`));
  const options = $("#adapter-options");
  const run = $("#run");
  const stop = $("#stop");
  const error = $("#play-error");
  const answers = $("#answers");
  let base = null;
  let controller = null;

  async function loadModels() {
    try {
      const { data } = await api.get("/v1/models");
      base = (data.find((m) => !m.parent) || data[0])?.id ?? null;
      setText(baseName, base ? `Base model (${base})` : "Base model");
      options.replaceChildren(...data.filter((m) => m.parent).map((m) => h("option", { value: m.id })));
    } catch (e) {
      showError(error, `Could not list the models: ${e.message}`);
    }
  }

  function number(input, label) {
    const value = Number(input.value);
    if (input.value.trim() === "" || !Number.isFinite(value)) throw new Error(`${label} must be a number.`);
    return value;
  }

  async function go() {
    controller?.abort();
    showError(error, "");
    let request;
    const models = [];
    try {
      if (!base) await loadModels();
      if (useBase.checked && base) models.push(base);
      for (const input of adapterInputs) {
        const name = input.value.trim();
        if (name && !models.includes(name)) models.push(name);
      }
      if (!prompt.value.trim()) throw new Error("Write a prompt first.");
      if (!models.length) throw new Error("Choose the base model or at least one adapter.");
      const topK = Math.round(number($("#top-k"), "Alternatives shown"));
      request = {
        messages: [{ role: "user", content: prompt.value }],
        temperature: number($("#temperature"), "Temperature"),
        max_tokens: Math.round(number($("#max-tokens"), "Max tokens")),
        logprobs: true,
        ...(topK > 0 ? { top_logprobs: topK } : {}),
        stream_options: { include_usage: true },
      };
    } catch (e) {
      showError(error, e.message);
      return;
    }
    tip.hide();
    controller = new AbortController();
    const columns = models.map((model, index) => new Answer(model, index));
    answers.dataset.count = String(columns.length);
    answers.replaceChildren(...columns.map((c) => c.el));
    run.disabled = true;
    stop.disabled = false;
    announce(`Streaming ${columns.length} answers.`);
    await Promise.all(columns.map((c) => c.stream(request, controller.signal)));
    run.disabled = false;
    stop.disabled = true;
    announce(`${columns.length} answers finished.`);
  }

  form.addEventListener("submit", (event) => { event.preventDefault(); go(); });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); form.requestSubmit(); }
  });
  stop.addEventListener("click", () => controller?.abort());
  window.addEventListener("scroll", () => tip.hide(), { passive: true });

  return {
    show(params) {
      loadModels();
      const model = params.get("model");
      if (model) {
        const free = adapterInputs.find((input) => !input.value.trim() || input.value.trim() === model);
        (free ?? adapterInputs[0]).value = model;
      }
    },
    hide() { tip.hide(); },
  };
}
