/* walspan view: the index of a store. One row per session, linking to its own page. */
(function () {
  const h = W.h, vis = W.vis;
  const DATA = W.readData();
  const rows = Array.isArray(DATA.sessions) ? DATA.sessions : [];
  const state = { ready: false, readyMs: null, sessions: rows.length };
  window.walspanView = state;
  const app = document.getElementById('app');
  document.title = vis(DATA.source || 'store') + ' · walspan';

  const top = h('header', 'top');
  const titleRow = h('div', 'title-row');
  titleRow.append(h('span', 'brand', 'walspan'), h('span', 'sid', vis(DATA.source || '')));
  top.append(titleRow);
  const statusCounts = {};
  let spans = 0, failed = 0;
  for (const r of rows) {
    const st = r.error ? 'unreadable' : String(r.status);
    statusCounts[st] = (statusCounts[st] || 0) + 1;
    spans += Number(r.spans) || 0;
    if (r.error) failed++;
  }
  const facts = h('div', 'facts');
  const f = h('span', 'fact');
  f.append(h('b', null, 'sessions '), h('span', null, W.num(rows.length)));
  facts.append(f);
  const g = h('span', 'fact');
  g.append(h('b', null, 'spans '), h('span', null, W.num(spans)));
  facts.append(g);
  Object.keys(statusCounts).sort().forEach(function (st) {
    facts.append(h('span', 'pill ' + W.statusClass(st), vis(st) + ' ' + W.num(statusCounts[st])));
  });
  const gen = h('span', 'fact');
  gen.append(h('b', null, 'written '), h('span', null, vis(DATA.generated_at)));
  facts.append(gen);
  top.append(facts);
  app.append(top);

  const bar = h('div', 'toolbar');
  const q = h('input'); q.id = 'q'; q.type = 'search'; q.placeholder = 'filter by session, title or status'; q.spellcheck = false;
  const count = h('span', 'count'); count.id = 'count';
  bar.append(q, count);
  app.append(bar);

  const wrap = h('div', 'index-wrap');
  const table = h('table', 'index');
  const thead = h('thead');
  const cols = [['session', 'session_id'], ['status', 'status'], ['spans', 'spans'], ['started (UTC)', 'start_time'],
    ['duration', 'duration'], ['writers', 'writers'], ['title', 'title'], ['trace id', 'trace_id']];
  const hr = h('tr');
  let sortKey = 'start_time', sortDir = -1;
  cols.forEach(function (c) {
    const th = h('th', null, c[0]);
    th.dataset.key = c[1];
    th.title = 'sort';
    th.addEventListener('click', function () {
      if (sortKey === c[1]) sortDir = -sortDir; else { sortKey = c[1]; sortDir = 1; }
      draw();
    });
    hr.append(th);
  });
  thead.append(hr);
  const tbody = h('tbody');
  table.append(thead, tbody);
  wrap.append(table);
  app.append(wrap);

  function value(r, key) {
    if (key === 'duration') return r.end_time != null && r.start_time != null ? r.end_time - r.start_time : -1;
    const v = r[key];
    return v == null ? '' : v;
  }
  function draw() {
    const text = q.value.trim().toLowerCase();
    const shown = rows.filter(function (r) {
      if (!text) return true;
      return [r.session_id, r.status, r.title, r.trace_id, r.error].some(function (v) {
        return v != null && String(typeof v === 'string' ? v : JSON.stringify(v)).toLowerCase().indexOf(text) >= 0;
      });
    });
    shown.sort(function (a, b) {
      const x = value(a, sortKey), y = value(b, sortKey);
      return (x < y ? -1 : x > y ? 1 : 0) * sortDir;
    });
    tbody.textContent = '';
    const frag = document.createDocumentFragment();
    for (const r of shown) {
      const tr = h('tr', r.error ? 'bad' : null);
      const td = h('td', 'sess');
      if (r.href) {
        const a = h('a', null, vis(r.session_id));
        // the file name is the session's path-safe stem; encode it anyway so it stays a
        // relative path whatever it holds
        a.href = encodeURIComponent(String(r.href));
        td.append(a);
      } else td.textContent = vis(r.session_id);
      tr.append(td);
      if (r.error) {
        const e = h('td', 'err', 'unreadable: ' + W.visText(r.error));
        e.colSpan = cols.length - 1;
        tr.append(e);
      } else {
        const st = h('td');
        st.append(h('span', 'pill ' + W.statusClass(r.status), vis(r.status)));
        if (r.attached_writers) st.append(h('span', 'live', ' ' + r.attached_writers + ' attached'));
        if (r.status_message) st.title = W.visText(r.status_message);
        tr.append(st,
          h('td', 'num', W.num(r.spans)),
          h('td', null, W.iso(r.start_time)),
          h('td', 'num', r.end_time != null && r.start_time != null ? W.dur(r.end_time - r.start_time) : 'running'),
          h('td', 'num', W.num(r.writers)),
          h('td', 'title-c', r.title == null ? '' : vis(typeof r.title === 'string' ? r.title : JSON.stringify(r.title))),
          h('td', 'tid', vis(r.trace_id)));
      }
      frag.append(tr);
    }
    tbody.append(frag);
    count.textContent = shown.length === rows.length ? W.num(rows.length) + ' sessions' : W.num(shown.length) + ' of ' + W.num(rows.length) + ' sessions';
    count.dataset.total = String(rows.length);
    count.dataset.rows = String(shown.length);
    count.dataset.failed = String(failed);
    for (const th of hr.children) th.className = th.dataset.key === sortKey ? (sortDir > 0 ? 'asc' : 'desc') : '';
  }
  let timer = 0;
  q.addEventListener('input', function () { clearTimeout(timer); timer = setTimeout(draw, 60); });
  draw();
  requestAnimationFrame(function () {
    setTimeout(function () {
      state.readyMs = performance.now();
      state.ready = true;
      document.documentElement.dataset.ready = '1';
    }, 0);
  });
})();
