// redtap's live page: polls GET /v1/backends and GET /v1/live once a second (with the bearer
// token when one was typed), draws the table and the chart, and changes weights through
// PUT /v1/weights after a confirm step. No framework, nothing loaded from elsewhere.
'use strict';

const COLORS = ['#2f6fde', '#e8590c', '#2b8a3e', '#9c36b5', '#c2255c', '#0c8599', '#5c940d', '#862e9c'];
const TOKEN_KEY = 'redtap-token';
// The server checks every weight; this only bounds the inputs. A test keeps it equal to balance::MAX_WEIGHT.
const MAX_WEIGHT = 10000;
const $ = (sel) => document.querySelector(sel);

let token = sessionStorage.getItem(TOKEN_KEY) || '';
let polling = false;
let backends = [];          // the last GET /v1/backends
let live = null;            // the last GET /v1/live
let lastOk = null;          // Date of the last good poll
let edits = {};             // name -> weight typed but not applied
let markers = [];           // unix ms of weight changes seen
let lastWeights = null;     // "A=50,B=50" of the previous poll
let ownChange = null;       // weights string our own PUT produced

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

const fmtInt = (n) => Number(n).toLocaleString('en-US');
const pct = (x) => (x * 100).toFixed(1) + '%';
const fmtRate = (x) => x >= 100 ? fmtInt(Math.round(x)) : x.toFixed(1);
const clock = (ms) => new Date(ms).toLocaleTimeString('en-GB');

class ApiError extends Error {
  constructor(kind, status, msg) { super(msg); this.kind = kind; this.status = status; }
}

