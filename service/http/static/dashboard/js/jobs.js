// #/jobs: the project's jobs, newest first, refreshed every few seconds; filters by status, kind and parent.
import { api } from "./api.js";
import { badge, clear, fmtDuration, fmtNumber, fmtTime, h, progressBar } from "./dom.js";

const STATUSES = ["queued", "running", "cancel_requested", "succeeded", "failed", "cancelled"];
const KINDS = ["distill", "teacher_cache", "benchmark", "generate"];
const REFRESH_MS = 3000;

export function headline(job) {
  const s = job.summary || {};
  if (job.kind === "distill") {
    const kl = s.final?.val_kl ?? s.val_kl ?? s.final?.val_reverse_kl ?? s.val_reverse_kl;
    return kl === undefined ? "" : `val KL ${fmtNumber(kl, 4)}`;
  }
  if (job.kind === "benchmark" && s.metrics) return `${Object.keys(s.metrics).length} models scored`;
  if (job.kind === "generate" && s.answers) return `${s.answers.length} answers`;
  if (job.kind === "teacher_cache" && s.size_bytes) return `${fmtNumber(s.tokens ?? s.records ?? "")} cached`;
  return "";
}

export function renderJobs(main, params) {
  const filters = { status: params.get("status") || "", kind: params.get("kind") || "", parent_id: params.get("parent_id") || "" };
  let pages = 1;
  const body = h("tbody", { id: "jobs-body" });
  const more = h("button", { id: "jobs-more", hidden: true, onclick: () => { pages++; refresh(); } }, "Load more");
  const live = h("span", { class: "live off", title: "refreshing" });
  const note = h("span", { class: "muted", id: "jobs-note" });

  const select = (name, values) => h("select", { id: `filter-${name}`, onchange: (e) => setFilter(name, e.target.value) },
    h("option", { value: "" }, "any"), values.map((v) => h("option", { value: v, selected: filters[name] === v }, v.replace("_", " "))));
  function setFilter(name, value) {
    filters[name] = value;
    const q = new URLSearchParams(Object.entries(filters).filter(([, v]) => v));
    history.replaceState(null, "", `#/jobs${q.toString() ? "?" + q : ""}`);
    pages = 1;
    refresh();
  }

  clear(main, h("section", { class: "panel" },
    h("div", { class: "row", style: "justify-content:space-between;align-items:center" },
      h("h1", {}, live, "Jobs"), h("a", { class: "button", href: "#/new" }, "New job")),
    h("div", { class: "filters" },
      h("div", {}, h("label", { for: "filter-status" }, "Status"), select("status", STATUSES)),
      h("div", {}, h("label", { for: "filter-kind" }, "Kind"), select("kind", KINDS)),
      h("div", {}, h("label", { for: "filter-parent_id" }, "Parent job"),
        h("input", { id: "filter-parent_id", value: filters.parent_id, placeholder: "job id", size: 28,
          onchange: (e) => setFilter("parent_id", e.target.value.trim()) })),
      note),
    h("div", { class: "scroll" }, h("table", { id: "jobs-table" },
      h("thead", {}, h("tr", {}, ["Job", "Kind", "Status", "Progress", "ETA", "Parent", "Children", "Result", "Created"].map((t) => h("th", {}, t)))),
      body)),
    more,
  ));

  let timer = null;
  let stopped = false;
  async function refresh() {
    clearTimeout(timer);
    try {
      const jobs = [];
      let after;
      let hasMore = false;
      for (let i = 0; i < pages; i++) {
        const page = await api("/v1/jobs", { query: { ...filters, limit: 50, after } });
        jobs.push(...page.data);
        hasMore = page.has_more;
        if (!hasMore) break;
        after = page.data[page.data.length - 1].id;
      }
      if (stopped) return;
      draw(jobs);
      more.hidden = !hasMore;
      live.className = "live";
      note.textContent = `${jobs.length} job${jobs.length === 1 ? "" : "s"}${hasMore ? " (more below)" : ""} · refreshed ${new Date().toLocaleTimeString()}`;
    } catch (e) {
      live.className = "live off";
      note.textContent = `could not refresh: ${e.message}`;
    }
    if (!stopped) timer = setTimeout(refresh, document.hidden ? REFRESH_MS * 4 : REFRESH_MS);
  }

  function draw(jobs) {
    const children = new Map();
    for (const j of jobs) if (j.parent_id) children.set(j.parent_id, [...(children.get(j.parent_id) || []), j.id]);
    if (!jobs.length) {
      clear(body, h("tr", {}, h("td", { colspan: 9, class: "muted" }, "No jobs match. ", h("a", { href: "#/new" }, "Submit one."))));
      return;
    }
    clear(body, jobs.map((j) => {
      const p = j.progress || {};
      const kids = children.get(j.id) || [];
      return h("tr", { "data-job": j.id, "data-status": j.status },
        h("td", {}, h("a", { href: `#/jobs/${j.id}`, class: "mono" }, j.id)),
        h("td", {}, j.kind),
        h("td", {}, badge(j.status)),
        h("td", {}, p.total_steps ? [progressBar(p.fraction), " ", `${p.step}/${p.total_steps}`] : j.status === "succeeded" ? progressBar(1) : "–"),
        h("td", {}, j.status === "running" ? fmtDuration(p.eta_seconds) : "–"),
        h("td", {}, j.parent_id ? h("a", { href: `#/jobs/${j.parent_id}`, class: "mono" }, j.parent_id) : "–"),
        h("td", {}, kids.length ? kids.map((id) => h("div", {}, h("a", { href: `#/jobs/${id}`, class: "mono" }, id))) : "–"),
        h("td", {}, j.error ? h("span", { class: "error", title: j.error.message || "" }, j.error.code || "error") : headline(j)),
        h("td", { class: "muted" }, fmtTime(j.created_at)));
    }));
  }

  refresh();
  return () => { stopped = true; clearTimeout(timer); };
}
