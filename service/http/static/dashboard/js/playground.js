// #/playground: one prompt, each model's answer side by side. The models are filled in from a distill job (its
// first teacher, its student before training, the distilled student) or picked by hand; the page submits a
// `generate` job, follows it (#/playground?job=<id>) and shows the answers. Answers go in as text, never HTML.
import { api, ApiError, listAll } from "./api.js";
import { badge, clear, fmtNumber, h, progressBar, toast } from "./dom.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 1000;

// The answers of a generate job's summary as cards, in the spec's order (also used by the job page).
export function answerCards(answers) {
  return h("div", { class: "answers", id: "pg-answer-cards" }, (answers || []).map((a) => h("div", { class: "answer", dataset: { label: a.label } },
    h("h3", {}, a.label),
    h("div", { class: "muted answer-meta" },
      `${fmtNumber(a.tokens)} tokens · ${fmtNumber(a.seconds, 2)} s · ${fmtNumber(a.tokens_per_second, 1)} tokens/s`,
      a.finish_reason === "length" ? " · cut at max_tokens" : ""),
    h("pre", { class: "answer-text" }, a.text || ""),
    h("div", { class: "muted answer-meta mono" }, describe(a)))));
}

function describe(c) {
  if (c.student_of) return `student of ${c.student_of} (before training)`;
  if (c.adapter) return `${c.model && !c.model.startsWith("student of") ? c.model : "its student"} + adapter of ${c.adapter}`;
  return c.model || "";
}