async function api(method, path, body) {
  const headers = {};
  if (token) headers['Authorization'] = 'Bearer ' + token;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), 5000);
  let res;
  try {
    res = await fetch(path, {
      method, headers, cache: 'no-store', signal: ctl.signal,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError('network', 0, e.name === 'AbortError' ? 'no answer within 5 s' : String(e.message || e));
  } finally {
    clearTimeout(timer);
  }
  const text = await res.text();
  let data = null;
  try { data = JSON.parse(text); } catch (_) { /* not JSON: keep the text */ }
  if (!res.ok) {
    const msg = (data && data.error) || text.trim() || res.statusText;
    throw new ApiError(res.status === 401 ? 'auth' : 'http', res.status, msg);
  }
  return data;
}

function showMessage(kind, text) {
  const m = $('#message');
  m.className = 'message ' + kind;
  m.textContent = text;
  m.hidden = false;
}

function clearMessage() { $('#message').hidden = true; }

function setStatus(kind, text) {
  const s = $('#status');
  s.className = 'pill ' + kind;
  s.textContent = text;
}

async function poll() {
  if (polling) return;
  polling = true;
  while (polling) {
    try {
      const [b, l] = await Promise.all([api('GET', '/v1/backends'), api('GET', '/v1/live')]);
      backends = b; live = l; lastOk = new Date();
      onData();
    } catch (e) {
      onError(e);
      if (e.kind === 'auth') { polling = false; break; }
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

function onError(e) {
  if (e.kind === 'auth') {
    const refused = token !== '';
    $('#auth').hidden = false;
    $('#main').hidden = true;
    $('#auth-why').textContent = refused
      ? 'The token you gave was refused. Enter the token redtap was started with (--admin-token).'
      : 'This redtap requires a bearer token for its API (--admin-token).';
    setStatus('error', 'token needed');
    showMessage('error', refused
      ? 'The API refused the token (401): ' + e.message + '.'
      : 'The API refused the request (401): a token is required.');
    $('#token').focus();
    return;
  }
  setStatus('stale', 'stale');
  const when = lastOk ? ' The figures below are from ' + lastOk.toLocaleTimeString('en-GB') + '.' : '';
  if (e.kind === 'network') {
    showMessage('error', 'Cannot reach redtap at this address: ' + e.message + '. Retrying every second.' + when);
  } else {
    showMessage('error', 'The API answered ' + e.status + ': ' + e.message + '. Retrying every second.' + when);
  }
}

function onData() {
  $('#auth').hidden = true;
  $('#main').hidden = false;
  const m = $('#message');
  if (m.classList.contains('error') || m.textContent.startsWith('Trying')) clearMessage();
  setStatus('live', 'live');
  $('#updated').textContent = 'updated ' + lastOk.toLocaleTimeString('en-GB');
  const weights = backends.map((b) => b.name + '=' + b.weight).join(',');
  if (lastWeights !== null && weights !== lastWeights) {
    markers.push(live.unix_ms);
    if (weights !== ownChange) {
      $('#change-note').textContent = 'Weights changed elsewhere at ' + clock(live.unix_ms) + ' (' + weights + ').';
    }
  }
  lastWeights = weights;
  markers = markers.filter((m) => live.unix_ms - m < 60000);
  renderBackends();
  renderChart();
  renderPipeline();
  renderSources();
}

function shareCell(cls, value, target, color) {
  const bar = el('div', { class: 'bar' });
  const fill = el('i');
  fill.style.width = Math.min(100, value * 100) + '%';
  fill.style.background = color;
  const tick = el('b');
  tick.style.left = 'calc(' + Math.min(100, target * 100) + '% - 1px)';
  tick.title = 'target ' + pct(target);
  bar.append(fill, tick);
  return el('td', { class: 'share ' + cls }, el('span', { class: 'v' }, pct(value)), bar);
}

function rowFor(name) {
  const tbody = $('#backends tbody');
  let row = tbody.querySelector('tr[data-backend="' + CSS.escape(name) + '"]');
  if (row) return row;
  const num = el('input', { type: 'number', min: '0', max: String(MAX_WEIGHT), step: '1', class: 'weight-input', 'aria-label': 'new weight for ' + name });
  const slider = el('input', { type: 'range', min: '0', max: '100', step: '1', 'aria-label': 'new weight for ' + name });
  const edit = el('td', { class: 'edit' }, num, ' ', slider);
  const onEdit = (v) => {
    const b = backends.find((x) => x.name === name);
    const w = Math.max(0, Math.min(MAX_WEIGHT, Math.round(Number(v))));
    if (Number.isNaN(w) || !b || w === b.weight) delete edits[name]; else edits[name] = w;
    num.value = String(Number.isNaN(w) ? '' : w);
    slider.value = String(w);
    updateEditState();
  };
  num.addEventListener('input', () => { if (num.value !== '') onEdit(num.value); });
  num.addEventListener('change', () => onEdit(num.value));
  slider.addEventListener('input', () => onEdit(slider.value));
  row = el('tr', { 'data-backend': name },
    el('td', { class: 'name' }, el('span', { class: 'swatch' }), name),
    el('td', { class: 'state' }),
    el('td', { class: 'weight-now' }),
    edit);
  for (let i = 0; i < 8; i++) row.append(el('td'));
  tbody.append(row);
  return row;
}

function renderBackends() {
  const liveBy = Object.fromEntries((live.backends || []).map((b) => [b.name, b]));
  $('#recent-head').textContent = live.recent_seconds > 0
    ? 'last ' + Math.round(live.recent_seconds) + ' s' : 'last 10 s';
  const total = backends.reduce((s, b) => s + b.weight, 0);
  backends.forEach((b, i) => {
    const color = COLORS[i % COLORS.length];
    const l = liveBy[b.name] || { share_recent: 0, routed_rate: 0 };
    const row = rowFor(b.name);
    row.querySelector('.swatch').style.background = color;
    const state = row.children[1];
    state.className = 'state ' + (b.up ? 'up' : 'down');
    state.textContent = b.up ? 'up'
      : (b.excluded ? 'excluded' : 'down') + (b.down_cause ? ': ' + b.down_cause : '');
    row.children[2].textContent = String(b.weight);
    const edit = row.children[3];
    const [num, slider] = edit.querySelectorAll('input');
    slider.max = String(Math.max(100, total, ...Object.values(edits)));
    const dirty = b.name in edits;
    edit.classList.toggle('dirty', dirty);
    if (!dirty && document.activeElement !== num) {
      num.value = String(b.weight);
      slider.value = String(b.weight);
    }
    const cells = [
      shareCell('target', b.target_share, b.target_share, '#9aa5b5'),
      shareCell('since-start', b.actual_share, b.target_share, color),
      shareCell('since-change', b.actual_share_since_change, b.target_share, color),
      shareCell('share-recent', l.share_recent, b.target_share, color),
      el('td', { class: 'num rate' }, fmtRate(l.routed_rate)),
      el('td', { class: 'num routed' }, fmtInt(b.records_routed)),
      el('td', { class: 'num written' }, fmtInt(b.records_written)),
      el('td', { class: 'num errors' }, fmtInt(b.write_errors)),
    ];
    cells.forEach((c, k) => row.children[4 + k].replaceWith(c));
  });
}

function updateEditState() {
  const n = Object.keys(edits).length;
  $('#review').disabled = n === 0;
  $('#reset').disabled = n === 0;
  if (n === 0) $('#confirm').hidden = true;
  for (const row of document.querySelectorAll('#backends tbody tr')) {
    row.children[3].classList.toggle('dirty', row.dataset.backend in edits);
  }
}

function review() {
  const after = Object.fromEntries(backends.map((b) => [b.name, b.name in edits ? edits[b.name] : b.weight]));
  const sumBefore = backends.reduce((s, b) => s + b.weight, 0);
  const sumAfter = Object.values(after).reduce((s, w) => s + w, 0);
  const list = $('#confirm-list');
  list.replaceChildren();
  for (const b of backends) {
    if (!(b.name in edits)) continue;
    const t0 = sumBefore ? b.weight / sumBefore : 0;
    const t1 = sumAfter ? after[b.name] / sumAfter : 0;
    list.append(el('li', {}, b.name + ': weight ' + b.weight + ' → ' + after[b.name] +
      ' (target ' + pct(t0) + ' → ' + pct(t1) + ')'));
  }
  $('#confirm').hidden = false;
  $('#confirm-yes').focus();
}

async function confirmChange() {
  const change = Object.assign({}, edits);
  $('#confirm-yes').disabled = true;
  try {
    const answer = await api('PUT', '/v1/weights', change);
    edits = {};
    backends = answer;
    ownChange = answer.map((b) => b.name + '=' + b.weight).join(',');
    const at = Date.now();
    $('#change-note').textContent = 'Weights changed at ' + clock(at) + ': ' +
      Object.entries(change).map(([n, w]) => n + ' → ' + w).join(', ') +
      '. "since change" starts over and should approach the target; the chart marks the change.';
    const unsaved = answer.find((b) => b.unsaved);
    if (unsaved) {
      // `unsaved` says where, why, and that a restart would lose the change.
      showMessage('warning', 'Weights applied: ' + ownChange + ', but ' + unsaved.unsaved + '.');
    } else {
      showMessage('info', 'Weights applied: ' + ownChange + '.');
    }
    updateEditState();
    if (live) renderBackends();
  } catch (e) {
    if (e.kind === 'auth') { onError(e); polling = false; }
    else showMessage('error', 'The weight change was refused' + (e.status ? ' (' + e.status + ')' : '') + ': ' + e.message + '. Nothing changed.');
  } finally {
    $('#confirm-yes').disabled = false;
    $('#confirm').hidden = true;
  }
}

function renderChart() {
  const W = Math.max(320, $('#chart').clientWidth || 640), H = 150, L = 48, R = 8, T = 8, B = 20;
  const series = live.backends.map((b) => b.routed_per_second);
  const n = Math.max(1, ...series.map((s) => s.length));
  const peak = Math.max(1, ...series.flat());
  const mag = Math.pow(10, Math.floor(Math.log10(peak)));
  const top = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((v) => v >= peak);
  const x = (secAgo) => L + (W - L - R) * (1 - secAgo / 60);
  const y = (v) => T + (H - T - B) * (1 - v / top);
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', '0 0 ' + W + ' ' + H);
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', 'records per second routed to each backend over the last minute');
  const add = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.append(e);
    return e;
  };
  for (const f of [0, 0.5, 1]) {
    add('line', { x1: L, x2: W - R, y1: y(top * f), y2: y(top * f), stroke: '#e3e6eb' });
    add('text', { x: L - 6, y: y(top * f) + 4, 'text-anchor': 'end', 'font-size': 11, fill: '#6b7280' }, f === 0 ? '0' : fmtRate(top * f));
  }
  for (const s of [60, 45, 30, 15, 0]) {
    const anchor = s === 60 ? 'start' : s === 0 ? 'end' : 'middle';
    add('text', { x: x(s), y: H - 4, 'text-anchor': anchor, 'font-size': 11, fill: '#6b7280' }, s ? '-' + s + ' s' : 'now');
  }
  for (const m of markers) {
    const ago = (live.unix_ms - m) / 1000;
    add('line', { x1: x(ago), x2: x(ago), y1: T, y2: H - B, stroke: '#1d2330', 'stroke-dasharray': '4 3' });
  }
  series.forEach((s, i) => {
    if (s.length === 0) return;
    const pts = s.map((v, k) => x(s.length - 1 - k) + ',' + y(v)).join(' ');
    add('polyline', { points: pts, fill: 'none', stroke: COLORS[i % COLORS.length], 'stroke-width': 2, 'stroke-linejoin': 'round' });
  });
  if (n < 2) add('text', { x: (L + W) / 2, y: H / 2, 'text-anchor': 'middle', fill: '#6b7280' }, 'collecting… (one point a second)');
  $('#chart').replaceChildren(svg);
  $('#legend').replaceChildren(...live.backends.map((b, i) => {
    const sw = el('span', { class: 'swatch' });
    sw.style.background = COLORS[i % COLORS.length];
    return el('span', {}, sw, b.name + ' ' + fmtRate(b.routed_rate) + '/s');
  }));
}

function renderPipeline() {
  const d = live.dropped, k = live.kernel_drops;
  const dropped = Object.values(d).reduce((s, v) => s + v, 0);
  const items = [
    ['Capture', live.capture_up ? 'up' : 'down: reopening', !live.capture_up],
    ['Capture rate', fmtRate(live.capture_rate) + ' records/s', false],
    ['Captured', fmtInt(live.captured), false],
    ['Queue depth', fmtInt(live.queue_depth), false],
    ['Buffered', fmtInt(live.buffered) + ' of ' + fmtInt(live.buffer_max), live.buffered > 0],
    ['Dropped', fmtInt(dropped) + ' records', dropped > 0],
  ];
  items.push(['Dropped by reason', Object.entries(d).map(([r, v]) => r.replace('_', ' ') + ' ' + fmtInt(v)).join(', '), dropped > 0]);
  items.push(['Kernel drops', 'ring ' + fmtInt(k.ring) + ', interface ' + fmtInt(k.interface), k.ring + k.interface > 0]);
  $('#pipeline').replaceChildren(...items.flatMap(([name, value, bad]) => [
    el('dt', {}, name), el('dd', { class: bad ? 'bad' : '', 'data-stat': name.trim() }, value)]));
}

function renderSources() {
  const tbody = $('#sources tbody');
  const minute = live.backends.reduce((s, b) => s + b.routed_per_second.reduce((a, v) => a + v, 0), 0);
  const approx = live.top_sources.some((s) => s.error > 0);
  $('#top-note').textContent = 'last ' + live.top_seconds + ' s' + (approx ? '; ± is the sketch\'s error bound' : '; exact');
  if (live.top_sources.length === 0) {
    tbody.replaceChildren(el('tr', {}, el('td', { class: 'muted', colspan: '3' }, 'no records in the last minute')));
    return;
  }
  tbody.replaceChildren(...live.top_sources.map((s) => el('tr', {},
    el('td', {}, s.source),
    el('td', { class: 'num' }, fmtInt(s.records) + (s.error > 0 ? ' ± ' + fmtInt(s.error) : '')),
    el('td', { class: 'share' }, minute > 0 ? pct(Math.min(1, s.records / minute)) : '–'))));
}

$('#auth').addEventListener('submit', (ev) => {
  ev.preventDefault();
  token = $('#token').value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  $('#token').value = '';
  showMessage('info', 'Trying the token…');
  poll();
});
$('#review').addEventListener('click', review);
$('#reset').addEventListener('click', () => { edits = {}; updateEditState(); if (live) renderBackends(); });
$('#confirm-yes').addEventListener('click', confirmChange);
$('#confirm-no').addEventListener('click', () => { $('#confirm').hidden = true; });
poll();
