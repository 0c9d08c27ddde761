// gswarm dashboard: the cluster as the head sees it, live.
//
// The state starts from the REST list routes (with the event seq read before them), then
// follows /ws/events?since=SEQ; after a disconnect it resumes from the last seq it applied,
// so nothing is missed. Every call sends the api token, kept in sessionStorage; /ui#token=T
// signs in directly (a fragment never reaches the server) and is removed from the address bar.
// Sections are re-rendered as HTML strings and morphed into the page, so elements that did not
// change (a button under the pointer) stay put while progress ticks.
'use strict';

(() => {
  const TOKEN_KEY = 'gswarm-token';
  const EVENT_TAIL = 100;
  const ENDED_OPS_SHOWN = 12;
  const JOBS_SHOWN = 10;

  const S = {
    nodes: new Map(),
    models: new Map(),
    locs: new Map(), // "model@device" -> Location
    ops: new Map(),
    jobs: new Map(),
    services: new Map(),
    events: [],
    lastSeq: 0,
  };
  let token = '';
  let generation = 0; // bumps on sign-in/out: stale sockets and timers check it and stop
  let retries = 0;
  let socket = null;
  let pending = null;

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------ formatting

  const ESC = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
  const esc = (v) => String(v ?? '').replace(/[&<>"']/g, (c) => ESC[c]);

  function bytes(n) {
    n = Number(n) || 0;
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? String(Math.round(n)) : n.toFixed(n >= 100 ? 0 : 1)) + ' ' + units[i];
  }

  function dur(s) {
    s = Math.max(0, Math.round(s));
    if (s < 60) return s + 's';
    if (s < 3600) return Math.floor(s / 60) + 'm' + String(s % 60).padStart(2, '0') + 's';
    return Math.floor(s / 3600) + 'h' + String(Math.floor((s % 3600) / 60)).padStart(2, '0') + 'm';
  }

  function clock(ts) {
    const d = new Date(ts * 1000);
    return [d.getHours(), d.getMinutes(), d.getSeconds()].map((x) => String(x).padStart(2, '0')).join(':');
  }

  const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;
  const badge = (state) => `<span class="badge s-${esc(state)}">${esc(state)}</span>`;
  const pct = (part, whole) => (whole > 0 ? Math.min(100, (100 * part) / whole) : 0);

  // ------------------------------------------------------------ REST

  class AuthError extends Error {}

  async function api(method, path, body) {
    const init = { method, headers: { Authorization: 'Bearer ' + token }, cache: 'no-store' };
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(path, init);
    let data = null;
    try { data = await resp.json(); } catch (_) { data = null; }
    const message = data && data.error ? data.error.message : `${resp.status} ${resp.statusText}`;
    if (resp.status === 401 || resp.status === 403) throw new AuthError(message);
    if (!resp.ok) throw new Error(message);
    return data;
  }

  const seg = encodeURIComponent;

  // ------------------------------------------------------------ sign-in

  function readFragment() {
    if (!location.hash) return;
    const params = new URLSearchParams(location.hash.slice(1));
    const t = params.get('token');
    if (t) sessionStorage.setItem(TOKEN_KEY, t);
    history.replaceState(null, '', location.pathname + location.search);
  }

  function showSignin(message) {
    generation++;
    if (socket) socket.close();
    socket = null;
    token = '';
    sessionStorage.removeItem(TOKEN_KEY);
    $('dash').hidden = true;
    $('signout').hidden = true;
    $('signin').hidden = false;
    const err = $('signin-error');
    err.textContent = message || '';
    err.hidden = !message;
    setConn('off', 'not signed in');
    $('token').value = '';
    $('token').focus();
  }

  function signIn(t) {
    token = t;
    sessionStorage.setItem(TOKEN_KEY, t);
    $('signin').hidden = true;
    start(++generation);
  }

  function setConn(kind, text) {
    const el = $('conn');
    el.className = 'conn conn-' + kind;
    el.textContent = text;
  }

  // ------------------------------------------------------------ state: load, then follow

  async function start(gen) {
    setConn('wait', 'loading…');
    try {
      const root = await api('GET', '/');
      const since = root.last_seq;
      const [nodes, models, ops, jobs, services, events] = await Promise.all([
        api('GET', '/nodes'),
        api('GET', '/models'),
        api('GET', '/ops?limit=500'),
        api('GET', '/jobs?limit=' + JOBS_SHOWN),
        api('GET', '/services'),
        api('GET', `/events?since=${Math.max(0, since - EVENT_TAIL)}&limit=${EVENT_TAIL}`),
      ]);
      const fullJobs = await Promise.all(jobs.jobs.map((j) => api('GET', '/jobs/' + seg(j.job_id))));
      if (gen !== generation) return;
      S.nodes = new Map(nodes.nodes.map((n) => [n.node_id, n]));
      S.models = new Map();
      S.locs = new Map();
      for (const m of models.models) {
        S.models.set(m.name, m);
        for (const loc of m.locations) S.locs.set(loc.model + '@' + loc.device, loc);
      }
      S.ops = new Map(ops.ops.map((o) => [o.op_id, o]));
      S.jobs = new Map(fullJobs.map((j) => [j.job_id, j]));
      S.services = new Map(services.services.map((s) => [s.service_id, s]));
      S.events = events.events.filter((e) => e.seq <= since && e.kind !== 'op.progress');
      S.lastSeq = since;
      $('dash').hidden = false;
      $('signout').hidden = false;
      render();
      follow(gen);
    } catch (err) {
      if (gen !== generation) return;
      if (err instanceof AuthError) return showSignin(err.message);
      setConn('wait', 'head unreachable, retrying…');
      setTimeout(() => start(gen), backoff());
    }
  }

  function backoff() {
    retries = Math.min(retries + 1, 6);
    return Math.min(5000, 250 * 2 ** retries);
  }

  function follow(gen) {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const url = `${scheme}//${location.host}/ws/events?since=${S.lastSeq}&token=${seg(token)}`;
    const ws = new WebSocket(url);
    socket = ws;
    ws.onmessage = (msg) => {
      if (gen !== generation) return;
      const m = JSON.parse(msg.data);
      if (m.type === 'event') apply(m);
      else if (m.type === 'notice' && m.code === 'live') {
        retries = 0;
        if (m.last_seq < S.lastSeq) {
          // A head with a fresh event log (its state was reset): start over from its lists.
          ws.onclose = null;
          ws.close();
          start(gen);
          return;
        }
        setConn('live', 'live');
      }
    };
    ws.onclose = () => {
      if (gen !== generation) return;
      socket = null;
      setConn('wait', `reconnecting (from event ${S.lastSeq})…`);
      setTimeout(() => resume(gen), backoff());
    };
  }

  async function resume(gen) {
    if (gen !== generation) return;
    try {
      await api('GET', '/'); // a socket refused for its token says nothing about why: ask REST
    } catch (err) {
      if (gen !== generation) return;
      if (err instanceof AuthError) return showSignin(err.message);
      setTimeout(() => resume(gen), backoff());
      return;
    }
    if (gen === generation) follow(gen);
  }

  function apply(ev) {
    if (ev.seq <= S.lastSeq) return; // already applied (replayed twice around a reconnect)
    S.lastSeq = ev.seq;
    const [topic, what] = ev.kind.split('.');
    const d = ev.data || {};
    switch (topic) {
      case 'node':
        if (what === 'deleted') S.nodes.delete(ev.key);
        else S.nodes.set(ev.key, d);
        break;
      case 'model':
        if (what === 'deleted') {
          S.models.delete(ev.key);
          for (const [k, loc] of S.locs) if (loc.model === ev.key) S.locs.delete(k);
        } else {
          S.models.set(ev.key, { ...d, locations: [] });
        }
        break;
      case 'location':
        if (what === 'deleted') S.locs.delete(d.model + '@' + d.device);
        else S.locs.set(d.model + '@' + d.device, d);
        break;
      case 'op':
        S.ops.set(ev.key, d);
        pruneOps();
        break;
      case 'service':
        if (what === 'deleted') S.services.delete(ev.key);
        else S.services.set(ev.key, d);
        break;
      case 'job':
        if (what === 'action') {
          const job = S.jobs.get(d.job_id) || { job_id: d.job_id, name: d.job_id, state: 'pending', actions: [] };
          const i = job.actions.findIndex((a) => a.id === d.id);
          if (i >= 0) job.actions[i] = d;
          else job.actions.push(d);
          S.jobs.set(d.job_id, job);
        } else {
          const old = S.jobs.get(ev.key);
          S.jobs.set(ev.key, { ...d, actions: old ? old.actions : [] });
        }
        break;
      default:
        break;
    }
    if (ev.kind !== 'op.progress') {
      S.events.push(ev);
      if (S.events.length > EVENT_TAIL) S.events.splice(0, S.events.length - EVENT_TAIL);
    }
    schedule();
  }

  function pruneOps() {
    if (S.ops.size < 1000) return;
    const ended = [...S.ops.values()].filter((o) => !isOpen(o)).sort((a, b) => a.created_at - b.created_at);
    for (const o of ended.slice(0, ended.length - 100)) S.ops.delete(o.op_id);
  }

  const isOpen = (op) => op.state === 'queued' || op.state === 'running';

  // ------------------------------------------------------------ rendering

  function schedule() {
    if (pending === null) pending = requestAnimationFrame(() => { pending = null; render(); });
  }

  function render() {
    const online = [...S.nodes.values()].filter((n) => n.status === 'online').length;
    const running = [...S.ops.values()].filter(isOpen).length;
    $('summary').textContent =
      `${online}/${S.nodes.size} nodes online · ${plural(modelNames().length, 'model')} · ` +
      `${plural(running, 'op')} open · event ${S.lastSeq}`;
    morph($('nodes'), renderNodes());
    morph($('matrix'), renderMatrix());
    morph($('ops'), renderOps());
    morph($('jobs'), renderJobs());
    morph($('services'), renderServices());
    morph($('events'), renderEvents());
  }

  // Update `el`'s children to `html`, keeping every element whose tag, key and attributes allow it.
  const rendered = new WeakMap();

  function morph(el, html) {
    if (rendered.get(el) === html) return;
    rendered.set(el, html);
    const t = document.createElement('template');
    t.innerHTML = html;
    morphChildren(el, t.content);
  }

  // Children with a `data-key` are matched by key (moved, never rebuilt, when rows come and go);
  // the others by position, when their tag matches.
  function morphChildren(into, from) {
    const next = [...from.childNodes];
    const keyed = new Map();
    for (const child of into.children) {
      const key = child.getAttribute('data-key');
      if (key) keyed.set(key, child);
    }
    next.forEach((node, i) => {
      const old = into.childNodes[i] || null;
      const key = node.nodeType === 1 ? node.getAttribute('data-key') : null;
      const match = key ? keyed.get(key) : null;
      if (match && match.nodeName === node.nodeName) {
        keyed.delete(key);
        if (match !== old) into.insertBefore(match, old);
        morphNode(match, node);
      } else if (!key && old && sameKind(old, node)) {
        morphNode(old, node);
      } else {
        into.insertBefore(node, old);
      }
    });
    while (into.childNodes.length > next.length) into.removeChild(into.lastChild);
  }

  function sameKind(a, b) {
    if (a.nodeType !== b.nodeType || a.nodeName !== b.nodeName) return false;
    return a.nodeType !== 1 || !a.hasAttribute('data-key');
  }

  function morphNode(a, b) {
    if (a.nodeType !== 1) {
      if (a.nodeValue !== b.nodeValue) a.nodeValue = b.nodeValue;
      return;
    }
    for (const { name } of [...a.attributes]) if (!b.hasAttribute(name)) a.removeAttribute(name);
    for (const { name, value } of [...b.attributes]) if (a.getAttribute(name) !== value) a.setAttribute(name, value);
    morphChildren(a, b);
  }

  function meter(used, total, label) {
    const p = pct(used, total);
    const level = p > 90 ? ' high' : p > 75 ? ' mid' : '';
    return `<div class="meter${level}"><div class="meter-label">${label}</div>` +
      `<progress max="${total || 1}" value="${used}"></progress></div>`;
  }

  function renderNodes() {
    if (!S.nodes.size) return '<p class="empty">No nodes yet: start an agent with <code>gswarm client HEAD_URL</code>.</p>';
    return [...S.nodes.values()].sort((a, b) => a.node_id.localeCompare(b.node_id)).map((n) => {
      const inv = n.inventory || {};
      const facts = [n.hostname || inv.hostname, (n.addresses || [])[0], inv.cpu_count ? inv.cpu_count + ' CPUs' : '',
        inv.memory_total ? bytes(inv.memory_total) + ' RAM' : '', n.agent_version ? 'agent ' + n.agent_version : '']
        .filter(Boolean).map(esc).join(' · ');
      const tiers = (inv.tiers || []).map((t) => meter(t.capacity - t.free, t.capacity,
        `<b>${esc(t.name)}</b> ${bytes(t.free)} free of ${bytes(t.capacity)}`)).join('');
      const gpus = (inv.gpus || []).map((g) => meter(g.memory_total - g.memory_free, g.memory_total,
        `<b>gpu${esc(g.index)}</b> ${esc(g.name)}${g.simulated ? ' <i>(simulated)</i>' : ''}: ` +
        `${bytes(g.memory_total - g.memory_free)} of ${bytes(g.memory_total)} used` +
        (g.utilization ? ` · ${esc(g.utilization)}% busy` : ''))).join('');
      const gpuNote = inv.gpu_error ? `<p class="muted">GPUs: ${esc(inv.gpu_error)}</p>` : '';
      return `<article class="card node" data-key="node-${esc(n.node_id)}">
        <header><b class="name">${esc(n.node_id)}</b> ${badge(n.status)}</header>
        <p class="muted">${facts}</p>${tiers}${gpus || '<p class="muted">no GPUs</p>'}${gpuNote}</article>`;
    }).join('');
  }

  // Every device of every node (its tiers, then its GPUs), plus devices that only copies name.
  function devices() {
    const out = [];
    const seen = new Set();
    const add = (node, tier) => {
      const d = node + ':' + tier;
      if (!seen.has(d)) { seen.add(d); out.push({ device: d, node, tier }); }
    };
    for (const n of [...S.nodes.values()].sort((a, b) => a.node_id.localeCompare(b.node_id))) {
      const inv = n.inventory || {};
      for (const t of inv.tiers || []) add(n.node_id, t.name);
      for (const g of inv.gpus || []) add(n.node_id, 'gpu' + g.index);
    }
    for (const loc of S.locs.values()) {
      const i = loc.device.indexOf(':');
      add(loc.device.slice(0, i), loc.device.slice(i + 1));
    }
    return out;
  }

  const storageDevices = () => devices().filter((d) => !d.tier.startsWith('gpu'));

  function modelNames() {
    const names = new Set(S.models.keys());
    for (const loc of S.locs.values()) names.add(loc.model);
    return [...names].sort();
  }

  function servicesOn(model, device) {
    return [...S.services.values()].filter((s) => s.model === model && s.device === device);
  }

  function renderMatrix() {
    const names = modelNames();
    if (!names.length) return '<p class="empty">No models yet: download one.</p>';
    const devs = devices();
    const byNode = [];
    for (const d of devs) {
      const last = byNode[byNode.length - 1];
      if (last && last.node === d.node) last.count++;
      else byNode.push({ node: d.node, count: 1 });
    }
    const head1 = byNode.map((g) => `<th colspan="${g.count}" class="node-col">${esc(g.node)}</th>`).join('');
    const head2 = devs.map((d) => `<th>${esc(d.tier)}</th>`).join('');
    const rows = names.map((name) => {
      const m = S.models.get(name);
      const cells = devs.map((d) => {
        const loc = S.locs.get(name + '@' + d.device);
        const attrs = `data-act="cell" data-model="${esc(name)}" data-device="${esc(d.device)}"`;
        if (!loc) return `<td><button type="button" class="cell empty" ${attrs} title="no copy">·</button></td>`;
        const op = loc.op_id ? S.ops.get(loc.op_id) : null;
        let detail = loc.size ? bytes(loc.size) : '';
        if (op && isOpen(op) && op.progress && op.progress.total > 0) {
          detail = Math.floor(pct(op.progress.done, op.progress.total)) + '%';
        }
        const served = servicesOn(name, d.device).map((s) => `<small class="svc">▶ ${esc(s.state)}</small>`).join('');
        return `<td><button type="button" class="cell s-${esc(loc.state)}" ${attrs} data-state="${esc(loc.state)}" ` +
          `title="${esc(name)} on ${esc(d.device)}: ${esc(loc.state)}">${esc(loc.state)}<small>${esc(detail)}</small>${served}</button></td>`;
      }).join('');
      const type = m ? `<small class="muted">${esc(m.type)}</small>` : '';
      return `<tr data-key="model-${esc(name)}"><th class="model"><button type="button" class="link" data-act="model" ` +
        `data-model="${esc(name)}">${esc(name)}</button> ${type}</th>${cells}</tr>`;
    }).join('');
    return `<table class="matrix"><thead><tr><th rowspan="2">model</th>${head1}</tr><tr>${head2}</tr></thead>` +
      `<tbody>${rows}</tbody></table>`;
  }

  function opKind(op) {
    const a = op.args || {};
    return a.remove_source && op.kind !== 'delete' ? `${op.kind} (move)` : op.kind;
  }

  function opTarget(op) {
    const a = op.args || {};
    const n = op.node_id;
    switch (op.kind) {
      case 'download': return `→ ${n}:${a.tier}`;
      case 'fetch': {
        const p = (a.peers || [])[0];
        return `${a.source_device || (p ? p.node_id + ':' + p.tier : 'peer')} → ${n}:${a.tier}`;
      }
      case 'copy': return `${n}:${a.source_tier} → ${n}:${a.target_tier}`;
      case 'load': return `${a.source_tier ? n + ':' + a.source_tier + ' ' : ''}→ ${n}:gpu${a.gpu}`;
      case 'delete': return `${n}:${a.tier}`;
      case 'serve': return `${a.device} :${a.port}`;
      case 'replicate': return `→ ${(a.targets || []).join(', ')}`;
      default: return n;
    }
  }

  function progressCell(op) {
    const p = op.progress || {};
    const now = Date.now() / 1000;
    const elapsed = op.started_at ? (op.finished_at || now) - op.started_at : 0;
    const parts = [];
    let bar = '';
    if (p.total > 0) {
      const value = Math.min(p.done, p.total);
      bar = `<progress class="op-bar" max="${p.total}" value="${value}"></progress>`;
      parts.push(`${bytes(p.done)} of ${bytes(p.total)} (${Math.floor(pct(p.done, p.total))}%)`);
    } else if (p.done > 0) {
      if (isOpen(op)) bar = '<progress class="op-bar"></progress>';
      parts.push(bytes(p.done));
    }
    if (isOpen(op) && p.rate > 0) {
      parts.push(bytes(p.rate) + '/s');
      if (p.total > p.done) parts.push('ETA ' + dur((p.total - p.done) / p.rate));
    }
    if (elapsed > 0) parts.push((isOpen(op) ? 'elapsed ' : 'took ') + dur(elapsed));
    if (p.message && isOpen(op)) parts.push(esc(p.message));
    return `${bar}<span class="op-text">${parts.join(' · ')}</span>`;
  }

  function renderOps() {
    const all = [...S.ops.values()].sort((a, b) => b.created_at - a.created_at);
    const open = all.filter(isOpen).reverse();
    const ended = all.filter((o) => !isOpen(o)).slice(0, ENDED_OPS_SHOWN);
    if (!open.length && !ended.length) return '<p class="empty">No operations yet.</p>';
    const row = (op) => {
      const a = op.args || {};
      const err = op.error ? `<div class="error">${esc(op.error.code)}: ${esc(op.error.message)}</div>` : '';
      const cancel = isOpen(op)
        ? `<button type="button" class="small danger" data-act="cancel" data-op="${esc(op.op_id)}">Cancel</button>` : '';
      return `<tr data-key="op-${esc(op.op_id)}" data-op="${esc(op.op_id)}" data-state="${esc(op.state)}">` +
        `<td><code title="${esc(op.op_id)}">${esc(op.op_id.slice(0, 8))}</code></td><td>${esc(opKind(op))}</td>` +
        `<td>${esc(a.model_name || a.service_id || '')}</td><td>${esc(opTarget(op))}</td><td>${badge(op.state)}</td>` +
        `<td class="progress-cell">${progressCell(op)}${err}</td><td>${cancel}</td></tr>`;
    };
    return '<table class="ops"><thead><tr><th>op</th><th>kind</th><th>model</th><th>where</th><th>state</th>' +
      `<th>progress</th><th></th></tr></thead><tbody>${open.map(row).join('')}${ended.map(row).join('')}</tbody></table>`;
  }

  // A DAG laid out in layers: an action's column is the length of the longest path to it.
  function renderDag(job) {
    const actions = [...(job.actions || [])].sort((a, b) => a.index - b.index);
    if (!actions.length) return '';
    const byId = new Map(actions.map((a) => [a.id, a]));
    const depth = new Map();
    const depthOf = (a, trail) => {
      if (depth.has(a.id)) return depth.get(a.id);
      if (trail.has(a.id)) return 0;
      trail.add(a.id);
      let v = 0;
      for (const dep of a.depends_on || []) if (byId.has(dep)) v = Math.max(v, depthOf(byId.get(dep), trail) + 1);
      depth.set(a.id, v);
      return v;
    };
    const columns = [];
    for (const a of actions) {
      const d = depthOf(a, new Set());
      (columns[d] = columns[d] || []).push(a);
    }
    const W = 170, H = 38, GX = 46, GY = 12, PAD = 4;
    const pos = new Map();
    columns.forEach((col, x) => col.forEach((a, y) => pos.set(a.id, { x: PAD + x * (W + GX), y: PAD + y * (H + GY) })));
    const width = PAD * 2 + columns.length * (W + GX) - GX;
    const height = PAD * 2 + Math.max(...columns.map((c) => c.length)) * (H + GY) - GY;
    const edges = [];
    for (const a of actions) {
      const to = pos.get(a.id);
      for (const dep of a.depends_on || []) {
        const from = pos.get(dep);
        if (!from) continue;
        const x1 = from.x + W, y1 = from.y + H / 2, x2 = to.x, y2 = to.y + H / 2, mx = (x1 + x2) / 2;
        edges.push(`<path class="edge" d="M${x1} ${y1} C${mx} ${y1} ${mx} ${y2} ${x2} ${y2}"></path>`);
      }
    }
    const boxes = actions.map((a) => {
      const p = pos.get(a.id);
      const label = a.id.length > 22 ? a.id.slice(0, 21) + '…' : a.id;
      const tip = `${a.id}: ${a.action} (${a.state})${a.attempts > 1 ? `, attempt ${a.attempts}` : ''}${a.error ? ' - ' + a.error : ''}`;
      return `<g class="action a-${esc(a.state)}" data-key="${esc(a.id)}" data-action="${esc(a.id)}" data-state="${esc(a.state)}">` +
        `<title>${esc(tip)}</title><rect x="${p.x}" y="${p.y}" width="${W}" height="${H}" rx="6"></rect>` +
        `<text x="${p.x + 8}" y="${p.y + 15}" class="t1">${esc(label)}</text>` +
        `<text x="${p.x + 8}" y="${p.y + 30}" class="t2">${esc(a.action)} · ${esc(a.state)}</text></g>`;
    }).join('');
    return `<svg class="dag" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" ` +
      `xmlns="http://www.w3.org/2000/svg">${edges.join('')}${boxes}</svg>`;
  }

  function renderJobs() {
    const jobs = [...S.jobs.values()].sort((a, b) => b.created_at - a.created_at).slice(0, JOBS_SHOWN);
    if (!jobs.length) return '<p class="empty">No jobs yet: <code>gsmodel job FILE</code> runs one.</p>';
    return jobs.map((j) => {
      const open = ['pending', 'running'].includes(j.state);
      const counts = Object.entries(j.counts || {}).map(([k, v]) => `${v} ${esc(k)}`).join(', ');
      const cancel = open
        ? `<button type="button" class="small danger" data-act="cancel-job" data-job="${esc(j.job_id)}">Cancel</button>` : '';
      const err = j.error ? `<p class="error">${esc(j.error)}</p>` : '';
      return `<article class="job" data-key="job-${esc(j.job_id)}" data-job="${esc(j.job_id)}">` +
        `<header><b>${esc(j.name)}</b> <code>${esc(j.job_id.slice(0, 8))}</code> ${badge(j.state)} ` +
        `<span class="muted">${counts}</span> ${cancel}</header>${err}<div class="scroll">${renderDag(j)}</div></article>`;
    }).join('');
  }

  function safeUrl(url) {
    return /^https?:\/\//i.test(url || '') ? url : '';
  }

  function renderServices() {
    const list = [...S.services.values()].sort((a, b) => a.service_id.localeCompare(b.service_id));
    if (!list.length) return '<p class="empty">No services: serve a copy from the matrix.</p>';
    const rows = list.map((s) => {
      const url = safeUrl(s.url);
      const link = url ? `<a href="${esc(url)}" target="_blank" rel="noopener noreferrer">${esc(url)}</a>` : esc(s.url);
      const stop = s.state === 'stopping' || s.state === 'stopped' ? ''
        : `<button type="button" class="small danger" data-act="stop" data-model="${esc(s.model)}" ` +
          `data-device="${esc(s.device)}">Stop</button>`;
      return `<tr data-key="svc-${esc(s.service_id)}"><td>${esc(s.model)}</td><td>${esc(s.device)}</td>` +
        `<td>${esc(s.backend)}</td><td>${badge(s.state)}</td><td>${link}</td><td>${esc(s.restarts)}</td>` +
        `<td class="error">${esc(s.error)}</td><td>${stop}</td></tr>`;
    }).join('');
    return '<table><thead><tr><th>model</th><th>device</th><th>backend</th><th>health</th><th>URL</th>' +
      `<th>restarts</th><th></th><th></th></tr></thead><tbody>${rows}</tbody></table>`;
  }

  function eventSummary(ev) {
    const d = ev.data || {};
    const [topic] = ev.kind.split('.');
    if (topic === 'op') return [d.kind, d.node_id, d.error ? d.error.message : ''].filter(Boolean).join(' · ');
    if (topic === 'location') return [d.state, d.size ? bytes(d.size) : ''].filter(Boolean).join(' · ');
    if (topic === 'node') return d.status || '';
    if (topic === 'service') return [d.state, d.url].filter(Boolean).join(' · ');
    if (topic === 'job') return d.state || '';
    return '';
  }

  function renderEvents() {
    return S.events.slice().reverse().map((ev) =>
      `<li data-key="ev-${ev.seq}"><span class="seq">${ev.seq}</span> <time>${clock(ev.ts)}</time> ` +
      `<code class="kind">${esc(ev.kind)}</code> <span class="key">${esc(ev.key)}</span> ` +
      `<span class="muted">${esc(eventSummary(ev))}</span></li>`).join('');
  }

  // ------------------------------------------------------------ actions (each confirmed in a dialog)

  let dialogRun = null;

  function openDialog(title, body, confirmLabel, run) {
    $('dialog-title').textContent = title;
    $('dialog-body').innerHTML = body;
    $('dialog-error').hidden = true;
    const ok = $('dialog-ok');
    ok.hidden = !run;
    ok.disabled = false;
    ok.textContent = confirmLabel || 'Confirm';
    dialogRun = run;
    const dlg = $('dialog');
    if (!dlg.open) dlg.showModal();
    const first = $('dialog-body').querySelector('input, select');
    (first || (run ? ok : $('dialog-cancel'))).focus();
  }

  function closeDialog() {
    dialogRun = null;
    if ($('dialog').open) $('dialog').close();
  }

  async function submitDialog(ev) {
    ev.preventDefault();
    if (!dialogRun) return;
    const ok = $('dialog-ok');
    ok.disabled = true;
    const fields = Object.fromEntries(new FormData($('dialog-form')).entries());
    try {
      const message = await dialogRun(fields);
      closeDialog();
      if (message) toast(message);
    } catch (err) {
      if (err instanceof AuthError) { closeDialog(); showSignin(err.message); return; }
      const box = $('dialog-error');
      box.textContent = err.message;
      box.hidden = false;
      ok.disabled = false;
    }
  }

  function toast(text, isError) {
    const el = document.createElement('div');
    el.className = 'toast' + (isError ? ' error' : '');
    el.textContent = text;
    $('toasts').appendChild(el);
    setTimeout(() => el.remove(), 6000);
  }

  const submitted = (what) => (resp) => `${what}: op ${String(resp.op_id || resp.job_id || '').slice(0, 8)} ${resp.state || ''}`;

  function options(list, selected) {
    return list.map((d) => `<option value="${esc(d)}"${d === selected ? ' selected' : ''}>${esc(d)}</option>`).join('');
  }

  function select(name, label, list, selected) {
    return `<label>${esc(label)} <select name="${esc(name)}" required>${options(list, selected)}</select></label>`;
  }

  const readyCopies = (model) => [...S.locs.values()].filter((l) => l.model === model && l.state === 'ready').map((l) => l.device);

  function cellActions(model, device) {
    const loc = S.locs.get(model + '@' + device);
    const isGpu = /:gpu\d+$/.test(device);
    const b = (act, label, cls) =>
      `<button type="button" class="${cls || ''}" data-act="${act}" data-model="${esc(model)}" data-device="${esc(device)}">${label}</button>`;
    let body;
    if (!loc) {
      const from = readyCopies(model);
      body = '<p>No copy here.</p><div class="choices">' +
        (from.length && !isGpu ? b('copy-here', 'Copy here…') : '') +
        (from.length && isGpu ? b('load-here', 'Load here…') : '') +
        (!isGpu ? b('download', 'Download here…') : '') + b('replicate', 'Replicate…') + '</div>';
    } else {
      const ready = loc.state === 'ready';
      body = `<p>${badge(loc.state)} ${loc.size ? bytes(loc.size) : ''} <code>${esc(loc.path || '')}</code></p>` +
        '<div class="choices">' +
        (ready && !isGpu ? b('copy', 'Copy…') + b('move', 'Move…') : '') +
        (ready && !isGpu && gpusOf(device.split(':')[0]).length ? b('load', 'Load onto a GPU…') : '') +
        (ready ? b('serve', 'Serve…') : '') + b('replicate', 'Replicate…') +
        (loc.op_id && S.ops.get(loc.op_id) && isOpen(S.ops.get(loc.op_id))
          ? `<button type="button" class="danger" data-act="cancel" data-op="${esc(loc.op_id)}">Cancel its op</button>` : '') +
        b('rm', 'Remove', 'danger') + '</div>';
    }
    openDialog(`${model} on ${device}`, body, null, null);
  }

  function gpusOf(node) {
    return devices().filter((d) => d.node === node && d.tier.startsWith('gpu')).map((d) => d.device);
  }

  const ACTIONS = {
    cell: (ds) => cellActions(ds.model, ds.device),
    model: (ds) => ACTIONS.replicate(ds),
    download: (ds) => {
      const targets = storageDevices().map((d) => d.device);
      const m = ds.model ? S.models.get(ds.model) : null;
      openDialog('Download a model',
        `<label>Model name <input name="model_name" required value="${esc(ds.model || '')}"></label>` +
        `<label>Source (Hub repo id, hf://, http(s):// or file://) <input name="source_url" required ` +
        `value="${esc((m && m.source_url) || '')}"></label>` + select('target_device', 'Onto', targets, ds.device),
        'Download', async (f) => submitted('download')(await api('POST', '/download', f)));
    },
    copy: (ds) => transfer('copy', ds),
    move: (ds) => transfer('move', ds),
    'copy-here': (ds) => {
      openDialog(`Copy ${ds.model} to ${ds.device}`, select('source_device', 'From', readyCopies(ds.model)), 'Copy',
        async (f) => submitted('copy')(await api('POST', '/copy',
          { model_name: ds.model, source_device: f.source_device, target_device: ds.device })));
    },
    rm: (ds) => {
      openDialog(`Remove ${ds.model} from ${ds.device}?`,
        `<p>The copy of <b>${esc(ds.model)}</b> on <b>${esc(ds.device)}</b> will be deleted from that node.</p>`, 'Remove',
        async () => submitted('remove')(await api('DELETE', `/models/${seg(ds.model)}/locations/${seg(ds.device)}`)));
    },
    load: (ds) => {
      openDialog(`Load ${ds.model} onto a GPU`, `<p>From <b>${esc(ds.device)}</b>.</p>` +
        select('device', 'GPU', gpusOf(ds.device.split(':')[0])), 'Load',
        async (f) => submitted('load')(await api('POST', '/load',
          { model_name: ds.model, device: f.device, source_device: ds.device })));
    },
    'load-here': (ds) => {
      const node = ds.device.split(':')[0];
      const from = readyCopies(ds.model).filter((d) => d.startsWith(node + ':') && !/:gpu\d+$/.test(d));
      openDialog(`Load ${ds.model} onto ${ds.device}`, from.length ? select('source_device', 'From', from)
        : '<p>The head picks the copy to load from.</p>', 'Load',
        async (f) => submitted('load')(await api('POST', '/load',
          { model_name: ds.model, device: ds.device, ...(f.source_device ? { source_device: f.source_device } : {}) })));
    },
    serve: (ds) => {
      openDialog(`Serve ${ds.model} on ${ds.device}`,
        '<label>Port <input name="port" type="number" min="1" max="65535" required value="8000"></label>' +
        '<label>Backend (empty: the default) <input name="backend" placeholder="builtin, vllm, …"></label>', 'Serve',
        async (f) => {
          const body = { model_name: ds.model, device: ds.device, port: Number(f.port) };
          if (f.backend) body.backend = f.backend;
          return submitted('serve')(await api('POST', '/serve', body));
        });
    },
    replicate: (ds) => {
      const have = new Set([...S.locs.values()].filter((l) => l.model === ds.model).map((l) => l.device));
      const targets = storageDevices().map((d) => d.device).filter((d) => !have.has(d));
      const boxes = targets.map((d) =>
        `<label class="check"><input type="checkbox" name="t:${esc(d)}" value="${esc(d)}"> ${esc(d)}</label>`).join('');
      openDialog(`Replicate ${ds.model}`,
        '<label>Onto <select name="all_nodes"><option value="">the devices ticked below</option>' +
        '<option value="disk">every node\'s disk</option><option value="dram">every node\'s dram</option></select></label>' +
        `<div class="checks">${boxes || '<p class="muted">Every device already has a copy.</p>'}</div>`, 'Replicate',
        async (f) => {
          const body = { model_name: ds.model };
          if (f.all_nodes) body.all_nodes = f.all_nodes;
          else body.targets = Object.keys(f).filter((k) => k.startsWith('t:')).map((k) => f[k]);
          return submitted('replicate')(await api('POST', '/replicate', body));
        });
    },
    stop: (ds) => {
      openDialog(`Stop ${ds.model} on ${ds.device}?`, '<p>The service stops; the copy stays loaded.</p>', 'Stop',
        async () => submitted('stop')(await api('POST', `/stop/${seg(ds.model)}/${seg(ds.device)}`)));
    },
    cancel: (ds) => {
      const op = S.ops.get(ds.op);
      const what = op ? `${opKind(op)} of ${(op.args || {}).model_name || ''} (${opTarget(op)})` : ds.op;
      openDialog('Cancel this operation?', `<p>${esc(what)}</p><p class="muted">A partial copy is thrown away.</p>`,
        'Cancel the op', async () => submitted('cancel')(await api('POST', `/ops/${seg(ds.op)}/cancel`)));
    },
    'cancel-job': (ds) => {
      const job = S.jobs.get(ds.job);
      openDialog('Cancel this job?', `<p>${esc(job ? job.name : ds.job)}: its running actions are cancelled.</p>`,
        'Cancel the job', async () => `job ${(await api('POST', `/jobs/${seg(ds.job)}/cancel`)).state}`);
    },
  };

  function transfer(kind, ds) {
    const targets = storageDevices().map((d) => d.device).filter((d) => d !== ds.device);
    const note = kind === 'move' ? '<p class="muted">The source copy is removed once the target is ready.</p>' : '';
    openDialog(`${kind === 'move' ? 'Move' : 'Copy'} ${ds.model} from ${ds.device}`,
      select('target_device', 'To', targets) + note, kind === 'move' ? 'Move' : 'Copy',
      async (f) => submitted(kind)(await api('POST', '/' + kind,
        { model_name: ds.model, source_device: ds.device, target_device: f.target_device })));
  }

  // ------------------------------------------------------------ wiring

  function init() {
    readFragment();
    $('signin-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const t = $('token').value.trim();
      if (t) signIn(t);
    });
    $('signout').addEventListener('click', () => showSignin(''));
    window.addEventListener('hashchange', () => {
      // /ui#token=... typed into a tab already showing the page: no reload happens.
      readFragment();
      const t = sessionStorage.getItem(TOKEN_KEY);
      if (t && t !== token) signIn(t);
    });
    $('dialog-form').addEventListener('submit', submitDialog);
    $('dialog-cancel').addEventListener('click', closeDialog);
    document.addEventListener('click', (ev) => {
      const el = ev.target.closest('[data-act]');
      if (!el || !ACTIONS[el.dataset.act]) return;
      ev.preventDefault();
      ACTIONS[el.dataset.act]({ ...el.dataset });
    });
    setInterval(() => { if (S.ops.size && [...S.ops.values()].some(isOpen)) schedule(); }, 1000);
    const t = sessionStorage.getItem(TOKEN_KEY);
    if (t) signIn(t);
    else showSignin('');
  }

  init();
})();
