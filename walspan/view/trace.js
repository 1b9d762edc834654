/* walspan view: one trace. A waterfall of the span tree (only the rows in view are in the DOM,
   so 100,000 spans scroll like 100), a detail panel, filters, and a conversation view for
   agent traces. Conventions it reads are listed in docs/VIEWER.md. */
(function () {
  const h = W.h, vis = W.vis;
  const scriptStart = performance.now();
  const DATA = W.readData();
  const parsedAt = performance.now();
  const T = DATA.trace || {};
  const spans = Array.isArray(T.spans) ? T.spans : [];
  const writers = Array.isArray(T.writers) ? T.writers : [];
  const n = spans.length;
  const MARK = W.markerPattern(DATA.truncation_marker);
  const RH = 24;          // row height in px; rows are absolutely placed at k * RH
  const OVERSCAN = 12;    // rows drawn above and below the viewport
  const MAX_INDENT = 40;  // deeper levels are drawn at this indent, with their depth written out
  const CONV_CHUNK = 200; // conversation cards added per scroll step
  const CARD_TEXT = 3000; // characters of a message shown in its card (the detail panel has all)
  // what a test or benchmark reads: ready once the first frame with rows is drawn; the
  // timings are milliseconds since navigation start
  const state = { ready: false, readyMs: null, spans: n, scriptStartMs: scriptStart, parseMs: parsedAt - scriptStart, initMs: null };
  window.walspanView = state;

  // ---- the tree: parent links, children (CSR arrays), depth-first order ------------------
  const index = new Map();
  for (let i = 0; i < n; i++) index.set(spans[i].span_id, i);
  const parent = new Int32Array(n).fill(-1);
  const orphan = new Uint8Array(n);   // names a parent that is not in the trace
  for (let i = 0; i < n; i++) {
    const p = spans[i].parent_span_id;
    if (p == null) continue;
    const j = index.get(p);
    if (j === undefined) orphan[i] = 1;
    else if (j !== i) parent[i] = j;
  }
  const childStart = new Int32Array(n + 2);   // children of i: childList[childStart[i] .. childStart[i+1])
  for (let i = 0; i < n; i++) childStart[(parent[i] < 0 ? n : parent[i]) + 1]++;
  for (let i = 0; i <= n; i++) childStart[i + 1] += childStart[i];
  const childList = new Int32Array(n);
  {
    const fill = childStart.slice(0, n + 1);
    for (let i = 0; i < n; i++) childList[fill[parent[i] < 0 ? n : parent[i]]++] = i;
  }
  const order = new Int32Array(n);   // position -> span, depth-first, children in start order
  const pos = new Int32Array(n);     // span -> position
  const depth = new Int32Array(n);
  const end = new Int32Array(n);     // position just past span's subtree in `order`
  const seen = new Uint8Array(n);
  let placed = 0;
  function walk(root) {              // iterative: a 100,000-deep chain must not overflow the stack
    const stack = [root];
    while (stack.length) {
      const i = stack.pop();
      if (i >= n) {                  // the virtual root's children
        for (let c = childStart[n + 1] - 1; c >= childStart[n]; c--) stack.push(childList[c]);
        continue;
      }
      if (seen[i]) continue;
      seen[i] = 1;
      pos[i] = placed;
      order[placed++] = i;
      depth[i] = parent[i] >= 0 ? depth[parent[i]] + 1 : 0;
      for (let c = childStart[i + 1] - 1; c >= childStart[i]; c--) stack.push(childList[c]);
    }
  }
  walk(n);
  // spans whose parents form a cycle (only in a hand-made file) are shown as roots
  const cycle = new Uint8Array(n);
  for (let i = 0; i < n; i++) if (!seen[i]) { cycle[i] = 1; parent[i] = -1; walk(i); }
  // a subtree is contiguous in depth-first order: it ends where its last child's subtree ends
  for (let k = n - 1; k >= 0; k--) {
    const i = order[k];
    let e = k + 1;
    for (let c = childStart[i]; c < childStart[i + 1]; c++) {
      const ch = childList[c];
      if (parent[ch] === i) e = Math.max(e, end[pos[ch]]);  // (a cycle-broken child is not under i)
    }
    end[k] = e;
  }
  function hasChildren(i) { return end[pos[i]] > pos[i] + 1; }

  // ---- statuses, time range, writers ------------------------------------------------------
  // A span cut short by a crash (its writer died, or the trace ended as crashed) is shown as
  // "crashed"; one cut short by a normal end of the trace as "interrupted".
  function shownStatus(s) {
    if (s.status === 'interrupted' && (s.status_message === 'writer lost' || T.status === 'crashed')) return 'crashed';
    return ['ok', 'error', 'interrupted', 'open'].indexOf(s.status) >= 0 ? s.status : 'other';
  }
  const status = new Array(n);
  const statusCounts = {}, kindCounts = {};
  let tMin = T.start_time, tMax = T.end_time;
  for (let i = 0; i < n; i++) {
    const s = spans[i];
    const st = shownStatus(s);
    status[i] = st;
    statusCounts[st] = (statusCounts[st] || 0) + 1;
    const k = String(s.kind);
    kindCounts[k] = (kindCounts[k] || 0) + 1;
    if (typeof s.start_time === 'number') {
      if (tMin == null || s.start_time < tMin) tMin = s.start_time;
      if (tMax == null || s.start_time > tMax) tMax = s.start_time;
    }
    if (typeof s.end_time === 'number' && (tMax == null || s.end_time > tMax)) tMax = s.end_time;
  }
  for (const w of writers) if (typeof w.last_time === 'number' && (tMax == null || w.last_time > tMax)) tMax = w.last_time;
  if (tMin == null) tMin = 0;
  if (tMax == null || tMax < tMin) tMax = tMin;
  const span = Math.max(tMax - tMin, 1);

  const writerInfo = new Map();
  const PALETTE = ['#2563eb', '#db2777', '#059669', '#d97706', '#7c3aed', '#0891b2', '#65a30d', '#dc2626', '#475569', '#c026d3'];
  writers.forEach(function (w, k) {
    writerInfo.set(w.writer_id, {
      label: 'pid ' + vis(w.pid), colour: PALETTE[k % PALETTE.length],
      title: 'writer ' + vis(w.writer_id) + ', pid ' + vis(w.pid) + ' on ' + vis(w.host) + ', ' + vis(w.state) +
        (w.message ? ' (' + vis(w.message) + ')' : '')
    });
  });
  function writerOf(i) {
    return writerInfo.get(spans[i].writer_id) || { label: spans[i].writer_id ? 'w ' + vis(spans[i].writer_id).slice(0, 6) : '?', colour: '#64748b', title: 'writer ' + vis(spans[i].writer_id) + ' (not in the trace)' };
  }

  // ---- page skeleton ----------------------------------------------------------------------
  const app = document.getElementById('app');
  document.title = vis(T.session_id) + ' · walspan';
  const top = h('header', 'top');
  const titleRow = h('div', 'title-row');
  titleRow.append(h('span', 'brand', 'walspan'), h('span', 'sid', vis(T.session_id)), h('span', 'pill ' + W.statusClass(T.status), vis(T.status)));
  if (T.status_message) titleRow.append(h('span', 'smsg', vis(T.status_message)));
  top.append(titleRow);
  const facts = h('div', 'facts');
  function fact(k, v) { const f = h('span', 'fact'); f.append(h('b', null, k + ' '), h('span', null, v)); facts.append(f); }
  fact('trace', vis(T.trace_id));
  fact('started', W.iso(T.start_time));
  fact('duration', T.end_time != null && T.start_time != null ? W.dur(T.end_time - T.start_time) : 'running (' + W.dur(tMax - tMin) + ' so far)');
  fact('spans', W.num(n));
  if (T.anomalies) fact('anomalies', W.num(T.anomalies));
  top.append(facts);
  const legend = h('div', 'writers');
  legend.append(h('b', null, 'writers '));
  writers.forEach(function (w) {
    const info = writerInfo.get(w.writer_id);
    const chip = h('span', 'wchip', info.label + ' · ' + vis(w.host) + ' · ' + vis(w.state));
    chip.style.borderColor = info.colour;
    chip.style.color = info.colour;
    chip.title = info.title;
    legend.append(chip);
  });
  top.append(legend);
  const metaKeys = Object.keys(T.metadata || {});
  if (metaKeys.length) {
    const det = h('details', 'meta');
    det.append(h('summary', null, 'metadata (' + metaKeys.length + ')'));
    det.append(kvTable(T.metadata));
    top.append(det);
  }
  app.append(top);

  const bar = h('div', 'toolbar');
  const tabW = h('button', 'tab on', 'Waterfall'); tabW.id = 'tab-waterfall';
  const tabC = h('button', 'tab', 'Conversation'); tabC.id = 'tab-conversation';
  const q = h('input'); q.id = 'q'; q.type = 'search'; q.placeholder = 'filter by name  ( / )'; q.spellcheck = false;
  const kindSel = h('select'); kindSel.id = 'kind'; kindSel.title = 'kind';
  kindSel.append(new Option('every kind', ''));
  Object.keys(kindCounts).sort().forEach(function (k) { kindSel.append(new Option(vis(k) + ' (' + W.num(kindCounts[k]) + ')', k)); });
  const statusSel = h('select'); statusSel.id = 'status'; statusSel.title = 'status';
  statusSel.append(new Option('every status', ''));
  ['ok', 'error', 'interrupted', 'crashed', 'open', 'other'].forEach(function (st) {
    if (statusCounts[st]) statusSel.append(new Option(st + ' (' + W.num(statusCounts[st]) + ')', st));
  });
  const expandBtn = h('button', 'btn', 'expand all'); expandBtn.id = 'expand-all';
  const collapseBtn = h('button', 'btn', 'collapse all'); collapseBtn.id = 'collapse-all';
  const unzoomBtn = h('button', 'btn hidden', 'whole trace'); unzoomBtn.id = 'unzoom';
  unzoomBtn.title = 'show the whole trace in the waterfall again';
  const count = h('span', 'count'); count.id = 'count';
  bar.append(tabW, tabC, q, kindSel, statusSel, expandBtn, collapseBtn, unzoomBtn, count);
  app.append(bar);

  const main = h('div', 'main');
  const left = h('div', 'left');
  const wf = h('div', 'wf'); wf.id = 'waterfall';
  const axis = h('div', 'axis');
  const axisName = h('div', 'axis-name', 'span');
  const axisLane = h('div', 'axis-lane');
  const ticks = [];
  for (let t = 0; t <= 4; t++) {
    const tick = h('span', 'tick');
    tick.style.left = (t * 25) + '%';
    ticks.push(tick);
    axisLane.append(tick);
  }
  axis.append(axisName, axisLane);
  // the time window the lanes show: the whole trace, or the span zoomed into
  let vStart = tMin, vSpan = span;
  function drawAxis() {
    ticks.forEach(function (tick, t) { tick.textContent = '+' + W.dur(vStart - tMin + vSpan * t / 4); });
  }
  drawAxis();
  const scroller = h('div', 'scroller'); scroller.id = 'scroller';
  const sizer = h('div', 'sizer');
  scroller.append(sizer);
  wf.append(axis, scroller);
  const conv = h('div', 'conv hidden'); conv.id = 'conversation';
  left.append(wf, conv);
  const detail = h('aside', 'detail'); detail.id = 'detail';
  detail.append(h('p', 'hint', 'Click a span to see its attributes, events, input and output. Keys: ↑ ↓ move, ← → collapse and expand, / filter.'));
  main.append(left, detail);
  app.append(main);

  // ---- filtering and the visible rows -----------------------------------------------------
  const collapsed = new Uint8Array(n);
  const match = new Uint8Array(n).fill(1);
  const keep = new Uint8Array(n);     // matches, or has a matching descendant
  let filterOn = false, matchCount = n;
  let visible = new Int32Array(n);
  let visibleCount = 0;
  let lowerNames = null;              // built on the first name search

  function applyFilter() {
    const text = q.value.trim().toLowerCase();
    const kind = kindSel.value, st = statusSel.value;
    filterOn = !!(text || kind || st);
    if (text && !lowerNames) { lowerNames = new Array(n); for (let i = 0; i < n; i++) lowerNames[i] = String(spans[i].name).toLowerCase(); }
    matchCount = 0;
    for (let i = 0; i < n; i++) {
      const m = (!text || lowerNames[i].indexOf(text) >= 0 || spans[i].span_id === text) &&
        (!kind || String(spans[i].kind) === kind) && (!st || status[i] === st);
      match[i] = m ? 1 : 0;
      if (m) matchCount++;
    }
    keep.set(match);
    if (filterOn) {
      // keep the ancestors of every match (as context), and open them so the match shows
      for (let k = n - 1; k >= 0; k--) {
        const i = order[k];
        if (keep[i] && parent[i] >= 0) { keep[parent[i]] = 1; collapsed[parent[i]] = 0; }
      }
    }
    rebuild();
    if (!conv.classList.contains('hidden')) buildConversation();
    else convDirty = true;
  }

  function rebuild() {
    let c = 0;
    for (let k = 0; k < n;) {
      const i = order[k];
      if (filterOn && !keep[i]) { k = end[k]; continue; }
      visible[c++] = i;
      k = collapsed[i] ? end[k] : k + 1;
    }
    visibleCount = c;
    sizer.style.height = (c * RH) + 'px';
    count.textContent = filterOn
      ? W.num(matchCount) + ' of ' + W.num(n) + ' spans match · ' + W.num(c) + ' rows'
      : W.num(n) + ' spans · ' + W.num(c) + ' rows';
    count.dataset.total = String(n);
    count.dataset.matches = String(matchCount);
    count.dataset.rows = String(c);
    render(true);
  }

  // ---- the virtualised rows ---------------------------------------------------------------
  const pool = [];
  function makeRow() {
    const r = h('div', 'row');
    const tree = h('div', 'tree');
    const ind = h('span', 'ind'), tog = h('span', 'tog'), dot = h('span', 'dot'), nm = h('span', 'nm');
    const kd = h('span', 'kd'), wr = h('span', 'wr'), dp = h('span', 'dp');
    tree.append(ind, tog, dot, dp, nm, kd);
    const lane = h('div', 'lane');
    const b = h('div', 'bar'), du = h('span', 'du');
    lane.append(b, du);
    r.append(tree, wr, lane);
    r._p = { ind: ind, tog: tog, dot: dot, nm: nm, kd: kd, wr: wr, dp: dp, bar: b, du: du };
    return r;
  }
  let selected = -1;
  let lastFirst = -1, lastLast = -1;
  function render(force) {
    const first = Math.max(0, Math.floor(scroller.scrollTop / RH) - OVERSCAN);
    const last = Math.min(visibleCount, Math.ceil((scroller.scrollTop + scroller.clientHeight) / RH) + OVERSCAN);
    if (!force && first === lastFirst && last === lastLast) return;
    lastFirst = first; lastLast = last;
    while (pool.length < last - first) { const r = makeRow(); pool.push(r); sizer.append(r); }
    for (let p = 0; p < pool.length; p++) {
      const r = pool[p], k = first + p;
      if (k >= last) { r.style.display = 'none'; continue; }
      fillRow(r, k);
    }
  }
  function fillRow(r, k) {
    const i = visible[k], s = spans[i], p = r._p;
    r.style.display = '';
    r.style.top = (k * RH) + 'px';
    r.dataset.i = String(i);
    r.dataset.spanId = vis(s.span_id);
    r.className = 'row' + (i === selected ? ' sel' : '') + (filterOn && !match[i] ? ' ctx' : '');
    const d = depth[i];
    p.ind.style.width = (Math.min(d, MAX_INDENT) * 14) + 'px';
    p.dp.textContent = d > MAX_INDENT ? d + '·' : '';
    p.tog.textContent = hasChildren(i) ? (collapsed[i] ? '▸' : '▾') : '';
    p.dot.className = 'dot ' + W.statusClass(status[i]);
    p.nm.textContent = vis(s.name) + (orphan[i] ? '  (parent not in trace)' : cycle[i] ? '  (parent cycle)' : '');
    p.kd.textContent = vis(s.kind);
    const w = writerOf(i);
    p.wr.textContent = w.label;
    p.wr.style.color = w.colour;
    p.wr.title = w.title;
    const st = typeof s.start_time === 'number' ? s.start_time : tMin;
    const en = typeof s.end_time === 'number' ? s.end_time : tMax;
    const x0 = clamp((st - vStart) / vSpan), x1 = clamp((en - vStart) / vSpan);
    const outside = en < vStart || st > vStart + vSpan;
    p.bar.className = 'bar ' + W.statusClass(status[i]) + (outside ? ' hidden' : '');
    p.bar.style.left = (x0 * 100) + '%';
    p.bar.style.width = ((x1 - x0) * 100) + '%';
    p.du.textContent = outside ? '' : s.end_time == null ? 'open' : W.dur(s.end_time - s.start_time);
    p.du.style.left = (x1 * 100) + '%';  // at worst in the lane's right margin
  }
  function clamp(x) { return x < 0 ? 0 : x > 1 ? 1 : x; }
  function zoom(a, b) {
    vStart = a;
    vSpan = Math.max(b - a, 1);
    unzoomBtn.classList.toggle('hidden', vStart === tMin && vSpan === span);
    drawAxis();
    render(true);
  }
  unzoomBtn.addEventListener('click', function () { zoom(tMin, tMin + span); });
  let scrollQueued = false;
  scroller.addEventListener('scroll', function () {
    if (scrollQueued) return;
    scrollQueued = true;
    requestAnimationFrame(function () { scrollQueued = false; render(false); });
  });
  window.addEventListener('resize', function () { render(true); });

  function toggle(i, open) {
    if (!hasChildren(i)) return;
    collapsed[i] = open === undefined ? (collapsed[i] ? 0 : 1) : (open ? 0 : 1);
    rebuild();
  }
  sizer.addEventListener('click', function (ev) {
    const r = ev.target.closest('.row');
    if (!r) return;
    const i = Number(r.dataset.i);
    if (ev.target.classList.contains('tog')) toggle(i);
    else select(i, false);
  });
  sizer.addEventListener('dblclick', function (ev) {
    const r = ev.target.closest('.row');
    if (r) toggle(Number(r.dataset.i));
  });
  expandBtn.addEventListener('click', function () { collapsed.fill(0); rebuild(); });
  collapseBtn.addEventListener('click', function () {
    for (let i = 0; i < n; i++) collapsed[i] = hasChildren(i) ? 1 : 0;
    rebuild();
  });
  let filterTimer = 0;
  q.addEventListener('input', function () { clearTimeout(filterTimer); filterTimer = setTimeout(applyFilter, n > 20000 ? 150 : 40); });
  kindSel.addEventListener('change', applyFilter);
  statusSel.addEventListener('change', applyFilter);

  function rowOf(i) {
    for (let k = 0; k < visibleCount; k++) if (visible[k] === i) return k;
    return -1;
  }
  function scrollToRow(k) {
    const topPx = k * RH, view = scroller.clientHeight;
    if (topPx < scroller.scrollTop || topPx + RH > scroller.scrollTop + view) scroller.scrollTop = Math.max(0, topPx - view / 3);
  }
  // Show span i in the waterfall: open its ancestors; clear a filter that hides it.
  function reveal(i) {
    for (let a = parent[i]; a >= 0; a = parent[a]) collapsed[a] = 0;
    if (filterOn && !keep[i]) { q.value = ''; kindSel.value = ''; statusSel.value = ''; applyFilter(); }
    else rebuild();
    const k = rowOf(i);
    if (k >= 0) scrollToRow(k);
    render(true);
  }

  document.addEventListener('keydown', function (ev) {
    if (ev.target === q || ev.target.tagName === 'SELECT') {
      if (ev.key === 'Escape') { q.value = ''; applyFilter(); q.blur(); }
      return;
    }
    if (ev.key === '/') { ev.preventDefault(); q.focus(); return; }
    if (wf.classList.contains('hidden') || !visibleCount) return;
    let k = selected >= 0 ? rowOf(selected) : -1;
    if (ev.key === 'ArrowDown' || ev.key === 'j') k = Math.min(visibleCount - 1, k + 1);
    else if (ev.key === 'ArrowUp' || ev.key === 'k') k = Math.max(0, k - 1);
    else if (ev.key === 'ArrowRight' && selected >= 0) { toggle(selected, true); ev.preventDefault(); return; }
    else if (ev.key === 'ArrowLeft' && selected >= 0) {
      if (hasChildren(selected) && !collapsed[selected]) toggle(selected, false);
      else if (parent[selected] >= 0) select(parent[selected], true);
      ev.preventDefault();
      return;
    } else return;
    ev.preventDefault();
    if (k >= 0) { select(visible[k], false); scrollToRow(k); render(true); }
  });

  // ---- the detail panel -------------------------------------------------------------------
  function kvTable(obj) {
    const t = h('table', 'kv');
    Object.keys(obj).sort().forEach(function (k) {
      const tr = h('tr');
      tr.append(h('th', null, vis(k)));
      const td = h('td');
      td.append(valueNode(obj[k]));
      tr.append(td);
      t.append(tr);
    });
    return t;
  }
  function valueNode(v) {
    const text = W.pretty(v);
    const el = h(text.indexOf('\n') < 0 && text.length < 200 ? 'span' : 'pre', 'val' + (typeof v === 'string' ? '' : ' json'));
    if (W.appendMarked(el, text, MARK)) el.classList.add('has-trunc');
    return el;
  }
  function section(title, node) {
    const s = h('section', 'dsec');
    s.append(h('h3', null, title), node);
    return s;
  }
  function isException(ev) {
    const a = ev.attributes || {};
    return ev.name === 'exception' || a['exception.type'] != null || a['exception.stacktrace'] != null;
  }
  function exceptionNode(a, when) {
    const box = h('div', 'exc');
    const head = h('div', 'exc-head');
    head.append(h('b', null, vis(a['exception.type'] != null ? a['exception.type'] : 'exception')));
    if (a['exception.message'] != null) head.append(document.createTextNode(': '), h('span', null, W.visText(a['exception.message'])));
    if (when) head.append(h('span', 'ev-time', when));
    box.append(head);
    const tb = a['exception.stacktrace'] != null ? a['exception.stacktrace'] : a['exception.traceback'];
    if (tb != null) { const pre = h('pre', 'tb'); W.appendMarked(pre, W.pretty(tb), MARK); box.append(pre); }
    const rest = {};
    for (const k of Object.keys(a)) if (!/^exception\.(type|message|stacktrace|traceback)$/.test(k)) rest[k] = a[k];
    if (Object.keys(rest).length) box.append(kvTable(rest));
    return box;
  }

  function select(i, scroll) {
    selected = i;
    showDetail(i);
    if (scroll) reveal(i); else render(true);
    try { history.replaceState(null, '', '#span=' + encodeURIComponent(spans[i].span_id)); } catch (e) { /* file:// in some browsers */ }
    for (const c of conv.querySelectorAll('.card.sel')) c.classList.remove('sel');
    const card = conv.querySelector('.card[data-i="' + i + '"]');
    if (card) card.classList.add('sel');
  }

  function showDetail(i) {
    const s = spans[i];
    detail.textContent = '';
    detail.scrollTop = 0;
    const head = h('div', 'dhead');
    head.append(h('h2', null, vis(s.name)), h('span', 'pill ' + W.statusClass(status[i]), status[i]));
    detail.append(head);
    if (s.status_message) detail.append(h('p', 'smsg', W.visText(s.status_message)));
    const facts = {
      'span id': vis(s.span_id),
      'kind': vis(s.kind),
      'start': W.iso(s.start_time),
      'end': s.end_time == null ? 'open' : W.iso(s.end_time),
      'duration': s.end_time == null ? 'open (' + W.dur(tMax - s.start_time) + ' so far)' : W.dur(s.end_time - s.start_time),
      'offset': '+' + W.dur(s.start_time - tMin)
    };
    const t = h('table', 'kv facts-t');
    Object.keys(facts).forEach(function (k) { const tr = h('tr'); tr.append(h('th', null, k), h('td', null, facts[k])); t.append(tr); });
    const ptr = h('tr'); ptr.append(h('th', null, 'parent'));
    const ptd = h('td');
    if (parent[i] >= 0) {
      const a = h('a', 'plink', vis(spans[parent[i]].name) + ' (' + vis(s.parent_span_id) + ')');
      a.href = '#';
      a.addEventListener('click', function (ev) { ev.preventDefault(); select(parent[i], true); });
      ptd.append(a);
    } else ptd.textContent = s.parent_span_id ? vis(s.parent_span_id) + ' (not in this trace)' : 'none (root)';
    ptr.append(ptd); t.append(ptr);
    const w = writerOf(i);
    const wtr = h('tr'); wtr.append(h('th', null, 'writer'));
    const wtd = h('td', null, w.title); wtd.style.color = w.colour; wtr.append(wtd); t.append(wtr);
    const nkids = childStart[i + 1] - childStart[i];
    if (nkids) { const ktr = h('tr'); ktr.append(h('th', null, 'children'), h('td', null, W.num(nkids))); t.append(ktr); }
    detail.append(t);

    const attrs = s.attributes || {};
    if (attrs['exception.type'] != null || attrs['exception.stacktrace'] != null) detail.append(section('Exception', exceptionNode(attrs, null)));
    const events = Array.isArray(s.events) ? s.events : [];
    const excs = events.filter(isException);
    if (excs.length) {
      const box = h('div');
      excs.forEach(function (ev) { box.append(exceptionNode(ev.attributes || {}, '+' + W.dur(ev.time - s.start_time))); });
      detail.append(section('Exceptions (' + excs.length + ')', box));
    }
    if (Object.keys(attrs).length) detail.append(section('Attributes (' + Object.keys(attrs).length + ')', kvTable(attrs)));
    if (events.length) {
      const list = h('ol', 'events');
      events.forEach(function (ev) {
        const li = h('li', isException(ev) ? 'ev exc-ev' : 'ev');
        li.append(h('b', null, vis(ev.name)), h('span', 'ev-time', '+' + W.dur(ev.time - s.start_time)));
        if (isException(ev)) li.append(h('span', 'ev-time', '(shown under Exceptions)'));
        else if (ev.attributes && Object.keys(ev.attributes).length) li.append(kvTable(ev.attributes));
        list.append(li);
      });
      detail.append(section('Events (' + events.length + ')', list));
    }
    if (s.input != null) detail.append(section('Input', valueNode(s.input)));
    if (s.output != null) detail.append(section('Output', valueNode(s.output)));
    const marks = detail.querySelectorAll('mark.trunc').length;
    if (marks) {
      const note = h('p', 'trunc-note', W.num(marks) + ' value(s) here were cut at the store\'s size cap; the highlighted marker says how much was kept.');
      detail.insertBefore(note, detail.children[1]);
    }
    const goto = h('button', 'btn', 'show in waterfall');
    goto.addEventListener('click', function () { showTab('waterfall'); reveal(i); });
    const zoomTo = h('button', 'btn', 'zoom waterfall to this span');
    zoomTo.id = 'zoom-span';
    zoomTo.addEventListener('click', function () {
      showTab('waterfall');
      zoom(s.start_time, s.end_time == null ? tMax : s.end_time);
      reveal(i);
    });
    detail.append(goto, document.createTextNode(' '), zoomTo);
  }

  // ---- the conversation view --------------------------------------------------------------
  // Which spans are turns of a conversation: see docs/VIEWER.md, "Agent traces".
  function attr(a, keys) {
    for (const k of keys) {
      let v = a[k];
      if (v === undefined && k.indexOf('.') > 0) {   // also nested: usage.input_tokens
        v = a;
        for (const part of k.split('.')) { v = v != null && typeof v === 'object' ? v[part] : undefined; }
      }
      if (v != null && v !== '') return v;
    }
    return null;
  }
  function convRole(s) {
    const k = String(s.kind).toLowerCase(), a = s.attributes || {};
    const op = a['gen_ai.operation.name'];
    if (k === 'user' || k === 'user_message' || ((k === 'message' || k === 'input') && (a.role == null || a.role === 'user'))) return 'user';
    if (k === 'generation' || k === 'llm' || k === 'chat' || op === 'chat' || op === 'text_completion' || op === 'generate_content') return 'generation';
    if (k === 'tool' || k === 'tool_call' || op === 'execute_tool') return 'tool';
    if (k === 'agent' || op === 'invoke_agent' || op === 'create_agent') return 'agent';
    return null;
  }
  const MODEL = ['gen_ai.response.model', 'gen_ai.request.model', 'model', 'llm.model', 'model_name'];
  const TOK_IN = ['gen_ai.usage.input_tokens', 'input_tokens', 'prompt_tokens', 'usage.input_tokens', 'usage.prompt_tokens', 'llm.usage.prompt_tokens'];
  const TOK_OUT = ['gen_ai.usage.output_tokens', 'output_tokens', 'completion_tokens', 'usage.output_tokens', 'usage.completion_tokens', 'llm.usage.completion_tokens'];
  const TOOL = ['gen_ai.tool.name', 'tool', 'tool_name', 'tool.name'];
  const role = new Array(n);
  let convTotal = 0;
  for (let i = 0; i < n; i++) { role[i] = convRole(spans[i]); if (role[i]) convTotal++; }
  tabC.textContent = 'Conversation (' + W.num(convTotal) + ')';
  if (!convTotal) { tabC.disabled = true; tabC.title = 'no user, generation or tool spans in this trace'; }
  let convList = [], convShown = 0, convDirty = true;
  const convHead = h('div', 'conv-head');
  const convBody = h('div', 'conv-body');
  const sentinel = h('div', 'sentinel');
  conv.append(convHead, convBody, sentinel);
  const observer = 'IntersectionObserver' in window ? new IntersectionObserver(function (es) {
    if (es.some(function (e) { return e.isIntersecting; })) moreCards();
  }, { root: conv, rootMargin: '600px' }) : null;
  if (observer) observer.observe(sentinel);

  function buildConversation() {
    convDirty = false;
    convList = [];
    for (let i = 0; i < n; i++) if (role[i] && (!filterOn || match[i])) convList.push(i);
    convList.sort(function (a, b) { return (spans[a].start_time - spans[b].start_time) || (a - b); });
    let users = 0, gens = 0, tools = 0, tin = 0, tout = 0;
    for (const i of convList) {
      if (role[i] === 'user') users++;
      else if (role[i] === 'tool') tools++;
      else if (role[i] === 'generation') {
        gens++;
        const a = spans[i].attributes || {};
        tin += Number(attr(a, TOK_IN)) || 0;
        tout += Number(attr(a, TOK_OUT)) || 0;
      }
    }
    convHead.textContent = W.num(users) + ' user message(s) · ' + W.num(gens) + ' generation(s), ' + W.num(tin) + ' input / ' +
      W.num(tout) + ' output tokens · ' + W.num(tools) + ' tool call(s)' + (filterOn ? ' (filtered)' : '');
    convBody.textContent = '';
    convShown = 0;
    moreCards();
  }
  function moreCards() {
    if (conv.classList.contains('hidden')) return;
    const stop = Math.min(convList.length, convShown + CONV_CHUNK);
    const frag = document.createDocumentFragment();
    for (; convShown < stop; convShown++) frag.append(card(convList[convShown]));
    convBody.append(frag);
    sentinel.textContent = convShown < convList.length ? W.num(convList.length - convShown) + ' more…' : '';
  }
  function textBlock(cls, label, v) {
    const box = h('div', 'cblock ' + cls);
    if (label) box.append(h('div', 'clabel', label));
    let text = W.pretty(v);
    const pre = h('pre', 'cbody');
    let more = 0;
    if (text.length > CARD_TEXT) { more = text.length - CARD_TEXT; text = text.slice(0, CARD_TEXT); }
    W.appendMarked(pre, text, MARK);
    if (more) pre.append(h('span', 'more', '\n… ' + W.num(more) + ' more characters in the details'));
    box.append(pre);
    return box;
  }
  function card(i) {
    const s = spans[i], a = s.attributes || {}, r = role[i];
    const c = h('div', 'card c-' + r + (i === selected ? ' sel' : ''));
    c.dataset.i = String(i);
    const head = h('div', 'chead');
    const label = { user: 'User', generation: 'Generation', tool: 'Tool', agent: 'Agent' }[r];
    head.append(h('span', 'role', label));
    if (r === 'generation') {
      head.append(h('span', 'cname', vis(attr(a, MODEL) != null ? attr(a, MODEL) : s.name)));
      const ti = attr(a, TOK_IN), to = attr(a, TOK_OUT);
      if (ti != null || to != null) head.append(h('span', 'ctok', (ti != null ? W.num(ti) + ' in' : '') + (ti != null && to != null ? ' · ' : '') + (to != null ? W.num(to) + ' out' : '') + ' tokens'));
    } else if (r === 'tool') {
      head.append(h('span', 'cname', vis(attr(a, TOOL) != null ? attr(a, TOOL) : s.name)));
    } else head.append(h('span', 'cname', vis(s.name)));
    head.append(h('span', 'ctime', '+' + W.dur(s.start_time - tMin)), h('span', 'cdur', s.end_time == null ? 'open' : W.dur(s.end_time - s.start_time)),
      h('span', 'pill ' + W.statusClass(status[i]), status[i]));
    c.append(head);
    if (r === 'user') {
      const msg = s.input != null ? s.input : attr(a, ['content', 'message', 'text', 'gen_ai.prompt']) != null ? attr(a, ['content', 'message', 'text', 'gen_ai.prompt']) : s.output;
      if (msg != null) c.append(textBlock('', null, msg));
    } else if (r === 'generation') {
      if (s.output != null) c.append(textBlock('', null, s.output));
      else if (s.status_message) c.append(textBlock('err', null, s.status_message));
    } else if (r === 'tool') {
      if (s.input != null) c.append(textBlock('args', 'input', s.input));
      if (s.output != null) c.append(textBlock('', 'output', s.output));
      if (s.status_message) c.append(textBlock('err', null, s.status_message));
    }
    return c;
  }
  convBody.addEventListener('click', function (ev) {
    const c = ev.target.closest('.card');
    if (c) select(Number(c.dataset.i), false);
  });

  function showTab(which) {
    const isConv = which === 'conversation';
    conv.classList.toggle('hidden', !isConv);
    wf.classList.toggle('hidden', isConv);
    tabC.classList.toggle('on', isConv);
    tabW.classList.toggle('on', !isConv);
    if (isConv && convDirty) buildConversation();
    if (!isConv) render(true);
  }
  tabW.addEventListener('click', function () { showTab('waterfall'); });
  tabC.addEventListener('click', function () { showTab('conversation'); });

  // ---- start ------------------------------------------------------------------------------
  rebuild();
  state.initMs = performance.now() - parsedAt;
  const m = /^#span=(.+)$/.exec(location.hash);
  if (m) {
    let want = null;
    try { want = decodeURIComponent(m[1]); } catch (e) { want = null; }
    if (want != null && index.has(want)) select(index.get(want), true);
  }
  // ready = the first frame with rows drawn and every handler attached
  requestAnimationFrame(function () {
    setTimeout(function () {
      state.readyMs = performance.now();
      state.ready = true;
      document.documentElement.dataset.ready = '1';
    }, 0);
  });
})();
