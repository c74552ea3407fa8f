// The dashboard's pages, drawn from the JSON API. <body data-page> names the page; each page is one function.
"use strict";

const main = document.getElementById("main");

// --- helpers ------------------------------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

async function api(path, body) {
  const init = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error((data.error && data.error.message) || `${response.status} ${response.statusText}`);
  return data;
}

const isNum = (v) => typeof v === "number" && Number.isFinite(v);
function num(v, digits = 4) {
  if (!isNum(v)) return "–";
  if (Number.isInteger(v)) return v.toLocaleString("en-US");
  return Math.abs(v) >= 1000 ? v.toFixed(0) : Number(v.toPrecision(digits)).toString();
}
function bytes(v) {
  if (!isNum(v)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) [v, i] = [v / 1024, i + 1];
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}
const status = (s) => h("span", { class: `status ${s}` }, s);
const runLink = (row) => h("a", { href: `/run/${row.id}` }, row.run || row.name);
const query = new URLSearchParams(location.search);

function table(headers, rows, attrs) {
  return h("table", attrs, h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))));
}

function keyValues(obj) {
  const rows = Object.entries(obj).filter(([, v]) => v === null || typeof v !== "object");
  return table(["key", "value"], rows.map(([k, v]) => [k, isNum(v) ? num(v, 6) : String(v)]));
}

// Replace a node's children, skipping null/undefined/false (what `cond ? x : null` leaves).
function put(node, ...children) {
  node.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
}

function fail(error) {
  put(main, h("pre", { class: "error" }, String(error.message || error)));
}

// --- runs ---------------------------------------------------------------------------------------------
const RUN_COLUMNS = [
  ["run", "run"], ["date", "date"], ["model", "model"], ["method", "method"], ["status", "status"],
  ["steps", "steps", num], ["eval_metric", "final eval", num], ["best_eval_metric", "best eval", num],
  ["peak_mem_bytes", "peak memory", bytes], ["train_tokens_per_s", "tokens/s", (v) => num(v, 3)],
  ["artifact_bytes", "artifact", bytes],
];

async function runsPage() {
  const selected = new Set();
  let sortKey = "date", descending = true, data = await api("/api/runs");
  const filter = h("input", { type: "text", id: "filter", placeholder: "filter: name, model, method, status…", size: 40 });
  const compare = h("button", { id: "compare", disabled: true, onclick: () => { location.href = `/compare?runs=${[...selected].join(",")}`; } }, "Compare selected");
  const tbody = h("tbody");
  const heads = RUN_COLUMNS.map(([key, label, f]) => h("th", { class: `sortable${f ? " num" : ""}`, "data-key": key, onclick: () => {
    descending = sortKey === key ? !descending : false;
    sortKey = key;
    draw();
  } }, label));
  const reports = h("div", { id: "reports" });

  function draw() {
    const words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
    const rows = data.runs.filter((r) => words.every((w) => [r.run, r.model, r.method, r.status].join(" ").toLowerCase().includes(w)));
    rows.sort((a, b) => {
      const [x, y] = [a[sortKey], b[sortKey]];
      const order = x === y ? 0 : x === null || x === undefined ? 1 : y === null || y === undefined ? -1 : x < y ? -1 : 1;
      return descending && x !== null && y !== null ? -order : order;
    });
    heads.forEach((th) => th.className = `sortable${th.dataset.key === sortKey ? (descending ? " sorted-desc" : " sorted-asc") : ""}`);
    put(tbody, ...rows.map((r) => h("tr", { "data-id": r.id },
      h("td", {}, h("input", { type: "checkbox", class: "select", checked: selected.has(r.id), onchange: (e) => {
        e.target.checked ? selected.add(r.id) : selected.delete(r.id);
        compare.disabled = selected.size < 2;
      } })),
      RUN_COLUMNS.map(([key, , f]) => h("td", { class: f ? "num" : null, title: key === "status" ? r.detail : null },
        key === "run" ? runLink(r) : key === "status" ? status(r.status) : f ? f(r[key]) : (r[key] ?? "–"))))));
    put(reports, ...(data.reports.length ? [h("h2", {}, "Reports (tunelab compare)"),
      h("ul", {}, data.reports.map((x) => h("li", {}, h("a", { href: `/files/${x.path}`, target: "_blank" }, x.name))))] : []));
  }
  filter.addEventListener("input", draw);
  put(main, h("h1", {}, "Runs"),
    h("p", { class: "muted" }, `${data.runs.length} runs in ${data.dirs.join(", ")}`),
    h("div", { class: "toolbar" }, filter, compare),
    h("table", { id: "runs" }, h("thead", {}, h("tr", {}, h("th"), heads)), tbody), reports);
  draw();
  setInterval(async () => {  // the table follows the runs directories (cheap: the index is cached)
    if (document.hidden) return;
    data = await api("/api/runs");
    draw();
  }, 5000);
}

