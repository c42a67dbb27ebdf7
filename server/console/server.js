// The server panel: throughput, latency percentiles, KV cache and GPU slots from /metrics, over a rolling window.

import { drawChart } from "./chart.js";
import { $, fmt, h, setText } from "./dom.js";
import { derive, metrics, RATE_S } from "./metrics.js";

const CHARTS = [
  { id: "chart-throughput", title: "Throughput", yFormat: (v) => fmt.rate(v),
    series: [["tokensPerS", "generated tok/s"], ["promptPerS", "prompt tok/s"]] },
  { id: "chart-ttft", title: "Time to first token", yFormat: (v) => fmt.seconds(v),
    series: [["ttft.0.5", "p50"], ["ttft.0.9", "p90"], ["ttft.0.99", "p99"]] },
  { id: "chart-itl", title: "Inter-token latency", yFormat: (v) => fmt.seconds(v),
    series: [["itl.0.5", "p50"], ["itl.0.9", "p90"], ["itl.0.99", "p99"]] },
  { id: "chart-capacity", title: "KV cache and GPU slots in use", yFormat: (v) => fmt.pct(v), yMax: 1,
    series: [["kv", "KV cache"], ["slots", "GPU LoRA slots"]] },
];

function pick(point, path) {
  const dot = path.indexOf(".");  // "ttft.0.99": the 0.99 quantile of point.ttft
  const value = dot < 0 ? point[path] : point[path.slice(0, dot)][path.slice(dot + 1)];
  return value === undefined ? null : value;
}

function card(label, value, detail, name) {
  return h("div", { class: "stat", "data-stat": name },
    h("p", { class: "stat-label", text: label }), h("p", { class: "stat-value", text: value }),
    h("p", { class: "stat-detail", text: detail }));
}

export function serverPanel() {
  const status = $("#server-status");
  const cards = $("#server-cards");
  const windowSelect = $("#server-window");
  let visible = false;

  function render() {
    if (!visible) return;
    const span = Number(windowSelect.value);
    const history = metrics.history;
    if (metrics.error) setText(status, `Could not read /metrics: ${metrics.error}`);
    else if (!history.length) setText(status, "Waiting for the first scrape…");
    else setText(status, `Scraped ${new Date(history.at(-1).t * 1000).toLocaleTimeString()} · ${history.length} samples `
      + `· rates and percentiles over ${RATE_S} s`);
    if (!history.length) return;
    const now = history.at(-1).t;
    const points = [];
    for (let i = 0; i < history.length; i += 1) {
      if (now - history[i].t <= span) points.push(derive(history, i));
    }
    const last = points.at(-1);
    const latest = history.at(-1);
    const ms = (q) => fmt.seconds(q);
    cards.replaceChildren(
      card("Generated tokens/s", fmt.rate(last.tokensPerS), `prompt ${fmt.rate(last.promptPerS)} tok/s · `
        + `${fmt.rate(last.requestsPerS)} req/s`, "throughput"),
      card("Time to first token p50", ms(last.ttft[0.5]), `p90 ${ms(last.ttft[0.9])} · p99 ${ms(last.ttft[0.99])}`, "ttft"),
      card("Inter-token latency p50", ms(last.itl[0.5]), `p90 ${ms(last.itl[0.9])} · p99 ${ms(last.itl[0.99])}`, "itl"),
      card("KV cache", fmt.pct(last.kv), `${fmt.int(latest.kvUsed)} of ${fmt.int(latest.kvTotal)} blocks`, "kv"),
      card("GPU LoRA slots", latest.slotsTotal ? `${fmt.int(latest.slotsUsed)} / ${fmt.int(latest.slotsTotal)}` : "—",
        `${fmt.int(latest.running)} running · ${fmt.int(latest.waiting)} waiting`, "slots"),
      ...(latest.gpuTotal ? [card("GPU memory", fmt.pct(latest.gpuUsed / latest.gpuTotal),
        `${fmt.bytes(latest.gpuUsed)} of ${fmt.bytes(latest.gpuTotal)}`, "gpu")] : []),
    );
    for (const chart of CHARTS) {
      const series = chart.series.map(([path, label]) => ({
        name: path, label, points: points.map((p) => [p.t - now, pick(p, path)]),
      }));
      drawChart($(`#${chart.id}`), series, {
        title: chart.title, xMin: -span, xMax: 0, yMax: chart.yMax, yFormat: chart.yFormat,
        xFormat: (v) => (Math.round(v) === 0 ? "now" : span <= 120 ? `${Math.round(v)} s` : `${Math.round(v / 6) / 10} min`),
        empty: "No requests in this window.",
      });
    }
  }

  metrics.subscribe(render);
  windowSelect.addEventListener("change", render);
  window.addEventListener("resize", render);

  return {
    show() { visible = true; render(); },
    hide() { visible = false; },
  };
}
