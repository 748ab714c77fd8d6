// The page of `magicanimate-rt serve`: no framework, no build step, no CDN.
// Progress comes from the job's event stream (read with fetch, so an API key can go in a
// header, which EventSource cannot send).
"use strict";

const $ = (id) => document.getElementById(id);
let current = null;      // id of the job this page follows
let follow = null;       // AbortController of its event stream
let examples = {};       // example name -> url
let shown = null;        // id of the job whose videos are on the page

function apiKey() { return $("api-key").value.trim() || sessionStorage.getItem("magicanimate-key") || ""; }
function headers() { const k = apiKey(); return k ? { Authorization: "Bearer " + k } : {}; }

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { const body = await response.json(); if (body.error) message = body.error.message; } catch (e) { /* not JSON */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function seconds(s) {
  if (s == null || !isFinite(s)) return "";
  s = Math.round(s);
  return s >= 60 ? Math.floor(s / 60) + " min " + (s % 60) + " s" : s + " s";
}

// ---------------------------------------------------------------- server state and examples
async function checkServer() {
  const pill = $("server-state");
  try {
    const r = await fetch("/readyz", { headers: headers() });
    const body = await r.json();
    pill.textContent = r.ok ? "ready: " + body.workers.length + " worker(s)" : (body.error ? body.error.message : "not ready");
    pill.className = "pill " + (r.ok ? "ready" : "down");
  } catch (e) {
    pill.textContent = "server unreachable";
    pill.className = "pill down";
  }
}

async function loadExamples() {
  try {
    const body = await (await api("/v1/examples")).json();
    for (const [kind, select] of [["sources", $("source-example")], ["drivings", $("driving-example")]]) {
      for (const item of body[kind]) {
        examples[item.name] = item.url;
        const option = document.createElement("option");
        option.value = option.textContent = item.name;
        select.appendChild(option);
      }
    }
  } catch (e) { /* examples are optional */ }
}

let presets = [];         // [{name, steps, description}] of GET /v1/presets

async function loadPresets() {
  // the request's defaults and the presets, from the server (runtime/request.py): none restated here
  try {
    const body = await (await api("/v1/presets")).json();
    const d = body.defaults;
    $("width").value = d.width || d.size; $("height").value = d.height || d.size;
    $("guidance").value = d.guidance; $("seed").value = d.seed; $("fit").value = d.fit;
    presets = body.presets;
    for (const kind of body.driving_kinds || []) {
      const option = $("driving-kind").querySelector('option[value="' + kind.name + '"]');
      if (option) { option.disabled = !kind.enabled; option.title = kind.description; }
    }
    $("driving-kind").value = d.driving_kind;
    const select = $("preset");
    for (const p of presets) {
      const option = document.createElement("option");
      option.value = option.textContent = p.name;
      select.appendChild(option);
    }
    showPreset();
  } catch (e) { /* e.g. 401 before a key is given: the server's defaults apply */ }
}

function showPreset() {
  const p = presets.find((x) => x.name === $("preset").value);
  if (!p) return;
  $("steps").placeholder = p.steps;  // empty: the preset's steps
  $("preset-note").textContent = p.name + ": " + p.description;
}

async function chosenFile(input, select, what) {
  if (input.files.length) return [input.files[0], input.files[0].name];
  if (select.value) {
    const blob = await (await api(examples[select.value])).blob();
    return [blob, select.value];
  }
  throw new Error("choose a " + what + " (a file, or one of the examples)");
}

// ---------------------------------------------------------------- submitting and following
async function submit(event) {
  event.preventDefault();
  showError("");
  if ($("api-key").value.trim()) sessionStorage.setItem("magicanimate-key", $("api-key").value.trim());
  const button = $("start");
  button.disabled = true;
  try {
    const form = new FormData();
    const [source, sourceName] = await chosenFile($("source"), $("source-example"), "photo");
    const [driving, drivingName] = await chosenFile($("driving"), $("driving-example"), "motion video");
    form.append("source", source, sourceName);
    form.append("driving", driving, drivingName);
    const width = $("width").value, height = $("height").value;
    if (width === height) { if (width !== "") form.append("size", width); }
    else { form.append("width", width); form.append("height", height); }
    for (const [name, id] of [["preset", "preset"], ["steps", "steps"], ["guidance", "guidance"], ["seed", "seed"], ["max_frames", "max-frames"], ["fit", "fit"]]) {
      if ($(id).value !== "") form.append(name, $(id).value);
    }
    form.append("driving_kind", $("driving-kind").value);
    form.append("grid", "true");
    const body = await (await api("/v1/animations", { method: "POST", body: form })).json();
    watch(body.id);
  } catch (e) {
    showError(e.message);
  } finally {
    button.disabled = false;
    refreshRecent();
  }
}

function watch(id) {
  if (follow) follow.abort();
  current = id;
  $("job").hidden = false;
  $("results").hidden = true;
  shown = null;
  $("job-id").textContent = id;
  $("cancel").disabled = false;
  follow = new AbortController();
  readEvents(id, follow.signal).catch((e) => { if (e.name !== "AbortError") poll(id); });
}

async function readEvents(id, signal) {
  const response = await api("/v1/animations/" + id + "/events", { signal });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
      if (block.startsWith("event: status") && data) show(JSON.parse(data));
    }
  }
  // the stream ended: one last look (the server may have shut down mid-job)
  show(await (await api("/v1/animations/" + id)).json());
}

