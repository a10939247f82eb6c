// The status page: reads /api/status and /api/decisions (this origin only), renders every
// string as text (never as HTML), and refreshes itself. No build step, no dependency.
"use strict";

const REFRESH_MS = 2000;

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  }
  return node;
}

function fill(parent, ...children) {
  parent.replaceChildren(...children);
}

async function getJSON(path) {
  const response = await fetch(path, {credentials: "same-origin", cache: "no-store"});
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

async function postJSON(path, value) {
  const response = await fetch(path, {
    method: "POST", credentials: "same-origin", cache: "no-store",
    headers: {"content-type": "application/json"}, body: JSON.stringify(value),
  });
  const body = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function badge(server) {
  const kind = server.public ? "public" : server.visible_to.length ? "audience" : "internal";
  return el("span", {class: `badge ${kind}`}, server.badge);
}

function token(state) {
  const words = {
    none: "none (callers bring their own)", warm: "warm", fetching: "fetching",
    refreshing: "refreshing", failing: "failing", per_user: "per user (token exchange)",
  }[state.state] || state.state;
  const cell = el("span", {class: state.state}, words);
  const details = [];
  if (state.age_s !== undefined) details.push(`age ${state.age_s} s, usable ${state.usable_for_s} s more`);
  if (state.error) details.push(`${state.state === "failing" ? "" : "last refresh failed: "}${state.error}`);
  if (state.users !== undefined) details.push(`${state.users} user(s) held`);
  if (state.actor) details.push(`actor token ${state.actor.state}`);
  return el("span", {}, cell, details.length ? el("div", {class: "detail"}, details.join("; ")) : "");
}

function renderServers(status) {
  const rows = status.servers.map((server) => el("tr", {"data-server": server.name},
    el("td", {}, el("strong", {}, server.name), server.title ? el("div", {}, server.title) : ""),
    el("td", {}, badge(server)),
    el("td", {}, server.upstream || "(from envoy-config)"),
    el("td", {}, server.route || ""),
    el("td", {}, `${server.rules.tools} / ${server.rules.prompts} / ${server.rules.resources}`),
    el("td", {class: "token"}, token(server.token)),
    el("td", {}, toggleButton(server))));
  fill(document.querySelector("#servers tbody"), ...rows);
}

function toggleButton(server) {
  const button = el("button", {type: "button", class: "toggle"},
    server.public ? "make internal" : "make public");
  button.addEventListener("click", () => preview({toggle_public: server.name}));
  return button;
}

function renderMatrix(status) {
  const withItems = document.getElementById("matrix-items").checked;
  const callers = status.matrix.callers;
  fill(document.querySelector("#matrix thead"),
    el("tr", {}, el("th", {}, "server / rule"), ...callers.map((c) => el("th", {}, c))));
  const rows = status.matrix.rows
    .filter((row) => withItems || row.kind === "server")
    .map((row) => el("tr", {class: row.kind === "server" ? "server-row" : "item-row"},
      el("td", {}, row.kind === "server" ? row.server : `${row.kind}s.${row.key}`),
      ...callers.map((c) => el("td", {class: row.cells[c]}, row.cells[c]))));
  fill(document.querySelector("#matrix tbody"), ...rows);
}

function pairs(list) {
  return list.flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value)]);
}

function renderNetworks(status) {
  const n = status.networks;
  const you = status.you;
  const named = Object.entries(n.networks).map(([name, d]) => [
    `network ${name}`,
    [d.cidrs.length ? `CIDRs ${d.cidrs.join(", ")}` : "",
     d.principals.length ? `principals ${d.principals.join(", ")}` : "",
     Object.keys(d.jwt_claims).length ? `JWT claims ${JSON.stringify(d.jwt_claims)}` : ""]
      .filter(Boolean).join("; ")]);
  fill(document.querySelector("#networks dl"), ...pairs([
    ["internal ranges", n.internal_ranges.join(", ") || "(none)"],
    ...named,
    ["trusted proxies", n.trusted_proxies.join(", ") || "(none)"],
    ["X-Forwarded-For read", `at most ${n.max_xff_entries} entries, ${n.max_xff_bytes} bytes`],
    ["this page's request", `from ${you.client_ip ?? "(unknown)"} (${you.source}), network ${you.network}` +
      (you.networks.length ? ` (in ${you.networks.join(", ")})` : "")],
  ]));
}

