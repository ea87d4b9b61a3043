// The GradWatch tab: a hand-written ES module (no build step, no network beyond this
// TensorBoard). TensorBoard loads it in an iframe whose base URL is
// /data/plugin/gradwatch/, imports it and calls render() once. The tab follows TensorBoard's
// reloads (the reload button and auto-reload): TensorBoard's host answers an
// 'experimental.bootstrap' MessagePort and broadcasts 'experimental.DataReloaded' on it after
// each reload; the tab also polls its own routes every POLL_MS while the page is visible (a
// reload it may have missed, or a host without that message). It redraws only when the data
// changed, keeping filters and the selected row.

const SEVERITY_ORDER = {error: 0, warning: 1, info: 2};
const COLORS = {error: '#d93025', warning: '#e37400', info: '#5f6368'};
const STATUS_TEXT = {
  stalled: 'stopped training',
  exploding: 'blowing up',
  nonfinite: 'NaN / Inf',
  zero_init: 'n/a (zero-init)',
  ok: 'ok',
};
const POLL_MS = 5000;

const CSS = `
:root { color-scheme: light; }
* { box-sizing: border-box; }
body {
  margin: 0; padding: 16px 24px 32px; background: #f5f6f7; color: #202124;
  font: 13px/1.45 Roboto, "Helvetica Neue", Arial, sans-serif;
}
h1 { font-size: 20px; font-weight: 500; margin: 0; }
h2 { font-size: 15px; font-weight: 500; margin: 0 0 10px; }
code, .mono { font-family: "Roboto Mono", Menlo, Consolas, monospace; font-size: 12px; }
.gw-header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; margin-bottom: 14px; }
.gw-sub { color: #5f6368; }
.gw-chips { display: flex; gap: 8px; flex-wrap: wrap; }
.gw-chip { padding: 2px 10px; border-radius: 12px; background: #e8eaed; font-weight: 500; }
.gw-chip.error { background: #fce8e6; color: #c5221f; }
.gw-chip.warning { background: #fef7e0; color: #b06000; }
.gw-chip.ok { background: #e6f4ea; color: #137333; }
.gw-card {
  background: #fff; border-radius: 8px; padding: 14px 16px; margin-bottom: 16px;
  box-shadow: 0 1px 2px rgba(60,64,67,.15), 0 1px 3px 1px rgba(60,64,67,.08);
}
.gw-filters { display: flex; gap: 18px; align-items: center; flex-wrap: wrap; margin-bottom: 14px; }
.gw-filters label { color: #5f6368; display: flex; gap: 6px; align-items: center; }
.gw-filters select {
  font: inherit; padding: 3px 6px; border: 1px solid #dadce0; border-radius: 4px; background: #fff;
}
.gw-empty { color: #5f6368; padding: 8px 0; }
.gw-error-box { color: #c5221f; }
table { border-collapse: collapse; width: 100%; }
th {
  text-align: left; font-weight: 500; color: #5f6368; border-bottom: 1px solid #dadce0;
  padding: 6px 8px; white-space: nowrap;
}
td { padding: 6px 8px; border-bottom: 1px solid #f1f3f4; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.gw-row { cursor: pointer; }
tr.gw-row:hover { background: #f8f9fa; }
tr.gw-row.selected { background: #e8f0fe; }
.gw-sev { display: inline-block; padding: 0 8px; border-radius: 10px; font-weight: 500; font-size: 12px; }
.gw-sev.error { background: #fce8e6; color: #c5221f; }
.gw-sev.warning { background: #fef7e0; color: #b06000; }
.gw-where { font-weight: 500; color: #1a73e8; }
.gw-code {
  display: block; margin-top: 2px; color: #3c4043; background: #f1f3f4; border-radius: 4px;
  padding: 1px 6px; white-space: pre; overflow: hidden; text-overflow: ellipsis; max-width: 460px;
}
.gw-hint { color: #3c4043; min-width: 260px; max-width: 460px; white-space: normal; overflow-wrap: anywhere; }
#gw-anomaly-table td.gw-kind { white-space: nowrap; }
#gw-anomaly-table td.gw-tensor-cell { overflow-wrap: anywhere; min-width: 120px; }
#gw-anomaly-table td.gw-run-cell { overflow-wrap: anywhere; max-width: 220px; }
.gw-details td { background: #fafbfc; padding: 10px 16px 14px; }
.gw-details dl { display: grid; grid-template-columns: max-content 1fr; gap: 3px 16px; margin: 0; }
.gw-details dt { color: #5f6368; }
.gw-details dd { margin: 0; }
.gw-details dd.gw-tensors { max-height: 160px; overflow: auto; }
.gw-legend { display: flex; gap: 16px; color: #5f6368; font-size: 12px; margin-top: 6px; flex-wrap: wrap; }
.gw-dot { display: inline-block; width: 9px; height: 9px; border-radius: 50%; margin-right: 5px; }
.gw-status { font-weight: 500; }
.gw-status.stalled { color: #1967d2; }
.gw-status.exploding, .gw-status.nonfinite { color: #c5221f; }
.gw-status.ok { color: #137333; }
.gw-status.zero_init { color: #5f6368; }
.gw-run-title { font-weight: 500; margin: 14px 0 4px; }
table.gw-ratios { table-layout: fixed; }
table.gw-ratios td { vertical-align: middle; padding: 3px 8px; }
table.gw-ratios col.name { width: 280px; }
table.gw-ratios col.spark { width: 250px; }
table.gw-ratios col.num { width: 100px; }
svg text { font: 11px Roboto, Arial, sans-serif; fill: #5f6368; }
`;

