// Kiln's dashboard: a single page over /api/v2, updated live from /api/v2/events.
// No framework and no build step, so that it is served from the binary and works with
// no internet access.
"use strict";

const API = "/api/v2";
const RESULTS = ["SUCCESS", "WARNINGS", "FAILURE", "SKIPPED", "EXCEPTION", "RETRY", "CANCELLED"];
const LEVELS = ["debug", "info", "warning", "error", "critical"];

const view = document.getElementById("view");
const tokenInput = document.getElementById("token");
tokenInput.value = localStorage.getItem("kiln-token") || "";
tokenInput.addEventListener("change", () => localStorage.setItem("kiln-token", tokenInput.value));

// ---- helpers ----

function esc(text) {
  return String(text ?? "").replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

async function get(path) {
  const response = await fetch(API + path, { headers: authHeaders() });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function authHeaders() {
  const token = tokenInput.value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

async function post(path, body) {
  const response = await fetch(API + path, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders() },
    body: JSON.stringify(body),
  });
  const reply = await response.json().catch(() => ({}));
  // A refused JSON-RPC call answers with an error object; other writes with a string.
  const error = reply.error && (reply.error.message || reply.error);
  if (!response.ok) throw new Error(error || response.statusText);
  return reply;
}

async function rpc(path, method, params = {}) {
  return post(path, { jsonrpc: "2.0", method, params, id: Date.now() });
}

// Downloads through fetch, so that the token goes along when reads are private.
async function download(path, name) {
  try {
    const token = tokenInput.value.trim();
    const response = await fetch(API + path, { headers: token ? { Authorization: `Bearer ${token}` } : {} });
    if (!response.ok) throw new Error(response.statusText);
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = name;
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  } catch (e) {
    flash(`download failed: ${e.message}`);
  }
}

function flash(message, ok = false) {
  const box = document.getElementById("flash");
  box.textContent = message;
  box.className = ok ? "ok" : "";
  box.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { box.hidden = true; }, 6000);
}

function badge(results, complete = true) {
  const name = results == null ? (complete ? "PENDING" : "RUNNING") : RESULTS[results];
  return `<span class="badge r-${name}" data-result="${name}">${name}</span>`;
}

// A buildset's badge: its result once complete; QUEUED while nothing of it runs yet.
function buildsetBadge(b) {
  if (!b.complete && b.state === "queued") return `<span class="badge r-QUEUED" data-result="QUEUED">QUEUED</span>`;
  return badge(b.results, b.complete);
}

// A request's state: its result once complete; running while a master holds it;
// scheduled while a delayed run or a retry's backoff keeps it back; queued otherwise.
function requestBadge(r) {
  if (r.complete) return badge(r.results, true);
  if (r.claimed) return badge(null, false);
  const name = r.not_before != null && r.not_before * 1000 > Date.now() ? "SCHEDULED" : "QUEUED";
  return `<span class="badge r-${name}" data-result="${name}">${name}</span>`;
}

function when(seconds) {
  return seconds == null ? "" : new Date(seconds * 1000).toLocaleString();
}

function duration(start, end) {
  if (start == null) return "";
  const s = (end ?? Date.now() / 1000) - start;
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 90) return `${s.toFixed(1)} s`;
  if (s < 5400) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${(s / 3600).toFixed(1)} h`;
}

async function act(what, fn) {
  try {
    const reply = await fn();
    flash(what + " done", true);
    refresh();
    return reply;
  } catch (e) {
    flash(what + " failed: " + e.message);
  }
}

// ---- pages ----

// ---- run lists: filters and paging live in the hash (#/buildsets?results=2&page=1) ----

const PAGE = 50;

function hashQuery() {
  return new URLSearchParams(location.hash.split("?")[1] || "");
}

// Seconds since the epoch of a datetime-local value, or null.
function epoch(local) {
  const t = local ? Date.parse(local) : NaN;
  return Number.isNaN(t) ? null : t / 1000;
}

function resultOptions(selected) {
  return `<option value="">any result</option>` + RESULTS.map((r, i) =>
    `<option value="${i}" ${String(i) === selected ? "selected" : ""}>${r}</option>`).join("");
}

// The API query of the shared filters: result, time range, page.
function filterQuery(q, timeField) {
  const api = new URLSearchParams({ limit: PAGE, offset: Number(q.get("page") || 0) * PAGE });
  if (q.get("results")) api.set("results", q.get("results"));
  if (epoch(q.get("from")) != null) api.set(`${timeField}__ge`, epoch(q.get("from")));
  if (epoch(q.get("to")) != null) api.set(`${timeField}__le`, epoch(q.get("to")));
  return api;
}

function pager(total, q) {
  const page = Number(q.get("page") || 0);
  const first = total ? page * PAGE + 1 : 0;
  const last = Math.min(total, (page + 1) * PAGE);
  return `<div class="pager"><button type="button" class="page" data-page="${page - 1}" ${page > 0 ? "" : "disabled"}>Newer</button>
    <span class="muted" id="range">${first}–${last} of ${total}</span>
    <button type="button" class="page" data-page="${page + 1}" ${last < total ? "" : "disabled"}>Older</button></div>`;
}

// Filter forms and pager buttons rewrite the hash; render follows it.
function wireFilters(base) {
  const form = document.getElementById("filters");
  form?.addEventListener("submit", event => {
    event.preventDefault();
    const q = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) q.set(k, v);
    location.hash = `#/${base}` + (q.toString() ? `?${q}` : "");
  });
  document.querySelectorAll("button.page").forEach(b => b.addEventListener("click", () => {
    const q = hashQuery();
    q.set("page", b.dataset.page);
    location.hash = `#/${base}?${q}`;
  }));
}

