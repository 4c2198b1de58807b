// #/new: submit a job. For distillation a form (student, teachers, datasets, preset, steps, evaluation) builds
// the body; the other kinds start from a template. The body is shown as JSON, can be edited, and the server's
// estimate (teacher caches reused or built, tokens, memory, time) is shown before submitting.
import { api, ApiError, listAll } from "./api.js";
import { clear, fmtBytes, fmtDuration, fmtNumber, h, toast } from "./dom.js";

export function renderNew(main) {
  let models = [], datasets = [];
  let edited = false;
  let estimateTimer = null;
  let stopped = false;
  const el = {};
  const body = h("textarea", { id: "job-body", rows: 16, spellcheck: "false", oninput: () => { edited = true; scheduleEstimate(); } });
  const errors = h("ul", { class: "errors", id: "submit-errors" });
  const estimate = h("div", { id: "estimate" }, h("p", { class: "muted" }, "Fill in the form to see an estimate."));
  const form = h("div", { id: "new-form" });

  clear(main,
    h("section", { class: "panel" }, h("h1", {}, "New job"),
      h("div", { class: "filters" }, h("div", {}, h("label", { for: "job-kind" }, "Kind"),
        el.kind = h("select", { id: "job-kind", onchange: () => { edited = false; drawForm(); } },
          ["distill", "teacher_cache", "benchmark", "generate"].map((k) => h("option", { value: k }, k))))),
      form),
    h("div", { class: "row" },
      h("section", { class: "panel grow" }, h("h2", {}, "Request body"),
        h("p", { class: "muted" }, "POST /v1/jobs. Edit it freely; the server checks it and names any wrong field."),
        body, errors,
        h("div", { class: "row" },
          h("button", { class: "primary", id: "submit-job", onclick: submit }, "Submit job"),
          h("button", { onclick: () => { edited = false; rebuild(); } }, "Reset from the form"))),
      h("section", { class: "panel estimate", style: "flex:0 0 380px" }, h("h2", {}, "Estimate"), estimate)));

  const option = (items, label) => items.map((x) => h("option", { value: x.id }, `${label(x)} (${x.id})`));
  const modelLabel = (m) => m.name;
  const dataLabel = (d) => `${d.name} · ${d.format} · ${d.records} records`;

  function field(label, input, hint) {
    return h("div", {}, h("label", { for: input.id }, label), input, hint ? h("div", { class: "muted", style: "font-size:12px" }, hint) : null);
  }

  function drawForm() {
    const kind = el.kind.value;
    if (!models.length || !datasets.length) {
      clear(form, h("p", { class: "muted", id: "need-inputs" }, `This project has ${models.length} model(s) and ${datasets.length} dataset(s). `,
        "Register models (", h("code", {}, "distillery models add PATH"), ") and upload datasets (", h("code", {}, "distillery datasets upload FILE"), ") first."));
    }
    if (kind === "distill") {
      const textSets = datasets.filter((d) => d.format !== "mcq" && d.format !== "preference");
      clear(form, h("div", { class: "form-grid" },
        field("Student", el.student = h("select", { id: "f-student", onchange: rebuild }, option(models, modelLabel))),
        field("Keep layers (optional)", el.keep = h("input", { id: "f-keep", placeholder: "e.g. 0,2,4,6", oninput: rebuild }), "prune the student to these layers"),
        field("Preset", el.preset = h("select", { id: "f-preset", onchange: rebuild },
          h("option", { value: "" }, "none (defaults)"), ["fast", "quality", "memory"].map((p) => h("option", { value: p }, p)))),
        h("div", {}, h("label", {}, "Teachers (weight)"), el.teachers = h("div", { class: "checks", id: "f-teachers" },
          models.map((m, i) => h("label", {}, h("input", { type: "checkbox", value: m.id, checked: i === 0, onchange: rebuild }),
            h("span", { style: "flex:1" }, `${m.name} (${m.id})`),
            h("input", { type: "number", value: "1", min: "0.01", step: "0.1", style: "width:64px", "data-weight": m.id, oninput: rebuild }))))),
        field("Teacher mode", el.mode = h("select", { id: "f-mode", onchange: rebuild }, ["offline", "online", "on_policy"].map((m) => h("option", { value: m }, m)))),
        field("Steps", el.steps = h("input", { id: "f-steps", type: "number", value: "100", min: "1", oninput: rebuild })),
        field("Training data", el.train = h("select", { id: "f-train", onchange: rebuild }, option(textSets, dataLabel))),
        field("Validation", el.valid = h("select", { id: "f-valid", onchange: rebuild },
          h("option", { value: "0.05" }, "5% of the training data"), h("option", { value: "0.1" }, "10% of the training data"), option(textSets, dataLabel))),
        field("Learning rate", el.lr = h("input", { id: "f-lr", value: "auto", oninput: rebuild }), "a number, or auto (a short search)"),
        field("Evaluate when done on", el.evaluate = h("select", { id: "f-evaluate", onchange: rebuild },
          h("option", { value: "" }, "no benchmark"), option(datasets.filter((d) => d.format === "text"), dataLabel)), "a benchmark child job against the teacher"),
      ));
    } else {
      clear(form, h("p", { class: "muted" }, kind === "teacher_cache"
        ? "A teacher cache: the teacher's top-k log-probabilities of a dataset, reused by every offline distillation on the same inputs."
        : kind === "generate" ? ["Each model's answer to one prompt. Edit the template below, or use the ", h("a", { href: "#/playground" }, "Playground"), "."]
        : "A benchmark: candidates scored against a reference model on held-out data. Edit the template below."));
    }
    rebuild();
  }

  function distillBody() {
    const teachers = [...el.teachers.querySelectorAll("input[type=checkbox]:checked")].map((c) => {
      const w = Number(el.teachers.querySelector(`[data-weight="${CSS.escape(c.value)}"]`)?.value || 1);
      return w === 1 ? { model: c.value } : { model: c.value, weight: w };
    });
    const student = { model: el.student.value };
    const keep = el.keep.value.trim();
    if (keep) student.keep_layers = keep.split(/[\s,]+/).filter(Boolean).map(Number);
    const valid = el.valid.value;
    const lr = el.lr.value.trim();
    const spec = {
      student, teachers, teacher_mode: el.mode.value,
      data: { train: el.train.value, valid: /^[0-9.]+$/.test(valid) ? Number(valid) : valid },
      training: { steps: Number(el.steps.value), ...(lr && lr !== "auto" ? { learning_rate: Number.isNaN(Number(lr)) ? lr : Number(lr) } : {}) },
    };
    if (el.preset.value) spec.preset = el.preset.value;
    if (el.evaluate.value) spec.evaluate = { data: { text: el.evaluate.value } };
    return { kind: "distill", spec };
  }

  function rebuild() {
    if (edited) return;
    const kind = el.kind.value;
    const m0 = models[0]?.id || "<model id>", m1 = models[1]?.id || m0, d0 = datasets[0]?.id || "<dataset id>";
    let value;
    if (kind === "distill") value = models.length && datasets.length ? distillBody() : { kind, spec: {} };
    else if (kind === "teacher_cache") value = { kind, spec: { teacher: m0, data: d0, top_k: 64, max_seq_len: 512 } };
    else if (kind === "generate") value = { kind, spec: { prompt: "Once upon a time", models: [{ label: "teacher", model: m0 }, { label: "student", model: m1 }], max_tokens: 64 } };
    else value = { kind, spec: { reference: m0, candidates: [{ label: "student", model: m1 }], data: { text: d0 } } };
    body.value = JSON.stringify(value, null, 2);
    scheduleEstimate();
  }

  function parsed() {
    try { return JSON.parse(body.value); } catch (e) { throw new Error(`the body is not JSON: ${e.message}`); }
  }

  function showErrors(e) {
    clear(errors, e instanceof ApiError && e.errors.length
      ? e.errors.map((x) => h("li", {}, x.field ? h("code", {}, x.field) : x.line ? `line ${x.line}` : "", x.field || x.line ? ": " : "", x.message))
      : h("li", {}, e.message));
  }

  async function submit() {
    clear(errors);
    let value;
    try { value = parsed(); } catch (e) { return showErrors(e); }
    const button = document.getElementById("submit-job");
    button.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", body: value });
      toast(`job ${job.id} created`);
      location.hash = `#/jobs/${job.id}`;
    } catch (e) { showErrors(e); } finally { button.disabled = false; }
  }

  function scheduleEstimate() {
    clearTimeout(estimateTimer);
    estimateTimer = setTimeout(runEstimate, 400);
  }

  async function runEstimate() {
    let value;
    try { value = parsed(); } catch (e) { return clear(estimate, h("p", { class: "error" }, e.message)); }
    try {
      const est = await api("/v1/jobs/estimate", { method: "POST", body: value });
      if (!stopped) drawEstimate(est);
    } catch (e) {
      if (stopped) return;
      if (e instanceof ApiError && e.errors.length) clear(estimate, h("p", { class: "muted" }, "Not a valid job yet:"),
        h("ul", { class: "errors" }, e.errors.slice(0, 6).map((x) => h("li", {}, x.field ? h("code", {}, x.field) : "", " ", x.message))));
      else clear(estimate, h("p", { class: "muted" }, `No estimate: ${e.message}`));
    }
  }

  function drawEstimate(est) {
    const caches = est.teacher_caches || [];
    clear(estimate,
      h("dl", { class: "kv" },
        h("dt", {}, "tokens"), h("dd", { id: "est-tokens" }, est.tokens === null || est.tokens === undefined ? "–" : fmtNumber(est.tokens)),
        h("dt", {}, "memory"), h("dd", { id: "est-memory" }, est.memory_bytes ? `≈ ${fmtBytes(est.memory_bytes)}` : "–"),
        h("dt", {}, "time"), h("dd", { id: "est-time" }, est.seconds ? `≈ ${fmtDuration(est.seconds)}` : "–")),
      (est.notes || []).map((n) => h("p", { class: "muted", style: "font-size:12px" }, n)),
      caches.length ? [h("h3", { style: "margin-top:10px" }, "Teacher caches"), h("table", { id: "est-caches" },
        h("tbody", {}, caches.map((c) => h("tr", {},
          h("td", { class: "mono" }, `${c.teacher} × ${c.dataset}`),
          h("td", {}, c.job_id ? ["reuses ", h("a", { class: "mono", href: `#/jobs/${c.job_id}` }, c.job_id), ` (${c.status})`] : "built first"))))),
      ] : null);
  }

  (async () => {
    try {
      [models, datasets] = await Promise.all([listAll("/v1/models"), listAll("/v1/datasets")]);
      if (!stopped) drawForm();
    } catch (e) { toast(e.message, true); }
  })();
  return () => { stopped = true; clearTimeout(estimateTimer); };
}