export function renderPlayground(main, params) {
  let models = [], distills = [];
  let stopped = false, pollTimer = null;
  const el = {};
  const rows = h("div", { id: "pg-models", class: "pg-models" });
  const errors = h("ul", { class: "errors", id: "pg-errors" });
  const result = h("section", { class: "panel", id: "pg-result" }, h("h2", {}, "Answers"),
    h("p", { class: "muted" }, "Submit a prompt to see each model's answer here."));

  clear(main,
    h("section", { class: "panel" }, h("h1", {}, "Playground"),
      h("p", { class: "muted" }, "One prompt; the teacher, the student before training and the distilled student (or any models) ",
        "answer it side by side, one at a time on a worker (a ", h("code", {}, "generate"), " job). Greedy by default: a rerun writes the same text."),
      h("label", { for: "pg-prompt" }, "Prompt"),
      el.prompt = h("textarea", { id: "pg-prompt", rows: 5, spellcheck: "false", placeholder: "Once upon a time" }),
      h("label", { class: "inline" }, el.chat = h("input", { type: "checkbox", id: "pg-chat" }),
        " as a chat message (rendered with each model's chat template)"),
      h("div", { class: "form-grid pg-grid" },
        h("div", {}, h("label", { for: "pg-distill" }, "Fill in from a distill job"),
          el.distill = h("select", { id: "pg-distill", onchange: () => fillFromJob(el.distill.value) }, h("option", { value: "" }, "—"))),
        h("div", {}, h("label", { for: "pg-max-tokens" }, "Max tokens"),
          el.maxTokens = h("input", { id: "pg-max-tokens", type: "number", value: "128", min: "1", max: "4096" })),
        h("div", {}, h("label", { for: "pg-temperature" }, "Temperature (0: greedy) · top p · seed"),
          h("div", { class: "row" },
            el.temperature = h("input", { id: "pg-temperature", type: "number", value: "0", min: "0", max: "10", step: "0.1", style: "width:80px" }),
            el.topP = h("input", { id: "pg-top-p", type: "number", value: "1", min: "0.01", max: "1", step: "0.05", style: "width:80px" }),
            el.seed = h("input", { id: "pg-seed", type: "number", value: "0", min: "0", style: "width:90px" })))),
      h("label", {}, "Models (at most 8)"), rows,
      h("div", { class: "row", style: "margin-top:8px" },
        h("button", { id: "pg-add", onclick: () => addRow({ label: `model ${rows.children.length + 1}` }) }, "Add a model"),
        h("button", { class: "primary", id: "pg-submit", onclick: submit }, "Generate")),
      errors),
    result);

  const option = (value, text, selected) => h("option", { value, selected: value === selected }, text);
  const modelOptions = (selected) => [option("", "— (the job's student)", selected),
    ...models.map((m) => option(m.id, `${m.name} (${m.id})`, selected)),
    ...(selected && !models.some((m) => m.id === selected) ? [option(selected, selected, selected)] : [])];
  const jobOptions = (selected) => [option("", "—", selected),
    ...distills.map((j) => option(j.id, `${j.id} (${j.status})`, selected)),
    ...(selected && !distills.some((j) => j.id === selected) ? [option(selected, selected, selected)] : [])];

  function addRow(c = {}) {
    if (rows.children.length >= 8) return toast("at most 8 models", true);
    const row = h("div", { class: "pg-row row" },
      h("input", { class: "pg-label", value: c.label || "", placeholder: "label", style: "width:150px" }),
      h("div", {}, h("span", { class: "muted" }, "model "), h("select", { class: "pg-model" }, modelOptions(c.model || ""))),
      h("div", {}, h("span", { class: "muted" }, "adapter of "), h("select", { class: "pg-adapter" }, jobOptions(c.adapter || ""))),
      h("div", {}, h("span", { class: "muted" }, "or student before "), h("select", { class: "pg-student-of" }, jobOptions(c.student_of || ""))),
      h("button", { class: "pg-remove", onclick: () => row.remove() }, "Remove"));
    rows.append(row);
  }

  function setRows(candidates) {
    clear(rows);
    for (const c of candidates) addRow(c);
  }

  function fillFromJob(jobId) {
    const job = distills.find((j) => j.id === jobId);
    if (!job) return;
    const teacher = job.spec?.teachers?.[0]?.model;
    setRows([
      ...(teacher ? [{ label: "teacher", model: teacher }] : []),
      { label: "student (before)", student_of: job.id },
      { label: "distilled", adapter: job.id },
    ]);
  }

  function candidates() {
    return [...rows.querySelectorAll(".pg-row")].map((row) => {
      const c = { label: row.querySelector(".pg-label").value.trim() };
      for (const [cls, key] of [[".pg-model", "model"], [".pg-adapter", "adapter"], [".pg-student-of", "student_of"]]) {
        const value = row.querySelector(cls).value;
        if (value) c[key] = value;
      }
      return c;
    });
  }

  function body() {
    const text = el.prompt.value;
    const number = (input) => (input.value.trim() === "" ? undefined : Number(input.value));
    const spec = {
      prompt: el.chat.checked ? [{ role: "user", content: text }] : text,
      models: candidates(),
      max_tokens: number(el.maxTokens),
      temperature: number(el.temperature),
      top_p: number(el.topP),
      seed: number(el.seed),
    };
    for (const k of Object.keys(spec)) if (spec[k] === undefined) delete spec[k];
    return { kind: "generate", spec };
  }

  function showErrors(e) {
    clear(errors, e instanceof ApiError && e.errors.length
      ? e.errors.map((x) => h("li", {}, x.field ? h("code", {}, x.field) : "", x.field ? ": " : "", x.message))
      : h("li", {}, e.message));
  }

  async function submit() {
    clear(errors);
    const button = document.getElementById("pg-submit");
    button.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", body: body() });
      toast(`generate job ${job.id} created`);
      location.hash = `#/playground?job=${encodeURIComponent(job.id)}`;
    } catch (e) { showErrors(e); } finally { button.disabled = false; }
  }

  function drawJob(job) {
    const p = job.progress || {};
    const waiting = (job.waiting_on || []).map((w) => h("li", {}, `waiting for ${w.kind} job `,
      h("a", { class: "mono", href: `#/jobs/${w.id}` }, w.id), ` (${w.status}${w.fraction != null ? ` ${Math.round(w.fraction * 100)}%` : ""})`));
    const answers = job.summary?.answers || [];
    clear(result,
      h("div", { class: "row", style: "justify-content:space-between;align-items:center" },
        h("h2", {}, "Answers · ", h("a", { class: "mono", href: `#/jobs/${job.id}` }, job.id), " ", badge(job.status)),
        h("span", { id: "pg-progress", class: "muted" }, p.total_steps ? `${p.step} / ${p.total_steps} models` : job.status)),
      TERMINAL.has(job.status) ? null : progressBar(p.fraction, true),
      waiting.length ? h("ul", { class: "muted" }, waiting) : null,
      job.error ? h("p", { class: "error", id: "pg-job-error" }, `${job.error.code}: ${job.error.message}`) : null,
      answers.length ? answerCards(answers) : null,
      answers.length && job.summary.wall_seconds ? h("p", { class: "muted" }, `all answers in ${fmtNumber(job.summary.wall_seconds, 2)} s, models loaded one at a time`) : null);
  }

  async function follow(jobId, fill) {
    let job;
    try {
      job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
    } catch (e) {
      if (!stopped) clear(result, h("h2", {}, "Answers"), h("p", { class: "error", id: "pg-job-error" }, e.message));
      return;
    }
    if (stopped) return;
    if (fill && job.kind === "generate") {
      const prompt = job.spec.prompt;
      const chat = Array.isArray(prompt);
      el.chat.checked = chat;
      el.prompt.value = chat ? prompt.filter((m) => m.role === "user").map((m) => m.content).join("\n\n") : prompt;
      el.maxTokens.value = job.spec.max_tokens;
      el.temperature.value = job.spec.temperature;
      el.topP.value = job.spec.top_p;
      el.seed.value = job.spec.seed;
      setRows(job.spec.models);
    }
    drawJob(job);
    if (!TERMINAL.has(job.status)) pollTimer = setTimeout(() => follow(jobId, false), POLL_MS);
  }

  (async () => {
    try {
      [models, distills] = await Promise.all([listAll("/v1/models"), listAll("/v1/jobs", { kind: "distill" }, 200)]);
    } catch (e) { return toast(e.message, true); }
    if (stopped) return;
    distills = distills.filter((j) => j.status !== "failed" && j.status !== "cancelled");
    el.distill.append(...distills.map((j) => h("option", { value: j.id },
      `${j.id} · ${j.status} · student ${j.spec?.student?.model || "?"}`)));
    const jobId = params.get("job");
    if (jobId) return follow(jobId, true);
    const from = params.get("distill") || distills.find((j) => j.status === "succeeded")?.id;
    if (from && distills.some((j) => j.id === from)) { el.distill.value = from; fillFromJob(from); }
    else addRow({ label: "model 1", model: models[0]?.id || "" });
  })();
  return () => { stopped = true; clearTimeout(pollTimer); };
}
