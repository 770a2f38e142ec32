"use strict";
// The admin token arrives in the fragment (never sent to a server), is
// kept in this tab's sessionStorage, and leaves the URL at once: history,
// bookmarks and screenshots never hold it. The selected flow may stay.
const params = new URLSearchParams(location.hash.slice(1));
let token = params.get("token") || sessionStorage.getItem("ordersaga-token");
let correlation = params.get("correlation");
if (params.has("token")) {
  const kept = correlation ? "#correlation=" + encodeURIComponent(correlation) : "";
  history.replaceState(null, "", location.pathname + location.search + kept);
}
let current = null; // the saga shown in the saga panel

const $ = (id) => document.getElementById(id);
const text = (value) => document.createTextNode(value ?? "");
const time = (iso) => new Date(iso).toLocaleTimeString();
const SVG = "http://www.w3.org/2000/svg";

function svg(name, attributes, parent) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes || {})) element.setAttribute(key, value);
  if (parent) parent.appendChild(element);
  return element;
}

function titled(element, title) {
  svg("title", {}, element).textContent = title;
  return element;
}

function row(cells, className) {
  const tr = document.createElement("tr");
  if (className) tr.className = className;
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.appendChild(cell); else td.appendChild(text(cell));
    tr.appendChild(td);
  }
  return tr;
}

function fill(id, rows, empty) {
  if (rows.length === 0) {
    const cell = document.createElement("td");
    cell.colSpan = $(id).closest("table").tHead.rows[0].cells.length;
    cell.className = "empty";
    cell.textContent = empty;
    const tr = document.createElement("tr");
    tr.appendChild(cell);
    rows = [tr];
  }
  $(id).replaceChildren(...rows);
}

function flowLink(label, id) {
  const a = document.createElement("a");
  a.textContent = label;
  a.className = "mono";
  a.onclick = () => { correlation = id; showFlow(); };
  return a;
}

function stateCell(state) {
  const span = document.createElement("span");
  span.textContent = state;
  span.className = state;
  return span;
}

async function api(path, options) {
  const response = await fetch(path, {
    ...options,
    headers: { authorization: "Bearer " + token, ...(options && options.headers) },
  });
  if (response.status === 401 || response.status === 403) {
    sessionStorage.removeItem("ordersaga-token");
    token = null;
    showLogin();
    throw new Error("not authorized");
  }
  return response;
}

async function json(path) {
  const response = await api(path);
  if (!response.ok) throw new Error(path + ": " + response.status);
  return response.json();
}

async function refresh() {
  const summary = await json("/api/summary");
  $("running").textContent = summary.active.running;
  $("compensating").textContent = summary.active.compensating;
  $("failed").textContent = summary.active.failed;
  $("overdue").textContent = summary.active.overdue;
  $("overdue").className = "value" + (summary.active.overdue > 0 ? " failed" : "");
  fill("overdue-sagas", summary.overdue.map((o) =>
    row([flowLink(o.order_id, o.correlation_id), o.step, time(o.overdue_since)], "stuck")), "none");
  $("completed").textContent = summary.last_hour.completed;
  $("compensated").textContent = summary.last_hour.compensated;
  const rate = summary.last_hour.completion_rate;
  $("completion-rate").textContent = rate === null ? "–" : Math.round(rate * 100) + "%";
  fill("failure-reasons", summary.top_failure_reasons.map((r) => row([r.reason, r.count])), "no failures");
  fill("flows", summary.active_flows.map((f) =>
    row([flowLink(f.order_id, f.correlation_id), stateCell(f.state), f.current_step ?? "", f.age_seconds + " s"])), "nothing in progress");
  fill("recent", summary.recently_finished.map((f) =>
    row([flowLink(f.order_id, f.correlation_id), stateCell(f.state), f.failure_reason ?? "", time(f.finished_at)])), "nothing finished yet");
  fill("events", summary.recent_events.map((e) =>
    row([time(e.occurred_at), e.service, e.summary, flowLink(e.correlation_id.slice(0, 8), e.correlation_id)])), "no events yet");
  $("status").textContent = "updated " + new Date().toLocaleTimeString();
  if (correlation) await showFlow();
}

// ---- charts: hand-drawn SVG, no library ----

const WIDTH = 560, HEIGHT = 180, LEFT = 44, RIGHT = 12, TOP = 12, BOTTOM = 26;

