// The Prometheus text format, read in the browser, and what the server panel derives from it.

const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?$/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

function number(text) {
  if (text === "+Inf" || text === "Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  return Number(text);
}

function unescape(text) {
  return text.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
}

/** Exposition text -> Map(metric name -> [{labels, value}]). */
export function parsePrometheus(text) {
  const samples = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = LINE.exec(line.trim());
    if (!match) continue;
    const labels = {};
    for (const [, key, value] of (match[2] || "").matchAll(LABEL)) labels[key] = unescape(value);
    if (!samples.has(match[1])) samples.set(match[1], []);
    samples.get(match[1]).push({ labels, value: number(match[3]) });
  }
  return samples;
}

/** The sum of a metric's samples whose labels pass `keep`; null when it has none. */
export function total(samples, name, keep = () => true) {
  const found = (samples.get(name) || []).filter((s) => keep(s.labels));
  return found.length ? found.reduce((sum, s) => sum + s.value, 0) : null;
}

/** Per label value of `label`: the metric's summed value. */
export function byLabel(samples, name, label) {
  const out = new Map();
  for (const s of samples.get(name) || []) {
    const key = s.labels[label];
    if (key !== undefined) out.set(key, (out.get(key) || 0) + s.value);
  }
  return out;
}

/** A histogram summed over its label sets: cumulative [[le, count], ...] sorted by le, with +Inf last. */
export function histogram(samples, name) {
  const counts = new Map();
  for (const s of samples.get(`${name}_bucket`) || []) {
    const le = number(s.labels.le);
    counts.set(le, (counts.get(le) || 0) + s.value);
  }
  return [...counts.entries()].sort((a, b) => a[0] - b[0]);
}

/** `now - before` bucket by bucket (a counter reset counts from zero). */
export function bucketDelta(now, before) {
  const old = new Map(before || []);
  const reset = now.some(([le, count]) => count < (old.get(le) || 0));
  return now.map(([le, count]) => [le, reset ? count : count - (old.get(le) || 0)]);
}

/** Prometheus' histogram_quantile on cumulative buckets; null without observations. */
export function quantile(q, buckets) {
  if (!buckets.length) return null;
  const count = buckets[buckets.length - 1][1];
  if (!(count > 0)) return null;
  const rank = q * count;
  let lowerBound = 0;
  let lowerCount = 0;
  for (const [le, cumulative] of buckets) {
    if (cumulative >= rank) {
      if (le === Infinity) return lowerBound;  // past the last finite bucket: its bound is all we know
      const inBucket = cumulative - lowerCount;
      return inBucket > 0 ? lowerBound + (le - lowerBound) * ((rank - lowerCount) / inBucket) : le;
    }
    lowerBound = le;
    lowerCount = cumulative;
  }
  return lowerBound;
}
