// flotilla dashboard: polls the head's JSON endpoints once a second and renders the cluster,
// applications, deployments (figures + small SVG charts), replicas and a log viewer.
// Plain ES2020, no libraries, no build step.
"use strict";

const POLL_MS = 1000;
const WINDOW_S = 900;             // charts show the last 15 minutes
const LOG_LINES = 200, LOG_MAX_LINES = 5000;
const FIELDS = ["rps", "p50_ms", "p99_ms", "error_rate", "queued", "running", "replicas", "target"];
const CHARTS = [                  // data-series, title, series [field, label, scale]
  ["rps", "Requests / s", [["rps", "req/s", 1]]],
  ["latency", "Latency (ms)", [["p50_ms", "p50", 1], ["p99_ms", "p99", 1]]],
  ["errors", "Error rate (%)", [["error_rate", "errors %", 100]]],
  ["queue", "Queued & running", [["queued", "queued (routers)", 1], ["running", "running", 1]]],
  ["replicas", "Replicas vs target", [["replicas", "replicas", 1], ["target", "target", 1]]],
];

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------- formatting ----------
function num(v, digits = 1, compact = true) {
  if (v == null || !isFinite(v)) return "—";
  const a = Math.abs(v);
  if (compact && a >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (compact && a >= 1e4) return (v / 1e3).toFixed(1) + "k";
  if (a >= 100 || Number.isInteger(v)) return String(Math.round(v));
  if (a < 1) return String(+v.toPrecision(2));
  return v.toFixed(digits).replace(/\.?0+$/, "");
}
function bytes(v) {
  if (v == null) return "—";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(v) >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return (i ? v.toFixed(1) : String(Math.round(v))) + " " + u[i];
}
function dur(s) {
  if (s == null || !isFinite(s)) return "—";
  s = Math.max(0, Math.round(s));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
  return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
}
const clock = (t) => new Date(t * 1000).toLocaleTimeString([], {hour12: false});
const plain = (v) => (v == null ? "" : String(v));

function badgeClass(status) {
  const s = String(status || "").toUpperCase();
  if (["RUNNING", "HEALTHY", "PROMOTED", "ALIVE"].includes(s)) return "ok";
  if (["DEPLOY_FAILED", "UNHEALTHY", "DEAD", "ROLLED_BACK", "FAILED"].includes(s)) return "bad";
  if (["DEPLOYING", "UPDATING", "UPSCALING", "DOWNSCALING", "STARTING", "RECOVERING"].includes(s)) return "busy";
  if (["PENDING_MIGRATION", "DRAINING"].includes(s)) return "warn";
  return "idle";
}
const badge = (status, cls = "", kind = badgeClass(status)) => `<span class="badge ${kind} ${cls}">${esc(status)}</span>`;

// Set innerHTML / text only when it changed (keeps focus, hover and buttons stable).
function setHTML(el, html) { if (el && el._h !== html) { el._h = html; el.innerHTML = html; } }
function setText(el, text) { text = String(text); if (el && el.textContent !== text) el.textContent = text; }

// ---------- time series store ----------
const ts = {t: [], d: {}};
function mergeSeries(r) {
  const last = ts.t.length ? ts.t[ts.t.length - 1] : -Infinity;
  const keep = [];
  (r.t || []).forEach((t, i) => { if (t > last) keep.push(i); });
  if (!keep.length) return;
  const deps = r.deployments || {};
  for (const key of Object.keys(deps)) {
    if (!ts.d[key]) ts.d[key] = Object.fromEntries(FIELDS.map((f) => [f, ts.t.map(() => null)]));
  }
  for (const [key, s] of Object.entries(ts.d)) {
    for (const f of FIELDS) {
      const src = deps[key] && deps[key][f];
      for (const i of keep) s[f].push(src && src[i] != null ? src[i] : null);
    }
  }
  for (const i of keep) ts.t.push(r.t[i]);
  const cutoff = ts.t[ts.t.length - 1] - (r.window_s || WINDOW_S);
  let drop = 0;
  while (drop < ts.t.length && ts.t[drop] <= cutoff) drop++;
  if (drop) {
    ts.t.splice(0, drop);
    for (const s of Object.values(ts.d)) for (const f of FIELDS) s[f].splice(0, drop);
  }
}

// ---------- SVG line chart ----------
function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}
// series: [{label, values (aligned with t)}]; returns the <svg> markup.
// The x axis spans the history there is, rounded up to one of these (at most the window).
const SPANS = [60, 120, 300, 600, WINDOW_S];
const ago = (s) => (s >= 60 ? `-${+(s / 60).toFixed(1)}m` : `-${Math.round(s)}s`);
function chartSVG(kind, t, series, end, raw) {
  const W = 280, H = 130, L = 34, R = 6, T = 8, B = 18, pw = W - L - R, ph = H - T - B;
  const have = t.length ? end - t[0] : 0;
  const span = SPANS.find((s) => s >= have) || WINDOW_S;
  const start = end - span;
  let lastV = null, max0 = null, max = 0;
  series.forEach((s) => s.values.forEach((v) => {
    if (v == null) return;
    if (v > max) max = v;
  }));
  for (let i = raw.length - 1; i >= 0; i--) if (raw[i] != null) { lastV = raw[i]; break; }
  for (const v of raw) if (v != null && (max0 == null || v > max0)) max0 = v;
  const ymax = niceMax(max);
  const x = (tt) => L + ((tt - start) / span) * pw, y = (v) => T + ph - (v / ymax) * ph;
  let out = "";
  for (const f of [0, 0.5, 1]) {
    const yy = (T + ph - f * ph).toFixed(1);
    out += `<line class="grid" x1="${L}" x2="${W - R}" y1="${yy}" y2="${yy}"/>`;
    out += `<text class="ylab" x="${L - 4}" y="${+yy + 3}" text-anchor="end">${esc(num(f * ymax))}</text>`;
  }
  [-span, (-2 * span) / 3, -span / 3, 0].forEach((dt) => {
    const xx = x(end + dt).toFixed(1);
    out += `<line class="tick" x1="${xx}" x2="${xx}" y1="${T + ph}" y2="${T + ph + 3}"/>`;
    out += `<text class="xlab" x="${xx}" y="${H - 4}" text-anchor="${dt === -span ? "start" : dt === 0 ? "end" : "middle"}">${dt ? ago(-dt) : "now"}</text>`;
  });
  series.forEach((s, k) => {
    let seg = [];
    const flush = () => {
      if (seg.length === 1) out += `<circle class="s${k}" cx="${seg[0][0]}" cy="${seg[0][1]}" r="1.5"/>`;
      else if (seg.length) out += `<polyline class="s${k}" points="${seg.map((p) => p.join(",")).join(" ")}"/>`;
      seg = [];
    };
    s.values.forEach((v, i) => {
      if (v == null || t[i] < start) { flush(); return; }
      seg.push([x(t[i]).toFixed(1), y(v).toFixed(1)]);
    });
    flush();
  });
  return `<svg class="chart" data-series="${kind}" data-last="${plain(lastV)}" data-max="${plain(max0)}" ` +
    `viewBox="0 0 ${W} ${H}" preserveAspectRatio="xMidYMid meet" role="img">${out}</svg>`;
}