// --- one run ------------------------------------------------------------------------------------------
const CURVES = [
  ["loss", "loss", ["loss", "eval_loss"]], ["lr", "learning rate", ["lr"]],
  ["grad_norm", "gradient norm", ["grad_norm"]], ["tokens_per_s", "tokens/s", ["tokens_per_s"]],
];

function evalKeys(records) {
  const keys = new Set();
  for (const r of records) for (const [k, v] of Object.entries(r)) if (k.startsWith("eval_") && k !== "eval_loss" && isNum(v)) keys.add(k);
  return [...keys].filter((k) => !k.endsWith("_tokens") && !k.endsWith("_examples"));
}

function drawCurves(box, records) {
  const cards = CURVES.map(([id, title, keys]) => [id, title, keys]);
  const extra = evalKeys(records);
  if (extra.length) cards.splice(1, 0, ["eval", "eval metrics", extra]);
  put(box, ...cards.map(([id, title, keys]) => {
    const series = keys.map((k) => ({ name: k === "loss" ? "train loss" : k, dashed: k.startsWith("eval_"),
      points: records.filter((r) => isNum(r[k])).map((r) => [r.step, r[k]]) })).filter((s) => s.points.length);
    return h("div", { class: "card", id: `chart-${id}` }, h("h3", {}, title), lineChart(series, { xLabel: "step", yLabel: title, height: 240 }));
  }));
}

async function runPage() {
  const id = decodeURIComponent(location.pathname.slice("/run/".length));
  let details = await api(`/api/run/${id}`), records = [];
  const curves = h("div", { class: "charts", id: "curves" });
  const head = h("div");
  const body = h("div");
  put(main, head, h("h2", {}, "Curves"), curves, body);

  function drawHead() {
    const live = ["running", "starting"].includes(details.status);
    const stop = h("button", { class: "danger", id: "stop", onclick: async () => {
      stop.disabled = true;
      try { await api(`/api/run/${id}/stop`, {}); stop.textContent = "stopping (checkpoint, then exit)…"; } catch (e) { alert(e.message); }
    } }, "Stop (checkpoint and exit)");
    put(head, h("h1", {}, details.name, " ", h("span", { id: "run-status" }, status(details.status))),
      details.detail ? h("p", { id: "detail", class: "muted" }, details.detail) : null,
      live && details.status === "running" ? stop : null);
  }

  function drawBody() {
    const d = details, parts = [];
    if (d.hints && d.hints.length) parts.push(h("h2", {}, "Hints"), h("div", { id: "hints" }, d.hints.map((x) => h("div", { class: "hint" }, x))));
    if (d.summary && Object.keys(d.summary).length) parts.push(h("h2", {}, "Summary"), keyValues(d.summary));
    if (d.eval && Object.keys(d.eval).length) parts.push(h("h2", {}, "Evaluation"), keyValues(d.eval));
    if (d.confusion) parts.push(h("h2", {}, "Confusion matrix (rows: true, columns: predicted)"), confusionTable(d.confusion));
    if (d.predictions && d.predictions.length) parts.push(h("h2", {}, "Predictions (worst first)"), predictionsBrowser(id, d.predictions));
    if (d.checkpoints && d.checkpoints.length) parts.push(h("h2", {}, "Checkpoints"), h("ul", { id: "checkpoints" }, d.checkpoints.map((c) => h("li", {}, c))));
    if (d.plots && d.plots.length) parts.push(h("h2", {}, "Plots"), h("p", {}, d.plots.map((p) => [h("a", { href: `/files/${id}/plots/${p}`, target: "_blank" }, p), " "])));
    if (d.report) parts.push(h("p", {}, h("a", { href: `/files/${id}/report.html`, target: "_blank" }, "report.html")));
    if (d.config) parts.push(h("h2", {}, "Config (resolved)"), h("pre", { id: "config" }, d.config));
    if (d.job && d.job.log) parts.push(h("h2", {}, "Training log"), h("pre", { id: "log" }, d.job.log));
    put(body, ...parts);
  }

  async function poll() {
    try {
      if (details.status !== "starting") {
        const m = await api(`/api/run/${id}/metrics?since=${records.length}`);
        if (m.count < records.length) records = [];  // the log was cut back (a resume)
        records = records.concat(m.records);
        drawCurves(curves, records);
        if (m.status !== details.status) { details = await api(`/api/run/${id}`); drawHead(); drawBody(); }
      } else {
        details = await api(`/api/run/${id}`);
        drawHead();
        drawBody();
      }
    } catch (e) { /* the next poll retries */ }
    if (["running", "starting"].includes(details.status)) setTimeout(poll, 1000);
  }
  drawHead();
  drawBody();
  poll();
}

