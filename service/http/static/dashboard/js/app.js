// The dashboard's entry point: the API key (entered once, kept in localStorage), the hash router and the
// navigation. Pages: #/jobs (live list), #/jobs/<id> (a job), #/new (submit), #/results (benchmarks, compare),
// #/playground (one prompt, answers side by side).
import { api, ApiError, clearKey, getKey, setKey } from "./api.js";
import { clear, h } from "./dom.js";
import { renderJobs } from "./jobs.js";
import { renderJob } from "./job.js";
import { renderNew } from "./new.js";
import { renderPlayground } from "./playground.js";
import { renderResults } from "./results.js";

const main = document.getElementById("main");
let cleanup = null;

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query = ""] = raw.split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(query) };
}

function renderWhoami() {
  const el = document.getElementById("whoami");
  const key = getKey();
  if (!key) return clear(el);
  const shown = key.split("_").slice(0, 2).join("_") + "_…";
  clear(el, h("span", { class: "mono", title: "the API key this page uses" }, shown),
    h("button", { id: "logout", onclick: () => { clearKey(); route(); } }, "Forget key"));
}

function renderLogin(message) {
  clear(main, h("section", { class: "panel intro", id: "login" },
    h("h1", {}, "Distillery dashboard"),
    h("p", {}, "Follow distillation jobs live (loss, validation KL, learning rate, teacher weights, events and samples), ",
      "download their checkpoints and artifacts, compare benchmark results side by side, and submit new jobs."),
    h("p", { class: "muted" }, "Enter an API key of your project (", h("code", {}, "distillery-server keys create --project NAME"),
      " prints one). It is kept in this browser only and sent to this server alone; every page shows only your project's jobs."),
    h("form", { id: "login-form", onsubmit: login },
      h("label", { for: "api-key" }, "API key"),
      h("div", { class: "row" },
        h("input", { id: "api-key", name: "key", type: "password", autocomplete: "off", placeholder: "dst_…", style: "flex:1;min-width:280px" }),
        h("button", { class: "primary", type: "submit", id: "login-button" }, "Use this key")),
      h("p", { class: "error", id: "login-error" }, message || "")),
  ));
  document.getElementById("api-key").focus();
}

async function login(event) {
  event.preventDefault();
  const key = document.getElementById("api-key").value.trim();
  const error = document.getElementById("login-error");
  if (!/^dst_[^_]+_.+/.test(key)) { error.textContent = "An API key reads dst_<prefix>_<secret>."; return; }
  setKey(key);
  try {
    await api("/v1/jobs", { query: { limit: 1 } });
  } catch (e) {
    clearKey();
    error.textContent = e instanceof ApiError ? `Refused: ${e.message}` : `The server did not answer: ${e.message}`;
    return;
  }
  if (!location.hash || location.hash === "#/" || location.hash === "#/login") location.hash = "#/jobs";
  else route();
}

function route() {
  cleanup?.();
  cleanup = null;
  renderWhoami();
  const { parts, params } = parseHash();
  const page = parts[0] || "jobs";
  for (const a of document.querySelectorAll("#nav a[data-page]")) a.classList.toggle("active", a.dataset.page === page);
  if (!getKey()) return renderLogin();
  const views = {
    jobs: () => (parts[1] ? renderJob(main, parts[1], params) : renderJobs(main, params)),
    new: () => renderNew(main, params),
    results: () => renderResults(main, params),
    playground: () => renderPlayground(main, params),
  };
  const view = views[page];
  if (!view) {
    clear(main, h("section", { class: "panel" }, h("h1", {}, "No such page"), h("a", { href: "#/jobs" }, "Back to the jobs")));
    return;
  }
  cleanup = view() || null;
}

window.addEventListener("distillery:unauthorized", () => {
  clearKey();
  cleanup?.();
  cleanup = null;
  renderWhoami();
  renderLogin("The server refused this API key (unknown or revoked). Enter another.");
});
window.addEventListener("hashchange", route);
route();