function drawCharts() {
  const end = ts.t.length ? ts.t[ts.t.length - 1] : (snap ? snap.time : Date.now() / 1000);
  for (const dep of document.querySelectorAll(".deployment")) {
    const s = ts.d[dep.dataset.deployment];
    for (const [kind, , defs] of CHARTS) {
      const slot = dep.querySelector(`.chart-slot[data-kind="${kind}"]`);
      if (!slot) continue;
      const series = defs.map(([f, label, k]) => ({label, values: s ? s[f].map((v) => (v == null ? null : v * k)) : []}));
      slot.innerHTML = chartSVG(kind, s ? ts.t : [], series, end, s ? s[defs[0][0]] : []);
    }
  }
}

// ---------- rendering the snapshot ----------
let snap = null;

function renderHeader(d) {
  const c = d.cluster || {};
  setText($("version"), c.version ? " " + c.version : "");
  const link = (label, url) => url && /^https?:\/\//i.test(url) ? `<a href="${esc(url)}" target="_blank" rel="noopener">${esc(label)}</a>` : `<span class="muted">${esc(label.trim())}: off</span>`;
  const proxies = Object.entries(d.proxies || {}).map(([n, s]) => `<span title="proxy ${esc(n)}">proxy ${badge(s)}</span>`).join(" ");
  setHTML($("cluster"),
    `<span><b>namespace</b> ${esc(c.namespace)}</span><span><b>backend</b> ${esc(c.backend)}</span>` +
    (c.head_pid ? `<span><b>head pid</b> ${esc(c.head_pid)}</span>` : "") +
    `<span>${link("HTTP " + (c.http_url || ""), c.http_url)}</span>` +
    `<span>${link("metrics", c.metrics_enabled === false ? null : c.metrics_url)}</span>` + proxies);
  setText($("updated"), clock(d.time));
}

