// #/results?bench=<ids>&runs=<ids>: benchmark tables and charts (report.json of each benchmark job, its PNG
// charts), and distill runs side by side (their summaries and validation curves overlaid).
import { api, artifactBlob, artifactJson, listAll } from "./api.js";
import { barChart, LineChart } from "./charts.js";
import { badge, clear, fmtNumber, h, toast } from "./dom.js";

// The benchmark metrics shown, in order, with which way is better.
const METRICS = [
  ["kl", "KL to reference", "low"], ["ppl", "perplexity", "low"], ["top1_agreement", "top-1 agreement", "high"],
  ["top5_agreement", "top-5 agreement", "high"], ["mcq_accuracy", "MCQ accuracy", "high"], ["pref_accuracy", "preference accuracy", "high"],
  ["pref_agreement", "preference agreement", "high"], ["prefill_tokens_per_second", "prefill tok/s", "high"],
  ["decode_tokens_per_second", "decode tok/s", "high"], ["peak_memory_bytes", "peak memory", "low"],
  ["parameters", "parameters", "low"], ["compression_ratio_params", "compression (params)", "high"],
];
const RUN_METRICS = ["val_kl", "val_reverse_kl", "val_ppl", "val_top1_agreement"];

export function renderResults(main, params) {
  const ids = (name) => (params.get(name) || "").split(",").map((s) => s.trim()).filter(Boolean);
  const selected = { bench: new Set(ids("bench")), runs: new Set(ids("runs")) };
  const benchPicker = h("div", { class: "checks", id: "bench-picker" }, h("span", { class: "muted" }, "loading…"));
  const runPicker = h("div", { class: "checks", id: "run-picker" }, h("span", { class: "muted" }, "loading…"));
  const benchOut = h("div", { id: "bench-results" });
  const runsOut = h("div", { id: "run-compare" });
  const charts = [];

  clear(main,
    h("section", { class: "panel" }, h("h1", {}, "Results & compare"),
      h("div", { class: "grid2" },
        h("div", {}, h("label", {}, "Benchmark jobs"), benchPicker),
        h("div", {}, h("label", {}, "Distill runs to compare"), runPicker))),
    h("section", { class: "panel" }, h("h2", {}, "Benchmarks"), benchOut),
    h("section", { class: "panel" }, h("h2", {}, "Runs side by side"), runsOut));

  function updateHash() {
    const q = new URLSearchParams();
    if (selected.bench.size) q.set("bench", [...selected.bench].join(","));
    if (selected.runs.size) q.set("runs", [...selected.runs].join(","));
    history.replaceState(null, "", `#/results${q.toString() ? "?" + q : ""}`);
  }

  function picker(el, jobs, set, redraw) {
    if (!jobs.length) return clear(el, h("span", { class: "muted" }, "none in this project yet"));
    clear(el, jobs.map((j) => h("label", {},
      h("input", { type: "checkbox", value: j.id, checked: set.has(j.id), onchange: (e) => {
        e.target.checked ? set.add(j.id) : set.delete(j.id);
        updateHash();
        redraw();
      } }),
      h("span", { class: "mono" }, j.id), badge(j.status), j.parent_id ? h("span", { class: "muted" }, `of ${j.parent_id}`) : null)));
  }

  (async () => {
    try {
      const [benches, runs] = await Promise.all([listAll("/v1/jobs", { kind: "benchmark" }, 200), listAll("/v1/jobs", { kind: "distill" }, 200)]);
      for (const id of selected.bench) if (!benches.some((j) => j.id === id)) benches.unshift({ id, status: "unknown" });
      for (const id of selected.runs) if (!runs.some((j) => j.id === id)) runs.unshift({ id, status: "unknown" });
      picker(benchPicker, benches, selected.bench, drawBench);
      picker(runPicker, runs, selected.runs, drawRuns);
      drawBench();
      drawRuns();
    } catch (e) { toast(e.message, true); }
  })();

  async function drawBench() {
    if (!selected.bench.size) return clear(benchOut, h("p", { class: "muted" }, "Pick one or more benchmark jobs above."));
    clear(benchOut, h("p", { class: "muted" }, "loading…"));
    const blocks = await Promise.all([...selected.bench].map(benchBlock));
    clear(benchOut, blocks);
  }

  async function benchBlock(id) {
    let job;
    try { job = await api(`/v1/jobs/${encodeURIComponent(id)}`); } catch (e) { return h("p", { class: "error" }, `${id}: ${e.message}`); }
    const title = h("h3", {}, h("a", { class: "mono", href: `#/jobs/${id}` }, id), " ", badge(job.status));
    const reportArtifact = job.artifacts.find((a) => a.name === "report.json");
    let candidates;
    if (reportArtifact) {
      try { candidates = (await artifactJson(reportArtifact.id)).candidates; } catch (e) { toast(`report of ${id}: ${e.message}`, true); }
    }
    if (!candidates && job.summary?.metrics) {
      candidates = Object.entries(job.summary.metrics).map(([label, metrics]) => ({ label, metrics, is_reference: label === job.summary.reference }));
    }
    if (!candidates) return h("div", { class: "bench", "data-job": id }, title, h("p", { class: "muted" }, job.status === "succeeded" ? "No results recorded." : "Results appear when the benchmark succeeds."));
    const shown = METRICS.filter(([k]) => candidates.some((c) => typeof c.metrics?.[k] === "number"));
    const best = Object.fromEntries(shown.map(([k, , dir]) => {
      const values = candidates.filter((c) => !c.is_reference && typeof c.metrics?.[k] === "number").map((c) => c.metrics[k]);
      return [k, values.length ? (dir === "low" ? Math.min(...values) : Math.max(...values)) : null];
    }));
    const table = h("div", { class: "scroll" }, h("table", { class: "bench-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "model"), shown.map(([, label, dir]) => h("th", { class: "num", title: dir === "low" ? "lower is better" : "higher is better" }, label)))),
      h("tbody", {}, candidates.map((c) => h("tr", {},
        h("td", {}, h("b", {}, c.label), c.is_reference ? h("span", { class: "muted" }, " (reference)") : null,
          c.model ? h("div", { class: "muted mono" }, c.model, c.adapter ? ` + ${c.adapter}` : "") : null),
        shown.map(([k]) => h("td", { class: "num", style: !c.is_reference && c.metrics?.[k] === best[k] ? "font-weight:700" : null },
          k === "peak_memory_bytes" && typeof c.metrics?.[k] === "number" ? `${(c.metrics[k] / 2 ** 20).toFixed(1)} MB` : fmtNumber(c.metrics?.[k], 4))))))));
    const chartRow = h("div", { class: "grid4" });
    const block = h("div", { class: "bench", "data-job": id, style: "margin-bottom:18px" }, title, table, chartRow);
    const labels = candidates.map((c) => c.label);
    requestAnimationFrame(() => {
      for (const [k, label] of shown.filter(([k]) => ["kl", "ppl", "top1_agreement", "mcq_accuracy", "pref_accuracy", "decode_tokens_per_second"].includes(k)).slice(0, 4)) {
        const el = h("div", { class: "chart" });
        chartRow.append(el);
        barChart(el, label, labels, candidates.map((c) => c.metrics?.[k]));
      }
    });
    const pngs = job.artifacts.filter((a) => a.name.endsWith(".png"));
    if (pngs.length) {
      const gallery = h("details", {}, h("summary", {}, `Report charts (${pngs.length} PNG)`));
      const box = h("div", { class: "pngs" });
      gallery.append(box);
      gallery.addEventListener("toggle", async () => {
        if (!gallery.open || box.childElementCount) return;
        for (const a of pngs) {
          try { box.append(h("img", { alt: a.name, title: a.name, src: URL.createObjectURL(await artifactBlob(a.id)) })); } catch (e) { toast(e.message, true); }
        }
      });
      block.append(gallery);
    }
    return block;
  }

  async function drawRuns() {
    charts.splice(0).forEach((c) => c.destroy());
    if (!selected.runs.size) return clear(runsOut, h("p", { class: "muted" }, "Pick one or more distill runs above."));
    clear(runsOut, h("p", { class: "muted" }, "loading…"));
    const runs = await Promise.all([...selected.runs].map(async (id) => {
      try {
        const [job, metrics] = await Promise.all([api(`/v1/jobs/${encodeURIComponent(id)}`), api(`/v1/jobs/${encodeURIComponent(id)}/metrics`)]);
        return { id, job, metrics: metrics.data };
      } catch (e) { return { id, error: e.message }; }
    }));
    const ok = runs.filter((r) => !r.error);
    const cell = (v) => h("td", { class: "num" }, fmtNumber(v, 4));
    const table = h("div", { class: "scroll" }, h("table", { id: "runs-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "run"), h("th", {}, "status"), h("th", {}, "student"), h("th", {}, "teachers"),
        RUN_METRICS.map((m) => h("th", { class: "num" }, `${m} start → final`)), h("th", { class: "num" }, "best step"), h("th", { class: "num" }, "steps"), h("th", { class: "num" }, "tokens/s"))),
      h("tbody", {}, runs.map((r) => r.error ? h("tr", {}, h("td", { class: "mono" }, r.id), h("td", { colspan: 10, class: "error" }, r.error)) : (() => {
        const s = r.job.summary || {};
        return h("tr", { "data-job": r.id },
          h("td", {}, h("a", { class: "mono", href: `#/jobs/${r.id}` }, r.id)), h("td", {}, badge(r.job.status)),
          h("td", { class: "mono" }, String(r.job.spec?.student?.model ?? "")), h("td", { class: "mono" }, (r.job.spec?.teachers || []).map((t) => t.model).join(", ")),
          RUN_METRICS.map((m) => h("td", { class: "num" }, s.initial?.[m] === undefined && s.final?.[m] === undefined ? "–" : `${fmtNumber(s.initial?.[m], 4)} → ${fmtNumber(s.final?.[m], 4)}`)),
          cell(s.best?.step), cell(s.train?.steps ?? r.job.progress?.step), cell(s.train?.tokens_per_second));
      })()))));
    const valEl = h("div", { class: "chart", id: "compare-val" });
    const lossEl = h("div", { class: "chart", id: "compare-loss" });
    clear(runsOut, table, h("div", { class: "grid2", style: "margin-top:12px" }, valEl, lossEl));
    const series = (kind, name) => Object.fromEntries(ok.map((r) => [r.id, r.metrics.filter((m) => m.kind === kind && m.name === name).map((m) => [m.step, m.value])]));
    const val = new LineChart(valEl, { title: "Validation KL by run", empty: "no evaluations" });
    const loss = new LineChart(lossEl, { title: "Training loss by run", log: true });
    charts.push(val, loss);
    val.setSeries(series("eval", "val_kl"));
    loss.setSeries(series("train", "loss"));
  }

  return () => charts.forEach((c) => c.destroy());
}