/// A line chart of `series` ({name, values}) over `labels` (x positions),
/// with a dot for every non-zero point (its value in a tooltip).
function lineChart(id, labels, series, unit) {
  const chart = $(id);
  chart.replaceChildren();
  chart.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
  const max = Math.max(1, ...series.flatMap((s) => s.values));
  const x = (i) => LEFT + (labels.length > 1 ? i * (WIDTH - LEFT - RIGHT) / (labels.length - 1) : 0);
  const y = (v) => HEIGHT - BOTTOM - v * (HEIGHT - TOP - BOTTOM) / max;
  for (const tick of [0, max / 2, max]) {
    svg("line", { x1: LEFT, x2: WIDTH - RIGHT, y1: y(tick), y2: y(tick), class: "grid" }, chart);
    svg("text", { x: LEFT - 4, y: y(tick) + 4, class: "axis", "text-anchor": "end" }, chart)
      .textContent = (Math.round(tick * 10) / 10) + unit;
  }
  const anchors = ["start", "middle", "end"];
  [0, Math.floor((labels.length - 1) / 2), labels.length - 1].forEach((i, n) => {
    if (labels[i] === undefined) return;
    svg("text", { x: x(i), y: HEIGHT - 8, class: "axis", "text-anchor": anchors[n] }, chart).textContent = labels[i];
  });
  let keyAt = LEFT + 8;
  series.forEach((s, n) => {
    const points = s.values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    svg("polyline", { points, class: "line series-" + n, "data-series": s.name }, chart);
    s.values.forEach((v, i) => {
      if (v > 0) titled(svg("circle", { cx: x(i), cy: y(v), r: 2.5, class: "dot series-" + n, "data-series": s.name }, chart),
        `${s.name} ${labels[i]}: ${Math.round(v * 10) / 10}${unit}`);
    });
    const key = svg("text", { x: keyAt, y: TOP + 4, class: "key series-" + n }, chart);
    key.textContent = "● " + s.name;
    keyAt += 24 + 6 * s.name.length;
  });
}

/// Horizontal bars: p50 and p99 of each step's executions.
function latencyChart(id, steps) {
  const chart = $(id);
  chart.replaceChildren();
  const lane = 26, height = Math.max(1, steps.length) * lane + 20;
  chart.setAttribute("viewBox", `0 0 ${WIDTH} ${height}`);
  if (steps.length === 0) {
    svg("text", { x: 8, y: 20, class: "axis" }, chart).textContent = "no step finished in the last hour";
    return;
  }
  const labelWidth = 190;
  const max = Math.max(1, ...steps.map((s) => s.p99_ms));
  const w = (ms) => ms * (WIDTH - labelWidth - 140) / max;
  steps.forEach((s, i) => {
    const top = i * lane + 4;
    svg("text", { x: 4, y: top + 14, class: "label" }, chart).textContent =
      (s.kind === "compensation" ? "↩ " : "") + s.step;
    titled(svg("rect", { x: labelWidth, y: top, width: Math.max(1, w(s.p99_ms)), height: 9, class: "p99", "data-step": s.step }, chart),
      `${s.step} p99 ${s.p99_ms.toFixed(1)} ms (${s.count})`);
    titled(svg("rect", { x: labelWidth, y: top + 10, width: Math.max(1, w(s.p50_ms)), height: 9, class: "p50", "data-step": s.step }, chart),
      `${s.step} p50 ${s.p50_ms.toFixed(1)} ms (${s.count})`);
    svg("text", { x: labelWidth + w(s.p99_ms) + 4, y: top + 14, class: "axis" }, chart).textContent =
      `p50 ${Math.round(s.p50_ms)} · p99 ${Math.round(s.p99_ms)} ms`;
  });
}

const hhmm = (iso) => new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });

async function refreshCharts() {
  const charts = await json("/api/charts");
  const minutes = charts.minutes.map((m) => hhmm(m.at));
  lineChart("chart-throughput", minutes, [
    { name: "completed", values: charts.minutes.map((m) => m.completed) },
    { name: "compensated", values: charts.minutes.map((m) => m.compensated) },
    { name: "failed", values: charts.minutes.map((m) => m.failed) },
    { name: "terminated", values: charts.minutes.map((m) => m.terminated) },
  ], "");
  lineChart("chart-in-flight", minutes, [
    { name: "in flight", values: charts.minutes.map((m) => m.in_flight) },
  ], "");
  $("in-flight").textContent = charts.in_flight;
  latencyChart("chart-latency", charts.step_latency);
  const groups = [...new Set(charts.backlog.flatMap((b) => Object.keys(b.consumer_lag)))];
  const samples = charts.backlog.map((b) => time(b.at));
  lineChart("chart-outbox", samples, [
    { name: "outbox age (s)", values: charts.backlog.map((b) => b.outbox_age_seconds) },
  ], "");
  lineChart("chart-lag", samples, groups.map((g) => (
    { name: g, values: charts.backlog.map((b) => b.consumer_lag[g] ?? 0) })), "");
}

