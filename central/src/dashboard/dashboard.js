// The Pimesh dashboard: one site's nodes and rollouts, read every 2 s from the central
// server's /v1/sites/<site>/overview with the session token `pimeshctl dashboard` made.
// Every string a node or an operator sent is shown with textContent: never parsed as HTML.
"use strict";

const REFRESH_MS = 2000;
const HEALTHY = new Set(["applied", "trying"]);

function session() {
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("token") && hash.get("site")) {
    sessionStorage.setItem("pimesh-site", hash.get("site"));
    sessionStorage.setItem("pimesh-token", hash.get("token"));
    history.replaceState(null, "", location.pathname);
  }
  return { site: sessionStorage.getItem("pimesh-site"), token: sessionStorage.getItem("pimesh-token") };
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function bar(row, done, of) {
  const td = cell(row, "");
  const outer = document.createElement("span");
  outer.className = "bar";
  const inner = document.createElement("span");
  inner.style.width = (of === 0 ? 100 : Math.round((100 * done) / of)) + "%";
  outer.appendChild(inner);
  td.appendChild(outer);
  td.appendChild(document.createTextNode(" " + done + "/" + of));
}

function age(seconds) {
  if (seconds < 90) return seconds + " s ago";
  if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
  return Math.round(seconds / 3600) + " h ago";
}

// The certificate of `dates` (node, issuer, anchor: seconds since the epoch) that expires
// first, in days from `now`; its cell is "bad" within a week, "warn" within a month, and its
// title lists each date.
function certificates(row, dates, now) {
  if (!dates) return cell(row, "");
  const named = ["node", "issuer", "anchor"].filter((name) => Number.isFinite(dates[name]));
  if (!named.length) return cell(row, "");
  const first = named.reduce((a, b) => (dates[b] < dates[a] ? b : a));
  const days = Math.floor((dates[first] - now) / 86400);
  const text = days < 0 ? `${first} expired` : `${first} in ${days} d`;
  const td = cell(row, text, days < 7 ? "bad" : days < 30 ? "warn" : "good");
  td.title = named.map((name) => `${name}: ${new Date(dates[name] * 1000).toISOString().slice(0, 10)}`).join(", ");
  return td;
}

// A success rate's class: "bad" below 90 %, "warn" below 99 %.
function health(success) {
  return success < 0.9 ? "bad" : success < 0.99 ? "warn" : "good";
}

// One line per service the node's apps called, from the report's `traffic` (counts over
// `window_s` seconds): requests per second, success rate, p50 and p99 latency, each line of
// its service's health and the cell of the worst.
function traffic(row, measured) {
  if (!measured || !measured.services.length) return cell(row, "");
  const td = cell(row, "", "traffic");
  let worst = 1;
  for (const s of measured.services) {
    const line = document.createElement("div");
    line.className = "service";
    line.dataset.service = s.service;
    const rps = measured.window_s > 0 ? s.requests / measured.window_s : 0;
    const parts = [s.service, `${rps.toFixed(rps < 10 ? 2 : 1)} rps`];
    if (s.answered > 0) {
      const success = (s.answered - s.failures) / s.answered;
      worst = Math.min(worst, success);
      parts.push(`${(100 * success).toFixed(1)} % ok`);
      line.className += " " + health(success);
    }
    const ms = (us) => (us < 10000 ? (us / 1000).toFixed(1) : Math.round(us / 1000)) + " ms";
    if (Number.isFinite(s.p50_us)) parts.push(`p50 ${ms(s.p50_us)}`);
    if (Number.isFinite(s.p99_us)) parts.push(`p99 ${ms(s.p99_us)}`);
    line.textContent = parts.join(" · ");
    td.appendChild(line);
  }
  td.className = "traffic " + health(worst);
  td.title = `over the ${measured.window_s} s before the report`;
  return td;
}

function fill(id, rows) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren(...rows);
}