async function buildsetsPage() {
  const q = hashQuery();
  const api = filterQuery(q, "submitted_at");
  api.set("order", "-bsid");
  if (q.get("reason")) api.set("reason__contains", q.get("reason"));
  const [sets, builders] = await Promise.all([
    get(`/buildsets?${api}`),
    get("/builders?order=name"),
  ]);
  const rows = sets.buildsets.map(b => `
    <tr data-bsid="${b.bsid}">
      <td><a href="#/buildsets/${b.bsid}">${b.bsid}</a></td>
      <td>${buildsetBadge(b)}</td>
      <td>${esc(b.reason)}${b.parent_buildid ? ` <span class="muted">(child of <a href="#/builds/${b.parent_buildid}">build ${b.parent_buildid}</a>)</span>` : ""}</td>
      <td>${when(b.submitted_at)}</td>
      <td>${duration(b.submitted_at, b.complete_at)}</td>
    </tr>`).join("");
  const boxes = builders.builders.map(b =>
    `<label><input type="checkbox" name="builder" value="${esc(b.name)}"> ${esc(b.name)}</label>`).join("");
  return `
    <h1>Buildsets <span class="muted">(${sets.meta.total})</span></h1>
    <form class="card submit" id="submit-form">
      <strong>Submit</strong> ${boxes || '<span class="muted">no builders</span>'}
      <input type="text" id="reason" placeholder="reason" value="from the dashboard">
      <button class="primary" id="submit" type="submit">Submit</button>
      <details id="submit-more"><summary>priority, properties, sourcestamp</summary><div class="fields">
        <label>priority <input type="number" id="priority" value="0" min="-1000" max="1000"></label>
        <label>properties <textarea id="properties" placeholder='one per line: name=JSON, e.g. version="1.2"'></textarea></label>
        <label>repository <input type="text" id="repository"></label>
        <label>branch <input type="text" id="branch"></label>
        <label>revision <input type="text" id="revision"></label>
      </div></details>
    </form>
    <form class="card filters" id="filters">
      <select name="results">${resultOptions(q.get("results"))}</select>
      <input type="search" name="reason" placeholder="reason contains" value="${esc(q.get("reason") ?? "")}">
      <label>from <input type="datetime-local" name="from" value="${esc(q.get("from") ?? "")}"></label>
      <label>to <input type="datetime-local" name="to" value="${esc(q.get("to") ?? "")}"></label>
      <button type="submit">Filter</button> <a href="#/buildsets">clear</a>
    </form>
    <table id="buildsets"><thead><tr><th>#</th><th>status</th><th>reason</th><th>submitted</th><th>duration</th></tr></thead>
    <tbody>${rows || '<tr><td colspan="5" class="muted">nothing here</td></tr>'}</tbody></table>
    ${pager(sets.meta.total, q)}`;
}

function wireBuildsets() {
  const form = document.getElementById("submit-form");
  if (!form) return;
  form.addEventListener("submit", async event => {
    event.preventDefault();
    const builders = [...form.querySelectorAll("input[name=builder]:checked")].map(i => i.value);
    if (!builders.length) return flash("pick at least one builder");
    const body = { builders, reason: document.getElementById("reason").value };
    const priority = Number(document.getElementById("priority").value || 0);
    if (priority) body.priority = priority;
    const properties = {};
    for (const line of document.getElementById("properties").value.split("\n").map(l => l.trim()).filter(Boolean)) {
      const at = line.indexOf("=");
      if (at < 1) return flash(`property "${line}" is not name=JSON`);
      try { properties[line.slice(0, at).trim()] = JSON.parse(line.slice(at + 1)); }
      catch { return flash(`property "${line}": the value is not JSON (strings need quotes)`); }
    }
    if (Object.keys(properties).length) body.properties = properties;
    const stamp = Object.fromEntries(["repository", "branch", "revision"].map(k => [k, document.getElementById(k).value.trim()]).filter(([, v]) => v));
    if (Object.keys(stamp).length) body.sourcestamps = [stamp];
    const reply = await act("submit", () => post("/buildsets", body));
    if (reply) location.hash = `#/buildsets/${reply.bsid}`;
  });
}