function confusionTable({ matrix, labels }) {
  const peak = Math.max(1, ...matrix.flat());
  return h("table", { class: "cm", id: "confusion" }, h("tr", {}, h("th"), labels.map((l) => h("th", {}, l))),
    matrix.map((row, i) => h("tr", {}, h("th", {}, labels[i]), row.map((v) => h("td", {
      style: `background: rgba(37, 99, 235, ${(0.85 * v) / peak})${v / peak > 0.5 ? "; color: #fff" : ""}` }, num(v))))));
}

function predictionsBrowser(id, files) {
  const box = h("div", { id: "predictions" });
  const pick = h("select", { onchange: () => load(0, true) }, files.map((f) => h("option", {}, f)));
  const rows = h("tbody");
  const more = h("button", { class: "secondary" }, "more");
  const text = (m) => (Array.isArray(m) ? m.map((x) => `${x.role}: ${x.content}`).join("\n") : String(m ?? ""));
  async function load(offset, reset) {
    const page = await api(`/api/run/${id}/predictions?file=${encodeURIComponent(pick.value)}&offset=${offset}&limit=25`);
    if (reset) put(rows);
    rows.append(...page.rows.map((r) => h("tr", {}, h("td", { class: "num" }, r.line ?? ""),
      h("td", { style: "white-space: pre-wrap" }, text(r.prompt)), h("td", {}, r.reference), h("td", {}, r.prediction),
      h("td", { class: "num" }, num(r.exact_match)), h("td", { class: "num" }, num(r.rougeL, 3)))));
    const next = page.offset + page.rows.length;
    more.hidden = next >= page.total;
    more.onclick = () => load(next, false);
  }
  box.append(h("div", { class: "toolbar" }, pick),
    h("table", {}, h("thead", {}, h("tr", {}, ["line", "prompt", "reference", "prediction", "exact", "ROUGE-L"].map((x) => h("th", {}, x)))), rows), more);
  load(0, true);
  return box;
}

// --- compare ------------------------------------------------------------------------------------------
const X_AXES = [["step", "step"], ["epoch", "epoch"], ["tokens_seen", "tokens seen"], ["train_s", "wall time (s)"]];
const SIDE_BY_SIDE = [
  ["status", "status"], ["model", "model"], ["method", "method"], ["steps", "steps", num],
  ["final_train_loss", "final train loss", num], ["eval_metric", "final eval", num], ["best_eval_metric", "best eval", num],
  ["train_wall_s", "train time (s)", num, "summary"], ["train_tokens", "tokens", num, "summary"],
  ["train_tokens_per_s", "tokens/s", num], ["trainable_params", "trainable params", num, "summary"],
  ["peak_mem_bytes", "peak memory", bytes], ["artifact_bytes", "artifact", bytes], ["disk_bytes", "on disk", bytes],
];