function render(view) {
  document.getElementById("site").textContent = view.site;
  const newest = view.latest_revision;
  const nodes = view.nodes;
  const onNewest = nodes.filter((n) => n.revision === newest && HEALTHY.has(n.state)).length;
  const failed = nodes.filter((n) => !HEALTHY.has(n.state)).length;
  const summary = document.getElementById("summary");
  summary.textContent = newest === null
    ? "no revision published"
    : `${onNewest}/${nodes.length} on revision ${newest}` + (failed ? `, ${failed} failed` : "");
  summary.dataset.value = `${onNewest}/${nodes.length}`;
  summary.className = failed ? "bad" : onNewest === nodes.length ? "good" : "warn";

  fill("nodes", nodes.map((node) => {
    const row = document.createElement("tr");
    row.dataset.node = node.node;
    cell(row, node.node);
    cell(row, node.revision === null ? "none" : node.revision);
    cell(row, node.state, HEALTHY.has(node.state) ? "good" : "bad");
    cell(row, node.k3s ? `${node.k3s.role} ${node.k3s.ready ? "ready" : "not ready"}` : "");
    certificates(row, node.certificates, view.now);
    traffic(row, node.traffic);
    cell(row, node.received_at ? age(Math.max(0, view.now - node.received_at)) : "");
    cell(row, node.detail, "detail");
    return row;
  }));

  const rollout = view.rollouts[0];
  const release = rollout && rollout.plan.fleet ? `, release ${rollout.plan.fleet.release}` : "";
  document.getElementById("rollout-revision").textContent = rollout ? `of revision ${rollout.revision}${release}` : "";
  const state = document.getElementById("rollout-state");
  state.textContent = rollout ? rollout.state : "none";
  state.className = rollout && (rollout.state === "halted" || rollout.state === "aborted") ? "bad" : "";
  document.getElementById("rollout-reason").textContent = rollout && rollout.reason ? "— " + rollout.reason : "";
  const stages = rollout ? rollout.plan.waves.map((p) => p + "%") : [];
  if (rollout && rollout.plan.canary.length) stages.unshift("canary");
  fill("waves", stages.map((name, i) => {
    const row = document.createElement("tr");
    row.dataset.wave = name;
    const wave = rollout.waves[i];
    cell(row, name);
    if (!wave) {
      cell(row, "not started");
      return row;
    }
    const last = i === stages.length - 1;
    const earlier = new Set(rollout.waves.slice(0, i).flatMap((w) => w.nodes));
    const members = last
      ? [...new Set([...rollout.applied, ...Object.keys(rollout.failed), ...rollout.offline, ...wave.nodes])].filter((n) => !earlier.has(n))
      : wave.nodes;
    const count = (set) => members.filter((n) => set.has(n)).length;
    const applied = count(new Set(rollout.applied));
    cell(row, members.length);
    cell(row, applied);
    cell(row, count(new Set(Object.keys(rollout.failed))));
    cell(row, count(new Set(rollout.offline)));
    bar(row, applied, members.length);
    row.dataset.applied = applied;
    return row;
  }));

  fill("history", view.rollouts.map((r) => {
    const row = document.createElement("tr");
    cell(row, r.revision);
    cell(row, r.state, r.state === "halted" || r.state === "aborted" ? "bad" : "");
    cell(row, `${r.waves.length}/${r.plan.waves.length + (r.plan.canary.length ? 1 : 0)} started`);
    cell(row, r.applied.length);
    cell(row, Object.keys(r.failed).length);
    return row;
  }));
  document.getElementById("updated").textContent = new Date().toLocaleTimeString();
}

async function refresh() {
  const { site, token } = session();
  const problem = document.getElementById("problem");
  if (!site || !token) {
    problem.hidden = false;
    problem.textContent = "No session: open the URL `pimeshctl dashboard` prints.";
    return;
  }
  try {
    const answer = await fetch(`/v1/sites/${encodeURIComponent(site)}/overview`, {
      headers: { Authorization: "Bearer " + token },
      cache: "no-store",
    });
    const body = await answer.json();
    if (!answer.ok) throw new Error(body.error || answer.statusText);
    problem.hidden = true;
    render(body);
  } catch (err) {
    problem.hidden = false;
    problem.textContent = "Cannot read the site: " + err.message;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