function renderResources(d) {
  const r = d.resources || {}, total = r.total || {}, avail = r.available || {};
  const order = ["CPU", "GPU", "memory", ...Object.keys(total).filter((k) => !["CPU", "GPU", "memory"].includes(k)).sort()];
  const bars = order.filter((k) => k in total).map((k) => {
    const tot = total[k] || 0, free = avail[k] ?? tot, used = Math.max(0, tot - free);
    const pct = tot > 0 ? Math.min(100, (used / tot) * 100) : 0;
    const f = k === "memory" ? bytes : (v) => num(v, 2);
    return `<div class="res"><div class="res-head"><b>${esc(k)}</b><span title="${esc(f(free))} free">${esc(f(used))} / ${esc(f(tot))} used</span></div>` +
      `<div class="bar"><div class="fill ${pct > 90 ? "hot" : ""}" style="width:${pct.toFixed(1)}%"></div></div></div>`;
  }).join("");
  const gpus = (r.gpus || []).map((g) => {
    const freePct = Math.round((g.free ?? 0) * 100);
    return `<div class="gpu"><div class="gpu-id">GPU ${esc(g.id)}</div>` +
      `<div class="bar small"><div class="fill" style="width:${100 - freePct}%"></div></div>` +
      `<div class="muted">${freePct}% free</div>` +
      `<div class="gpu-reps">${(g.replicas || []).map((id) => `<code>${esc(id)}</code>`).join(" ") || '<span class="muted">no replicas</span>'}</div></div>`;
  }).join("");
  setHTML($("res-body"), `<div class="res-grid">${bars || '<span class="muted">no resources reported</span>'}</div>` +
    (gpus ? `<div class="gpus">${gpus}</div>` : ""));
}

// Structure key: a card is rebuilt only when its deployments / replicas / deaths change.
function appKey(name, app) {
  return name + "|" + Object.entries(app.deployments || {}).map(([dn, dep]) =>
    dn + ":" + (dep.replicas || []).map((r) => r.id).join(",") + ":" + (dep.recent_deaths || []).map((r) => r.id).join(",")).join(";");
}

