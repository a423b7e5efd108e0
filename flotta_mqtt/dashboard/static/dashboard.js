// flotta_mqtt dashboard: reads the retained artifact statuses and node presence over MQTT
// WebSockets and draws them. Read-only: it subscribes and never publishes.
// Everything shown comes from the bus (text is set with textContent, never as HTML).
(function () {
  "use strict";

  const STATES = ["waiting", "ready", "dispatched", "running", "completed", "failed", "cancelled", "skipped"];
  const FINAL = new Set(["completed", "failed", "cancelled", "skipped"]);
  // Progress bars fill from the left with what is done, then what is under way.
  const BAR_ORDER = ["completed", "skipped", "failed", "cancelled", "running", "dispatched", "ready", "waiting"];
  const SVG = "http://www.w3.org/2000/svg";
  const NODE_W = 180, NODE_H = 44, GAP_X = 56, GAP_Y = 16, MARGIN = 20;
  const LIST_MAX = 100;

  const model = {
    statuses: new Map(), // artifact id -> ArtifactStatus (highest seq seen)
    presence: new Map(), // node -> NodePresence
    selected: null, // artifact id the user chose (or the latest, until they choose)
    pinned: false,
    job: null, // job id whose details are open
    layouts: new Map(), // artifact id -> {key, positions, width, height}
  };

  const $ = (id) => document.getElementById(id);
  let pending = false;
  function schedule() {
    if (!pending) {
      pending = true;
      requestAnimationFrame(() => {
        pending = false;
        render();
      });
    }
  }

  // --- connection ---------------------------------------------------------------------------

  async function start() {
    const config = await (await fetch("config.json", { cache: "no-store" })).json();
    const params = new URLSearchParams(location.search);
    const url = params.get("broker") || config.broker;
    const root = config.root;
    $("broker-url").textContent = url;
    const fromHash = decodeURIComponent(location.hash.replace(/^#/, ""));
    if (fromHash) {
      model.selected = fromHash;
      model.pinned = true;
    }
    const options = {
      clean: true,
      reconnectPeriod: 2000,
      connectTimeout: 10000,
      protocolVersion: 4,
      clientId: "dashboard-" + Math.random().toString(16).slice(2, 10),
    };
    if (config.username) options.username = config.username;
    if (config.password) options.password = config.password;
    const client = mqtt.connect(url, options);
    const statusPrefix = root + "/artifacts/";
    const presencePrefix = root + "/presence/";
    client.on("connect", () => {
      setConnection("connected");
      client.subscribe([root + "/artifacts/+/+/status", root + "/presence/+"], { qos: 1 });
    });
    client.on("reconnect", () => setConnection("connecting"));
    client.on("offline", () => setConnection("offline"));
    client.on("close", () => setConnection("offline"));
    client.on("error", (err) => setConnection("error", String(err && err.message || err)));
    client.on("message", (topic, payload) => {
      if (payload.length === 0 && topic.startsWith(statusPrefix)) {
        // An emptied retained status: the scheduler pruned the artifact.
        model.statuses.delete(topic.slice(statusPrefix.length, -"/status".length));
        schedule();
        return;
      }
      let message;
      try {
        message = JSON.parse(new TextDecoder().decode(payload));
      } catch (err) {
        console.warn("unreadable message on", topic, err);
        return;
      }
      if (topic.startsWith(statusPrefix) && topic.endsWith("/status")) {
        const known = model.statuses.get(message.artifact_id);
        if (!known || message.seq > known.seq) model.statuses.set(message.artifact_id, message);
      } else if (topic.startsWith(presencePrefix)) {
        model.presence.set(message.node, message);
      }
      schedule();
    });
    window.addEventListener("hashchange", () => {
      const id = decodeURIComponent(location.hash.replace(/^#/, ""));
      if (id) select(id);
    });
  }

  function setConnection(state, detail) {
    const el = $("conn");
    el.dataset.state = state;
    el.textContent = state;
    el.title = detail || "";
  }

  function select(id) {
    model.selected = id;
    model.pinned = true;
    model.job = null;
    if (decodeURIComponent(location.hash.replace(/^#/, "")) !== id) {
      history.replaceState(null, "", "#" + encodeURIComponent(id));
    }
    schedule();
  }

  // --- rendering ----------------------------------------------------------------------------

  function render() {
    const artifacts = [...model.statuses.values()].sort((a, b) => b.updated_at - a.updated_at);
    if (!model.pinned && artifacts.length) {
      const live = artifacts.find((s) => !FINAL.has(s.state));
      model.selected = (live || artifacts[0]).artifact_id;
    }
    renderWorkers(artifacts);
    renderArtifacts(artifacts);
    renderArtifact(model.statuses.get(model.selected));
  }

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    return node;
  }

  function ago(seconds) {
    const d = Math.max(0, Date.now() / 1000 - seconds);
    if (d < 60) return Math.round(d) + " s";
    if (d < 3600) return Math.round(d / 60) + " min";
    if (d < 86400) return Math.round(d / 3600) + " h";
    return Math.round(d / 86400) + " d";
  }

  function bytes(n) {
    if (n === 1) return "1 byte";
    if (n < 1024) return n + " bytes";
    const units = ["KiB", "MiB", "GiB", "TiB"];
    let value = n / 1024, unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit++;
    }
    return value.toFixed(1) + " " + units[unit];
  }

  function clock(seconds) {
    return seconds ? new Date(seconds * 1000).toLocaleTimeString() : "";
  }

  function renderWorkers(artifacts) {
    // Jobs held per node: dispatched or running jobs of unfinished, listed artifacts.
    const busy = new Map();
    for (const status of artifacts) {
      if (FINAL.has(status.state) || !status.jobs) continue;
      for (const job of status.jobs) {
        if (job.state === "running" || job.state === "dispatched") {
          busy.set(job.worker, (busy.get(job.worker) || 0) + 1);
        }
      }
    }
    const nodes = [...model.presence.values()].sort((a, b) =>
      a.initiator === b.initiator ? a.node.localeCompare(b.node) : a.initiator ? 1 : -1);
    const body = $("workers");
    body.replaceChildren(...nodes.map((p) => {
      const caps = [...(p.executors || []).map((e) => "executor " + e),
        (p.operations || []).length + " operations"].join(", ");
      const name = el("td", { class: "node", title: caps },
        el("span", { class: "dot" + (p.online ? " online" : "") }), p.node,
        el("span", { class: "role", text: (p.initiator ? "initiator" : "worker") + " · max " + p.max_jobs }));
      return el("tr", { dataset: { node: p.node, online: String(p.online) } },
        name,
        el("td", { text: (p.projects || []).join(", ") }),
        el("td", { class: "num", text: String(busy.get(p.node) || 0) + "/" + p.max_jobs }),
        el("td", { text: (p.online ? "online " : "offline ") + ago(p.since), title: clock(p.since) }));
    }));
    $("workers-count").textContent = nodes.length
      ? nodes.filter((p) => p.online).length + " online / " + nodes.length : "";
    $("workers-empty").hidden = nodes.length > 0;
  }

  function stack(counts, total) {
    const bar = el("div", { class: "stack" });
    for (const state of BAR_ORDER) {
      const n = (counts || {})[state] || 0;
      if (!n || !total) continue;
      const part = el("span", { class: state, title: `${state} ${n}` });
      part.style.width = `${(100 * n) / total}%`; // CSSOM, which the page's CSP allows
      bar.append(part);
    }
    return bar;
  }

  function renderArtifacts(artifacts) {
    const list = $("artifacts");
    const shown = artifacts.slice(0, LIST_MAX);
    list.replaceChildren(...shown.map((s) => {
      const done = (s.counts || {}).completed || 0;
      const item = el("li", { class: s.artifact_id === model.selected ? "selected" : "", dataset: { artifact: s.artifact_id, state: s.state } },
        el("div", { class: "row" },
          el("span", { class: "id", text: s.artifact_id, title: s.artifact_id }),
          el("span", { class: "badge", dataset: { state: s.state }, text: s.state })),
        el("div", { class: "sub", text: `${s.project} · ${done}/${s.total} jobs · ${ago(s.updated_at)} ago` }),
        stack(s.counts, s.total));
      item.addEventListener("click", () => select(s.artifact_id));
      return item;
    }));
    $("artifacts-count").textContent = artifacts.length > LIST_MAX
      ? `${LIST_MAX} of ${artifacts.length}` : artifacts.length ? String(artifacts.length) : "";
    $("artifacts-empty").hidden = artifacts.length > 0;
  }

  function renderArtifact(status) {
    $("artifact-empty").hidden = !!status;
    $("artifact").hidden = !status;
    if (!status) return;
    $("artifact-title").textContent = status.artifact_id;
    const done = (status.counts || {}).completed || 0;
    $("artifact-meta").textContent =
      `project ${status.project} · ${done}/${status.total} jobs completed · update ${status.seq} at ${clock(status.updated_at)}`;
    const badge = $("artifact-state");
    badge.textContent = status.state;
    badge.dataset.state = status.state;
    const error = $("artifact-error");
    error.hidden = !status.error;
    if (status.error) {
      const where = status.failed_job != null ? ` (job ${status.failed_job})` : "";
      error.textContent = `${status.error.type}${where}: ${status.error.message}`;
    }
    $("artifact-bar").replaceWith(Object.assign(stack(status.counts, status.total), { id: "artifact-bar" }));
    $("legend").replaceChildren(...STATES.map((state) =>
      el("span", {}, el("i", { class: state }), `${state} ${(status.counts || {})[state] || 0}`)));
    renderDag(status);
    renderJob(status);
  }

  // --- the DAG: layers by longest path, ordered by the barycentre of neighbours ---------------

  function layout(status) {
    const key = status.jobs.length + ":" + status.locks.length;
    const cached = model.layouts.get(status.artifact_id);
    if (cached && cached.key === key) return cached;
    const ids = status.jobs.map((j) => j.id).sort((a, b) => a - b);
    const preds = new Map(ids.map((i) => [i, []]));
    const succs = new Map(ids.map((i) => [i, []]));
    for (const [a, b] of status.locks) {
      if (preds.has(b) && succs.has(a)) {
        preds.get(b).push(a);
        succs.get(a).push(b);
      }
    }
    const layer = new Map();
    const waiting = new Map(ids.map((i) => [i, preds.get(i).length]));
    const ready = ids.filter((i) => waiting.get(i) === 0);
    while (ready.length) {
      const job = ready.shift();
      layer.set(job, Math.max(-1, ...preds.get(job).map((p) => layer.get(p))) + 1);
      for (const next of succs.get(job)) {
        waiting.set(next, waiting.get(next) - 1);
        if (waiting.get(next) === 0) ready.push(next);
      }
    }
    const columns = [];
    for (const id of ids) {
      const l = layer.has(id) ? layer.get(id) : 0;
      (columns[l] = columns[l] || []).push(id);
    }
    const row = new Map();
    columns.forEach((column) => column.forEach((job, i) => row.set(job, i)));
    for (let sweep = 0; sweep < 4; sweep++) {
      const forward = sweep % 2 === 0;
      const neighbours = forward ? preds : succs;
      const order = forward ? columns.slice(1) : columns.slice(0, -1).reverse();
      for (const column of order) {
        const keyOf = new Map(column.map((job) => {
          const ns = neighbours.get(job);
          return [job, ns.length ? ns.reduce((s, n) => s + row.get(n), 0) / ns.length : row.get(job)];
        }));
        column.sort((a, b) => keyOf.get(a) - keyOf.get(b) || row.get(a) - row.get(b));
        column.forEach((job, i) => row.set(job, i));
      }
    }
    const rows = Math.max(0, ...columns.map((c) => c.length));
    const positions = new Map();
    columns.forEach((column, index) => {
      const offset = ((rows - column.length) * (NODE_H + GAP_Y)) / 2;
      column.forEach((job, i) => positions.set(job, [MARGIN + index * (NODE_W + GAP_X), MARGIN + offset + i * (NODE_H + GAP_Y)]));
    });
    const result = {
      key,
      positions,
      width: MARGIN * 2 + columns.length * NODE_W + Math.max(0, columns.length - 1) * GAP_X,
      height: MARGIN * 2 + rows * NODE_H + Math.max(0, rows - 1) * GAP_Y,
    };
    model.layouts.set(status.artifact_id, result);
    return result;
  }

  function cut(text, limit) {
    return text.length <= limit ? text : text.slice(0, limit - 1) + "…";
  }

  function renderDag(status) {
    const dag = $("dag");
    const note = $("dag-note");
    if (!status.jobs || !status.locks) {
      dag.replaceChildren();
      dag.setAttribute("width", 0);
      dag.setAttribute("height", 0);
      note.hidden = false;
      note.textContent = status.total
        ? `${status.total} jobs: too large to draw (statuses list every job only for artifacts of at most 300 jobs).`
        : `Not bound to workers yet (${status.state}): no jobs to draw.`;
      return;
    }
    note.hidden = true;
    const { positions, width, height } = layout(status);
    dag.setAttribute("width", width);
    dag.setAttribute("height", height);
    dag.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const byId = new Map(status.jobs.map((j) => [j.id, j]));
    const defs = svg("defs");
    const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
    marker.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#6b7280" }));
    defs.append(marker);
    const children = [defs];
    for (const [a, b] of status.locks) {
      if (!positions.has(a) || !positions.has(b)) continue;
      const [xa, ya] = positions.get(a), [xb, yb] = positions.get(b);
      const x1 = xa + NODE_W, y1 = ya + NODE_H / 2, x2 = xb, y2 = yb + NODE_H / 2;
      const bend = Math.max(GAP_X / 2, (x2 - x1) / 2);
      const released = byId.get(a) && byId.get(a).state === "completed";
      children.push(svg("path", {
        class: "lock" + (released ? " done" : ""), "data-from": a, "data-to": b, "marker-end": "url(#arrow)",
        d: `M ${x1} ${y1} C ${x1 + bend} ${y1}, ${x2 - bend} ${y2}, ${x2} ${y2}`,
      }));
    }
    for (const job of status.jobs) {
      const [x, y] = positions.get(job.id);
      const g = svg("g", { class: `job ${job.state}${job.id === model.job ? " selected" : ""}`, "data-job-id": job.id, "data-state": job.state, tabindex: 0 });
      const title = svg("title");
      title.textContent = `job ${job.id} · ${job.name || "step " + job.step} · ${job.worker} · ${job.state}`;
      const label = svg("text", { class: "label", x: x + 10, y: y + 18 });
      label.textContent = cut(job.name || job.worker, 22);
      const sub = svg("text", { class: "sub", x: x + 10, y: y + 34 });
      sub.textContent = cut((job.name ? `${job.state} · ${job.worker}` : `step ${job.step} · ${job.state}`) + (job.attempt > 1 ? ` · try ${job.attempt}` : ""), 27);
      g.append(title, svg("rect", { x, y, width: NODE_W, height: NODE_H, rx: 7 }), label, sub);
      g.addEventListener("click", () => {
        model.job = model.job === job.id ? null : job.id;
        schedule();
      });
      g.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") {
          model.job = job.id;
          schedule();
        }
      });
      children.push(g);
    }
    dag.replaceChildren(...children);
  }

  function renderJob(status) {
    const panel = $("job");
    const job = status.jobs && status.jobs.find((j) => j.id === model.job);
    panel.hidden = !job;
    if (!job) return;
    $("job-title").textContent = `job ${job.id} · ${job.name || "step " + job.step} on ${job.worker}`;
    const waitsFor = (status.locks || []).filter(([, b]) => b === job.id).map(([a]) => a);
    const unlocks = (status.locks || []).filter(([a]) => a === job.id).map(([, b]) => b);
    const duration = job.started_at && job.finished_at ? (job.finished_at - job.started_at).toFixed(3) + " s" : "";
    const fields = [
      ["state", job.state],
      ["step", job.step],
      ["worker", job.worker],
      ["attempt", String(job.attempt)],
      ["started", clock(job.started_at)],
      ["finished", clock(job.finished_at)],
      ["duration", duration],
      ["product size", job.size != null ? bytes(job.size) : ""],
      ["exit code", job.exit_code != null ? String(job.exit_code) : ""],
      ["waits for", waitsFor.length ? "jobs " + waitsFor.join(", ") : "nothing"],
      ["unlocks", unlocks.length ? "jobs " + unlocks.join(", ") : "nothing (a final job)"],
      ["error", job.error || ""],
    ].filter(([, value]) => value !== "");
    $("job-fields").replaceChildren(...fields.flatMap(([name, value]) => [
      el("dt", { text: name }), el("dd", { dataset: { field: name }, text: value })]));
  }

  start().catch((err) => {
    setConnection("error", String(err));
    console.error(err);
  });
})();