// ---- one saga: its timeline, events, trace link and actions ----

async function showFlow() {
  $("trace-id").textContent = correlation;
  const response = await api("/api/saga?correlation=" + encodeURIComponent(correlation));
  if (response.status === 404) {
    // A flow without a saga (yet): its events only.
    current = null;
    $("saga").hidden = true;
    return showEvents(await json("/api/trace?correlation=" + encodeURIComponent(correlation)));
  }
  if (!response.ok) throw new Error("saga: " + response.status);
  showSaga(await response.json());
}

async function showSagaById(sagaId) {
  const response = await api("/api/saga?saga=" + encodeURIComponent(sagaId));
  if (!response.ok) throw new Error("saga: " + response.status);
  const one = await response.json();
  correlation = one.saga.correlation_id;
  $("trace-id").textContent = correlation;
  showSaga(one);
}

function showEvents(events) {
  const start = events.length ? new Date(events[0].occurred_at) : null;
  // An event caused by another of the flow points at its row; one caused
  // by a request shows the request's id.
  const position = new Map(events.map((e, i) => [e.event_id, i + 1]));
  const cause = (e) => !e.causation_id ? "" :
    position.has(e.causation_id) ? "#" + position.get(e.causation_id) : "request " + e.causation_id;
  fill("trace", events.map((e, i) =>
    row(["#" + (i + 1), time(e.occurred_at), "+" + (new Date(e.occurred_at) - start) + " ms", e.service, e.summary, cause(e)])), "no events for this flow");
}

function showSaga(one) {
  current = one.saga;
  const saga = one.saga;
  $("saga").hidden = false;
  $("saga-id").textContent = saga.saga_id;
  $("saga-order").textContent = saga.order_id;
  $("saga-state").textContent = saga.state;
  $("saga-state").className = "value " + saga.state;
  $("saga-reason").textContent = saga.failure_reason ?? saga.compensation_requested ?? "";
  $("saga-stuck").hidden = !saga.stuck_since;
  $("saga-stuck").textContent = saga.stuck_since
    ? `stuck since ${time(saga.stuck_since)}: ${saga.stuck_reason ?? ""}` : "";
  $("saga-version").textContent = `${saga.saga_type} v${saga.version}`;
  $("saga-unknown-version").hidden = !saga.version_unknown;
  $("saga-unknown-version").textContent = saga.version_unknown
    ? `no live replica carries ${saga.saga_type} version ${saga.version}: nothing drives this saga until one does` : "";
  const children = one.children ?? [];
  const family = [
    saga.parent_saga_id ? `child of saga ${saga.parent_saga_id} (step ${saga.parent_step})` : "",
    children.length ? "children: " + children.map((c) => `${c.step} → ${c.saga_type} ${c.saga_id} (${c.state})`).join(", ") : "",
  ].filter((part) => part).join("; ");
  $("saga-family").hidden = !family;
  $("saga-family").textContent = family;
  $("saga-phase").hidden = !saga.phase;
  $("saga-phase").textContent = saga.phase ? `the order: ${saga.phase}` : "";
  $("saga-waiting").hidden = !saga.waiting_for_signal;
  $("saga-waiting").textContent = saga.waiting_for_signal
    ? `waiting for signal ${saga.waiting_for_signal} until ${time(saga.waiting_until)}` : "";
  const link = $("saga-trace");
  if (one.trace_url) {
    link.href = one.trace_url;
    link.textContent = one.trace_id;
    link.hidden = false;
    $("saga-trace-id").textContent = "";
  } else {
    link.hidden = true;
    $("saga-trace-id").textContent = one.trace_id ?? "no trace recorded";
  }
  timeline(one);
  showEvents(one.events);
}