function appSkeleton(name, app) {
  const deps = Object.entries(app.deployments || {}).map(([dn, dep]) => {
    const key = name + "/" + dn;
    const charts = CHARTS.map(([kind, title, defs]) =>
      `<div class="chart-box"><div class="chart-title">${esc(title)}` +
      `<span class="legend">${defs.length > 1 ? defs.map(([, l], k) => `<i class="k${k}"></i>${esc(l)}`).join(" ") : ""}</span>` +
      `</div><div class="chart-slot" data-kind="${kind}"></div></div>`).join("");
    const rows = (dep.replicas || []).map((r) =>
      `<tr class="replica" data-replica="${esc(r.id)}" data-state="${esc(r.state)}"><td><code>${esc(r.id)}</code></td>` +
      `<td class="c-state"></td><td class="c-pid"></td><td class="c-node"></td><td class="c-gpu"></td><td class="c-run num"></td>` +
      `<td class="c-q num"></td><td class="mem num"></td><td class="c-ver"></td><td class="c-up"></td><td class="c-pend"></td>` +
      `<td><button class="log-btn" data-replica="${esc(r.id)}" type="button">log</button></td></tr>`).join("");
    const deaths = (dep.recent_deaths || []).slice().reverse().map((r) =>
      `<tr class="replica dead" data-replica="${esc(r.id)}" data-state="DEAD"><td><code>${esc(r.id)}</code></td>` +
      `<td>${badge("DEAD")}</td><td>${esc(r.pid ?? "—")}</td><td colspan="7" class="reason">${esc(r.reason)}</td>` +
      `<td class="c-ago"></td><td><button class="log-btn" data-replica="${esc(r.id)}" type="button">log</button></td></tr>`).join("");
    return `<div class="deployment" data-deployment="${esc(key)}">
      <div class="dep-head"><h3>${esc(dn)}</h3><span class="dep-badge"></span><span class="dep-trigger muted"></span>
        <span class="spacer"></span><span class="dep-meta"></span>
        <span class="pill">restarts <b class="dep-restarts"></b></span></div>
      <div class="msg dep-msg" hidden></div>
      <div class="dep-auto" hidden></div>
      <ul class="dep-findings" hidden></ul>
      <div class="figures">
        <div class="fig"><div class="v dep-rps"></div><div class="l">req/s</div></div>
        <div class="fig"><div class="v f-p50"></div><div class="l">p50 ms</div></div>
        <div class="fig"><div class="v f-p99"></div><div class="l">p99 ms</div></div>
        <div class="fig"><div class="v f-err"></div><div class="l">errors %</div></div>
        <div class="fig"><div class="v f-q"></div><div class="l">queued</div></div>
        <div class="fig"><div class="v f-run"></div><div class="l">running</div></div>
      </div>
      <div class="charts">${charts}</div>
      <table class="replicas"><thead><tr><th>replica</th><th>state</th><th>PID</th><th>node</th><th>GPU</th>
        <th class="num">running</th><th class="num">queued</th><th class="num" title="private (USS) + shared with other processes">Memory</th><th>version</th><th>up</th><th>pending</th><th></th></tr></thead>
        <tbody>${rows || '<tr class="empty"><td colspan="12" class="muted">no replicas</td></tr>'}</tbody>
        ${deaths ? `<tbody class="deaths"><tr class="sep"><td colspan="12">recent deaths</td></tr>${deaths}</tbody>` : ""}</table>
    </div>`;
  }).join("");
  return `<div class="app-head"><h2>${esc(name)}</h2><span class="app-badge"></span><span class="app-meta muted"></span></div>
    <div class="msg app-msg" hidden></div>${deps || '<div class="muted">no deployments</div>'}`;
}

function fillApp(card, name, app, now) {
  setHTML(card.querySelector(".app-badge"), badge(app.status, "app-status"));
  setHTML(card.querySelector(".app-meta"),
    `route <code>${esc(app.route_prefix ?? "—")}</code>` + (app.ingress ? ` · ingress <b>${esc(app.ingress)}</b>` : "") +
    (app.last_deployed_time_s ? ` · deployed ${esc(dur(now - app.last_deployed_time_s))} ago` : ""));
  const msg = card.querySelector(".app-msg");
  msg.hidden = !app.message;
  setText(msg, app.message || "");
  msg.classList.toggle("bad", badgeClass(app.status) === "bad");
  for (const [dn, dep] of Object.entries(app.deployments || {})) {
    const el = card.querySelector(`.deployment[data-deployment="${CSS.escape(name + "/" + dn)}"]`);
    if (el) fillDeployment(el, dep, now);
  }
}

