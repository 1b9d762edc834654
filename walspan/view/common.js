'use strict';
/* walspan view: helpers shared by the trace page and the index page.
   Everything a traced program wrote reaches the DOM through textContent (h, appendMarked),
   never through innerHTML, so no value can become markup. */
var W = (function () {
  // C0/C1 controls and the bidi overrides that could disguise an id; newlines and tabs are
  // kept in multi-line text (inputs, outputs) and escaped in one-line text (ids, names).
  var CTRL_LINE = /[\u0000-\u001f\u007f-\u009f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;
  var CTRL_TEXT = /[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;
  function escChar(c) { return '\\u' + c.charCodeAt(0).toString(16).padStart(4, '0'); }

  function vis(s) { return (s == null ? '' : String(s)).replace(CTRL_LINE, escChar); }
  function visText(s) { return (s == null ? '' : String(s)).replace(CTRL_TEXT, escChar); }

  function h(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    return e;
  }

  function readData() { return JSON.parse(document.getElementById('walspan-data').textContent); }

  // Times are integer nanoseconds since the epoch; past 2**53 a JavaScript number keeps them
  // to about a quarter of a microsecond, plenty for display.
  function iso(ns) {
    if (ns == null) return '-';
    var d = new Date(Math.floor(ns / 1e6));
    if (isNaN(d.getTime())) return String(ns);
    return d.toISOString().replace('T', ' ').replace('Z', ' UTC');
  }

  function dur(ns) {
    if (ns == null || !isFinite(ns)) return '';
    if (ns < 0) ns = 0;
    if (ns < 1e3) return ns.toFixed(0) + ' ns';
    if (ns < 1e6) return (ns / 1e3).toFixed(1) + ' µs';
    if (ns < 1e9) return (ns / 1e6).toFixed(1) + ' ms';
    if (ns < 60e9) return (ns / 1e9).toFixed(2) + ' s';
    var s = Math.round(ns / 1e9);
    if (s < 3600) return Math.floor(s / 60) + ' min ' + (s % 60) + ' s';
    return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
  }

  function num(n) { return n == null ? '-' : Number(n).toLocaleString('en-US'); }

  // The truncation marker template ("…[walspan: truncated, kept {kept} of {total} bytes]")
  // as a pattern matching any filled-in marker.
  function markerPattern(template) {
    var parts = String(template || '').split(/\{kept\}|\{total\}/);
    var src = parts.map(function (p) { return p.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'); }).join('\\d+');
    return src ? new RegExp(src, 'g') : null;
  }

  // Append `text` to `el`, wrapping every truncation marker in <mark class="trunc">.
  // Returns the number of markers found.
  function appendMarked(el, text, re) {
    text = visText(text);
    if (!re) { el.appendChild(document.createTextNode(text)); return 0; }
    re.lastIndex = 0;
    var last = 0, found = 0, m;
    while ((m = re.exec(text)) !== null) {
      if (m.index > last) el.appendChild(document.createTextNode(text.slice(last, m.index)));
      el.appendChild(h('mark', 'trunc', m[0]));
      last = m.index + m[0].length;
      found++;
      if (m[0].length === 0) re.lastIndex++;
    }
    if (last < text.length) el.appendChild(document.createTextNode(text.slice(last)));
    return found;
  }

  function pretty(v) { return typeof v === 'string' ? v : JSON.stringify(v, null, 2); }

  function statusClass(s) { return 'st-' + String(s).replace(/[^a-z]/g, ''); }

  return {
    vis: vis, visText: visText, h: h, readData: readData, iso: iso, dur: dur, num: num,
    markerPattern: markerPattern, appendMarked: appendMarked, pretty: pretty, statusClass: statusClass
  };
})();