function treeNode(bs, names) {
  const builds = bs.builds.map(b => `
    <li data-buildid="${b.buildid}">${badge(b.results, b.complete)}
      <a href="#/builds/${b.buildid}">${esc(b.builder ?? names[b.builderid])} #${b.number}</a>
      <span class="muted">${esc(b.state_string)}</span>
      ${b.children.length ? `<ul>${b.children.map(c => `<li>buildset <a href="#/buildsets/${c.bsid}">${c.bsid}</a> ${badge(c.results, c.complete)} <span class="muted">${esc(c.parent_relationship ?? "")}</span>${treeNode(c, names)}</li>`).join("")}</ul>` : ""}
    </li>`).join("");
  return `<ul>${builds}</ul>`;
}

async function builderNames() {
  const all = await get("/builders");
  return Object.fromEntries(all.builders.map(b => [b.builderid, b.name]));
}

// A Gantt chart of a buildset's builds and, under each, the builds of the buildsets it
// triggered: one bar per build from its start to its end (or now), on the buildset's
// own time axis.
function timeline(tree, names) {
  const rows = [];
  const walk = (bs, depth) => {
    for (const b of bs.builds) {
      rows.push({ b, depth, label: `${b.builder ?? names[b.builderid]} #${b.number}` });
      for (const child of b.children ?? []) walk(child, depth + 1);
    }
  };
  walk(tree, 0);
  if (!rows.length) return '<span class="muted">no builds yet</span>';
  const now = Date.now() / 1000;
  const t0 = Math.min(tree.submitted_at, ...rows.map(r => r.b.started_at));
  const t1 = Math.max(t0 + 0.001, ...rows.map(r => r.b.complete_at ?? now));
  const pct = t => (100 * (t - t0) / (t1 - t0)).toFixed(2);
  const bars = rows.map(({ b, depth, label }) => {
    const end = b.complete_at ?? now;
    const width = Math.max(0.5, Number(pct(end)) - Number(pct(b.started_at)));
    const name = b.results == null ? "RUNNING" : RESULTS[b.results];
    return `<div class="lane" data-buildid="${b.buildid}">
      <a class="lane-label" style="padding-left:${depth * 1.1}rem" href="#/builds/${b.buildid}">${esc(label)}</a>
      <div class="lane-track"><span class="bar r-${name}" style="left:${pct(b.started_at)}%;width:${width}%" title="${esc(label)}: ${name}, ${duration(b.started_at, b.complete_at)}"></span></div></div>`;
  }).join("");
  return `${bars}<div class="lane axis"><span></span><div class="lane-track muted"><span>${when(t0)}</span><span>${duration(t0, t1)}</span></div></div>`;
}

async function buildsetPage(id) {
  const [one, requests, tree, names] = await Promise.all([
    get(`/buildsets/${id}`), get(`/buildsets/${id}/buildrequests`), get(`/buildsets/${id}/tree`), builderNames(),
  ]);
  const b = one.buildsets[0];
  const props = Object.entries(b.properties).map(([k, [v, src]]) =>
    `<tr><td>${esc(k)}</td><td><code>${esc(JSON.stringify(v))}</code></td><td class="muted">${esc(src)}</td></tr>`).join("");
  const stamps = b.sourcestamps.map(s =>
    `<tr><td>${esc(s.repository)}</td><td>${esc(s.branch ?? "")}</td><td><code>${esc(s.revision ?? "")}</code></td><td>${esc(s.project)}</td></tr>`).join("");
  const reqs = requests.buildrequests.map(r => `
    <tr data-brid="${r.buildrequestid}"><td>${r.buildrequestid}</td><td>${esc(names[r.builderid])}</td><td>${requestBadge(r)}</td>
    <td>${r.priority}</td><td>${r.claimed ? "master " + r.claimed_by_masterid : r.superseded_by ? `<span class="muted">superseded by request ${r.superseded_by}</span>` : '<span class="muted">unclaimed</span>'}</td>
    <td>${r.not_before != null && !r.complete ? when(r.not_before) : ""}</td></tr>`).join("");
  return `
    <h1>Buildset ${b.bsid} ${buildsetBadge(b)}</h1>
    <div class="card"><dl class="facts">
      <dt>reason</dt><dd>${esc(b.reason)}</dd>
      <dt>submitted</dt><dd>${when(b.submitted_at)}</dd>
      <dt>duration</dt><dd>${duration(b.submitted_at, b.complete_at)}</dd>
      ${b.parent_buildid ? `<dt>parent</dt><dd><a href="#/builds/${b.parent_buildid}">build ${b.parent_buildid}</a> (${esc(b.parent_relationship)})</dd>` : ""}
      ${b.external_idstring ? `<dt>external id</dt><dd>${esc(b.external_idstring)}</dd>` : ""}
    </dl>
    <div class="actions">
      <button class="danger" id="cancel" ${b.complete ? "disabled" : ""}>Cancel</button>
      <button id="resubmit" ${b.complete ? "" : "disabled"}>Resubmit failed</button>
    </div></div>
    <h2>Builds and the buildsets they triggered</h2>
    <div class="card tree" id="tree">${treeNode(tree.tree, names)}</div>
    <h2>Timeline</h2>
    <div class="card" id="timeline">${timeline(tree.tree, names)}</div>
    <h2>Requests</h2>
    <table><thead><tr><th>#</th><th>builder</th><th>status</th><th>priority</th><th>claim</th><th>not before</th></tr></thead><tbody id="requests">${reqs}</tbody></table>
    ${stamps ? `<h2>Sourcestamps</h2><table><thead><tr><th>repository</th><th>branch</th><th>revision</th><th>project</th></tr></thead><tbody>${stamps}</tbody></table>` : ""}
    ${props ? `<h2>Properties</h2><table><thead><tr><th>name</th><th>value</th><th>source</th></tr></thead><tbody>${props}</tbody></table>` : ""}`;
}

