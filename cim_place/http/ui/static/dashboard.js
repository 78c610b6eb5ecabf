// The cim-place dashboard: polls the read-only JSON API under /ui/api/ every 2 s and renders it.
// Every value goes into the page through textContent, never as HTML, so names and metadata
// cannot inject markup or script.
"use strict";

const REFRESH_MS = 2000;
const PAGE = 25;
const api = (path) => new URL("api/" + path, document.baseURI).toString();
const view = { q: "", state: "", cursors: [""], selected: "" };

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function badge(text) {
  return el("span", text, "badge " + String(text).replace(/[^a-z]/g, ""));
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.append(cell);
    else if (cell && typeof cell === "object") {
      td.textContent = cell.text ?? "";
      if (cell.cls) td.className = cell.cls;
      if (cell.title) td.title = cell.title;
    } else td.textContent = cell ?? "";
    tr.append(td);
  }
  return tr;
}

function fill(id, rows, columns, emptyText) {
  const body = document.getElementById(id);
  if (!rows.length) {
    const tr = row([emptyText]);
    tr.className = "empty";
    tr.firstChild.colSpan = columns;
    body.replaceChildren(tr);
  } else body.replaceChildren(...rows);
}

function size(bytes) {
  let value = Number(bytes) || 0;
  for (const unit of ["B", "KiB", "MiB", "GiB", "TiB"]) {
    if (value < 1024 || unit === "TiB") return unit === "B" ? `${value} B` : `${value.toFixed(1)} ${unit}`;
    value /= 1024;
  }
  return `${bytes} B`;
}

function ago(epochSeconds) {
  if (!epochSeconds) return "";
  const s = Math.max(0, Date.now() / 1000 - epochSeconds);
  if (s < 120) return `${s.toFixed(0)}s ago`;
  if (s < 7200) return `${(s / 60).toFixed(0)}m ago`;
  return `${(s / 3600).toFixed(0)}h ago`;
}

const shortCid = (cid) => (cid && cid.length > 20 ? `${cid.slice(0, 10)}…${cid.slice(-8)}` : cid || "");

async function getJson(path) {
  const response = await fetch(api(path), { cache: "no-store", credentials: "same-origin" });
  const doc = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(doc.error || `${path}: HTTP ${response.status}`);
  return doc;
}

function renderSummary(summary) {
  const cards = [["objects", summary.objects, ""]];
  for (const [state, count] of Object.entries(summary.by_state)) cards.push([state, count, state]);
  cards.push(["stored", size(summary.bytes), ""]);
  const n = summary.nodes;
  cards.push(["nodes up", n.up, ""], ["late", n.late, n.late ? "degraded" : ""], ["down", n.down, n.down ? "lost" : ""]);
  document.getElementById("summary").replaceChildren(
    ...cards.map(([label, value, cls]) => {
      const card = el("div", null, "card " + cls);
      card.dataset.card = label;
      card.append(el("div", label, "label"), el("div", value, "value"));
      return card;
    }),
  );
}

function renderNodes(nodes) {
  fill("nodes-body", nodes.map((node) => {
    const total = node.used + node.free;
    const bar = el("div", null, "bar");
    const fillBar = el("span");
    fillBar.style.width = `${total ? Math.max(1, (100 * node.used) / total) : 0}%`;
    bar.append(fillBar);
    const usage = el("div", null, "usage");
    usage.append(bar, el("span", total ? `${((100 * node.used) / total).toFixed(1)}%` : ""));
    const tr = row([
      node.node, node.labels.zone || "", badge(node.state),
      node.volumes.map((v) => v.name).join(", "),
      { text: size(node.used), cls: "num" }, { text: size(node.free), cls: "num" },
      usage, ago(node.heartbeat_at),
    ]);
    tr.dataset.node = node.node;
    return tr;
  }), 8, "no node heartbeats");
}

function renderObjects(page) {
  fill("objects-body", page.objects.map((o) => {
    const tr = row([
      o.name || "—", { text: shortCid(o.cid), cls: "mono", title: o.cid }, badge(o.state),
      { text: `${o.pinned}/${o.desired}`, cls: "num" }, o.policy || "", { text: size(o.size), cls: "num" },
    ]);
    tr.dataset.cid = o.cid;
    if (o.cid === view.selected) tr.classList.add("selected");
    tr.addEventListener("click", () => select(o.cid));
    return tr;
  }), 6, view.q || view.state ? "no object matches" : "no objects yet");
  const first = (view.cursors.length - 1) * PAGE;
  document.getElementById("page-info").textContent =
    page.matched ? `${first + 1}-${first + page.objects.length} of ${page.matched}` : "";
  document.getElementById("prev").disabled = view.cursors.length < 2;
  const next = document.getElementById("next");
  next.disabled = !page.next;
  next.dataset.after = page.next || "";
}