async function comparePage() {
  const ids = (query.get("runs") || "").split(",").filter(Boolean);
  if (ids.length < 1) { put(main, h("p", {}, "Select runs on the ", h("a", { href: "/" }, "runs page"), " to compare them.")); return; }
  const data = await api(`/api/compare?runs=${ids.join(",")}`);
  const summaries = await Promise.all(data.runs.map((r) => api(`/api/run/${r.id}`).then((d) => d.summary || {})));
  const metrics = new Set();
  for (const r of data.runs) for (const rec of r.records) for (const [k, v] of Object.entries(rec)) if (isNum(v) && !["step", "epoch", "tokens_seen", "train_s"].includes(k)) metrics.add(k);
  const metricPick = h("select", { id: "metric", onchange: draw }, [...metrics].sort().map((m) => h("option", { selected: m === "loss" }, m)));
  const axisPick = h("select", { id: "x-axis", onchange: draw }, X_AXES.map(([k, label]) => h("option", { value: k }, label)));
  const chart = h("div", { class: "card", id: "compare-chart" });

  function draw() {
    const [k, x] = [metricPick.value, axisPick.value];
    const series = data.runs.map((r) => ({ name: r.row.run, points: r.records.filter((rec) => isNum(rec[k]) && isNum(rec[x])).map((rec) => [rec[x], rec[k]]) }));
    put(chart, lineChart(series, { xLabel: axisPick.selectedOptions[0].textContent, yLabel: k, width: 1100, height: 360 }));
  }
  const names = data.runs.map((r) => r.row.run);
  const diffRows = Object.entries(data.diff.config).map(([key, values]) => [h("span", { class: "diff-key" }, key), ...values.map((v) => (v === null ? "–" : typeof v === "object" ? JSON.stringify(v) : String(v)))]);
  const side = SIDE_BY_SIDE.map(([key, label, f, from]) => [label, ...data.runs.map((r, i) => {
    const v = from === "summary" ? summaries[i][key] : r.row[key];
    return key === "status" ? status(v) : f ? f(v) : (v ?? "–");
  })]);
  put(main, h("h1", {}, `Compare ${names.length} runs`),
    h("div", { class: "toolbar" }, h("label", {}, "metric ", metricPick), h("label", {}, "x-axis ", axisPick)), chart,
    h("div", { class: "grid2" },
      h("div", {}, h("h2", {}, "Config differences"), diffRows.length ? table(["key", ...names], diffRows, { id: "config-diff" }) : h("p", { id: "config-diff" }, "The configs are the same.")),
      h("div", {}, h("h2", {}, "Metrics, cost and memory"), table(["", ...names], side, { id: "side-by-side" }))));
  draw();
}

// --- playground ---------------------------------------------------------------------------------------
async function playgroundPage() {
  const [runs, options] = await Promise.all([api("/api/runs"), api("/api/options")]);
  const chatRuns = runs.runs.filter((r) => r.status === "finished");
  const g = options.generation;
  const field = (id, value, attrs) => h("input", Object.assign({ id, value: value ?? "", size: 8 }, attrs || {}));
  const settings = {
    max_new_tokens: field("max_new_tokens", g.max_new_tokens, { type: "number" }), temperature: field("temperature", g.temperature),
    top_p: field("top_p", g.top_p), top_k: field("top_k", g.top_k, { type: "number" }),
    repetition_penalty: field("repetition_penalty", "", { placeholder: "auto" }), seed: field("seed", "", { placeholder: "none" }),
  };
  const system = h("input", { type: "text", id: "system", size: 50, placeholder: "system prompt (default: the run's)" });
  const prompt = h("textarea", { id: "prompt", rows: 3, placeholder: "your message" });
  const sides = ["a", "b"].map((side, i) => ({
    pick: h("select", { id: `run-${side}` }, i ? h("option", { value: "" }, "(none)") : null, chatRuns.map((r) => h("option", { value: r.id }, r.run))),
    transcript: h("div", { class: "transcript", id: `transcript-${side}` }), history: [],
  }));
  const send = h("button", { id: "send", onclick: async () => {
    const text = prompt.value.trim();
    if (!text) return;
    send.disabled = true;
    const body = { system: system.value || null };
    for (const [k, input] of Object.entries(settings)) if (input.value !== "") body[k] = Number(input.value);
    await Promise.all(sides.filter((s) => s.pick.value).map(async (s) => {
      s.history.push({ role: "user", content: text });
      s.transcript.append(h("div", { class: "msg user" }, text));
      const waiting = h("div", { class: "msg assistant pending" }, "…");
      s.transcript.append(waiting);
      try {
        const reply = await api("/api/chat", { ...body, run: s.pick.value, messages: s.history });
        s.history.push({ role: "assistant", content: reply.text });
        waiting.replaceWith(h("div", { class: "msg assistant" }, reply.text));
      } catch (e) {
        s.history.pop();
        waiting.replaceWith(h("pre", { class: "error" }, e.message));
      }
    }));
    prompt.value = "";
    send.disabled = false;
  } }, "Send");
  const reset = h("button", { class: "secondary", onclick: () => sides.forEach((s) => { s.history = []; put(s.transcript); }) }, "Reset");
  put(main, h("h1", {}, "Playground"),
    chatRuns.length ? null : h("p", { class: "muted" }, "No finished run to chat with yet."),
    h("div", { class: "toolbar" }, Object.entries(settings).map(([k, input]) => h("label", {}, `${k} `, input))),
    h("div", { class: "toolbar" }, system),
    h("div", { class: "grid2" }, sides.map((s) => h("div", { class: "card" }, s.pick, s.transcript))),
    h("p", {}, prompt), h("div", { class: "toolbar" }, send, reset));
}

