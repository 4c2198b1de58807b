// #/jobs/<id>: one job, live. Charts of loss, validation KL, learning rate and teacher weights (metrics, read
// again whenever the event stream reports progress), the event log (the SSE stream), the student's samples
// (on-policy `samples` events), checkpoints, artifacts to download, cancel.
import { api, downloadArtifact, streamEvents } from "./api.js";
import { LineChart } from "./charts.js";
import { badge, clear, fmtBytes, fmtDuration, fmtNumber, fmtTime, h, progressBar, toast } from "./dom.js";
import { answerCards } from "./playground.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const LOG_LIMIT = 2000;

export function renderJob(main, jobId) {
  const abort = new AbortController();
  let job = null;
  let lastEventId = 0;
  let metricsTimer = null;
  let lastMetricsAt = 0;
  let children = [];

  const head = h("section", { class: "panel", id: "job-head" }, h("p", { class: "muted" }, "loading…"));
  const chartsPanel = h("section", { class: "panel", id: "job-charts" });
  const chartEls = { loss: h("div", { class: "chart", id: "chart-loss" }), val: h("div", { class: "chart", id: "chart-val" }),
    lr: h("div", { class: "chart", id: "chart-lr" }), weights: h("div", { class: "chart", id: "chart-weights" }) };
  clear(chartsPanel, h("h2", {}, "Training curves"), h("div", { class: "grid2" }, Object.values(chartEls)));
  const charts = {
    loss: new LineChart(chartEls.loss, { title: "Training loss", log: true }),
    val: new LineChart(chartEls.val, { title: "Validation KL", empty: "no evaluation yet" }),
    lr: new LineChart(chartEls.lr, { title: "Learning rate" }),
    weights: new LineChart(chartEls.weights, { title: "Teacher weights", empty: "one teacher, or no evaluation yet" }),
  };
  const summaryPanel = h("section", { class: "panel grow", id: "job-summary" });
  const logBox = h("div", { class: "log", id: "event-log" });
  const liveDot = h("span", { class: "live off" });
  const samplesPanel = h("section", { class: "panel", id: "job-samples", hidden: true });
  const files = h("section", { class: "panel grow", id: "job-files" });
  const specPanel = h("details", { class: "panel" });

  clear(main, head, chartsPanel,
    h("div", { class: "row" }, summaryPanel, h("section", { class: "panel grow" }, h("h2", {}, liveDot, "Events"), logBox)),
    samplesPanel, h("div", { class: "row" }, files), specPanel);

  async function loadJob() {
    job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
    children = await api("/v1/jobs", { query: { parent_id: jobId, limit: 100 } }).then((p) => p.data).catch(() => children);
    drawHead();
    drawSummary();
    clear(specPanel, h("summary", {}, h("b", {}, "Spec")), h("pre", { class: "mono" }, JSON.stringify(job.spec, null, 2)));
    chartsPanel.hidden = job.kind !== "distill";
    return job;
  }

  function drawHead() {
    const p = job.progress || {};
    const canCancel = !TERMINAL.has(job.status) && job.status !== "cancel_requested";
    const bench = children.filter((c) => c.kind === "benchmark").map((c) => c.id);
    const resultsLink = job.kind === "benchmark" ? `#/results?bench=${job.id}`
      : job.kind === "distill" ? `#/results?runs=${job.id}${bench.length ? "&bench=" + bench.join(",") : ""}` : null;
    const playLink = job.kind === "generate" ? `#/playground?job=${encodeURIComponent(job.id)}`
      : job.kind === "distill" && job.status !== "failed" && job.status !== "cancelled" ? `#/playground?distill=${encodeURIComponent(job.id)}` : null;
    clear(head,
      h("div", { class: "row", style: "justify-content:space-between;align-items:center" },
        h("h1", {}, `${job.kind} job `, h("span", { class: "mono" }, job.id), " ", badge(job.status)),
        h("div", { class: "row" },
          resultsLink ? h("a", { class: "button", id: "open-results", href: resultsLink }, "Results") : null,
          playLink ? h("a", { class: "button", id: "open-playground", href: playLink }, "Playground") : null,
          h("button", { class: "danger", id: "cancel-job", disabled: !canCancel, onclick: cancel }, "Cancel"))),
      h("div", { class: "row", style: "align-items:center" },
        h("div", { class: "grow" }, progressBar(job.status === "succeeded" ? 1 : p.fraction, true)),
        h("span", { id: "job-progress" }, p.total_steps ? `step ${p.step} / ${p.total_steps}` : job.status),
        job.status === "running" ? h("span", { class: "muted" }, `ETA ${fmtDuration(p.eta_seconds)}`) : null),
      h("dl", { class: "kv" },
        h("dt", {}, "created"), h("dd", {}, fmtTime(job.created_at)),
        h("dt", {}, "started"), h("dd", {}, fmtTime(job.started_at)),
        h("dt", {}, "finished"), h("dd", {}, fmtTime(job.finished_at)),
        job.parent_id ? [h("dt", {}, "parent"), h("dd", {}, h("a", { class: "mono", href: `#/jobs/${job.parent_id}` }, job.parent_id))] : null,
        children.length ? [h("dt", {}, "children"), h("dd", {}, children.map((c) => h("span", {},
          h("a", { class: "mono", href: `#/jobs/${c.id}` }, c.id), ` (${c.kind}, ${c.status}) `)))] : null,
        job.error ? [h("dt", {}, "error"), h("dd", { class: "error" }, `${job.error.code}: ${job.error.message}`)] : null));
  }

  function drawSummary() {
    const s = job.summary || {};
    if (job.kind === "generate") {
      return clear(summaryPanel, h("h2", {}, "Answers"),
        s.answers?.length ? answerCards(s.answers) : h("p", { class: "muted" }, "Nothing reported yet."));
    }
    const rows = [];
    if (s.initial || s.final) {
      for (const key of ["val_kl", "val_reverse_kl", "val_ppl", "val_top1_agreement"]) {
        if (s.initial?.[key] === undefined && s.final?.[key] === undefined) continue;
        rows.push(h("tr", {}, h("td", {}, key), h("td", { class: "num" }, fmtNumber(s.initial?.[key])), h("td", { class: "num" }, fmtNumber(s.final?.[key]))));
      }
    }
    const extra = [];
    if (s.best) extra.push(["best step", s.best.step], ["best val KL", s.best.val_kl]);
    if (s.shipped) extra.push(["shipped", s.shipped]);
    if (s.learning_rate !== undefined) extra.push(["learning rate", s.learning_rate]);
    if (s.train) extra.push(["tokens", s.train.tokens], ["tokens/s", s.train.tokens_per_second], ["wall", fmtDuration(s.train.wall_seconds)],
      ["peak memory", fmtBytes(s.train.peak_memory_bytes)]);
    if (!s.initial && !s.final) for (const k of ["step", "loss", "lr", "val_kl", "val_reverse_kl"]) if (typeof s[k] === "number") extra.push([k, s[k]]);
    if (s.metrics) for (const [label, m] of Object.entries(s.metrics)) extra.push([label, Object.entries(m).map(([k, v]) => `${k} ${fmtNumber(v, 3)}`).join(" · ")]);
    const warnings = (s.warnings || []).map((w) => h("li", {}, `${w.code}: ${w.message}`));
    clear(summaryPanel, h("h2", {}, "Summary"),
      rows.length ? h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "metric"), h("th", { class: "num" }, "start"), h("th", { class: "num" }, "final"))), h("tbody", {}, rows)) : null,
      extra.length ? h("dl", { class: "kv", style: "margin-top:10px" }, extra.map(([k, v]) => [h("dt", {}, k), h("dd", {}, typeof v === "number" ? fmtNumber(v, 5) : String(v ?? "–"))])) : null,
      warnings.length ? h("ul", { class: "errors" }, warnings) : null,
      !rows.length && !extra.length ? h("p", { class: "muted" }, "Nothing reported yet.") : null);
  }

  async function loadMetrics() {
    lastMetricsAt = Date.now();
    if (job && job.kind !== "distill") return;
    const points = (await api(`/v1/jobs/${encodeURIComponent(jobId)}/metrics`)).data;
    const by = (kind, test) => {
      const out = {};
      for (const m of points) if (m.kind === kind && test(m.name)) (out[m.name] ||= []).push([m.step, m.value]);
      return out;
    };
    charts.loss.setSeries(by("train", (n) => n === "loss"));
    charts.val.setSeries(by("eval", (n) => n === "val_kl" || n === "val_reverse_kl"));
    charts.lr.setSeries(by("train", (n) => n === "lr"));
    const teachers = (job?.spec?.teachers || []).map((t) => t.model);
    const weights = by("eval", (n) => /^teacher_weight_\d+$/.test(n));
    charts.weights.setSeries(Object.fromEntries(Object.entries(weights).map(([n, v]) => {
      const i = Number(n.split("_").pop());
      return [`teacher ${i}${teachers[i] ? " " + teachers[i] : ""}`, v];
    })));
  }

  function scheduleMetrics() {
    if (metricsTimer) return;
    const wait = Math.max(0, 1500 - (Date.now() - lastMetricsAt));
    metricsTimer = setTimeout(async () => {
      metricsTimer = null;
      try { await loadMetrics(); } catch { /* the next state message tries again */ }
    }, wait);
  }

  async function loadFiles() {
    const [checkpoints, artifacts] = await Promise.all([
      api(`/v1/jobs/${encodeURIComponent(jobId)}/checkpoints`).then((r) => r.data),
      api(`/v1/jobs/${encodeURIComponent(jobId)}/artifacts`).then((r) => r.data),
    ]);
    clear(files, h("div", { class: "grid2" },
      h("div", {}, h("h2", {}, "Checkpoints"), checkpoints.length
        ? h("table", { id: "checkpoints" }, h("thead", {}, h("tr", {}, h("th", {}, "step"), h("th", {}, "saved"))),
          h("tbody", {}, checkpoints.map((c) => h("tr", {}, h("td", {}, c.step), h("td", { class: "muted" }, fmtTime(c.created_at))))))
        : h("p", { class: "muted" }, "No checkpoints.")),
      h("div", {}, h("h2", {}, "Artifacts"), artifacts.length
        ? h("table", { id: "artifacts" }, h("thead", {}, h("tr", {}, h("th", {}, "file"), h("th", { class: "num" }, "size"), h("th", {}, ""))),
          h("tbody", {}, artifacts.map((a) => h("tr", {}, h("td", { class: "mono" }, a.name), h("td", { class: "num" }, fmtBytes(a.size_bytes)),
            h("td", {}, h("button", { onclick: () => downloadArtifact(a).catch((e) => toast(e.message, true)) }, "Download"))))))
        : h("p", { class: "muted" }, TERMINAL.has(job?.status) ? "No artifacts." : "Artifacts appear when the job succeeds."))));
  }

  function appendEvent(e) {
    lastEventId = Math.max(lastEventId, e.id);
    const line = h("div", { class: e.kind, "data-event": e.kind },
      h("span", { class: "t" }, new Date(e.created_at).toLocaleTimeString(), " "), h("span", { class: "k" }, e.kind), " ", e.message);
    const atBottom = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 8;
    logBox.append(line);
    while (logBox.childElementCount > LOG_LIMIT) logBox.firstElementChild.remove();
    if (atBottom) logBox.scrollTop = logBox.scrollHeight;
    if (e.kind === "samples") drawSamples(e);
  }

  function drawSamples(e) {
    const samples = e.data?.samples || [];
    samplesPanel.hidden = !samples.length;
    clear(samplesPanel, h("h2", {}, `Student samples at step ${e.data?.step ?? "?"}`),
      h("p", { class: "muted" }, "Completions the student wrote for held-out prompts; the gap is the KL to the teacher per token (nats)."),
      samples.slice(0, 8).map((s) => h("div", { class: "sample" },
        h("div", { class: "prompt" }, s.prompt), h("div", { class: "completion" }, h("b", {}, "→ "), s.completion),
        h("div", { class: "muted" }, `${s.tokens} tokens · mean gap ${fmtNumber(s.mean_gap, 3)} · max gap ${fmtNumber(s.max_gap, 3)}`))));
  }

  async function cancel() {
    if (!confirm(`Cancel job ${jobId}?`)) return;
    try {
      job = await api(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" });
      toast(`job ${jobId}: ${job.status.replace("_", " ")}`);
      await loadJob();
    } catch (e) { toast(e.message, true); }
  }

  function onMessage(message) {
    if (message.event === "state") {
      const state = message.data;
      const changed = state.status !== job?.status;
      if (job) {
        job = { ...job, status: state.status, progress: state.progress, summary: state.summary };
        if (changed) loadJob().then(loadFiles).catch(() => {});
        else { drawHead(); drawSummary(); }
      }
      scheduleMetrics();
    } else if (message.data && typeof message.data === "object" && "kind" in message.data) {
      appendEvent(message.data);
      if (message.event === "checkpoint" || message.event === "done") loadFiles().catch(() => {});
    }
  }

  (async () => {
    try {
      await loadJob();
      await Promise.all([loadMetrics(), loadFiles()]);
      const events = await listAllEvents();
      for (const e of events) appendEvent(e);
      for (const e of events.filter((x) => x.kind === "samples").slice(-1)) drawSamples(e);
      liveDot.className = "live";
      await streamEvents(jobId, lastEventId, onMessage, abort.signal, (on) => { liveDot.className = on ? "live" : "live off"; });
      if (abort.signal.aborted) return;
      liveDot.className = "live off";
      await loadJob();
      await Promise.all([loadMetrics(), loadFiles()]);
    } catch (e) {
      if (abort.signal.aborted) return;
      if (!job) clear(head, h("h1", {}, "Job ", h("span", { class: "mono" }, jobId)), h("p", { class: "error" }, e.message), h("a", { href: "#/jobs" }, "Back to the jobs"));
      else toast(e.message, true);
    }
  })();

  async function listAllEvents() {
    const out = [];
    let after = 0;
    for (;;) {
      const page = await api(`/v1/jobs/${encodeURIComponent(jobId)}/events`, { query: { after } });
      out.push(...page.data);
      if (!page.has_more || !page.data.length) return out;
      after = page.data[page.data.length - 1].id;
    }
  }

  return () => {
    abort.abort();
    clearTimeout(metricsTimer);
    Object.values(charts).forEach((c) => c.destroy());
  };
}