/// The saga's executions as lanes on a time axis: one bar per attempt,
/// compensations marked, and a line where the saga turned back.
function timeline(one) {
  const chart = $("timeline");
  chart.replaceChildren();
  const executions = one.executions;
  const lane = 24, labelWidth = 200, top = 8, width = 900;
  const height = top + Math.max(1, executions.length) * lane + 28;
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const start = new Date(one.saga.created_at).getTime();
  const ends = executions.flatMap((e) => e.bars.map((b) => new Date(b.to).getTime()));
  const end = Math.max(start + 1, new Date(one.saga.finished_at ?? one.saga.updated_at).getTime(), ...ends);
  const x = (iso) => labelWidth + (new Date(iso).getTime() - start) * (width - labelWidth - 16) / (end - start);
  for (const fraction of [0, 0.25, 0.5, 0.75, 1]) {
    const at = labelWidth + fraction * (width - labelWidth - 16);
    svg("line", { x1: at, x2: at, y1: top, y2: height - 22, class: "grid" }, chart);
    const anchor = fraction === 0 ? "start" : fraction === 1 ? "end" : "middle";
    svg("text", { x: at, y: height - 8, class: "axis", "text-anchor": anchor }, chart).textContent =
      "+" + Math.round(fraction * (end - start)) + " ms";
  }
  executions.forEach((e, i) => {
    const y = top + i * lane;
    const compensation = e.kind === "compensation";
    svg("text", { x: 4, y: y + 15, class: "label" + (compensation ? " compensation" : "") }, chart).textContent =
      (compensation ? "↩ compensate " : "") + e.step +
      (e.status === "skipped" ? " (skipped)" : "") +
      (e.waiting_until ? ` (waits for ${e.signal})` : "");
    e.bars.forEach((b, n) => {
      const from = x(b.from), to = x(b.to);
      titled(svg("rect", {
        x: from, y: y + 3, width: Math.max(2, to - from - 1), height: lane - 8,
        class: "attempt " + b.outcome + (compensation ? " compensation" : ""),
        "data-step": e.step, "data-kind": e.kind,
      }, chart), `${e.step} (${e.kind}) #${n + 1}: ${b.note}`);
    });
  });
  for (const event of one.events.filter((e) => e.event_type.endsWith(".SagaCompensationStarted"))) {
    const at = x(event.occurred_at);
    titled(svg("line", { x1: at, x2: at, y1: top, y2: height - 22, class: "turned-back" }, chart), event.summary);
  }
  if (executions.length === 0) {
    svg("text", { x: labelWidth, y: top + 15, class: "axis" }, chart).textContent = "no step begun yet";
  }
}

// Each action: its confirmation's words, and whether it needs a reason.
const ACTIONS = {
  retry: { ask: "Retry the failed executions of this saga?", reason: null },
  compensate: { ask: "Compensate this saga (undo its steps)?", reason: "optional" },
  pause: { ask: "Pause this saga? A step in flight finishes first.", reason: null },
  resume: { ask: "Resume this saga where it stopped?", reason: null },
  terminate: { ask: "Terminate this saga for good, without compensating?", reason: "required", effects: true },
};

let pending = null;

function ask(action) {
  if (!current) return;
  const what = ACTIONS[action];
  pending = { action, saga: current.saga_id };
  $("confirm-text").textContent = `${what.ask} Saga ${current.saga_id} (order ${current.order_id}) is ${current.state}.`;
  $("confirm-reason-row").hidden = what.reason === null;
  $("confirm-reason").value = "";
  $("confirm-reason").required = what.reason === "required";
  $("confirm-reason").placeholder = what.reason === "required" ? "a reason (required)" : "a reason (optional)";
  $("confirm-effects-row").hidden = !what.effects;
  $("confirm-effects").checked = false;
  $("confirm").showModal();
}

