// vmeter's built-in dashboard. Everything it shows comes from the collector's own API
// (/v2/meters/<meter>/statistics), with the caller's token (X-Auth-Token), so it sees what
// that token may see. State lives in the URL fragment (#view=vm&vm=<id>&range=24h&refresh=30),
// so a view can be bookmarked; a token given as #token=… is moved to sessionStorage and
// taken out of the address at once.
//
// For tests and measurements, the page states what it drew: <body data-state> is
// "loading", "drawn" or "error"; data-draws counts completed draws; data-load-ms is the time
// from navigation to the first complete draw; each chart's section has data-series, a JSON
// list of {label, points, sum, last} of the series it plotted.
"use strict";

const $ = (id) => document.getElementById(id);
const RANGES = { "1h": 3600, "6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400 };
const TOP = 10;       // VMs in the fleet's table
const TOP_CHART = 5;  // VMs in the fleet's CPU chart
let timer = null;
let generation = 0;   // a newer draw makes older, slower ones drop their results

// ---- URL state -------------------------------------------------------------------------

function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  if (h.has("token")) {
    sessionStorage.setItem("vmeter-token", h.get("token"));
    h.delete("token");
    history.replaceState(null, "", "#" + h.toString());
  }
  return {
    vm: h.get("vm") || "",
    range: h.get("range") || "24h",
    from: h.get("from") || "",
    to: h.get("to") || "",
    refresh: h.has("refresh") ? Number(h.get("refresh")) : 30,
  };
}

function writeHash(s) {
  const h = new URLSearchParams();
  h.set("view", s.vm ? "vm" : "fleet");
  if (s.vm) h.set("vm", s.vm);
  h.set("range", s.range);
  if (s.range === "custom") { h.set("from", s.from); h.set("to", s.to); }
  h.set("refresh", String(s.refresh));
  if (location.hash.slice(1) !== h.toString()) location.hash = h.toString();
}

function token() { return sessionStorage.getItem("vmeter-token") || ""; }

// ---- the API ---------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, params) {
  const headers = { Accept: "application/json" };
  if (token()) headers["X-Auth-Token"] = token();
  const res = await fetch(path + "?" + params.toString(), { headers });
  const text = await res.text();
  let body = null;
  try { body = JSON.parse(text); } catch (_) { /* not JSON: reported below */ }
  if (!res.ok) {
    const msg = body && body.error_message && body.error_message.faultstring
      ? body.error_message.faultstring : text.slice(0, 200);
    throw new ApiError(res.status, `${path}: ${res.status} ${msg}`);
  }
  return body;
}

// Ceilometer's query: q.field/q.op/q.value triplets, in order.
function query(filters, extra) {
  const p = new URLSearchParams();
  for (const [field, op, value] of filters) {
    p.append("q.field", field); p.append("q.op", op); p.append("q.value", value);
  }
  for (const [k, v] of extra || []) p.append(k, v);
  return p;
}

function stats(meter, filters, extra) {
  return api(`/v2/meters/${encodeURIComponent(meter)}/statistics`, query(filters, extra));
}

// The API's timestamps are UTC without a zone.
function epoch(ts) { return Date.parse(/[zZ]|[+-]\d\d:\d\d$/.test(ts) ? ts : ts + "Z") / 1000; }
function iso(sec) { return new Date(sec * 1000).toISOString().replace(/\.\d+Z$/, ""); }

// ---- time range ------------------------------------------------------------------------

// The range in whole minutes (the end rounded up): statistics over whole minutes come from
// the per-minute rollups, which is what keeps a day of a fleet fast.
function window_(s) {
  let to = Math.ceil(Date.now() / 60000) * 60;
  let from = to - (RANGES[s.range] || RANGES["24h"]);
  if (s.range === "custom" && s.from && s.to) {
    from = epoch(s.from); to = epoch(s.to);
  }
  // About 360 points per chart, in whole minutes: a day is 4-minute buckets.
  const period = Math.max(60, Math.ceil((to - from) / 360 / 60) * 60);
  from = Math.floor(from / period) * period;
  return { from, to, period };
}

function timeFilters(w) {
  return [["timestamp", "ge", iso(w.from)], ["timestamp", "lt", iso(w.to)]];
}

// ---- charts ----------------------------------------------------------------------------