async function poll(id) {
  while (current === id) {
    try {
      const st = await (await api("/v1/animations/" + id)).json();
      show(st);
      if (["succeeded", "failed", "cancelled"].includes(st.status)) return;
    } catch (e) { showError(e.message); return; }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

function show(st) {
  if (st.id !== current) return;
  const pill = $("job-status");
  pill.textContent = st.status;
  pill.className = "pill " + st.status;
  const p = st.progress || {};
  const bar = $("progress");
  let text = "";
  if (st.status === "queued") {
    bar.removeAttribute("value");
    text = "waiting in the queue" + (st.queue_position ? " (position " + st.queue_position + ")" : "");
  } else {
    const steps = p.steps || 1;
    const decode = p.frames ? (p.frames_done || 0) / p.frames : 0;
    // a person video's job first makes its DensePose clip: the first 30% of the bar
    const dp = p.densepose, prep = dp ? 0.3 : 0;
    const made = !dp ? 0 : p.stage !== "densepose" ? 1 : dp.frames ? Math.min(1, dp.frames_done / dp.frames) : 0;
    bar.max = 1;
    bar.value = st.status === "succeeded" ? 1
      : Math.min(1, prep * made + (1 - prep) * (0.9 * (p.step || 0) / steps + 0.1 * decode));
    text = (p.stage || st.status) + (p.steps ? ": step " + (p.step || 0) + " of " + p.steps : "");
    if (p.stage === "densepose") {
      text = "densepose: " + dp.frames_done + (dp.frames ? " of about " + dp.frames : "") + " frames of the motion made";
    }
    if (p.stage === "decoding" && p.frames) text += ", " + (p.frames_done || 0) + " of " + p.frames + " frames decoded";
    if (st.status === "running" && p.eta_s) text += " — about " + seconds(p.eta_s) + " left";
    if (p.cancelling) text += " (cancelling at the next step)";
  }
  if (st.status === "succeeded") text = "done in " + seconds(st.timings && st.timings.run);
  if (st.error) text = st.status + ": " + st.error.message;
  $("progress-text").textContent = text;
  if (["succeeded", "failed", "cancelled"].includes(st.status)) {
    $("cancel").disabled = true;
    if (st.status === "failed") showError(st.error ? st.error.message : "the job failed");
    if (st.status === "succeeded") showResult(st);
    refreshRecent();
  }
}

async function source(url) {
  // without a key the browser streams (and seeks in) the video itself; with one it must
  // fetch it with the header first
  if (!apiKey()) return url;
  return URL.createObjectURL(await (await api(url)).blob());
}

async function showResult(st) {
  if (shown === st.id) return;  // the stream's last event and the final look both land here
  shown = st.id;
  $("results").hidden = false;
  const video = await source(st.video_url);
  $("result-video").src = video;
  $("video-link").href = video;
  $("video-link").download = st.id + ".mp4";
  $("grid-figure").hidden = !st.grid_url;
  if (st.grid_url) {
    const grid = await source(st.grid_url);
    $("grid-video").src = grid;
    $("grid-link").href = grid;
    $("grid-link").download = st.id + "-grid.mp4";
  }
}

async function cancel() {
  if (!current) return;
  try {
    await api("/v1/animations/" + current, { method: "DELETE" });
  } catch (e) { showError(e.message); }
}

// ---------------------------------------------------------------- recent jobs
async function refreshRecent() {
  try {
    const body = await (await api("/v1/animations?limit=20")).json();
    const rows = body.animations.map((st) => {
      const tr = document.createElement("tr");
      const s = st.settings || {};
      const cells = [new Date(st.created).toLocaleString(), st.id, st.status, s.width + "x" + s.height, s.steps,
                     [st.source || st.reference_id, st.driving].filter(Boolean).join(" + ")];
      cells.forEach((c, i) => {
        const td = document.createElement("td");
        if (i === 1) { const code = document.createElement("code"); code.textContent = c; td.appendChild(code); }
        else td.textContent = c == null ? "" : c;
        tr.appendChild(td);
      });
      const td = document.createElement("td");
      const open = document.createElement("button");
      open.type = "button"; open.className = "small"; open.textContent = "show";
      open.onclick = () => watch(st.id);
      td.appendChild(open);
      tr.appendChild(td);
      return tr;
    });
    $("recent").querySelector("tbody").replaceChildren(...rows);
  } catch (e) { /* e.g. 401 before a key is given */ }
}

$("job-form").addEventListener("submit", submit);
$("cancel").addEventListener("click", cancel);
$("refresh").addEventListener("click", refreshRecent);
$("source").addEventListener("change", () => {
  const f = $("source").files[0];
  $("source-preview").hidden = !f;
  if (f) $("source-preview").src = URL.createObjectURL(f);
});
$("preset").addEventListener("change", showPreset);
checkServer();
loadPresets();
loadExamples();
refreshRecent();
setInterval(checkServer, 10000);
