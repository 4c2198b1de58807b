// The API client of the dashboard: every call carries the API key the user entered (kept in localStorage) and
// only ever goes to this server's /v1. Problems (RFC 9457) become ApiError with their field errors.

const KEY = "distillery.apiKey";

export const getKey = () => localStorage.getItem(KEY) || "";
export const setKey = (key) => localStorage.setItem(KEY, key.trim());
export const clearKey = () => localStorage.removeItem(KEY);

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || problem?.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
    this.errors = Array.isArray(problem?.errors) ? problem.errors : [];
  }
}

function randomId() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16)); // randomUUID needs a secure context; this does not
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function headers(extra = {}) {
  return { Authorization: `Bearer ${getKey()}`, ...extra };
}

async function failure(response) {
  let problem = null;
  try { problem = await response.json(); } catch { /* not JSON */ }
  const error = new ApiError(response.status, problem);
  if (response.status === 401) window.dispatchEvent(new CustomEvent("distillery:unauthorized", { detail: error }));
  return error;
}

export async function api(path, { method = "GET", body, query, signal } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query || {})) if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  const extra = {};
  if (body !== undefined) extra["Content-Type"] = "application/json";
  if (method === "POST") extra["Idempotency-Key"] = randomId();
  const response = await fetch(url, {
    method, signal, headers: headers(extra), body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? null : response.json();
}

// Every page of a list (at most `max` items).
export async function listAll(path, query = {}, max = 500) {
  const items = [];
  let after;
  for (;;) {
    const page = await api(path, { query: { ...query, limit: 100, after } });
    items.push(...page.data);
    if (!page.has_more || !page.data.length || items.length >= max) return items;
    after = page.data[page.data.length - 1].id;
  }
}

export async function artifactBlob(artifactId) {
  const response = await fetch(`/v1/artifacts/${encodeURIComponent(artifactId)}/content`, { headers: headers() });
  if (!response.ok) throw await failure(response);
  return response.blob();
}

export async function artifactJson(artifactId) {
  return JSON.parse(await (await artifactBlob(artifactId)).text());
}

// Save an artifact: the download needs the key in a header, so it is fetched and handed over as a blob.
export async function downloadArtifact(artifact) {
  const blob = await artifactBlob(artifact.id);
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = artifact.name.split("/").pop() || "artifact";
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 30000);
}

// A job's server-sent events, read with fetch (EventSource cannot send the Authorization header). Calls
// onMessage({event, id, data}) for each; reconnects after a dropped connection from the last id; resolves when
// the server ends the stream (the job finished) or `signal` aborts.
export async function streamEvents(jobId, after, onMessage, signal, onState = () => {}) {
  let last = after || 0;
  let delay = 1000;
  while (!signal.aborted) {
    try {
      const response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events/stream?after=${last}`, {
        headers: headers({ Accept: "text/event-stream" }), signal,
      });
      if (response.status === 429) {
        const wait = Number(response.headers.get("Retry-After") || 5) * 1000;
        onState(false);
        await sleep(wait, signal);
        continue;
      }
      if (!response.ok) throw await failure(response);
      onState(true);
      delay = 1000;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) { onState(false); return; }
        buffer += value;
        let cut;
        while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
          const message = parseBlock(block);
          if (!message) continue;
          if (message.id !== undefined) last = Number(message.id);
          onMessage(message);
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError && error.status < 500 && error.status !== 429) { onState(false); throw error; }
      onState(false);
      await sleep(delay, signal);
      delay = Math.min(delay * 2, 15000);
    }
  }
}

function parseBlock(block) {
  const message = { event: "message", data: "" };
  let any = false;
  for (const line of block.split(/\r?\n/)) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "data") { message.data += (message.data ? "\n" : "") + value; any = true; }
    else if (field === "event") message.event = value;
    else if (field === "id") message.id = value;
  }
  if (!any) return null;
  try { message.data = JSON.parse(message.data); } catch { /* leave as text */ }
  return message;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}