const COLORS = ["#2f6fb3", "#d9822b", "#3a9d5d", "#b33f3f", "#7a5bb5", "#8c6d31", "#2a9fb0", "#c4508f", "#5f6b76", "#9aa92d"];

function panel(title, note, wide) {
  const sec = document.createElement("section");
  sec.className = "panel" + (wide ? " wide" : "");
  const h = document.createElement("h2"); h.textContent = title; sec.append(h);
  if (note) { const p = document.createElement("p"); p.className = "note"; p.textContent = note; sec.append(p); }
  $("main").append(sec);
  return sec;
}

// Charts are drawn once every panel of a view is in place (a chart's width is its panel's,
// which depends on how many panels share the row).
let pending = [];
function chart(sec, key, unit, series) { pending.push(() => drawChart(sec, key, unit, series)); }
function flushCharts() { const p = pending; pending = []; for (const f of p) f(); }

// series: [{label, points: [[t, v], …]}] → one uPlot chart over the union of their times.
function drawChart(sec, key, unit, series) {
  sec.dataset.chart = key;
  sec.dataset.series = JSON.stringify(series.map((s) => ({
    label: s.label,
    points: s.points.length,
    sum: s.points.reduce((a, p) => a + p[1], 0),
    last: s.points.length ? s.points[s.points.length - 1][1] : null,
  })));
  if (!series.some((s) => s.points.length)) {
    const d = document.createElement("div"); d.className = "empty"; d.textContent = "no data in this range";
    sec.append(d);
    return;
  }
  const xs = [...new Set(series.flatMap((s) => s.points.map((p) => p[0])))].sort((a, b) => a - b);
  const at = new Map(xs.map((x, i) => [x, i]));
  const data = [xs];
  for (const s of series) {
    const ys = new Array(xs.length).fill(null);
    for (const [t, v] of s.points) ys[at.get(t)] = v;
    data.push(ys);
  }
  const width = Math.max(320, sec.clientWidth - 24);
  const opts = {
    width, height: 240,
    scales: { x: { time: true } },
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
    axes: [{ values: (u, splits) => splits.map((t) => hhmm(t, u.scales.x.max - u.scales.x.min > 86400)) },
      { label: unit, size: 70 }],
    series: [{}].concat(series.map((s, i) => ({
      label: s.label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false,
      value: (u, v) => (v == null ? "–" : fmt(v)),
    }))),
    legend: { live: true },
  };
  new uPlot(opts, data, sec);
}

// Axis labels in UTC, 24-hour clock; with the date when the range is over a day.
function hhmm(t, withDate) {
  const d = new Date(t * 1000).toISOString();
  return withDate ? d.slice(5, 10) + " " + d.slice(11, 16) : d.slice(11, 16);
}

function fmt(v) {
  const a = Math.abs(v);
  if (a >= 1e9) return (v / 1e9).toFixed(2) + " G";
  if (a >= 1e6) return (v / 1e6).toFixed(2) + " M";
  if (a >= 1e4) return (v / 1e3).toFixed(1) + " k";
  return v.toFixed(a < 10 ? 2 : 1);
}

// Statistics rows → points (bucket start, value of `field`).
function points(rows, field) {
  return rows.map((r) => [epoch(r.period_start), r[field]]).sort((a, b) => a[0] - b[0]);
}

// groupby rows → one series per value of `key` (labelled by `label(row)`).
function grouped(rows, key, label, field) {
  const by = new Map();
  for (const r of rows) {
    const k = r.groupby[key];
    if (!by.has(k)) by.set(k, { label: label(r), rows: [] });
    by.get(k).rows.push(r);
  }
  return [...by.values()].map((g) => ({ label: g.label, points: points(g.rows, field || "avg") }));
}

// ---- views -----------------------------------------------------------------------------