function wireBuildset(id) {
  document.getElementById("cancel")?.addEventListener("click", () => act("cancel", () => rpc(`/buildsets/${id}`, "cancel")));
  document.getElementById("resubmit")?.addEventListener("click", async () => {
    const reply = await act("resubmit", () => rpc(`/buildsets/${id}`, "resubmit", { all: false }));
    if (reply) location.hash = `#/buildsets/${reply.result.bsid}`;
  });
}

function progressNode(node) {
  const pct = node.total > 0 ? Math.min(100, (100 * node.current) / node.total) : 0;
  const kids = node.children.map(progressNode).join("");
  return `
    <div class="progress" data-group="${esc(node.group.join("/"))}" data-current="${node.current}" data-total="${node.total}">
      <div class="label"><span>${esc(node.name || "build")}</span><span class="muted">${node.current}/${node.total} ${esc(node.status ?? "")}</span></div>
      <div class="track"><div class="bar" style="width:${pct.toFixed(1)}%"></div></div>
      ${kids ? `<div class="nested">${kids}</div>` : ""}
    </div>`;
}

function logLine(r) {
  return `<div class="record" data-id="${r.id}" data-level="${r.level}"><span class="lvl lvl-${r.level}">${r.level}</span><span class="muted">${new Date(r.at * 1000).toLocaleTimeString()}</span> ${esc(r.message)}</div>`;
}

const buildState = { id: null, lastLog: 0, level: "debug" };

async function buildPage(id) {
  const [one, progress, artifacts, triggered, names] = await Promise.all([
    get(`/builds/${id}`), get(`/builds/${id}/progress`), get(`/builds/${id}/artifacts`), get(`/builds/${id}/triggered`), builderNames(),
  ]);
  const b = one.builds[0];
  const request = (await get(`/buildrequests/${b.buildrequestid}`)).buildrequests[0];
  if (buildState.id !== id) Object.assign(buildState, { id, lastLog: 0, level: "debug" });
  const props = Object.entries(b.properties).map(([k, [v, src]]) =>
    `<tr><td>${esc(k)}</td><td><code>${esc(JSON.stringify(v))}</code></td><td class="muted">${esc(src)}</td></tr>`).join("");
  const files = artifacts.artifacts.map(a => `<li><a href="${esc(a.url)}">${esc(a.path)}</a> <span class="muted">${a.size} bytes</span></li>`).join("");
  const children = triggered.buildsets.map(c => `<li><a href="#/buildsets/${c.bsid}">buildset ${c.bsid}</a> ${badge(c.results, c.complete)} <span class="muted">${esc(c.parent_relationship ?? "")}</span></li>`).join("");
  const levels = LEVELS.map(l => `<option ${l === buildState.level ? "selected" : ""}>${l}</option>`).join("");
  return `
    <h1><a href="#/builders/${encodeURIComponent(names[b.builderid] ?? "")}">${esc(names[b.builderid])}</a> #${b.number} <span id="status">${badge(b.results, b.complete)}</span></h1>
    <div class="card"><dl class="facts">
      <dt>state</dt><dd id="state">${esc(b.state_string)}</dd>
      <dt>started</dt><dd>${when(b.started_at)}</dd>
      <dt>duration</dt><dd id="duration">${duration(b.started_at, b.complete_at)}</dd>
      <dt>request</dt><dd>${b.buildrequestid} of <a id="buildset-link" href="#/buildsets/${request.buildsetid}">buildset ${request.buildsetid}</a> on master ${b.masterid}</dd>
    </dl>
    <div class="actions">
      <button class="danger" id="stop" ${b.complete ? "disabled" : ""}>Stop</button>
      <button id="rebuild">Rebuild</button>
    </div></div>
    <h2>Progress</h2>
    <div class="card" id="progress">${progressNode(progress.progress[0])}</div>
    <h2>Log <select id="level">${levels}</select> <button id="log-download" type="button">Download raw log</button></h2>
    <div id="log" data-build="${id}"></div>
    ${b.error ? `<h2>Error</h2><pre id="error">${esc(b.error)}</pre>` : ""}
    ${b.traceback ? `<h2>Traceback</h2><pre id="traceback">${esc(b.traceback)}</pre>` : ""}
    <h2>Return value</h2><pre id="return-value">${esc(JSON.stringify(b.return_value, null, 2))}</pre>
    ${props ? `<h2>Properties</h2><table id="properties"><thead><tr><th>name</th><th>value</th><th>source</th></tr></thead><tbody>${props}</tbody></table>` : ""}
    ${files ? `<h2>Artifacts</h2><ul class="card" id="artifacts">${files}</ul>` : ""}
    ${children ? `<h2>Triggered</h2><ul class="card">${children}</ul>` : ""}`;
}

