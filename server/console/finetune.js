// The fine-tuning panel: upload data (bad lines listed), start a job, watch its loss, serve the result.

import { api } from "./api.js";
import { drawChart } from "./chart.js";
import { $, announce, fmt, h, setText, showError } from "./dom.js";

const POLL_MS = 2000;
const ACTIVE = new Set(["validating_files", "queued", "running"]);
const LINE_ISSUE = /^(?:(.*?): )?line (\d+): (.*)$/;
const WHERE = { pinned: "is pinned on the GPU", gpu: "is on the GPU", host: "is in host memory",
                loading: "is loading", registered: "is registered (on disk)", failed: "failed to load" };
const SNIPPET_MAX_BYTES = 8 * 1024 * 1024;  // the file's own lines are shown next to problems up to this size

export function finetunePanel() {
  const uploadForm = $("#upload-form");
  const fileInput = $("#ft-file");
  const uploadResult = $("#upload-result");
  const uploadButton = $("#upload-btn");
  const jobForm = $("#job-form");
  const trainingSelect = $("#job-training-file");
  const validationSelect = $("#job-validation-file");
  const jobError = $("#job-error");
  const baseLabel = $("#job-base");
  const jobsBody = $("#jobs-table tbody");
  const jobsError = $("#jobs-error");
  const detail = $("#job-detail");
  const serveResult = $("#serve-result");
  let base = null;
  let selected = null;  // job id
  let events = [];  // the selected job's events, oldest first
  let timer = null;
  let visible = false;

  // ---------------------------------------------------------------- upload
  async function problemList(message, file) {
    const [heading, ...lines] = message.split("\n");
    let source = [];
    if (file.size <= SNIPPET_MAX_BYTES) source = (await file.text()).split(/\r?\n/);
    const items = lines.map((line) => {
      const match = LINE_ISSUE.exec(line);
      if (!match) return h("li", { text: line.replace(/^.*?: (\.\.\.)/, "$1") });
      const number = Number(match[2]);
      const text = source[number - 1];
      return h("li", { "data-line": number },
        h("span", { class: "lineno", text: `Line ${number}` }), ` ${match[3]}`,
        text === undefined ? "" : h("code", { class: "snippet", text: text.length > 120 ? `${text.slice(0, 120)}…` : text }));
    });
    return [h("p", { class: "error-title", text: lines.length ? heading : message }),
            lines.length ? h("ul", { class: "problems" }, items) : ""];
  }

  uploadForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const file = fileInput.files[0];
    if (!file) {
      uploadResult.replaceChildren(h("p", { class: "error", role: "alert", text: "Choose a JSONL file first." }));
      return;
    }
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file, file.name);
    uploadButton.disabled = true;
    uploadResult.replaceChildren(h("p", { class: "muted", text: `Uploading ${file.name}…` }));
    try {
      const record = await api.upload("/v1/files", form);
      const examples = record.examples ?? null;
      uploadResult.replaceChildren(h("p", { class: "ok", "data-file-id": record.id },
        `Uploaded ${record.filename} as ${record.id}`,
        examples === null ? "" : ` (${fmt.int(examples)} examples, ${fmt.bytes(record.bytes)})`, "."));
      await loadFiles(record.id);
      announce(`Uploaded ${record.filename}.`);
    } catch (error) {
      uploadResult.replaceChildren(h("div", { class: "error-box", role: "alert" }, ...(await problemList(error.message, file))));
    } finally {
      uploadButton.disabled = false;
    }
  });

  async function loadFiles(choose) {
    try {
      const { data } = await api.get("/v1/files?purpose=fine-tune");
      const sorted = [...data].sort((a, b) => b.created_at - a.created_at);
      const option = (f) => h("option", { value: f.id, text: `${f.filename} (${f.id})` });
      const keepTraining = choose || trainingSelect.value;
      const keepValidation = validationSelect.value;
      trainingSelect.replaceChildren(h("option", { value: "", text: sorted.length ? "Choose a file" : "Upload a file first" }),
                                     ...sorted.map(option));
      validationSelect.replaceChildren(h("option", { value: "", text: "None" }), ...sorted.map(option));
      trainingSelect.value = keepTraining || sorted[0]?.id || "";
      validationSelect.value = keepValidation;
    } catch (error) {
      showError(jobError, `Could not list the files: ${error.message}`);
    }
  }

  // ---------------------------------------------------------------- start a job
  function hyperparameters() {
    const hp = {};
    for (const [id, key, integer] of [["#hp-epochs", "n_epochs", true], ["#hp-batch", "batch_size", true],
                                      ["#hp-lr", "learning_rate_multiplier", false], ["#hp-rank", "lora_rank", true]]) {
      const raw = $(id).value.trim();
      if (!raw) continue;
      const value = Number(raw);
      if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
        throw new Error(`${$(id).labels[0].textContent} must be ${integer ? "a whole number" : "a number"}, got ${raw}.`);
      }
      hp[key] = value;
    }
    const extra = $("#hp-extra").value.trim();
    if (extra) {
      let parsed;
      try { parsed = JSON.parse(extra); } catch (error) {
        throw new Error(`Other hyperparameters must be a JSON object: ${error.message}`);
      }
      if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) {
        throw new Error("Other hyperparameters must be a JSON object, like {\"max_steps\": 20}.");
      }
      Object.assign(hp, parsed);
    }
    return hp;
  }

  jobForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError(jobError, "");
    const body = { model: base, training_file: trainingSelect.value };
    try {
      if (!base) await loadBase();
      body.model = base;
      if (!body.training_file) throw new Error("Choose a training file (upload one first).");
      const hp = hyperparameters();
      if (Object.keys(hp).length) body.hyperparameters = hp;
      if (validationSelect.value) body.validation_file = validationSelect.value;
      const suffix = $("#job-suffix").value.trim();
      if (suffix) body.suffix = suffix;
      const seed = $("#job-seed").value.trim();
      if (seed) body.seed = Number(seed);
    } catch (error) {
      showError(jobError, error.message);
      return;
    }
    const button = $("#start-job");
    button.disabled = true;
    try {
      const job = await api.post("/v1/fine_tuning/jobs", body);
      announce(`Started job ${job.id}.`);
      select(job.id);
    } catch (error) {
      showError(jobError, error.message);
    } finally {
      button.disabled = false;
    }
  });

  async function loadBase() {
    const { data } = await api.get("/v1/models");
    base = (data.find((m) => !m.parent) || data[0])?.id ?? null;
    setText(baseLabel, base ?? "—");
  }

  // ---------------------------------------------------------------- jobs
  function select(id) {
    if (selected !== id) {
      selected = id;
      events = [];
      setText(serveResult, "");
      drawLoss(null);
    }
    detail.hidden = false;
    refresh();
  }

  function renderJobs(jobs) {
    const rows = jobs.map((job) => h("tr", { "data-job": job.id, class: job.id === selected ? "selected" : "" },
      h("th", { scope: "row", "data-label": "Job" },
        h("button", { type: "button", class: "link", text: job.id, "aria-pressed": String(job.id === selected),
                      onclick: () => select(job.id) })),
      h("td", { "data-label": "Status" }, h("span", { class: `badge job-${job.status}`, text: job.status })),
      h("td", { "data-label": "Adapter", text: job.fine_tuned_model ?? "—" }),
      h("td", { "data-label": "Created", text: fmt.ago(job.created_at) })));
    const focused = document.activeElement?.closest?.("tr")?.dataset?.job;
    jobsBody.replaceChildren(...(rows.length ? rows
      : [h("tr", { class: "empty-row" }, h("td", { colspan: 4, text: "No jobs yet." }))]));
    if (focused) jobsBody.querySelector(`tr[data-job="${CSS.escape(focused)}"] button`)?.focus();
  }

  async function newEvents(id) {
    const known = new Set(events.map((e) => e.id));
    const fresh = [];
    let after = null;
    for (;;) {
      const page = await api.get(`/v1/fine_tuning/jobs/${id}/events?limit=100${after ? `&after=${after}` : ""}`);
      let reached = false;
      for (const event of page.data) {
        if (known.has(event.id)) { reached = true; break; }
        fresh.push(event);
      }
      if (reached || !page.has_more || !page.data.length) break;
      after = page.data[page.data.length - 1].id;
    }
    return fresh.reverse();
  }

  function drawLoss(job) {
    const metricsEvents = events.filter((e) => e.type === "metrics" && e.data);
    const points = (key) => metricsEvents.filter((e) => typeof e.data[key] === "number").map((e) => [e.data.step, e.data[key]]);
    const series = [{ name: "train_loss", label: "training loss", points: points("train_loss") }];
    const valid = points("valid_loss");
    if (valid.length) series.push({ name: "valid_loss", label: "validation loss", points: valid });
    const totalSteps = metricsEvents.at(-1)?.data.total_steps;
    drawChart($("#loss-chart"), series, {
      title: job ? `Loss of ${job.id}` : "Loss", xMin: 0, xMax: totalSteps || undefined,
      xFormat: (v) => `step ${Math.round(v)}`, yFormat: (v) => String(Number(v.toPrecision(3))), dots: true,
      empty: job && ACTIVE.has(job.status) ? "Waiting for the first training step…" : "No loss reported.",
    });
  }

  function renderDetail(job, checkpoints, adapter) {
    setText($("#job-title"), `Job ${job.id}`);
    detail.dataset.job = job.id;
    detail.dataset.status = job.status;
    const last = events.filter((e) => e.type === "metrics").at(-1)?.data;
    const parts = [job.status];
    if (last) parts.push(`step ${last.step}/${last.total_steps}`, `loss ${last.train_loss?.toFixed(4)}`);
    if (job.trained_tokens) parts.push(`${fmt.int(job.trained_tokens)} tokens trained`);
    if (job.estimated_finish) parts.push(`done in about ${fmt.seconds(Math.max(0, job.estimated_finish - Date.now() / 1000))}`);
    setText($("#job-status"), parts.join(" · "));
    const failure = $("#job-failure");
    showError(failure, job.error?.message ? `The job failed: ${job.error.message}` : "");
    const hp = Object.entries(job.hyperparameters || {}).map(([k, v]) => `${k} ${JSON.stringify(v)}`).join(", ");
    setText($("#job-params"), `${job.model} · training file ${job.training_file}${hp ? ` · ${hp}` : ""}`);

    const serve = $("#serve-job");
    serve.hidden = !job.fine_tuned_model;
    if (job.fine_tuned_model) {
      serve.dataset.model = job.fine_tuned_model;
      const pinned = adapter?.pinned;
      serve.disabled = Boolean(pinned);
      setText(serve, pinned ? `${job.fine_tuned_model} is served (pinned)` : `Serve ${job.fine_tuned_model}`);
    }
    setText($("#job-adapter"), adapter ? `Adapter ${adapter.id} ${WHERE[adapter.state] ?? adapter.state}.` : "");
    $("#try-job").hidden = !job.fine_tuned_model;
    $("#try-job").href = job.fine_tuned_model ? `#playground?model=${encodeURIComponent(job.fine_tuned_model)}` : "#playground";
    $("#cancel-job").hidden = !ACTIVE.has(job.status);

    const rows = checkpoints.map((c) => h("tr", {},
      h("td", { "data-label": "Step", text: String(c.step_number) }),
      h("td", { "data-label": "Adapter" }, h("code", { text: c.fine_tuned_model_checkpoint })),
      h("td", { "data-label": "Loss", text: c.metrics?.train_loss?.toFixed?.(4) ?? "—" }),
      h("td", { "data-label": "Serve" }, h("button", { type: "button", class: "small", text: "Serve",
        "aria-label": `Serve ${c.fine_tuned_model_checkpoint}`, onclick: (e) => serveModel(c.fine_tuned_model_checkpoint, e.currentTarget) }))));
    $("#checkpoints-table tbody").replaceChildren(...(rows.length ? rows
      : [h("tr", { class: "empty-row" }, h("td", { colspan: 4, text: "No checkpoints yet." }))]));

    const recent = events.slice(-8).reverse().map((e) => h("li", { class: `event level-${e.level}` },
      h("time", { text: new Date(e.created_at * 1000).toLocaleTimeString() }), ` ${e.message}`));
    $("#job-events").replaceChildren(...recent);
    drawLoss(job);
  }

  async function serveModel(name, button) {
    button.disabled = true;
    setText(serveResult, `Loading ${name} into a GPU slot…`);
    try {
      const info = await api.post(`/v1/adapters/${encodeURIComponent(name)}/promote`);
      setText(serveResult, `${name} is served: ${info.state} on the ${info.tier}.`);
      announce(`${name} is served.`);
    } catch (error) {
      setText(serveResult, `Could not serve ${name}: ${error.message}`);
    } finally {
      button.disabled = false;
      refresh();
    }
  }

  $("#serve-job").addEventListener("click", (e) => serveModel(e.currentTarget.dataset.model, e.currentTarget));
  $("#cancel-job").addEventListener("click", async (e) => {
    if (!selected) return;
    e.currentTarget.disabled = true;
    try {
      await api.post(`/v1/fine_tuning/jobs/${selected}/cancel`);
    } catch (error) {
      setText(serveResult, `Could not cancel: ${error.message}`);
    } finally {
      e.currentTarget.disabled = false;
      refresh();
    }
  });

  async function refresh() {
    try {
      const { data } = await api.get("/v1/fine_tuning/jobs?limit=20");
      renderJobs(data);
      showError(jobsError, "");
      if (selected) {
        const id = selected;
        const [job, checkpoints, fresh] = await Promise.all([
          api.get(`/v1/fine_tuning/jobs/${id}`), api.get(`/v1/fine_tuning/jobs/${id}/checkpoints?limit=100`),
          newEvents(id)]);
        if (id !== selected) return;
        const have = new Set(events.map((e) => e.id));  // a refresh that overlapped this one may have added some
        events.push(...fresh.filter((e) => !have.has(e.id)));
        let adapter = null;
        if (job.fine_tuned_model) {
          adapter = await api.get(`/v1/adapters/${encodeURIComponent(job.fine_tuned_model)}`).catch(() => null);
        }
        renderDetail(job, checkpoints.data, adapter);
      }
    } catch (error) {
      showError(jobsError, `Could not read the jobs: ${error.message}`);
    }
  }

  function schedule() {
    window.clearTimeout(timer);
    if (visible) timer = window.setTimeout(async () => { await refresh(); schedule(); }, POLL_MS);
  }

  return {
    show() {
      visible = true;
      loadBase().catch(() => {});
      loadFiles();
      refresh().then(schedule);
    },
    hide() { visible = false; window.clearTimeout(timer); },
  };
}