// Every VM with cpu_util in the window: [{id, name, project, avg, max}], busiest first.
// Names come from /v2/resources (the statistics group by ids, as Ceilometer's do), for up to
// VM_NAMES VMs; the others show their ids.
const VM_NAMES = 5000;
async function fleetVms(w) {
  const [rows, resources] = await Promise.all([
    stats("cpu_util", timeFilters(w), [["groupby", "resource_id"], ["groupby", "project_id"]]),
    api("/v2/resources", query([["meter", "eq", "cpu_util"], ["timestamp", "ge", iso(w.from)]],
      [["limit", String(VM_NAMES)], ["meter_links", "0"]])),
  ]);
  const names = new Map(resources.map((r) => {
    const md = r.metadata || {};
    return [r.resource_id, md.display_name || md.name || r.resource_id];
  }));
  const by = new Map();
  for (const r of rows) {
    const id = r.groupby.resource_id;
    const v = by.get(id) || { id, name: names.get(id) || id, project: "", sum: 0, count: 0, max: -Infinity };
    // A VM moved to another project in the window has a group per project: combine them.
    v.sum += r.sum; v.count += r.count; v.max = Math.max(v.max, r.max);
    v.project = r.groupby.project_id || v.project;
    by.set(id, v);
  }
  return [...by.values()].map((v) => ({ ...v, avg: v.sum / v.count }))
    .sort((a, b) => b.avg - a.avg || a.id.localeCompare(b.id));
}

function fillVmSelect(vms, current) {
  const sel = $("vm");
  const known = new Map([...sel.options].map((o) => [o.value, o]));
  for (const v of [...vms].sort((a, b) => a.name.localeCompare(b.name))) {
    const o = known.get(v.id) || sel.appendChild(document.createElement("option"));
    o.value = v.id; o.textContent = `${v.name} (${v.project || "no project"})`;
  }
  sel.value = current;
}

async function drawFleet(w, gen) {
  const vms = await fleetVms(w);
  const [perProject, ...top] = await Promise.all([
    stats("cpu_util", timeFilters(w), [["groupby", "project_id"], ["period", String(w.period)]]),
    ...vms.slice(0, TOP_CHART).map((v) =>
      stats("cpu_util", [["resource_id", "eq", v.id], ...timeFilters(w)], [["period", String(w.period)]])),
  ]);
  if (gen !== generation) return false;
  $("main").replaceChildren();
  fillVmSelect(vms, "");

  const t = panel(`Top ${TOP} VMs by CPU`, `average and peak cpu_util over the range; ${vms.length} VMs reported`, false);
  t.dataset.chart = "top";
  t.dataset.series = JSON.stringify(vms.slice(0, TOP).map((v) => ({ label: v.name, id: v.id, avg: v.avg, max: v.max })));
  const table = document.createElement("table");
  table.innerHTML = "<thead><tr><th>VM</th><th>project</th><th class=num>avg %</th><th class=num>max %</th></tr></thead>";
  const body = document.createElement("tbody");
  for (const v of vms.slice(0, TOP)) {
    const tr = document.createElement("tr");
    tr.dataset.resource = v.id;
    for (const [text, cls] of [[v.name, ""], [v.project, ""], [v.avg.toFixed(1), "num"], [v.max.toFixed(1), "num"]]) {
      const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; tr.append(td);
    }
    tr.addEventListener("click", () => { state.vm = v.id; go(); });
    body.append(tr);
  }
  table.append(body);
  t.append(table);

  chart(panel(`CPU % of the ${Math.min(TOP_CHART, vms.length)} busiest VMs`, `average per ${w.period / 60} min`, false),
    "top-cpu", "%", vms.slice(0, TOP_CHART).map((v, i) => ({ label: v.name, points: points(top[i], "avg") })));
  chart(panel("CPU % per project", `average cpu_util of the project's VMs per ${w.period / 60} min`, true),
    "project-cpu", "%", grouped(perProject, "project_id", (r) => r.groupby.project_id || "(none)"));
  return true;
}