// The log box of build `id` on screen, if that is what is shown.
function logBox(id) {
  const box = document.getElementById("log");
  return box && Number(box.dataset.build) === id ? box : null;
}

// Reads the records after the last one shown and appends them. Calls run one after
// another: two reads from the same place (the first load and a live event) used to
// append the same records twice. Records already shown are skipped all the same.
let logChain = Promise.resolve();
function tailLog(id, reset = false) {
  logChain = logChain.then(() => tailOnce(id, reset)).catch(() => {});
  return logChain;
}

async function tailOnce(id, reset) {
  if (!logBox(id) || buildState.id !== id) return;
  if (reset) { logBox(id).innerHTML = ""; buildState.lastLog = 0; }
  const level = buildState.level;
  const data = await get(`/builds/${id}/logs?level=${level}&after=${buildState.lastLog}`);
  // A render may have replaced the box meanwhile (with this build's lines), or the page
  // may show another build now: look it up again.
  const box = logBox(id);
  if (!box || buildState.id !== id || level !== buildState.level) return;
  const fresh = data.logs.filter(r => r.id > buildState.lastLog);
  const stick = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
  box.insertAdjacentHTML("beforeend", fresh.map(logLine).join(""));
  if (fresh.length) buildState.lastLog = fresh[fresh.length - 1].id;
  if (stick) box.scrollTop = box.scrollHeight;
}

// `keep`: the log already on screen stays (a live refresh), else it is read afresh.
function wireBuild(id, keep = false) {
  document.getElementById("stop")?.addEventListener("click", () => act("stop", () => rpc(`/builds/${id}`, "stop")));
  document.getElementById("rebuild")?.addEventListener("click", async () => {
    const reply = await act("rebuild", () => rpc(`/builds/${id}`, "rebuild"));
    if (reply) location.hash = `#/buildsets/${reply.result.bsid}`;
  });
  document.getElementById("log-download")?.addEventListener("click", () => download(`/builds/${id}/log.txt`, `build-${id}.log`));
  document.getElementById("level")?.addEventListener("change", e => {
    buildState.level = e.target.value;
    tailLog(id, true);
  });
  if (!keep) tailLog(id, true);
}

async function buildersPage() {
  const all = await get("/builders?order=name");
  const rows = all.builders.map(b => `
    <tr data-builder="${esc(b.name)}"><td><a href="#/builders/${encodeURIComponent(b.name)}">${esc(b.name)}</a></td>
      <td><span class="badge s-${b.status}">${b.status.replace("_", " ")}</span>${b.served ? "" : ' <span class="badge unserved" title="no active master runs this builder: its work waits">no master</span>'}</td>
      <td>${b.latest_successful_buildid ? `<a href="#/builds/${b.latest_successful_buildid}">build ${b.latest_successful_buildid}</a>` : '<span class="muted">none</span>'}</td>
      <td>${esc(b.depends_on.join(", "))}</td><td class="muted">${esc(b.description ?? "")}</td>
      <td>${b.paused ? '<span class="badge paused">paused</span> ' : ""}<button class="toggle-pause" data-name="${esc(b.name)}" data-paused="${b.paused}">${b.paused ? "Resume" : "Pause"}</button></td></tr>`).join("");
  // Queue depth per builder, now (the first 50 builders: one count each).
  const charted = all.builders.slice(0, 50);
  const depths = await Promise.all(charted.map(b =>
    get(`/builders/${encodeURIComponent(b.name)}/buildrequests?complete=false&limit=1&field=buildrequestid`).then(r => r.meta.total)));
  const queues = barChart("queues", depths, charted.map((b, i) => `${b.name}: ${depths[i]} waiting`));
  return `<h1>Builders</h1>
    <h2>Requests waiting, per builder</h2>
    <div class="card">${queues}<div class="chart-labels">${charted.map((b, i) => `<span>${esc(b.name)} <b>${depths[i]}</b></span>`).join("")}</div></div>
    <table id="builders"><thead><tr><th>name</th><th>status</th><th>latest success</th><th>depends on</th><th>description</th><th>queue</th></tr></thead><tbody>${rows}</tbody></table>`;
}

// Pause stops every master from claiming a builder's requests; resume lets them run.
function wireBuilders() {
  document.querySelectorAll("button.toggle-pause").forEach(button => button.addEventListener("click", () => {
    const paused = button.dataset.paused === "true";
    const method = paused ? "resume" : "pause";
    act(method, () => rpc(`/builders/${encodeURIComponent(button.dataset.name)}`, method));
  }));
}

