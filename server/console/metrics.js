// Polls the server's /metrics and keeps a rolling window of what the panels show.

import { api } from "./api.js";
import { bucketDelta, byLabel, histogram, parsePrometheus, quantile, total } from "./prom.js";

export const HISTORY_S = 15 * 60;  // samples kept
export const RATE_S = 30;  // rates and percentiles of a point are over the 30 s before it
const INTERVAL_MS = 2000;

/** What one scrape says, reduced to the numbers the panels use. */
export function snapshot(samples, t) {
  return {
    t,
    generated: total(samples, "quiver_generation_tokens_total") ?? 0,
    prompt: total(samples, "quiver_prompt_tokens_total") ?? 0,
    requests: total(samples, "quiver_requests_total") ?? 0,
    ttft: histogram(samples, "quiver_time_to_first_token_seconds"),
    itl: histogram(samples, "quiver_inter_token_latency_seconds"),
    kvUsed: total(samples, "quiver_kv_cache_blocks_used"),
    kvTotal: total(samples, "quiver_kv_cache_blocks_total"),
    slotsUsed: total(samples, "quiver_adapters", (labels) => labels.tier === "gpu"),
    slotsTotal: total(samples, "quiver_lora_slots"),
    running: total(samples, "quiver_sequences_running"),
    waiting: total(samples, "quiver_sequences_waiting"),
    gpuUsed: total(samples, "quiver_gpu_memory_used_bytes"),
    gpuTotal: total(samples, "quiver_gpu_memory_total_bytes"),
  };
}

function increase(now, before) {
  return now >= before ? now - before : now;  // a restarted server counts from zero
}

/** Rates and latency percentiles at `history[index]`, over the `span` seconds before it. */
export function derive(history, index, span = RATE_S) {
  const now = history[index];
  let start = index;
  while (start > 0 && now.t - history[start - 1].t <= span + 0.001) start -= 1;
  const before = history[start];
  const elapsed = now.t - before.t;
  const point = { t: now.t, kv: now.kvTotal ? now.kvUsed / now.kvTotal : null,
                  slots: now.slotsTotal ? now.slotsUsed / now.slotsTotal : null,
                  tokensPerS: null, promptPerS: null, requestsPerS: null, ttft: {}, itl: {} };
  if (elapsed <= 0) return point;
  point.tokensPerS = increase(now.generated, before.generated) / elapsed;
  point.promptPerS = increase(now.prompt, before.prompt) / elapsed;
  point.requestsPerS = increase(now.requests, before.requests) / elapsed;
  const ttft = bucketDelta(now.ttft, before.ttft);
  const itl = bucketDelta(now.itl, before.itl);
  for (const q of [0.5, 0.9, 0.99]) {
    point.ttft[q] = quantile(q, ttft);
    point.itl[q] = quantile(q, itl);
  }
  return point;
}

class MetricsPoller {
  constructor() {
    this.history = [];
    this.samples = null;  // the last scrape, parsed
    this.error = null;
    this._listeners = new Set();
    this._timer = null;
  }

  start() {
    if (this._timer !== null) return;
    const tick = async () => {
      await this.poll();
      if (this._timer !== null) this._timer = window.setTimeout(tick, INTERVAL_MS);
    };
    this._timer = window.setTimeout(tick, 0);
  }

  stop() {
    window.clearTimeout(this._timer);
    this._timer = null;
  }

  subscribe(listener) {
    this._listeners.add(listener);
    return () => this._listeners.delete(listener);
  }

  /** Tokens (prompt + generated) per adapter label, from the last scrape. */
  tokensByAdapter() {
    if (!this.samples) return new Map();
    const out = byLabel(this.samples, "quiver_prompt_tokens_total", "adapter");
    for (const [name, n] of byLabel(this.samples, "quiver_generation_tokens_total", "adapter")) {
      out.set(name, (out.get(name) || 0) + n);
    }
    return out;
  }

  /** Mean load seconds and counts per tier ("disk": into host memory, "host": into a GPU slot). */
  loadTimes() {
    const out = {};
    if (!this.samples) return out;
    const sums = byLabel(this.samples, "quiver_adapter_load_seconds_sum", "tier");
    for (const [tier, count] of byLabel(this.samples, "quiver_adapter_load_seconds_count", "tier")) {
      out[tier] = { count, mean: count ? sums.get(tier) / count : null };
    }
    return out;
  }

  async poll() {
    try {
      const text = await api.get("/metrics", { text: true });
      this.samples = parsePrometheus(text);
      const t = Date.now() / 1000;
      this.history.push(snapshot(this.samples, t));
      while (this.history.length && t - this.history[0].t > HISTORY_S) this.history.shift();
      this.error = null;
    } catch (error) {
      this.error = error.message;
    }
    for (const listener of this._listeners) listener(this);
  }
}

export const metrics = new MetricsPoller();