// --- start a run --------------------------------------------------------------------------------------
async function startPage() {
  const options = await api("/api/options");
  const input = (id, attrs) => h("input", Object.assign({ type: "text", id, name: id }, attrs || {}));
  const fields = {
    dir: h("select", { id: "dir" }, options.dirs.map((d, i) => h("option", { value: i }, d))),
    model: input("model", { placeholder: options.default_model }),
    method: h("select", { id: "method" }, h("option", { value: "" }, "(default: lora)"), options.methods.map((m) => h("option", {}, m))),
    data: input("data", { placeholder: "data/train.jsonl" }),
    steps: input("steps", { placeholder: "train.max_steps (default: epochs)" }),
    lr: input("lr", { placeholder: "train.lr (default: the method's)" }),
    method_block: h("textarea", { id: "method_block", rows: 4, placeholder: "lora:\n  r: 8" }),
    overrides: h("textarea", { id: "overrides", rows: 3, placeholder: "more dotted.key=value lines, e.g. train.eval_every=10" }),
    run_name: input("run_name", { placeholder: "(default: method-model-date)" }),
  };
  const error = h("pre", { class: "error", id: "start-error", hidden: true });
  const submit = h("button", { id: "start", type: "submit" }, "Start training");
  const form = h("form", { class: "form", onsubmit: async (e) => {
    e.preventDefault();
    submit.disabled = true;
    error.hidden = true;
    const body = {};
    for (const [k, el] of Object.entries(fields)) body[k] = k === "dir" ? Number(el.value) : el.value;
    try {
      const started = await api("/api/start", body);
      location.href = `/run/${started.id}`;
    } catch (err) {
      error.textContent = err.message;
      error.hidden = false;
      submit.disabled = false;
    }
  } }, Object.entries(fields).map(([k, el]) => [h("label", { for: k }, k.replace("_", " ")), el]), h("span"), submit);
  put(main, h("h1", {}, "Start a run"),
    h("p", { class: "muted" }, "Validated by the same config model as `tunelab train`; the run trains in the background and its page opens."),
    form, error);
}

// --- login --------------------------------------------------------------------------------------------
function loginPage() {
  put(main, h("h1", {}, "tunelab ui: API key"),
    query.get("failed") ? h("pre", { class: "error" }, "Incorrect API key.") : null,
    h("form", { method: "post", action: "/login", class: "toolbar" },
      h("input", { type: "password", name: "key", id: "key", placeholder: "the key in --api-key-file", size: 40, autofocus: true }),
      h("input", { type: "hidden", name: "next", value: query.get("next") || "/" }), h("button", { type: "submit" }, "Log in")));
}

const PAGES = { runs: runsPage, run: runPage, compare: comparePage, playground: playgroundPage, start: startPage, login: loginPage };
Promise.resolve().then(() => PAGES[document.body.dataset.page]()).catch(fail);