function timing(t) {
  if (t?.every) return `every ${t.every.seconds} s`;
  if (t?.cron) return `<code>${esc(t.cron.pattern)}</code> ${esc(t.cron.timezone)}`;
  return "";
}

async function schedulesPage() {
  const all = await get("/schedules");
  const rows = all.schedules.map(s => `
    <tr data-schedule="${esc(s.name)}"><td>${esc(s.name)}</td><td>${timing(s.timing)}</td>
      <td>${esc((s.builders ?? []).join(", "))}</td>
      <td class="next-fire">${when(s.next_fire)}</td><td>${s.fires > 0 ? when(s.last_fire) : '<span class="muted">never</span>'}</td>
      <td>${s.last_bsid ? `<a href="#/buildsets/${s.last_bsid}">buildset ${s.last_bsid}</a>` : '<span class="muted">none yet</span>'}</td>
      <td>${s.fires}</td>
      <td><button class="force" data-name="${esc(s.name)}">Fire now</button></td></tr>`).join("");
  return `<h1>Schedules</h1>
    <table id="schedules"><thead><tr><th>name</th><th>timing</th><th>builders</th><th>next fire</th><th>last fire</th><th>last buildset</th><th>fires</th><th></th></tr></thead>
    <tbody>${rows || '<tr><td colspan="8" class="muted">no schedules: add [[schedule]] to the pipeline file</td></tr>'}</tbody></table>`;
}

function wireSchedules() {
  document.querySelectorAll("button.force").forEach(button => button.addEventListener("click", async () => {
    const reply = await act("fire", () => rpc(`/schedules/${encodeURIComponent(button.dataset.name)}`, "force"));
    if (reply) location.hash = `#/buildsets/${reply.result.bsid}`;
  }));
}

async function locksPage() {
  const all = await get("/locks");
  const rows = all.locks.map(l => `
    <tr data-lock="${esc(l.name)}"><td>${esc(l.name)}</td>
      <td class="held">${l.held} of ${l.count}</td>
      <td>${l.users.map(u => `${esc(u.name)} <span class="muted">(${u.units})</span>`).join(", ") || '<span class="muted">none</span>'}</td>
      <td class="holders">${l.holders.map(h => `<a href="#/builds/${h.buildid}">build ${h.buildid}</a> <span class="muted">since ${when(h.acquired_at)}</span>`).join(", ") || '<span class="muted">free</span>'}</td>
      <td class="waiting">${l.waiting > 0 ? `${l.waiting} waiting` : '<span class="muted">none</span>'}</td></tr>`).join("");
  return `<h1>Locks</h1>
    <table id="locks"><thead><tr><th>name</th><th>held</th><th>builders (units each)</th><th>holding builds</th><th>waiting requests</th></tr></thead>
    <tbody>${rows || '<tr><td colspan="5" class="muted">no locks: add [[lock]] to the pipeline file</td></tr>'}</tbody></table>`;
}

async function buildsListPage() {
  const q = hashQuery();
  const api = filterQuery(q, "started_at");
  api.set("order", "-buildid");
  if (q.get("builder")) api.set("builderid", q.get("builder"));
  const [builds, names] = await Promise.all([get(`/builds?${api}`), builderNames()]);
  const options = `<option value="">any builder</option>` + Object.entries(names).sort((a, b) => a[1].localeCompare(b[1])).map(([id, n]) =>
    `<option value="${id}" ${id === q.get("builder") ? "selected" : ""}>${esc(n)}</option>`).join("");
  const rows = builds.builds.map(b => `
    <tr data-buildid="${b.buildid}"><td><a href="#/builds/${b.buildid}">${b.buildid}</a></td>
      <td><a href="#/builders/${encodeURIComponent(names[b.builderid] ?? "")}">${esc(names[b.builderid] ?? "")}</a> #${b.number}</td>
      <td>${badge(b.results, b.complete)}</td><td class="muted">${esc(b.state_string)}</td>
      <td>${when(b.started_at)}</td><td>${duration(b.started_at, b.complete_at)}</td></tr>`).join("");
  return `<h1>Builds <span class="muted">(${builds.meta.total})</span></h1>
    <form class="card filters" id="filters">
      <select name="builder">${options}</select>
      <select name="results">${resultOptions(q.get("results"))}</select>
      <label>from <input type="datetime-local" name="from" value="${esc(q.get("from") ?? "")}"></label>
      <label>to <input type="datetime-local" name="to" value="${esc(q.get("to") ?? "")}"></label>
      <button type="submit">Filter</button> <a href="#/builds">clear</a>
    </form>
    <table id="builds"><thead><tr><th>#</th><th>build</th><th>status</th><th>state</th><th>started</th><th>duration</th></tr></thead>
    <tbody>${rows || '<tr><td colspan="6" class="muted">nothing here</td></tr>'}</tbody></table>
    ${pager(builds.meta.total, q)}`;
}