function renderConfig(status) {
  const reload = status.last_reload;
  fill(document.querySelector("#config dl"), ...pairs([
    ["generation", status.generation],
    ["file", status.config_file || "(built-in example)"],
    ["serving since", status.started],
    ["last reload", reload === null ? "none since start" :
      reload.ok ? `${reload.at}: ok` : `${reload.at}: refused: ${reload.problems.join("; ")}`],
    ["warnings", status.warnings.length ? status.warnings.join("; ") : "none"],
  ]));
  document.getElementById("summary").textContent =
    `generation ${status.generation}, ${status.servers.length} servers, ` +
    `${status.servers.filter((s) => s.public).length} visible to the internet`;
}

async function refreshStatus() {
  try {
    const status = await getJSON("/api/status");
    window.lastStatus = status;
    renderServers(status);
    renderMatrix(status);
    renderNetworks(status);
    renderConfig(status);
    document.getElementById("error").hidden = true;
  } catch (error) {
    const shown = document.getElementById("error");
    shown.textContent = String(error);
    shown.hidden = false;
  }
}

async function refreshDecisions() {
  const form = new FormData(document.getElementById("decision-filters"));
  const query = new URLSearchParams();
  for (const [key, value] of form) if (value) query.set(key, value);
  try {
    const found = await getJSON(`/api/decisions?${query}`);
    const rows = found.decisions.slice(0, 50).map((d) => el("tr", {},
      el("td", {}, d.time), el("td", {}, d.server ?? ""), el("td", {}, d.network),
      el("td", {}, d.client_ip ?? ""), el("td", {}, d.path), el("td", {}, d.reason),
      el("td", {}, d.http_status), el("td", {}, d.rule)));
    fill(document.querySelector("#decisions tbody"), ...rows);
  } catch (error) {
    fill(document.querySelector("#decisions tbody"), el("tr", {}, el("td", {class: "error"}, String(error))));
  }
}

async function tryCaller(event) {
  event.preventDefault();
  const asked = Object.fromEntries(new FormData(event.target));
  const shown = document.getElementById("try-result");
  try {
    const report = await postJSON("/api/try", asked);
    fill(shown,
      el("p", {}, el("strong", {}, `${report.reason} (HTTP ${report.http_status})`),
        ` network ${report.network}, server ${report.server ?? "(none)"}`),
      el("ol", {}, ...report.steps.map((step) => el("li", {}, step))));
  } catch (error) {
    fill(shown, el("p", {class: "error"}, String(error)));
  }
}

async function preview(asked) {
  const shown = document.getElementById("preview-result");
  try {
    const result = await postJSON("/api/preview", asked);
    if (!result.valid) {
      fill(shown, el("p", {class: "error"}, "invalid:"),
        el("ul", {}, ...result.problems.map((p) => el("li", {}, p))));
      return;
    }
    const changes = result.diff.changes.map((c) => el("li", {class: c.widens_external ? "widens" : ""},
      `${c.widens_external ? "! " : ""}${c.caller} ${c.widens ? "gains" : "loses"} ${c.item}` +
      ` (${c.before} → ${c.after}; ${c.rule_after || c.rule_before})`));
    const members = result.diff.memberships.map((m) => el("li", {class: m.widens_external ? "widens" : ""},
      `${m.widens_external ? "! " : ""}${m.key} ${m.what}: ` +
      [m.added.length ? `adds ${m.added.join(", ")}` : "", m.removed.length ? `removes ${m.removed.join(", ")}` : ""]
        .filter(Boolean).join("; ")));
    const credentials = result.diff.credentials.map((c) => el("li", {},
      `servers.${c.server} upstream Authorization: ${c.before} → ${c.after}`));
    fill(shown,
      el("p", {}, changes.length || members.length ? `${changes.length} change(s) in who sees what` +
        (result.diff.widens_external ? ", widening what external callers see" : "") : "no change in who sees what"),
      el("ul", {class: "changes"}, ...changes, ...members, ...credentials),
      ...(result.yaml === undefined ? [] : [
        el("p", {}, "The YAML to commit (nothing was applied; a secret written in the file " +
          "shows as ${REDACTED}: put yours back):"),
        el("pre", {class: "yaml"}, result.yaml)]));
  } catch (error) {
    fill(shown, el("p", {class: "error"}, String(error)));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("try-form").addEventListener("submit", tryCaller);
  document.getElementById("preview-form").addEventListener("submit", (event) => {
    event.preventDefault();
    preview({config: new FormData(event.target).get("config")});
  });
  document.getElementById("matrix-items").addEventListener("change", () => {
    if (window.lastStatus) renderMatrix(window.lastStatus);
  });
  document.getElementById("decision-filters").addEventListener("input", refreshDecisions);
  document.getElementById("decision-filters").addEventListener("submit", (e) => e.preventDefault());
  refreshStatus();
  refreshDecisions();
  setInterval(refreshStatus, REFRESH_MS);
  setInterval(refreshDecisions, REFRESH_MS);
});