async function drawVm(w, gen, vm) {
  const mine = [["resource_metadata.instance_id", "eq", vm], ...timeFilters(w)];
  const per = ["period", String(w.period)];
  const byDevice = [["groupby", "resource_id"], per];
  const [cpu, mem, dr, dw, ni, no, vms] = await Promise.all([
    stats("cpu_util", [["resource_id", "eq", vm], ...timeFilters(w)], [per]),
    stats("memory.usage", [["resource_id", "eq", vm], ...timeFilters(w)], [per]),
    stats("disk.device.read.bytes.rate", mine, byDevice),
    stats("disk.device.write.bytes.rate", mine, byDevice),
    stats("network.incoming.bytes.rate", mine, byDevice),
    stats("network.outgoing.bytes.rate", mine, byDevice),
    fleetVms(w),
  ]);
  if (gen !== generation) return false;
  $("main").replaceChildren();
  fillVmSelect(vms, vm);
  const me = vms.find((v) => v.id === vm);
  const who = me ? `${me.name} · project ${me.project || "none"} · ${vm}` : vm;
  // Device resource ids end with "<instance id>-<device>" (disks: "<id>-vda"; vNICs:
  // "<domain>-<id>-tap…"): label a series by its device.
  const dev = (prefix) => (r) => {
    const rid = r.groupby.resource_id, at = rid.lastIndexOf(vm + "-");
    return prefix + " " + (at >= 0 ? rid.slice(at + vm.length + 1) : rid);
  };
  chart(panel("CPU %", who, false), "cpu", "%", [
    { label: "avg", points: points(cpu, "avg") }, { label: "max", points: points(cpu, "max") }]);
  chart(panel("Memory used (MiB)", "memory.usage: guest memory in use (balloon statistics)", false), "memory", "MiB", [
    { label: "avg", points: points(mem, "avg") }]);
  chart(panel("Disk (bytes/s)", "per device, read and write", false), "disk", "B/s",
    [...grouped(dr, "resource_id", dev("read")), ...grouped(dw, "resource_id", dev("write"))]);
  chart(panel("Network (bytes/s)", "per interface, in and out", false), "network", "B/s",
    [...grouped(ni, "resource_id", dev("in")), ...grouped(no, "resource_id", dev("out"))]);
  return true;
}

// ---- the loop --------------------------------------------------------------------------

let state = readHash();

function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

// A refresh keeps the drawn charts (and data-state "drawn") until the new ones are ready;
// a new view or range says "loading" at once.
async function draw(refresh) {
  const gen = ++generation;
  const w = window_(state);
  if (refresh !== true) {
    document.body.dataset.state = "loading";
    status("loading…");
  }
  try {
    pending = [];
    const done = state.vm ? await drawVm(w, gen, state.vm) : await drawFleet(w, gen);
    if (!done) return;
    flushCharts();
    document.body.dataset.draws = String(Number(document.body.dataset.draws) + 1);
    if (!document.body.dataset.loadMs) document.body.dataset.loadMs = String(Math.round(performance.now()));
    document.body.dataset.state = "drawn";
    status(`${iso(w.from)} – ${iso(w.to)} UTC · updated ${new Date().toISOString().slice(11, 19)} UTC`);
  } catch (e) {
    if (gen !== generation) return;
    document.body.dataset.state = "error";
    document.body.dataset.error = String(e.message || e);
    status(e.status === 401 || e.status === 403
      ? "This API needs a token: enter one above (it stays in this tab only)."
      : "Could not load: " + (e.message || e), true);
  }
}

function schedule() {
  clearInterval(timer);
  timer = state.refresh > 0 ? setInterval(() => draw(true), state.refresh * 1000) : null;
}

function go() {
  writeHash(state);
  syncControls();
  schedule();
  draw();
}

function syncControls() {
  $("range").value = state.range;
  $("custom").hidden = state.range !== "custom";
  $("from").value = state.from; $("to").value = state.to;
  $("refresh").value = String(state.refresh);
  if ($("vm").value !== state.vm) {
    if (![...$("vm").options].some((o) => o.value === state.vm)) {
      const o = document.createElement("option"); o.value = state.vm; o.textContent = state.vm; $("vm").append(o);
    }
    $("vm").value = state.vm;
  }
}

$("vm").addEventListener("change", (e) => { state.vm = e.target.value; go(); });
$("range").addEventListener("change", (e) => {
  state.range = e.target.value;
  if (state.range === "custom" && !(state.from && state.to)) {
    const w = window_({ range: "24h" });
    state.from = iso(w.from).slice(0, 16); state.to = iso(w.to).slice(0, 16);
  }
  go();
});
for (const id of ["from", "to"]) {
  $(id).addEventListener("change", (e) => { state[id] = e.target.value; if (state.from && state.to) go(); });
}
$("refresh").addEventListener("change", (e) => { state.refresh = Number(e.target.value); go(); });
$("auth").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("vmeter-token", $("token").value.trim());
  $("token").value = "";
  draw();
});
window.addEventListener("hashchange", () => {
  const next = readHash();
  if (JSON.stringify(next) !== JSON.stringify(state)) { state = next; syncControls(); schedule(); draw(); }
});

go();