const state = {
  anomalies: [],
  timeline: {kinds: [], series: [], max_step: 0},
  ratios: {thresholds: {}, runs: []},
  filters: {run: '', rank: '', kind: ''},
  selected: null,
  loaded: '',
};

export async function render() {
  document.title = 'GradWatch';
  const style = el('style');
  style.textContent = CSS;
  document.head.appendChild(style);
  const root = el('div', {id: 'gw-root'});
  document.body.appendChild(root);
  root.appendChild(el('div', {class: 'gw-empty', id: 'gw-loading'}, 'Loading gradwatch data…'));
  await refresh();
  listenForReloads();
  schedulePoll();
}

let refreshing = null;

// Fetch everything; redraw when it changed (or on the first load). Returns whether it redrew.
function refresh() {
  if (!refreshing) refreshing = load().finally(() => { refreshing = null; });
  return refreshing;
}

async function load() {
  const root = document.getElementById('gw-root');
  let data;
  try {
    data = await Promise.all([
      getJson('./anomalies'),
      getJson('./timeline'),
      getJson('./update_ratios'),
    ]);
  } catch (err) {
    if (state.loaded) return false;  // keep what is shown; the next reload tries again
    root.replaceChildren(
      el('div', {class: 'gw-card gw-error-box'}, `Could not load gradwatch data: ${err}`)
    );
    return false;
  }
  const key = JSON.stringify(data);
  if (key === state.loaded) return false;
  state.loaded = key;
  [state.anomalies, state.timeline, state.ratios] = data;
  const scroll = [window.scrollX, window.scrollY];
  root.replaceChildren(
    header(),
    filtersBar(),
    el('div', {class: 'gw-card', id: 'gw-timeline-card'}),
    el('div', {class: 'gw-card', id: 'gw-table-card'}),
    el('div', {class: 'gw-card', id: 'gw-ratios-card'})
  );
  redraw();
  window.scrollTo(scroll[0], scroll[1]);
  root.setAttribute('data-ready', 'true');
  root.setAttribute('data-loads', String(Number(root.getAttribute('data-loads') || 0) + 1));
  return true;
}