// A bar chart as inline SVG (no library, nothing from the internet): one bar per value,
// scaled to the largest, each with a tooltip.
function barChart(id, values, titles, classes = []) {
  const max = Math.max(...values, 1e-9);
  const w = 100 / Math.max(values.length, 1);
  const bars = values.map((v, i) => {
    const h = 100 * v / max;
    return `<rect class="${classes[i] ?? ""}" x="${(i * w + w * 0.1).toFixed(2)}" y="${(100 - h).toFixed(2)}" width="${(w * 0.8).toFixed(2)}" height="${h.toFixed(2)}"><title>${esc(titles[i])}</title></rect>`;
  }).join("");
  return `<svg id="${id}" class="chart" viewBox="0 0 100 100" preserveAspectRatio="none" role="img">${bars}</svg>`;
}

// One builder: its status, queue depth, success rate over its last 100 finished builds,
// and its recent builds.
async function builderPage(name) {
  const key = encodeURIComponent(name);
  const dayAgo = Date.now() / 1000 - 86400;
  const [one, recent, queued, finished, day] = await Promise.all([
    get(`/builders/${key}`),
    get(`/builders/${key}/builds?order=-buildid&limit=20`),
    get(`/builders/${key}/buildrequests?complete=false&limit=1`),
    get(`/builders/${key}/builds?complete=true&order=-buildid&limit=100`),
    get(`/builders/${key}/builds?started_at__ge=${dayAgo}&limit=1000&field=started_at`),
  ]);
  // Durations of the last finished builds, oldest first; builds started per hour over
  // the last day.
  const last = finished.builds.slice(0, 40).reverse();
  const durations = barChart("durations", last.map(x => x.complete_at - x.started_at),
    last.map(x => `#${x.number}: ${duration(x.started_at, x.complete_at)}`),
    last.map(x => `r-${RESULTS[x.results] ?? "RUNNING"}`));
  const hours = Array.from({ length: 24 }, () => 0);
  for (const x of day.builds) hours[Math.min(23, Math.floor((x.started_at - dayAgo) / 3600))] += 1;
  const throughput = barChart("throughput", hours,
    hours.map((n, i) => `${n} builds, ${24 - i} to ${23 - i} hours ago`));
  const b = one.builders[0];
  const ok = finished.builds.filter(x => x.results === 0 || x.results === 1).length;
  const rate = finished.builds.length ? `${Math.round(100 * ok / finished.builds.length)}%` : "–";
  const rows = recent.builds.map(x => `
    <tr data-buildid="${x.buildid}"><td><a href="#/builds/${x.buildid}">#${x.number}</a></td><td>${badge(x.results, x.complete)}</td>
      <td class="muted">${esc(x.state_string)}</td><td>${when(x.started_at)}</td><td>${duration(x.started_at, x.complete_at)}</td></tr>`).join("");
  return `<h1>${esc(b.name)} <span class="badge s-${b.status}">${b.status.replace("_", " ")}</span>${b.served ? "" : ' <span class="badge unserved">no master</span>'}${b.paused ? ' <span class="badge paused">paused</span>' : ""}</h1>
    <div class="card"><dl class="facts">
      <dt>description</dt><dd>${esc(b.description ?? "")}</dd>
      <dt>queue</dt><dd id="queue-depth">${queued.meta.total} waiting</dd>
      <dt>success rate</dt><dd id="success-rate">${rate} <span class="muted">of the last ${finished.builds.length} finished builds</span></dd>
      <dt>depends on</dt><dd>${b.depends_on.map(d => `<a href="#/builders/${encodeURIComponent(d)}">${esc(d)}</a>`).join(", ") || '<span class="muted">nothing</span>'}</dd>
      <dt>all builds</dt><dd><a href="#/builds?builder=${b.builderid}">builds of ${esc(b.name)}</a></dd>
    </dl></div>
    <h2>Duration of the last ${last.length} finished builds</h2>
    <div class="card">${durations}</div>
    <h2>Builds started per hour, last 24 hours</h2>
    <div class="card">${throughput}</div>
    <h2>Recent builds</h2>
    <table id="recent"><thead><tr><th>build</th><th>status</th><th>state</th><th>started</th><th>duration</th></tr></thead>
    <tbody>${rows || '<tr><td colspan="5" class="muted">no builds yet</td></tr>'}</tbody></table>`;
}

async function mastersPage() {
  const all = await get("/masters");
  const rows = all.masters.map(m => `<tr><td>${m.masterid}</td><td>${esc(m.name)}</td><td>${m.active ? "active" : '<span class="muted">inactive</span>'}</td><td>${when(m.last_active)}</td></tr>`).join("");
  return `<h1>Masters</h1><table><thead><tr><th>#</th><th>name</th><th>state</th><th>last heartbeat</th></tr></thead><tbody>${rows}</tbody></table>`;
}