function fillDeployment(el, dep, now) {
  const q = (s) => el.querySelector(s);
  setHTML(q(".dep-badge"), badge(dep.status, "dep-status"));
  setText(q(".dep-trigger"), dep.status_trigger && dep.status_trigger !== "UNSPECIFIED" ? dep.status_trigger : "");
  const states = Object.entries(dep.replica_states || {}).map(([s, n]) => `<span class="st ${badgeClass(s)}">${esc(s)} ${esc(n)}</span>`).join(" ");
  const cfg = dep.config || {};
  setHTML(q(".dep-meta"), `<span class="pill">target <b>${esc(dep.target)}</b></span> ${states}` +
    (cfg.max_ongoing_requests != null ? ` <span class="pill muted">max ongoing ${esc(cfg.max_ongoing_requests)}</span>` : ""));
  setText(q(".dep-restarts"), dep.restarts ?? 0);
  const msg = q(".dep-msg");
  msg.hidden = !dep.message;
  setText(msg, dep.message || "");
  msg.classList.toggle("bad", badgeClass(dep.status) === "bad");
  const a = dep.autoscaler, auto = q(".dep-auto");
  auto.hidden = !a;
  if (a) setHTML(auto, `<b>autoscaler</b> target ${esc(a.target_replicas)} · running ${esc(a.running_replicas)}` +
    (a.last_decision ? ` · last decision: <span class="decision">${esc(a.last_decision)}</span>` +
      (a.last_decision_time_s ? ` <span class="muted">(${esc(clock(a.last_decision_time_s))}, ${esc(dur(now - a.last_decision_time_s))} ago)</span>` : "")
      : ' · <span class="muted">no decision yet</span>'));
  const fs = dep.findings || [], fl = q(".dep-findings");
  fl.hidden = !fs.length;
  setHTML(fl, fs.map((f) => `<li class="finding ${f.severity === "warning" ? "warn" : ""}" data-code="${esc(f.code)}">` +
    `<b>${esc(f.code)}</b> ${esc(f.message)} <span class="fix">Fix: ${esc(f.fix)}</span></li>`).join(""));
  const n = dep.now || {};
  setText(q(".dep-rps"), n.rps == null ? "0" : num(n.rps, 1, false));
  setText(q(".f-p50"), num(n.p50_ms, 2));
  setText(q(".f-p99"), num(n.p99_ms, 2));
  setText(q(".f-err"), n.error_rate == null ? "—" : num(n.error_rate * 100, 2));
  q(".f-err").classList.toggle("bad", n.error_rate > 0);
  setText(q(".f-q"), num(n.queued));
  setText(q(".f-run"), num(n.running));
  for (const r of dep.replicas || []) {
    const row = el.querySelector(`tr.replica[data-replica="${CSS.escape(r.id)}"]:not(.dead)`);
    if (!row) continue;
    if (row.dataset.state !== r.state) row.dataset.state = r.state;
    const c = (s) => row.querySelector(s);
    setHTML(c(".c-state"), badge(r.state));
    setText(c(".c-pid"), r.pid ?? "—");
    setText(c(".c-node"), r.node ?? "—");
    setText(c(".c-gpu"), (r.gpu_ids || []).join(", ") || "—");
    setText(c(".c-run"), r.running ?? "—");
    setText(c(".c-q"), r.queued ?? "—");
    const mem = c(".mem");
    setText(mem, r.uss_bytes == null ? "—" : `${bytes(r.uss_bytes)} + ${bytes(r.shared_bytes)} shared`);
    const memTitle = r.uss_bytes == null ? "not sampled yet" : `USS ${bytes(r.uss_bytes)} (private), shared ${bytes(r.shared_bytes)}, PSS ${bytes(r.pss_bytes)}, RSS ${bytes(r.rss_bytes)}`;
    if (mem && mem.title !== memTitle) mem.title = memTitle;
    setHTML(c(".c-ver"), r.version ? `<code title="${esc(r.version)}">${esc(String(r.version).slice(0, 8))}</code>` : "—");
    setText(c(".c-up"), r.started_s ? dur(now - r.started_s) : "—");
    setHTML(c(".c-pend"), r.pending_reason ? `<span class="pending">${esc(r.pending_reason)}</span>` : "");
  }
  for (const r of dep.recent_deaths || []) {
    const row = el.querySelector(`tr.replica.dead[data-replica="${CSS.escape(r.id)}"]`);
    if (row) setText(row.querySelector(".c-ago"), r.time_s ? dur(now - r.time_s) + " ago" : "—");
  }
}

function renderApps(d) {
  const box = $("apps"), apps = d.applications || {};
  for (const el of [...box.children]) if (!el.classList.contains("app") || !(el.dataset.app in apps)) el.remove();
  if (!Object.keys(apps).length) box.innerHTML = '<section class="panel muted">no applications deployed</section>';
  let prev = null;
  for (const [name, app] of Object.entries(apps)) {
    let card = box.querySelector(`.app[data-app="${CSS.escape(name)}"]`);
    if (!card) {
      card = document.createElement("section");
      card.className = "app panel";
      card.dataset.app = name;
    }
    const key = appKey(name, app);
    if (card._key !== key) { card._key = key; card.innerHTML = appSkeleton(name, app); }
    if (prev ? prev.nextSibling !== card : box.firstChild !== card) box.insertBefore(card, prev ? prev.nextSibling : box.firstChild);
    prev = card;
    fillApp(card, name, app, d.time);
  }
}