// TensorBoard's plugin IPC: a MessagePort handed to the host; it broadcasts
// 'experimental.DataReloaded' after every reload (button or auto-reload).
function listenForReloads() {
  if (window.parent === window || typeof MessageChannel === 'undefined') return;
  const channel = new MessageChannel();
  const port = channel.port1;
  port.addEventListener('message', (event) => {
    let msg;
    try {
      msg = JSON.parse(event.data);
    } catch (err) {
      return;
    }
    if (!msg || msg.isReply) return;
    port.postMessage(JSON.stringify({type: msg.type, id: msg.id, payload: null, error: null, isReply: true}));
    if (msg.type === 'experimental.DataReloaded' || msg.type === 'experimental.RunsChanged') {
      refresh();
    }
  });
  port.start();
  window.parent.postMessage('experimental.bootstrap', '*', [channel.port2]);
}

function schedulePoll() {
  const ms = Number(window.gradwatchPollMs) || POLL_MS;
  setTimeout(async () => {
    if (document.visibilityState !== 'hidden') await refresh();
    schedulePoll();
  }, ms);
}

document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'visible' && state.loaded) refresh();
});

async function getJson(path) {
  const response = await fetch(path);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

// ----------------------------------------------------------------------------- layout
function header() {
  const errors = state.anomalies.filter((a) => a.severity === 'error').length;
  const warnings = state.anomalies.filter((a) => a.severity === 'warning').length;
  const runs = allRuns();
  const chips = el('div', {class: 'gw-chips'});
  if (!state.anomalies.length) chips.appendChild(el('span', {class: 'gw-chip ok'}, 'no anomalies'));
  if (errors) chips.appendChild(el('span', {class: 'gw-chip error'}, plural(errors, 'error')));
  if (warnings) chips.appendChild(el('span', {class: 'gw-chip warning'}, plural(warnings, 'warning')));
  chips.appendChild(el('span', {class: 'gw-chip'}, plural(runs.length, 'run')));
  return el('div', {class: 'gw-header'}, [
    el('h1', null, 'GradWatch'),
    el('span', {class: 'gw-sub'}, 'the lines that silently corrupt gradients'),
    chips,
  ]);
}

function filtersBar() {
  const runs = allRuns();
  const ranks = [...new Set([
    ...state.anomalies.map((a) => a.rank),
    ...state.timeline.series.map((s) => s.rank),
  ])].sort((a, b) => a - b);
  const kinds = [...new Set(state.anomalies.map((a) => a.kind))].sort();
  const bar = el('div', {class: 'gw-filters'});
  bar.appendChild(select('run', 'Run', runs.map((r) => [r, runLabel(r)])));
  bar.appendChild(select('rank', 'Rank', ranks.map((r) => [String(r), String(r)])));
  bar.appendChild(select('kind', 'Kind', kinds.map((k) => [k, k])));
  return bar;
}

function select(key, label, options) {
  const s = el('select', {id: `gw-filter-${key}`});
  s.appendChild(el('option', {value: ''}, 'all'));
  for (const [value, text] of options) s.appendChild(el('option', {value}, text));
  if (state.filters[key] && !options.some(([value]) => value === state.filters[key])) {
    s.appendChild(el('option', {value: state.filters[key]}, state.filters[key]));
  }
  s.value = state.filters[key];
  s.addEventListener('change', () => {
    state.filters[key] = s.value;
    state.selected = null;
    redraw();
  });
  return el('label', null, [label, s]);
}

function redraw() {
  drawTimeline(document.getElementById('gw-timeline-card'));
  drawTable(document.getElementById('gw-table-card'));
  drawRatios(document.getElementById('gw-ratios-card'));
}

function passes(item) {
  const f = state.filters;
  return (!f.run || item.run === f.run) &&
    (f.rank === '' || String(item.rank) === f.rank) &&
    (!f.kind || item.kind === f.kind);
}

// ----------------------------------------------------------------------------- timeline
function drawTimeline(card) {
  card.replaceChildren(el('h2', null, 'Anomalies by step'));
  const series = state.timeline.series.filter(passes);
  if (!series.length) {
    card.appendChild(el('div', {class: 'gw-empty'}, 'No anomalies in the selected runs.'));
    return;
  }
  const multiRun = allRuns().length > 1 || series.some((s) => s.rank !== 0);
  const labels = series.map((s) => multiRun ? `${s.kind} · ${runLabel(s.run)} r${s.rank}` : s.kind);
  const maxChars = 52;  // longer labels are cut with an ellipsis (the full one in a tooltip)
  const labelWidth = 24 + 6.4 * Math.min(maxChars, Math.max(...labels.map((l) => l.length)));
  const width = Math.max(640, card.clientWidth - 32);
  const lane = 30;
  const top = 8;
  const height = top + lane * series.length + 30;
  // the axis of what is shown: the filtered runs' own steps, not every run's
  const runMax = state.timeline.run_max_step || {};
  const shownRuns = new Set(series.map((s) => s.run));
  const maxStep = Math.max(1, ...[...shownRuns].map((r) => runMax[r] || 0),
    ...series.flatMap((s) => s.points.map((p) => p[0])));
  const x0 = labelWidth;
  const x1 = width - 24;
  const sx = (step) => x0 + (x1 - x0) * (step / maxStep);
  const svg = svgEl('svg', {width, height, id: 'gw-timeline', role: 'img'});
  series.forEach((s, i) => {
    const y = top + lane * i + lane / 2;
    if (i % 2 === 0) {
      svg.appendChild(svgEl('rect', {x: 0, y: y - lane / 2, width, height: lane, fill: '#f8f9fa'}));
    }
    const t = svgEl('text', {x: 8, y: y + 4, class: 'gw-lane-label'});
    const full = labels[i];
    t.textContent = full.length > maxChars ? full.slice(0, maxChars - 1) + '…' : full;
    const tip = svgEl('title');
    tip.textContent = full;
    t.appendChild(tip);
    svg.appendChild(t);
    svg.appendChild(svgEl('line', {x1: x0, x2: x1, y1: y, y2: y, stroke: '#e0e0e0'}));
    const maxCount = Math.max(...s.points.map((p) => p[1]));
    for (const [step, count] of s.points) {
      const r = 3 + 6 * Math.sqrt(count / maxCount);
      const c = svgEl('circle', {
        cx: sx(step), cy: y, r, fill: COLORS[s.severity] || COLORS.warning,
        'fill-opacity': 0.75, stroke: '#fff', 'stroke-width': 1,
      });
      const title = svgEl('title');
      title.textContent = `${s.kind}: ${count} at step ${step} (${runLabel(s.run)}, rank ${s.rank})`;
      c.appendChild(title);
      svg.appendChild(c);
    }
  });
  const axisY = top + lane * series.length + 4;
  svg.appendChild(svgEl('line', {x1: x0, x2: x1, y1: axisY, y2: axisY, stroke: '#9aa0a6'}));
  for (const step of ticks(maxStep)) {
    svg.appendChild(svgEl('line', {x1: sx(step), x2: sx(step), y1: axisY, y2: axisY + 4, stroke: '#9aa0a6'}));
    const t = svgEl('text', {x: sx(step), y: axisY + 16, 'text-anchor': 'middle'});
    t.textContent = String(step);
    svg.appendChild(t);
  }
  card.appendChild(svg);
  card.appendChild(el('div', {class: 'gw-legend'}, [
    el('span', null, [el('span', {class: 'gw-dot', style: `background:${COLORS.error}`}), 'error']),
    el('span', null, [el('span', {class: 'gw-dot', style: `background:${COLORS.warning}`}), 'warning']),
    el('span', null, 'dot size: occurrences · x: TensorBoard step of the gradwatch/count scalars'),
  ]));
}

function ticks(max) {
  const raw = max / 6;
  const mag = Math.pow(10, Math.floor(Math.log10(Math.max(raw, 1))));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || mag * 10;
  const out = [];
  for (let v = 0; v <= max; v += step) out.push(v);
  return out;
}

// ----------------------------------------------------------------------------- table
function drawTable(card) {
  const rows = state.anomalies.filter(passes);
  card.replaceChildren(el('h2', null, `Findings (${rows.length})`));
  if (!rows.length) {
    card.appendChild(el('div', {class: 'gw-empty'},
      state.anomalies.length ? 'No anomaly matches the filters.' : 'No anomalies recorded.'));
    return;
  }
  const multi = allRuns().length > 1 || rows.some((a) => a.rank !== 0);
  const head = ['Severity', 'Kind', 'Tensors', 'Location', ...(multi ? ['Run', 'Rank'] : []),
    'First', 'Last', 'Count', 'Hint'];
  const numeric = new Set(['First', 'Last', 'Count', 'Rank']);
  const tbody = el('tbody');
  const table = el('table', {id: 'gw-anomaly-table'}, [
    el('thead', null, el('tr', null, head.map((h) => el('th', numeric.has(h) ? {class: 'num'} : null, h)))),
    tbody,
  ]);
  rows.forEach((a, i) => {
    const id = rowId(a);
    const tr = el('tr', {class: 'gw-row' + (state.selected === id ? ' selected' : ''),
      'data-where': a.where, 'data-kind': a.kind});
    tr.appendChild(el('td', null, el('span', {class: `gw-sev ${a.severity}`}, a.severity)));
    tr.appendChild(el('td', {class: 'mono gw-kind'}, a.kind));
    tr.appendChild(el('td', {class: 'mono gw-tensor-cell'}, a.tensor));
    tr.appendChild(el('td', null, [
      el('span', {class: 'gw-where mono', title: a.file ? `${a.file}:${a.line}` : ''}, a.where || '?'),
      a.code ? el('code', {class: 'gw-code'}, a.code) : null,
    ]));
    if (multi) {
      tr.appendChild(el('td', {class: 'mono gw-run-cell', title: runLabel(a.run)}, runLabel(a.run)));
      tr.appendChild(el('td', {class: 'num'}, String(a.rank)));
    }
    tr.appendChild(el('td', {class: 'num'}, String(a.first_step)));
    tr.appendChild(el('td', {class: 'num'}, String(a.last_step)));
    tr.appendChild(el('td', {class: 'num'}, String(a.count)));
    tr.appendChild(el('td', {class: 'gw-hint'}, a.hint));
    tr.addEventListener('click', () => {
      state.selected = state.selected === id ? null : id;
      drawTable(card);
    });
    tbody.appendChild(tr);
    if (state.selected === id) tbody.appendChild(details(a, head.length));
  });
  card.appendChild(table);
  card.appendChild(el('div', {class: 'gw-legend'},
    'One row per finding: the anomalies of one kind at one line, with every tensor they touched. ' +
    'Click a row for details. Count: anomaly events; steps count completed optimizer steps.'));
}

function details(a, colspan) {
  const ev = a.event || {};
  const names = Array.isArray(a.tensors) ? a.tensors : [];
  const total = Math.max(a.tensor_count || 0, names.length);
  const several = total > 1;
  const items = [
    ['What happened', ev.message || a.message],
    ['Fix', ev.hint || a.hint],
    ['Where', a.file ? `${a.file}:${a.line} in ${a.function || '?'}()` : '?'],
    ['Source line', a.code],
    ['Op', ev.op],
    ['Tensors', several ? `${plural(total, 'tensor')}: ${names.join(', ')}` +
      (total > names.length ? ` … (+${total - names.length} more)` : '') : null],
    [several ? 'First tensor' : 'Tensor', [ev.tensor, ev.dtype, ev.shape ? `[${ev.shape.join(', ')}]` : null, ev.device]
      .filter((v) => v != null && v !== '').join('  ')],
    ['Version', ev.version_before != null ? `${ev.version_before} → ${ev.version_after}` : null],
    ['Grad mode', ev.grad_mode],
    ['Change', ev.change ? `‖Δ‖₂ ${fmt(ev.change.l2)} · rel ${fmt(ev.change.rel)} · max |Δ| ${fmt(ev.change.max_abs)}` +
      (ev.change.nonfinite ? ' · non-finite after' : '') : null],
    ['Run / rank', `${runLabel(a.run)} / ${a.rank}`],
    ['Steps', `${a.first_step === a.last_step ? `step ${a.first_step}` : `${a.first_step} – ${a.last_step}`}` +
      ` (${plural(a.count, 'occurrence')})`],
  ];
  const dl = el('dl');
  for (const [k, v] of items) {
    if (v == null || v === '') continue;
    dl.appendChild(el('dt', null, k));
    const cls = k === 'Tensors' ? 'mono gw-tensors' : k === 'Source line' || k === 'Where' ? 'mono' : null;
    dl.appendChild(el('dd', cls ? {class: cls} : null, String(v)));
  }
  return el('tr', {class: 'gw-details'}, el('td', {colspan}, dl));
}

// ----------------------------------------------------------------------------- update ratios
function drawRatios(card) {
  const th = state.ratios.thresholds || {};
  card.replaceChildren(el('h2', null, 'Update / weight ratio per parameter'));
  const runs = state.ratios.runs.filter((r) =>
    (!state.filters.run || r.run === state.filters.run) &&
    (state.filters.rank === '' || String(r.rank) === state.filters.rank));
  if (!runs.some((r) => r.params.length)) {
    // gradwatch measures the first optimizer step and every stats_every-th one: a run with
    // optimizer steps but no ratio had an optimizer that changed no parameter
    const counted = runs.filter((r) => r.optimizer_updates != null);
    const updates = counted.reduce((n, r) => n + r.optimizer_updates, 0);
    card.appendChild(el('div', {class: 'gw-empty', id: 'gw-ratios-empty'},
      counted.length
        ? `0 parameters updated: ${updates ? plural(updates, 'optimizer step') + ' changed no parameter'
          : 'no optimizer step'} in the selected runs.`
        : 'No update/weight ratios logged (they are written on statistics steps: watch(stats_every=N)).'));
    return;
  }
  card.appendChild(el('div', {class: 'gw-legend'},
    `‖Δw‖ / ‖w‖ per optimizer step, log scale. Flagged: below ${fmt(th.stalled_below)} ` +
    `(stopped training) or above ${fmt(th.exploding_above)} (blowing up); healthy is about 1e-3. ` +
    'A parameter initialised to zero (a bias) has no meaningful ratio while it grows: n/a.'));
  for (const run of runs) {
    if (!run.params.length) continue;
    if (runs.length > 1 || run.rank !== 0) {
      card.appendChild(el('div', {class: 'gw-run-title'}, `${runLabel(run.run)} · rank ${run.rank}`));
    }
    const tbody = el('tbody');
    for (const p of run.params) {
      tbody.appendChild(el('tr', {class: 'gw-param', 'data-status': p.status}, [
        el('td', {class: 'mono'}, p.name),
        el('td', null, sparkline(p.points, th, p.status)),
        el('td', {class: 'num mono'}, fmt(p.last)),
        el('td', {class: 'num mono'}, fmt(p.min)),
        el('td', {class: 'num mono'}, fmt(p.max)),
        el('td', null, el('span', {class: `gw-status ${p.status}`}, STATUS_TEXT[p.status] || p.status)),
      ]));
    }
    card.appendChild(el('table', {class: 'gw-ratios'}, [
      el('colgroup', null, ['name', 'spark', 'num', 'num', 'num', 'status'].map(
        (c) => el('col', {class: c}))),
      el('thead', null, el('tr', null, [
        el('th', null, 'Parameter'), el('th', null, 'Ratio over steps'), el('th', {class: 'num'}, 'Last'),
        el('th', {class: 'num'}, 'Min'), el('th', {class: 'num'}, 'Max'), el('th', null, 'Status'),
      ])),
      tbody,
    ]));
  }
}

function sparkline(points, th, status) {
  const stroke = {stalled: '#1967d2', exploding: COLORS.error, nonfinite: COLORS.error}[status] || '#137333';
  const w = 220;
  const h = 30;
  const lo = -9;
  const hi = 1;
  const steps = points.map((p) => p[0]);
  const s0 = Math.min(...steps);
  const s1 = Math.max(...steps, s0 + 1);
  const sx = (s) => 2 + (w - 4) * ((s - s0) / (s1 - s0));
  const sy = (v) => {
    const l = Math.log10(Math.max(v, 1e-12));
    return h - 2 - (h - 4) * ((Math.min(Math.max(l, lo), hi) - lo) / (hi - lo));
  };
  const svg = svgEl('svg', {width: w, height: h, class: 'gw-spark'});
  svg.appendChild(svgEl('rect', {x: 0, y: 0, width: w, height: h, fill: '#f8f9fa', rx: 3}));
  for (const [v, color] of [[th.stalled_below, '#aecbfa'], [th.exploding_above, '#f6aea9']]) {
    if (v) svg.appendChild(svgEl('line', {x1: 0, x2: w, y1: sy(v), y2: sy(v), stroke: color, 'stroke-dasharray': '3 3'}));
  }
  const good = points.filter((p) => p[1] != null);
  if (good.length) {
    const d = good.map((p, i) => `${i ? 'L' : 'M'}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(' ');
    svg.appendChild(svgEl('path', {d, fill: 'none', stroke, 'stroke-width': 1.5}));
    const [ls, lv] = good[good.length - 1];
    svg.appendChild(svgEl('circle', {cx: sx(ls), cy: sy(lv), r: 2.5, fill: stroke}));
  }
  for (const p of points) {
    if (p[1] == null) svg.appendChild(svgEl('circle', {cx: sx(p[0]), cy: 4, r: 2.5, fill: COLORS.error}));
  }
  const title = svgEl('title');
  title.textContent = points.map((p) => `step ${p[0]}: ${fmt(p[1])}`).join('\n');
  svg.appendChild(title);
  return svg;
}

// ----------------------------------------------------------------------------- helpers
function allRuns() {
  return [...new Set([
    ...state.anomalies.map((a) => a.run),
    ...state.timeline.series.map((s) => s.run),
    ...state.ratios.runs.map((r) => r.run),
  ])].sort();
}

function runLabel(run) {
  return run === '.' ? '(logdir)' : run;
}

function rowId(a) {
  return JSON.stringify([a.run, a.rank, a.kind, a.tensor, a.file, a.line]);
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

function fmt(v) {
  if (v == null) return 'NaN/Inf';
  if (v === 0) return '0';
  const a = Math.abs(v);
  return a >= 1e-2 && a < 1e3 ? v.toPrecision(3) : v.toExponential(1);
}

function el(tag, attrs, children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
  setAttrs(node, attrs);
  return node;
}

function setAttrs(node, attrs) {
  if (!attrs) return;
  for (const [k, v] of Object.entries(attrs)) {
    if (v != null) node.setAttribute(k, String(v));
  }
}

function append(node, children) {
  if (children == null) return;
  if (Array.isArray(children)) {
    for (const c of children) append(node, c);
  } else if (typeof children === 'string') {
    node.appendChild(document.createTextNode(children));
  } else {
    node.appendChild(children);
  }
}