// ---- routing and live updates ----

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("?")[0].split("/").filter(Boolean);
  if (parts[0] === "buildsets" && parts[1]) return { page: "buildset", id: Number(parts[1]) };
  if (parts[0] === "builds" && parts[1]) return { page: "build", id: Number(parts[1]) };
  if (parts[0] === "builds") return { page: "builds" };
  if (parts[0] === "builders" && parts[1]) return { page: "builder", name: decodeURIComponent(parts[1]) };
  if (parts[0] === "builders") return { page: "builders" };
  if (parts[0] === "masters") return { page: "masters" };
  if (parts[0] === "schedules") return { page: "schedules" };
  if (parts[0] === "locks") return { page: "locks" };
  return { page: "buildsets" };
}

let rendering = false;
let again = false;

async function render() {
  if (rendering) { again = true; return; }
  rendering = true;
  const r = route();
  try {
    const scroll = window.scrollY;
    let html;
    if (r.page === "buildset") html = await buildsetPage(r.id);
    else if (r.page === "build") html = await buildPage(r.id);
    else if (r.page === "builders") html = await buildersPage();
    else if (r.page === "builds") html = await buildsListPage();
    else if (r.page === "builder") html = await builderPage(r.name);
    else if (r.page === "masters") html = await mastersPage();
    else if (r.page === "schedules") html = await schedulesPage();
    else if (r.page === "locks") html = await locksPage();
    else html = await buildsetsPage();
    // Keep what the user typed and checked in the submit form across live refreshes.
    const checked = [...document.querySelectorAll("input[name=builder]:checked")].map(i => i.value);
    const typed = Object.fromEntries(["reason", "priority", "properties", "repository", "branch", "revision"]
      .map(k => [k, document.getElementById(k)?.value]).filter(([, v]) => v != null));
    const moreOpen = document.getElementById("submit-more")?.open;
    // Taken right before the swap: records the live tail appended meanwhile are kept.
    const log = document.getElementById("log");
    const logScroll = log ? log.scrollTop : null;
    // Only the lines of the build about to be shown are kept: the box says whose they are.
    const keepLog = r.page === "build" && log && Number(log.dataset.build) === r.id ? log.innerHTML : null;
    view.innerHTML = html;
    checked.forEach(v => { const box = document.querySelector(`input[name=builder][value="${CSS.escape(v)}"]`); if (box) box.checked = true; });
    for (const [k, v] of Object.entries(typed)) { const input = document.getElementById(k); if (input) input.value = v; }
    if (moreOpen && document.getElementById("submit-more")) document.getElementById("submit-more").open = true;
    if (r.page === "buildsets") { wireBuildsets(); wireFilters("buildsets"); }
    if (r.page === "builds") wireFilters("builds");
    if (r.page === "buildset") wireBuildset(r.id);
    if (r.page === "builders") wireBuilders();
    if (r.page === "schedules") wireSchedules();
    if (r.page === "build") {
      if (keepLog != null) {
        document.getElementById("log").innerHTML = keepLog;
        wireBuild(r.id, true);
        document.getElementById("log").scrollTop = logScroll;
        tailLog(r.id);
      } else {
        wireBuild(r.id);
      }
    }
    window.scrollTo(0, scroll);
    document.body.dataset.page = r.page;
  } catch (e) {
    view.innerHTML = `<h1>Not available</h1><p class="muted">${esc(e.message)}</p>`;
  } finally {
    rendering = false;
    if (again) { again = false; render(); }
  }
}

// Progress reports come often: redraw only the bars and the state string.
let progressBusy = false;
async function liveProgress(id) {
  if (progressBusy) return;
  progressBusy = true;
  try {
    const [one, progress] = await Promise.all([get(`/builds/${id}`), get(`/builds/${id}/progress`)]);
    const box = document.getElementById("progress");
    if (!box || buildState.id !== id) return;
    box.innerHTML = progressNode(progress.progress[0]);
    const b = one.builds[0];
    const state = document.getElementById("state");
    if (state) state.textContent = b.state_string;
    const took = document.getElementById("duration");
    if (took) took.textContent = duration(b.started_at, b.complete_at);
  } catch (e) {
    // The next event or refresh tries again.
  } finally {
    progressBusy = false;
  }
}

let timer = null;
function refresh() {
  clearTimeout(timer);
  timer = setTimeout(render, 150);
}

function connect() {
  const live = document.getElementById("live");
  const token = tokenInput.value.trim();
  const source = new EventSource(API + "/events" + (token ? `?access_token=${encodeURIComponent(token)}` : ""));
  source.onopen = () => { live.className = "live on"; };
  source.onerror = () => { live.className = "live off"; };
  const r = () => route();
  for (const kind of ["buildset_submitted", "build_started", "build_finished", "request_completed", "buildset_complete", "master_expired", "lagged"]) {
    source.addEventListener(kind, refresh);
  }
  source.addEventListener("build_log", e => {
    const { buildid } = JSON.parse(e.data);
    const here = r();
    if (here.page === "build" && here.id === buildid) tailLog(buildid);
  });
  source.addEventListener("build_progress", e => {
    const { buildid } = JSON.parse(e.data);
    const here = r();
    if (here.page === "build" && here.id === buildid) liveProgress(buildid);
  });
}

window.addEventListener("hashchange", render);
render();
connect();
