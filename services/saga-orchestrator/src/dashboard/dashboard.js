"use strict";
// The token and the selected flow travel in the fragment, never to the server.
const params = new URLSearchParams(location.hash.slice(1));
let token = params.get("token") || sessionStorage.getItem("ordersaga-token");
let correlation = params.get("correlation");

const $ = (id) => document.getElementById(id);
const text = (value) => document.createTextNode(value ?? "");
const time = (iso) => new Date(iso).toLocaleTimeString();

function row(cells) {
  const tr = document.createElement("tr");
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
  a.onclick = () => { correlation = id; showTrace(); };
  return a;
}

function stateCell(state) {
  const span = document.createElement("span");
  span.textContent = state;
  span.className = state;
  return span;
}

async function api(path) {
  const response = await fetch(path, { headers: { authorization: "Bearer " + token } });
  if (response.status === 401 || response.status === 403) {
    sessionStorage.removeItem("ordersaga-token");
    token = null;
    showLogin();
    throw new Error("not authorized");
  }
  if (!response.ok) throw new Error(path + ": " + response.status);
  return response.json();
}

async function refresh() {
  const summary = await api("/api/summary");
  $("running").textContent = summary.active.running;
  $("compensating").textContent = summary.active.compensating;
  $("failed").textContent = summary.active.failed;
  $("overdue").textContent = summary.active.overdue;
  $("overdue").className = "value" + (summary.active.overdue > 0 ? " failed" : "");
  fill("overdue-sagas", summary.overdue.map((o) =>
    row([flowLink(o.order_id, o.correlation_id), o.step, time(o.overdue_since)])), "none");
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
  if (correlation) await showTrace();
}

async function showTrace() {
  $("trace-id").textContent = correlation;
  const events = await api("/api/trace?correlation=" + encodeURIComponent(correlation));
  const start = events.length ? new Date(events[0].occurred_at) : null;
  // An event caused by another of the flow points at its row; one caused
  // by a request shows the request's id.
  const position = new Map(events.map((e, i) => [e.event_id, i + 1]));
  const cause = (e) => !e.causation_id ? "" :
    position.has(e.causation_id) ? "#" + position.get(e.causation_id) : "request " + e.causation_id;
  fill("trace", events.map((e, i) =>
    row(["#" + (i + 1), time(e.occurred_at), "+" + (new Date(e.occurred_at) - start) + " ms", e.service, e.summary, cause(e)])), "no events for this flow");
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

function start() {
  if (!token) return showLogin();
  sessionStorage.setItem("ordersaga-token", token);
  $("login").hidden = true;
  $("dashboard").hidden = false;
  const tick = () => refresh().catch((error) => { $("status").textContent = String(error); });
  tick();
  setInterval(tick, 2000);
}

start();