async function confirmAction() {
  const reason = $("confirm-reason").value.trim();
  if ($("confirm-reason").required && reason === "") {
    $("confirm-reason").focus();
    return;
  }
  $("confirm").close();
  const { action, saga } = pending;
  pending = null;
  const body = reason ? { reason } : {};
  if (ACTIONS[action].effects && $("confirm-effects").checked) body.acknowledge_effects = true;
  const response = await api(`/api/sagas/${encodeURIComponent(saga)}/${action}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({ code: String(response.status), message: "" }));
  const result = $("action-result");
  if (response.ok) {
    result.className = "ok";
    result.textContent = `${action}: done; the saga is ${answer.saga.state}`;
  } else {
    result.className = "refused";
    result.textContent = `${action} refused: ${answer.code}: ${answer.message}`;
  }
  await showSagaById(saga);
  await refreshCharts();
}

// ---- search (SagaService/ListSagas's filters) ----

let nextPage = "";

function searchQuery() {
  const query = new URLSearchParams();
  const put = (key, value) => { if (value) query.set(key, value); };
  put("states", [...$("search-states").selectedOptions].map((o) => o.value).join(","));
  put("saga_type", $("search-type").value.trim());
  for (const key of ["created_after", "created_before", "finished_after", "finished_before"]) {
    const value = $("search-" + key).value;
    put(key, value ? new Date(value).toISOString() : "");
  }
  put("failure_reason_contains", $("search-reason").value.trim());
  put("order_id", $("search-order").value.trim());
  put("customer_id", $("search-customer").value.trim());
  put("version", $("search-version").value.trim());
  if ($("search-stuck").checked) query.set("stuck_only", "true");
  if ($("search-unknown-version").checked) query.set("unknown_version_only", "true");
  return query;
}

function sagaRow(saga) {
  const link = document.createElement("a");
  link.textContent = saga.order_id;
  link.className = "mono";
  link.onclick = () => showSagaById(saga.saga_id).catch(report);
  const stuck = saga.stuck_since ? `stuck since ${time(saga.stuck_since)}: ${saga.stuck_reason ?? ""}` : "";
  const unknown = saga.version_unknown ? "no live replica carries its version" : "";
  return row([link, stateCell(saga.state), `${saga.saga_type} v${saga.version}`, time(saga.created_at),
    saga.finished_at ? time(saga.finished_at) : "", stuck || unknown || saga.failure_reason || ""],
    saga.stuck_since || saga.version_unknown ? "stuck" : "");
}

async function search(more) {
  const query = searchQuery();
  if (more) query.set("page_token", nextPage);
  const response = await api("/api/sagas?" + query);
  const answer = await response.json();
  if (!response.ok) {
    $("search-result").textContent = `${answer.code}: ${answer.message}`;
    return;
  }
  $("search-result").textContent = "";
  const rows = answer.sagas.map(sagaRow);
  if (more) $("search-results").append(...rows); else fill("search-results", rows, "no saga matches");
  nextPage = answer.next_page_token;
  $("search-more").hidden = !nextPage;
}

/// The stuck sagas, always on show.
async function refreshStuck() {
  const response = await api("/api/sagas?stuck_only=true&page_size=20");
  if (!response.ok) return;
  const answer = await response.json();
  $("stuck").textContent = answer.sagas.length + (answer.next_page_token ? "+" : "");
  $("stuck").className = "value" + (answer.sagas.length > 0 ? " failed" : "");
  fill("stuck-sagas", answer.sagas.map(sagaRow), "none");
}

/// One saga by any of its ids.
async function find(event) {
  event.preventDefault();
  const id = $("find-id").value.trim();
  const result = $("find-result");
  if (!id) return;
  for (const key of ["saga", "order", "correlation"]) {
    const response = await api(`/api/saga?${key}=` + encodeURIComponent(id));
    if (response.ok) {
      result.textContent = "";
      const one = await response.json();
      correlation = one.saga.correlation_id;
      $("trace-id").textContent = correlation;
      return showSaga(one);
    }
  }
  result.textContent = "no saga has that id";
}

function showLogin() {
  $("dashboard").hidden = true;
  $("login").hidden = false;
}

$("token-save").onclick = () => {
  token = $("token-input").value.trim();
  sessionStorage.setItem("ordersaga-token", token);
  start();
};

for (const button of document.querySelectorAll("button[data-action]")) {
  button.onclick = () => ask(button.dataset.action);
}
$("confirm-ok").onclick = () => confirmAction().catch((error) => { $("action-result").textContent = String(error); });
$("confirm-cancel").onclick = () => { pending = null; $("confirm").close(); };
const report = (error) => { $("status").textContent = String(error); };
$("find-form").onsubmit = (event) => find(event).catch((error) => { $("find-result").textContent = String(error); });
$("search-form").onsubmit = (event) => {
  event.preventDefault();
  search(false).catch((error) => { $("search-result").textContent = String(error); });
};
$("search-more").onclick = () => search(true).catch((error) => { $("search-result").textContent = String(error); });

function start() {
  if (!token) return showLogin();
  sessionStorage.setItem("ordersaga-token", token);
  $("login").hidden = true;
  $("dashboard").hidden = false;
  const tick = () => Promise.all([refresh(), refreshStuck()]).catch(report);
  const chartTick = () => refreshCharts().catch(report);
  tick();
  chartTick();
  setInterval(tick, 2000);
  setInterval(chartTick, 10000);
}

start();