function renderObject(doc) {
  const damaged = doc.locations.filter((l) => l.state === "damaged" || l.state === "repairing").length;
  const facts = [
    ["cid", doc.cid], ["name", doc.name || "—"], ["state", badge(doc.state)],
    ["copies", `${doc.pinned} pinned of ${doc.desired} desired` + (damaged ? `, ${damaged} damaged` : "")], ["policy", doc.policy || "—"],
    ["size", size(doc.size)], ["owner", doc.owner || "—"], ["updated", ago(doc.updated_at)],
  ];
  for (const [key, value] of Object.entries(doc.metadata || {})) facts.push([`meta: ${key}`, String(value)]);
  const list = document.getElementById("object-facts");
  list.replaceChildren();
  for (const [key, value] of facts) {
    const dd = el("dd");
    dd.append(value instanceof Node ? value : document.createTextNode(value));
    if (key === "cid") dd.className = "mono";
    dd.dataset.fact = key;
    list.append(el("dt", key), dd);
  }
  fill("replicas-body", doc.locations.map((l) => row([
    l.node, l.volume, l.zone, badge(l.state), l.verified_at ? ago(l.verified_at) : "",
  ])), 5, "no replica");
  fill("conditions-body", doc.conditions.map((c) => {
    // Placed and Progressing are good news when true, Degraded when false.
    const good = c.type === "Degraded" ? !c.status : c.status || c.type === "Progressing";
    const flag = el("span", c.status ? "yes" : "no", "badge " + (good ? "placed" : "degraded"));
    return row([c.type, flag, c.reason, c.message, ago(c.last_transition)]);
  }), 5, "no conditions yet");
  fill("history-body", doc.tasks.slice().reverse().map((t) => row([
    ago(t.at), t.action || "?", t.node, badge(t.outcome),
    t.outcome === "failed" ? t.reason : `${t.duration.toFixed(2)} s, attempt ${t.attempts}`,
  ])), 5, "no task has run for this object");
  document.getElementById("object").hidden = false;
}

function renderTasks(doc) {
  const parts = Object.entries(doc.nodes).map(([node, c]) => `${node}: ${c.queued} queued, ${c.running} running`);
  document.getElementById("task-counts").textContent =
    `${doc.queued} queued, ${doc.running} running` + (parts.length ? ` (${parts.join("; ")})` : "");
  fill("inflight-body", doc.in_flight.map((t) => row([
    t.name || shortCid(t.cid), t.node, t.volume, badge(t.state),
  ])), 4, "nothing in flight");
  fill("failed-body", doc.failed.slice().reverse().map((f) => row([
    f.node, f.action || "?", { text: shortCid(f.root), cls: "mono", title: f.root || "" },
    { text: f.attempts, cls: "num" }, f.reason + (f.permanent ? " (permanent)" : ""),
  ])), 5, "no failed tasks");
}

function select(cid) {
  view.selected = cid;
  history.replaceState(null, "", cid ? `#object=${encodeURIComponent(cid)}` : "#");
  if (!cid) document.getElementById("object").hidden = true;
  refresh();
}

function objectsQuery() {
  const params = new URLSearchParams({ limit: String(PAGE) });
  if (view.q) params.set("q", view.q);
  if (view.state) params.set("state", view.state);
  const after = view.cursors[view.cursors.length - 1];
  if (after) params.set("after", after);
  return "objects?" + params.toString();
}

let running = false;
async function refresh() {
  if (running) return;
  running = true;
  const problems = [];
  const jobs = [
    getJson("summary").then(renderSummary),
    getJson("nodes").then(renderNodes),
    getJson(objectsQuery()).then(renderObjects),
    getJson("tasks").then(renderTasks),
  ];
  if (view.selected) jobs.push(getJson("object/" + encodeURIComponent(view.selected)).then(renderObject));
  for (const result of await Promise.allSettled(jobs)) {
    if (result.status === "rejected") problems.push(result.reason.message);
  }
  const problem = document.getElementById("problem");
  problem.hidden = !problems.length;
  problem.textContent = problems[0] || "";
  document.getElementById("refreshed").textContent = `updated ${new Date().toLocaleTimeString()}`;
  running = false;
}

function start() {
  const match = /^#object=(.+)$/.exec(location.hash);
  if (match) view.selected = decodeURIComponent(match[1]);
  let typing;
  document.getElementById("q").addEventListener("input", (event) => {
    clearTimeout(typing);
    typing = setTimeout(() => { view.q = event.target.value.trim(); view.cursors = [""]; refresh(); }, 250);
  });
  document.getElementById("search").addEventListener("submit", (event) => event.preventDefault());
  document.getElementById("state").addEventListener("change", (event) => {
    view.state = event.target.value; view.cursors = [""]; refresh();
  });
  document.getElementById("next").addEventListener("click", (event) => {
    if (event.target.dataset.after) { view.cursors.push(event.target.dataset.after); refresh(); }
  });
  document.getElementById("prev").addEventListener("click", () => {
    if (view.cursors.length > 1) { view.cursors.pop(); refresh(); }
  });
  document.getElementById("close").addEventListener("click", () => select(""));
  refresh();
  setInterval(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", start);
