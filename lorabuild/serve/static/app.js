// lorabuild dashboard: plain JS over the JSON API and the event stream (/api/events).
"use strict";
const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const $ = (sel) => document.querySelector(sel);
const S = {project: null, view: "projects", live: {}, queue: [], zoom: null, samplesStamp: {}, yaml: null, logId: null, tagger: null};

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const k of kids.flat()) if (k !== null && k !== undefined) e.append(k.nodeType ? k : document.createTextNode(String(k)));
  return e;
}
async function api(path, method, body) {
  const r = await fetch(path, {method: method || "GET", headers: {"Content-Type": "application/json", "X-CSRF-Token": CSRF},
                               body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await r.json().catch(() => ({error: `HTTP ${r.status}`}));
  if (!r.ok) throw new Error(data.error || `HTTP ${r.status}`);
  return data;
}
const fmtTime = (s) => s == null ? "" : s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`;

// --- navigation ---------------------------------------------------------------------------
function show(view) {
  S.view = view;
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.view === view));
  document.querySelectorAll(".view").forEach((v) => v.classList.toggle("active", v.id === `view-${view}`));
  location.hash = `${view}/${S.project || ""}`;
  refresh();
}
function refresh() {
  const f = {projects: renderProjects, builds: renderQueue, training: renderLive, samples: renderSamples,
             dataset: renderDataset, editor: loadEditor}[S.view];
  Promise.resolve(f()).catch((e) => console.error(e));
}

// --- projects -------------------------------------------------------------------------------
const STATE_CLASS = {"up to date": "ok", "stale": "stale", "waits on upstream": "wait", "error": "error"};
async function renderProjects() {
  const {projects} = await api("/api/projects");
  const root = $("#view-projects"); root.replaceChildren();
  for (const name of projects) {
    const card = el("div", {class: "card", "data-project": name}, el("h2", {}, name), el("p", {class: "muted"}, "reading status…"));
    root.append(card);
    api(`/api/projects/${encodeURIComponent(name)}`).then((o) => fillProject(card, o)).catch((e) => card.append(el("p", {class: "warn"}, e.message)));
  }
}
function fillProject(card, o) {
  card.replaceChildren(el("h2", {}, o.project));
  if (o.status.error || o.error) card.append(el("pre", {class: "warn"}, o.status.error || o.error));
  const stages = el("div", {class: "stages"});
  const why = el("ul", {class: "why"});
  for (const [stage, s] of Object.entries(o.status.stages || {})) {
    stages.append(el("span", {class: `stage ${STATE_CLASS[s.state] || "wait"}`, "data-stage": stage, title: s.state}, `${stage}: ${s.state}`));
    for (const w of s.why) why.append(el("li", {"data-stage": stage}, `${stage}: ${w}`));
  }
  card.append(stages, why);
  card.append(el("div", {class: "row"},
    el("button", {onclick: () => queueTarget(`train:${o.project}`)}, `▶ build train:${o.project}`),
    el("button", {onclick: () => queueTarget(`sample:${o.project}`)}, `▶ build sample:${o.project}`)));
  const p = o.plan;
  if (!p) return;
  const t = el("table", {}, el("tr", {}, ["concept", "images", "repeats", "share", "captions found", "defaulted", "tagged"].map((h) => el("th", {}, h))));
  for (const c of p.concepts) t.append(el("tr", {}, [c.folder.split(/[\\/]/).pop() + (c.validation ? " (validation)" : ""), c.images, c.repeats,
    `${Math.round(c.share_of_epoch * 100)}%`, c.captions_found, c.captions_defaulted, c.captions_tagged].map((v) => el("td", {}, v))));
  card.append(el("h3", {}, "plan"), t);
  card.append(el("p", {}, "buckets: " + Object.entries(p.buckets).map(([k, v]) => `${k}: ${v}`).join(", ")));
  if (p.steps) card.append(el("p", {class: "steps"}, `${p.steps.samples_per_epoch} samples per epoch, batch ${p.steps.batch_size} × accumulation ` +
    `${p.steps.gradient_accumulation_steps} → ${p.steps.steps_per_epoch} steps per epoch × ${p.steps.epochs} epochs = ${p.steps.total_steps} steps`));
  card.append(el("p", {class: "tags"}, "top tags: ", p.top_tags.map(([tag, n]) => el("span", {}, `${tag} (${n})`))));
  for (const w of p.warnings) card.append(el("p", {class: "warn"}, `warning: ${w}`));
}
async function queueTarget(target) {
  try { await api("/api/queue", "POST", {target}); show("builds"); } catch (e) { alert(e.message); }
}

// --- queue ----------------------------------------------------------------------------------
function renderQueue() {
  const body = $("#queue tbody"); body.replaceChildren();
  for (const e of [...S.queue].reverse()) {
    const took = e.started ? (e.ended || Date.now() / 1000) - e.started : null;
    const act = e.state === "running" ? el("button", {onclick: () => api(`/api/queue/${e.id}/stop`, "POST", {}).catch((x) => alert(x.message))}, "Stop")
      : e.state === "pending" ? el("button", {onclick: () => api(`/api/queue/${e.id}/stop`, "POST", {})}, "Cancel") : null;
    body.append(el("tr", {"data-id": e.id, "data-target": e.target, "data-state": e.state},
      el("td", {}, e.target), el("td", {class: `state-${e.state}`}, e.state), el("td", {}, new Date(e.added * 1000).toLocaleTimeString()),
      el("td", {}, fmtTime(took)), el("td", {}, e.note || ""),
      el("td", {}, act, " ", el("button", {onclick: () => { S.logId = e.id; loadLog(); }}, "Log"))));
  }
  loadLog();
}
async function loadLog() {
  if (!S.logId) return;
  const {log} = await api(`/api/queue/${S.logId}/log`);
  const pre = $("#log"); const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 10;
  pre.hidden = false; pre.textContent = log || "(no output yet)";
  if (atEnd) pre.scrollTop = pre.scrollHeight;
}

// --- live training --------------------------------------------------------------------------
let lossPlot, lrPlot;
function onLive(d) {
  let L = S.live[d.project];
  if (!L || d.rows_from === 0) L = S.live[d.project] = {rows: []};
  L.rows.length = d.rows_from; L.rows.push(...d.rows);
  Object.assign(L, d, {rows: L.rows});
  if (S.view === "training" && d.project === S.project) renderLive();
}
function ema(rows, a) {
  let m = null; return rows.map((r) => { m = m === null ? r[2] : a * m + (1 - a) * r[2]; return [r[0], m]; });
}
function renderLive() {
  const L = S.live[S.project];
  const stats = $("#live-stats"); stats.replaceChildren();
  if (!L) { stats.append(el("p", {class: "muted"}, `no training of ${S.project} recorded yet (cache/live/${S.project}/train.json)`)); $("#live-bar").style.width = "0"; }
  const rows = L ? L.rows : [];
  const a = Number($("#ema").value); $("#ema-v").textContent = a.toFixed(2);
  const sm = ema(rows, a);
  if (L) {
    const last = rows[rows.length - 1];
    const per = last && last[0] ? last[4] / last[0] : null;
    const left = per && L.state === "running" ? per * (L.total_steps - L.step) : null;
    const val = L.val || []; const best = val.length ? val.reduce((b, v) => (v[2] < b[2] ? v : b)) : null;
    const stat = (k, v) => el("div", {"data-stat": k}, el("span", {class: "muted"}, k), el("b", {}, v));
    stats.append(stat("state", L.state), stat("step", `${L.step} / ${L.total_steps}`), stat("epoch", `${L.epoch} / ${L.epochs}`),
      stat("elapsed", fmtTime(L.seconds)), stat("ETA", left === null ? "—" : fmtTime(left)),
      stat("loss", last ? last[2].toFixed(4) : "—"), stat("smoothed", sm.length ? sm[sm.length - 1][1].toFixed(4) : "—"),
      stat("lr", last && last[3] != null ? Number(last[3]).toExponential(2) : "—"),
      stat("best epoch (validation)", best ? `${best[0]} (${best[2].toFixed(4)})` : "—"));
    const quiet = Date.now() / 1000 - L.updated;
    if (L.state === "running" && quiet > 120) stats.append(el("p", {class: "warn"}, `no update for ${fmtTime(quiet)}: the build may have been killed`));
    if (L.state === "stopped") stats.append(el("p", {class: "warn"}, "stopped: the training state of the last finished epoch is kept; building train again continues from it"));
    $("#live-bar").style.width = `${Math.min(100, 100 * L.step / Math.max(1, L.total_steps))}%`;
  }
  const val = (L && L.val || []).map((v) => [v[1], v[2]]);
  const bestPt = val.length ? val.reduce((b, v) => (v[1] < b[1] ? v : b)) : null;
  lossPlot.draw([{points: rows.map((r) => [r[0], r[2]]), color: "#90caf9", label: "loss"},
                 {points: sm, color: "#0d47a1", width: 2, label: `smoothed (EMA ${a})`},
                 {points: val, color: "#e65100", dots: true, best: bestPt, label: "validation"}],
                {logY: $("#logy").checked, xRange: S.zoom, empty: "no loss yet"});
  lrPlot.draw([{points: rows.filter((r) => r[3] != null).map((r) => [r[0], r[3]]), color: "#2e7d32", label: "learning rate"}],
              {xRange: S.zoom, empty: ""});
}

// --- samples --------------------------------------------------------------------------------
const viewerCells = [];
async function renderSamples() {
  const d = await api(`/api/projects/${encodeURIComponent(S.project)}/samples`);
  const root = $("#samples"); root.replaceChildren();
  if (!d.rows.length) { root.append(el("p", {class: "muted"}, "no samples yet: build sample:" + S.project)); return; }
  const head = el("tr", {}, el("th", {}, ""));
  for (const c of d.columns) {
    const cell = d.rows.map((r) => r.cells[c]).find(Boolean);
    head.append(el("th", {}, cell ? cell.prompt : `prompt ${c}`));
  }
  const t = el("table", {id: "grid"}, head);
  for (const r of d.rows) {
    const tr = el("tr", {"data-row": r.id}, el("th", {}, r.label));
    for (const c of d.columns) {
      const cell = r.cells[c];
      tr.append(el("td", {}, cell ? el("img", {src: `${cell.url}?t=${d.stamp}`, alt: `${r.label}: ${cell.prompt}`, title: cell.parameters,
        onclick: () => openViewer({...cell, label: r.label})}) : ""));
    }
    t.append(tr);
  }
  root.append(t);
}
function openViewer(cell) {
  viewerCells.push(cell); while (viewerCells.length > 2) viewerCells.shift();
  const box = $("#viewer-cells"); box.replaceChildren();
  for (const c of viewerCells) box.append(el("figure", {}, el("img", {src: c.url}), el("figcaption", {}, el("b", {}, c.label), el("pre", {class: "parameters"}, c.parameters))));
  $("#viewer").hidden = false;
}

// --- dataset --------------------------------------------------------------------------------
async function renderDataset() {
  const d = await api(`/api/projects/${encodeURIComponent(S.project)}/dataset`);
  const root = $("#view-dataset"); root.replaceChildren();
  if (d.problem) root.append(el("p", {class: "warn"}, d.problem));
  S.tagger = d.tagger;
  root.append(el("p", {id: "tagger-line", class: "muted", "data-state": d.tagger.state}, d.tagger.line));
  root.append(el("p", {class: "tags"}, "tag frequency: ", d.tags.map(([t, n]) => el("span", {}, `${t} ${n}`))));
  for (const c of d.concepts) {
    root.append(el("h3", {}, `${c.folder} — ${c.images.length} images × ${c.repeats} repeats${c.validation ? " (validation)" : ""}`));
    const grid = el("div", {class: "images"});
    for (const im of c.images) grid.append(imageCard(im, c));
    root.append(grid);
  }
}
function imageCard(im, c, note) {
  const ta = el("textarea", {placeholder: `(no caption file: "${c.tokens}")`});
  ta.value = im.caption_file || "";
  const save = el("button", {disabled: true}, "Save");
  const msg = el("span", {class: "muted"}, note || "");
  ta.addEventListener("input", () => { save.disabled = ta.value.trim() === (im.caption_file || ""); });
  // every write goes through the caption API (atomic, CSRF-checked, refused if the file changed meanwhile);
  // the card is then drawn again from what the server read back
  const write = async (text) => {
    try {
      const r = await api(`/api/projects/${encodeURIComponent(S.project)}/caption`, "PUT", {id: im.id, text, expected: im.caption_file});
      card.replaceWith(imageCard(r.image, c, "saved"));
    } catch (e) { msg.textContent = e.message; }
  };
  save.addEventListener("click", () => write(ta.value));
  const addTag = (tag) => {
    // a caption file gets the tag appended; without one, the caption the training sees does
    const base = ta.value.trim() || (im.caption_file == null ? (im.caption_seen || "") : "");
    write(base ? `${base}, ${tag}` : tag);
  };
  const fit = im.fit ? `bucket ${im.fit.bucket[0]}×${im.fit.bucket[1]}, crop ${im.fit.crop.join(",")}` : "not bucketed yet";
  const card = el("div", {class: "image", "data-id": im.id}, el("img", {src: im.url, alt: im.id}), el("div", {}, im.id.split("/").pop()),
    el("div", {class: "muted"}, fit), im.flags.map((f) => el("span", {class: "flag"}, f)),
    ta, el("div", {class: "seen"}, "training sees: ", el("code", {}, im.caption_seen ?? "?")),
    suggestionsBox(im, addTag), el("div", {class: "row"}, save, msg));
  return card;
}
function suggestionsBox(im, addTag) {
  if (!S.tagger || S.tagger.state !== "ran") return null;  // the one line above the images says why
  if (!im.suggestions) {
    const why = S.tagger.mode === "missing" && im.caption_file != null ? "mode missing tags only images without a caption file" : "not in the last tag run";
    return el("div", {class: "suggest muted"}, `tagger: not tagged (${why})`);
  }
  if (!im.suggestions.length) return el("div", {class: "suggest muted"}, "tagger: no tag above the thresholds");
  return el("div", {class: "suggest"}, "tagger: ", im.suggestions.map((s) => el("button", {
    class: s.in_caption ? "sugg have" : "sugg", "data-tag": s.tag, "data-in-caption": String(s.in_caption), disabled: s.in_caption,
    title: s.in_caption ? "already in the caption" : "add to the caption file", onclick: () => addTag(s.tag)},
    `${s.in_caption ? "✓" : "+"} ${s.tag}`, s.score == null ? null : el("small", {}, ` ${s.score.toFixed(2)}`))));
}

// --- editor ---------------------------------------------------------------------------------
let schema = null, vTimer = null;
async function loadEditor() {
  const d = await api(`/api/projects/${encodeURIComponent(S.project)}/yaml`);
  S.yaml = d; $("#yaml").value = d.text; $("#editor-state").textContent = `projects/${S.project}.yaml`;
  if (!schema) schema = await api("/api/schema");
  validate();
}
function gutter(bad) {
  const n = $("#yaml").value.split("\n").length; const g = $("#gutter"); g.replaceChildren();
  for (let i = 1; i <= n; i++) g.append(el("span", {class: bad.has(i) ? "bad" : ""}, String(i)), "\n");
  g.scrollTop = $("#yaml").scrollTop;
}
async function validate() {
  const text = $("#yaml").value;
  const {problems} = await api(`/api/projects/${encodeURIComponent(S.project)}/validate`, "POST", {text});
  if ($("#yaml").value !== text) return;  // typed on meanwhile: the next check answers
  const ul = $("#problems"); ul.replaceChildren();
  for (const p of problems) ul.append(el("li", {"data-line": p.line}, `line ${p.line}:${p.col}: ${p.field ? p.field + ": " : ""}${p.message}`));
  gutter(new Set(problems.map((p) => p.line)));
  $("#save-yaml").disabled = problems.length > 0 || text === S.yaml.text;
  $("#editor-state").textContent = problems.length ? `${problems.length} problem(s): not saved` : text === S.yaml.text ? "saved" : "valid, not saved";
}
function hint() {
  // the dotted key at the cursor, from the indentation of the lines above, then its schema description
  const ta = $("#yaml"); const lines = ta.value.slice(0, ta.selectionStart).split("\n");
  const path = []; let indent = Infinity;
  for (let i = lines.length - 1; i >= 0; i--) {
    const m = /^(\s*)(?:- )?([A-Za-z_][\w]*)\s*:/.exec(lines[i]); if (!m) continue;
    if (m[1].length < indent) { path.unshift(m[2]); indent = m[1].length; if (!indent) break; }
  }
  let node = schema; for (const k of path) node = node && node.properties && node.properties[k];
  $("#hint").textContent = node && node.description ? `${path.join(".")}: ${node.description}` : "";
}

// --- wiring ---------------------------------------------------------------------------------
async function main() {
  lossPlot = new Plot($("#loss-chart"), (r) => { S.zoom = r; renderLive(); });
  lrPlot = new Plot($("#lr-chart"), (r) => { S.zoom = r; renderLive(); });
  const {projects} = await api("/api/projects");
  const [view, proj] = location.hash.slice(1).split("/");
  S.project = projects.includes(proj) ? proj : projects[0];
  for (const sel of [$("#project"), $("#q-project")]) for (const p of projects) sel.append(el("option", {value: p}, p));
  $("#project").value = S.project; $("#q-project").value = S.project;
  $("#project").addEventListener("change", (e) => { S.project = e.target.value; S.zoom = null; show(S.view); });
  document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => show(b.dataset.view)));
  $("#queue-form").addEventListener("submit", (e) => { e.preventDefault(); queueTarget(`${$("#q-stage").value}:${$("#q-project").value}`); });
  $("#ema").addEventListener("input", renderLive); $("#logy").addEventListener("change", renderLive);
  $("#live-reset").addEventListener("click", () => { S.zoom = null; renderLive(); });
  $("#viewer-close").addEventListener("click", () => { $("#viewer").hidden = true; viewerCells.length = 0; });
  $("#yaml").addEventListener("input", () => { clearTimeout(vTimer); vTimer = setTimeout(validate, 300); gutter(new Set()); });
  $("#yaml").addEventListener("scroll", () => { $("#gutter").scrollTop = $("#yaml").scrollTop; });
  for (const ev of ["keyup", "click"]) $("#yaml").addEventListener(ev, hint);
  $("#save-yaml").addEventListener("click", async () => {
    try { S.yaml = await api(`/api/projects/${encodeURIComponent(S.project)}/yaml`, "PUT", {text: $("#yaml").value, sha: S.yaml.sha}); validate(); }
    catch (e) { $("#editor-state").textContent = e.message; }
  });
  const es = new EventSource("/api/events");
  es.addEventListener("open", () => { $("#conn").textContent = "live"; });
  es.addEventListener("error", () => { $("#conn").textContent = "reconnecting…"; });
  es.addEventListener("queue", (m) => {
    const before = JSON.stringify(S.queue.map((e) => e.state)); S.queue = JSON.parse(m.data).entries;
    if (S.view === "builds") renderQueue();
    if (before !== JSON.stringify(S.queue.map((e) => e.state)) && S.view === "projects") renderProjects();
  });
  es.addEventListener("live", (m) => onLive(JSON.parse(m.data)));
  es.addEventListener("samples", (m) => {
    const d = JSON.parse(m.data); const changed = JSON.stringify(d) !== JSON.stringify(S.samplesStamp);
    S.samplesStamp = d; if (changed && S.view === "samples") renderSamples();
  });
  setInterval(() => { if (S.view === "builds") loadLog(); }, 2000);
  show(["projects", "builds", "training", "samples", "dataset", "editor"].includes(view) ? view : "projects");
}
main();
