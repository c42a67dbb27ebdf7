// A small SVG line chart: a few series of [x, y] points (y null leaves a gap), three grid lines.

const NS = "http://www.w3.org/2000/svg";
const PAD = { left: 52, right: 10, top: 10, bottom: 24 };

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  if (text !== undefined) el.textContent = text;
  return el;
}

/** The smallest 1, 2 or 5 times a power of ten at or above `value`. */
export function niceCeiling(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

/**
 * Draws `series` ([{name, label, points: [[x, y], ...]}]) into `container` (a div.chart).
 * options: title, xMin, xMax, yMax (default: fitted), xFormat, yFormat, empty (the text without data),
 * dots (mark each point).
 */
export function drawChart(container, series, options) {
  const { title, xFormat = String, yFormat = String, empty = "No data yet." } = options;
  const width = Math.max(260, Math.round(container.clientWidth || 560));
  const height = Number(container.dataset.height || 180);
  const values = series.flatMap((s) => s.points.filter((p) => p[1] !== null && Number.isFinite(p[1])));
  const xs = values.map((p) => p[0]);
  const xMin = options.xMin ?? (xs.length ? Math.min(...xs) : 0);
  let xMax = options.xMax ?? (xs.length ? Math.max(...xs) : 1);
  if (xMax <= xMin) xMax = xMin + 1;
  const yMax = options.yMax ?? niceCeiling(Math.max(0, ...values.map((p) => p[1])) * 1.05);
  const plotW = width - PAD.left - PAD.right;
  const plotH = height - PAD.top - PAD.bottom;
  const x = (v) => PAD.left + ((v - xMin) / (xMax - xMin)) * plotW;
  const y = (v) => PAD.top + plotH - (Math.min(Math.max(v, 0), yMax) / yMax) * plotH;

  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", class: "chart-svg" });
  const latest = series.map((s) => {
    const last = [...s.points].reverse().find((p) => p[1] !== null && Number.isFinite(p[1]));
    return `${s.label} ${last ? yFormat(last[1]) : "no data"}`;
  });
  root.setAttribute("aria-label", `${title}: ${latest.join(", ")}`);
  for (const fraction of [0, 0.5, 1]) {
    const gy = PAD.top + plotH - fraction * plotH;
    root.append(svg("line", { x1: PAD.left, x2: width - PAD.right, y1: gy, y2: gy, class: "grid" }));
    root.append(svg("text", { x: PAD.left - 6, y: gy + 4, class: "tick", "text-anchor": "end" },
      fraction === 0 ? "0" : yFormat(fraction * yMax)));
  }
  for (const [value, anchor] of [[xMin, "start"], [(xMin + xMax) / 2, "middle"], [xMax, "end"]]) {
    root.append(svg("text", { x: x(value), y: height - 6, class: "tick", "text-anchor": anchor }, xFormat(value)));
  }
  series.forEach((s, index) => {
    let d = "";
    let pen = false;
    let count = 0;
    for (const [px, py] of s.points) {
      if (py === null || !Number.isFinite(py)) { pen = false; continue; }
      d += `${pen ? "L" : "M"}${x(px).toFixed(1)} ${y(py).toFixed(1)} `;
      pen = true;
      count += 1;
    }
    const path = svg("path", { d: d.trim() || "M0 0", class: `line s${index}`, "data-series": s.name,
                               "data-count": count });
    root.append(path);
    if (options.dots && count <= 80) {
      for (const [px, py] of s.points) {
        if (py !== null && Number.isFinite(py)) root.append(svg("circle", { cx: x(px), cy: y(py), r: 2.5, class: `dot s${index}` }));
      }
    }
  });
  if (!values.length) {
    root.append(svg("text", { x: PAD.left + plotW / 2, y: PAD.top + plotH / 2, class: "empty", "text-anchor": "middle" }, empty));
  }

  const legend = document.createElement("ul");
  legend.className = "legend";
  series.forEach((s, index) => {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = `swatch s${index}`;
    swatch.setAttribute("aria-hidden", "true");
    item.append(swatch, latest[index]);
    legend.append(item);
  });
  container.replaceChildren(root, legend);
}