function renderRouting(d) {
  const traffic = Object.entries(d.traffic || {}), shadows = Object.entries(d.shadows || {});
  let html = "";
  if (traffic.length) {
    html += `<section class="panel"><h2>Traffic splits</h2><div class="splits">` + traffic.map(([name, t]) => {
      const w = Object.entries(t.traffic || {}), sum = w.reduce((a, [, v]) => a + (+v || 0), 0) || 1;
      const c = t.canary;
      return `<div class="split"><div class="split-head"><b>${esc(name)}</b> <span class="muted">route <code>${esc(t.route_prefix ?? "—")}</code>` +
        (t.sticky_header ? ` · sticky header ${esc(t.sticky_header)}` : "") + (t.sticky_cookie ? ` · sticky cookie ${esc(t.sticky_cookie)}` : "") + `</span></div>` +
        `<div class="wbar">${w.map(([app, v], k) => `<div class="w w${k % 4}" style="flex:${(+v || 0) / sum}" title="${esc(app)}">${esc(app)} ${esc(num((v / sum) * 100))}%</div>`).join("")}</div>` +
        (t.message ? `<div class="msg">${esc(t.message)}</div>` : "") +
        (c ? `<div class="canary"><b>canary</b> ${badge(c.phase, "", c.phase === "RUNNING" ? "busy" : badgeClass(c.phase))} <code>${esc(c.old)}</code> → <code>${esc(c.new)}</code> · share <b>${esc(num((c.share || 0) * 100))}%</b>` +
          ` · step ${esc(c.step)}/${esc((c.steps || []).length)} <span class="muted">[${(c.steps || []).map((s) => esc(num(s * 100)) + "%").join(", ")}]</span>` +
          figs("old", c.old_figures) + figs("new", c.new_figures) +
          (c.reason ? `<div class="reason">${esc(c.reason)}${c.last_decision_time_s ? ` <span class="muted">(${esc(clock(c.last_decision_time_s))})</span>` : ""}</div>` : "") + `</div>` : "") +
        `</div>`;
    }).join("") + `</div></section>`;
  }
  if (shadows.length) {
    html += `<section class="panel"><h2>Shadow traffic</h2><table class="plain"><thead><tr><th>route</th><th>target</th><th>fraction</th><th>max queue</th><th>message</th></tr></thead><tbody>` +
      shadows.map(([route, s]) => `<tr><td><code>${esc(s.route_prefix ?? route)}</code></td><td>${esc(s.target)}</td><td>${esc(num((s.fraction || 0) * 100))}%</td>` +
        `<td>${esc(s.max_queue ?? "—")}</td><td>${esc(s.message || "")}</td></tr>`).join("") + `</tbody></table></section>`;
  }
  setHTML($("routing"), html);
}
function figs(label, f) {
  if (!f || !Object.keys(f).length) return "";
  return `<div class="figs"><span class="muted">${label}:</span> ` + Object.entries(f).map(([k, v]) =>
    `${esc(k)} <b>${esc(typeof v === "number" ? (k.includes("rate") ? num(v * 100, 2) + "%" : num(v, 2)) : v)}</b>`).join(" · ") + `</div>`;
}

function render(d) {
  snap = d;
  renderHeader(d);
  renderResources(d);
  renderApps(d);
  renderRouting(d);
  drawCharts();
  document.body.dataset.updated = String(d.time);
}

// ---------- polling ----------
const ok = {dash: false, ts: false};
function setConn() {
  const live = ok.dash && ok.ts, el = $("conn-status");
  setText(el, live ? "live" : "disconnected — retrying");
  el.className = "conn " + (live ? "live" : "down");
  document.body.classList.toggle("stale", !live && snap != null);
}
async function getJSON(url) {
  const r = await fetch(url, {cache: "no-store"});
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}
async function loop(name, step) {   // one request in flight per endpoint
  for (;;) {
    const t0 = Date.now();
    try { await step(); ok[name] = true; } catch (e) { if (ok[name]) console.warn(e); ok[name] = false; }
    setConn();
    await sleep(Math.max(50, POLL_MS - (Date.now() - t0)));
  }
}
loop("dash", async () => render(await getJSON("/api/flotilla/dashboard/")));
loop("ts", async () => {
  const since = ts.t.length ? `?since=${ts.t[ts.t.length - 1]}` : "";
  mergeSeries(await getJSON("/api/flotilla/timeseries/" + since));
  if (snap) drawCharts();
});

// ---------- log viewer ----------
const log = {id: null, offset: null, gen: 0, timer: null};
async function openLog(id) {
  const gen = ++log.gen;
  clearTimeout(log.timer);
  Object.assign(log, {id, offset: null});
  $("log-panel").hidden = false;
  document.body.classList.add("log-open");
  setText($("log-title"), "log · replica " + id);
  setText($("log-path"), "");
  const view = $("log-view");
  view.textContent = "loading…";
  try {
    const r = await fetch(`/api/flotilla/logs/?replica=${encodeURIComponent(id)}&lines=${LOG_LINES}`, {cache: "no-store"});
    if (gen !== log.gen) return;
    if (!r.ok) { view.textContent = `${r.status}: ${await r.text()}`; return; }
    const j = await r.json();
    if (gen !== log.gen) return;
    view.textContent = j.text || "";
    log.offset = j.offset;
    setText($("log-path"), j.path || "");
    view.scrollTop = view.scrollHeight;
  } catch (e) {
    if (gen === log.gen) view.textContent = "could not load the log: " + e.message;
  }
  scheduleFollow(gen);
}
function scheduleFollow(gen) {
  log.timer = setTimeout(() => followLog(gen), POLL_MS);
}
async function followLog(gen) {
  if (gen !== log.gen || $("log-panel").hidden) return;
  if ($("log-follow").checked && log.offset != null) {
    try {
      const r = await fetch(`/api/flotilla/logs/?replica=${encodeURIComponent(log.id)}&offset=${log.offset}`, {cache: "no-store"});
      if (r.ok) {
        const j = await r.json();
        if (gen !== log.gen) return;
        if (j.text) appendLog(j.text + (j.truncated ? "\n[… output truncated …]\n" : ""));
        log.offset = j.offset;
      }
    } catch (e) { /* keep following; the banner reports connection problems */ }
  }
  if (gen === log.gen) scheduleFollow(gen);
}
function appendLog(text) {
  const view = $("log-view");
  let all = view.textContent + text;
  const lines = all.split("\n");
  if (lines.length > LOG_MAX_LINES) all = lines.slice(-LOG_MAX_LINES).join("\n");
  view.textContent = all;
  if ($("log-follow").checked) view.scrollTop = view.scrollHeight;
}
function closeLog() {
  log.gen++;
  clearTimeout(log.timer);
  $("log-panel").hidden = true;
  document.body.classList.remove("log-open");
}
document.addEventListener("click", (e) => {
  const b = e.target.closest(".log-btn");
  if (b) openLog(b.dataset.replica);
});
$("log-close").addEventListener("click", closeLog);
$("log-follow").addEventListener("change", () => { if ($("log-follow").checked) { const v = $("log-view"); v.scrollTop = v.scrollHeight; } });
document.addEventListener("keydown", (e) => { if (e.key === "Escape" && !$("log-panel").hidden) closeLog(); });

// ---- request trace: GET /api/flotilla/trace/?id= (stages per call, nested calls indented)
const STAGES = ["router_queue", "replica_queue", "batch_wait", "user_code", "downstream", "other"];
function traceText(t) {
  const out = [`request ${t.request_id}  ${t.route || ""}  status ${t.status ?? "-"}  end-to-end ${t.e2e_ms.toFixed(2)} ms`];
  const block = (n, ind) => {
    out.push(`${ind}${n.application}/${n.deployment}${n.replica ? `  (replica ${n.replica})` : ""}`);
    for (const s of STAGES) out.push(`${ind}  ${s.padEnd(14)}${(n.stages[s] || 0).toFixed(2).padStart(10)} ms`);
    for (const c of n.downstream_calls || []) {
      out.push(`${ind}  call ${c.application}/${c.deployment}: ${c.e2e_ms.toFixed(2)} ms`);
      block(c, ind + "    ");
    }
  };
  block(t, "  ");
  return out.join("\n");
}
$("trace-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const id = $("trace-id").value.trim(), view = $("trace-view");
  if (!id) return;
  try {
    const r = await fetch(`/api/flotilla/trace/?id=${encodeURIComponent(id)}`, {cache: "no-store"});
    view.textContent = r.ok ? traceText(await r.json()) : await r.text();
  } catch (err) {
    view.textContent = "could not reach the head: " + err;
  }
});

window.addEventListener("error", (e) => {
  const box = $("js-error");
  box.hidden = false;
  box.textContent = "dashboard error: " + (e.message || e);
});
