// The Atelier console: a client of the public API. No framework and no build step; every value from
// the API reaches the page as text nodes, never as HTML.
'use strict';

// The API's base path: the console is served at `<server.prefix>/`.
const BASE = location.pathname.replace(/\/[^/]*$/, '');

const S = {
  key: sessionStorage.getItem('atelier.key') || localStorage.getItem('atelier.key') || '',
  leave: new AbortController(), // aborted when the view changes
  schema: null,
};

// ---- helpers --------------------------------------------------------------

function h(tag, props, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === 'class') el.className = v;
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'value') el.value = v;
    // Through the CSSOM: the page's policy allows no inline style attributes.
    else if (k === 'style') el.style.cssText = v;
    else if (v !== undefined && v !== null && v !== false) el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of kids.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function uuid() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
  const x = [...b].map((v) => v.toString(16).padStart(2, '0')).join('');
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
}

class ApiError extends Error {
  constructor(status, body, text) {
    const detail = (body && Array.isArray(body.detail) ? body.detail : [])
      .map((d) => (d.field ? `${d.field}: ${d.message}` : d.message)).filter(Boolean);
    super([(body && body.error) || text || `HTTP ${status}`, ...detail].join(' — '));
    this.status = status;
    this.body = body;
  }
}

async function api(method, path, body, opts = {}) {
  const headers = { Authorization: `Bearer ${S.key}` };
  let payload;
  if (opts.form) payload = opts.form;
  else if (body !== undefined) { headers['Content-Type'] = 'application/json'; payload = JSON.stringify(body); }
  // A retried creation (a double click, a flaky link) runs once.
  if (method === 'POST' || method === 'PUT') headers['Idempotency-Key'] = uuid();
  const r = await fetch(BASE + path, { method, headers, body: payload, signal: opts.signal });
  if (r.status === 204) return null;
  const text = await r.text();
  let json = null;
  try { json = JSON.parse(text); } catch (_) { /* not JSON */ }
  if (!r.ok) throw new ApiError(r.status, json, text.slice(0, 300));
  return json;
}

function errorBox(e) { return h('div', { class: 'error', role: 'alert' }, e instanceof Error ? e.message : String(e)); }
function when(iso) { return iso ? new Date(iso).toLocaleString() : '—'; }
function credits(n) { return typeof n === 'number' ? n.toLocaleString(undefined, { maximumFractionDigits: 3 }) : '—'; }
function status(s) { return h('span', { class: `status ${s}` }, s || '—'); }
function bar(pct) { return h('div', { class: 'progress', title: `${Math.round(pct)}%` }, h('div', { style: `width:${Math.max(0, Math.min(100, pct))}%` })); }

// The notification stream (contract §4.2) read with fetch, so the key
// travels in a header and not in the URL.
async function follow(ids, onEvent, signal) {
  const url = `/notifications/events?name_list=batch_edit,image_result&id_task=${encodeURIComponent(ids.join(','))}`;
  while (!signal.aborted) {
    try {
      const r = await fetch(BASE + url, { headers: { Authorization: `Bearer ${S.key}`, Accept: 'text/event-stream' }, signal });
      if (!r.ok) throw new Error(`stream ${r.status}`);
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      let data = [];
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let nl;
        while ((nl = buffer.indexOf('\n')) >= 0) {
          const line = buffer.slice(0, nl).replace(/\r$/, '');
          buffer = buffer.slice(nl + 1);
          if (line === '') {
            if (data.length) {
              try { const n = JSON.parse(data.join('\n')); if (n && n.name) onEvent(n); } catch (_) { /* {} of backfill_complete */ }
            }
            data = [];
          } else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
        }
      }
    } catch (e) {
      if (signal.aborted) return;
    }
    await new Promise((res) => setTimeout(res, 1500));
  }
}

// Upload through a signed slot (contract §2.4/§2.5); the file id.
async function upload(file, projectName) {
  const slot = await api('POST', '/upload', { filename: file.name, project_name: projectName });
  const r = await fetch(slot.upload_url, { method: 'PUT', headers: { 'Content-Type': slot.content_type }, body: file });
  if (!r.ok) {
    let json = null; const text = await r.text();
    try { json = JSON.parse(text); } catch (_) { /* */ }
    throw new ApiError(r.status, json, text);
  }
  return slot.file_id;
}

// A drop zone that collects image files; `onChange(files)` after each change.
function dropZone(onChange, { multiple = true, what = 'garment photos' } = {}) {
  let files = [];
  const thumbs = h('div', { class: 'thumbs' });
  const input = h('input', { type: 'file', accept: 'image/jpeg,image/png,image/webp', multiple, hidden: true });
  const zone = h('div', { class: 'drop', tabindex: '0', 'data-testid': 'drop' },
    `Drop ${what} here, or `, h('a', { href: '#', onclick: (e) => { e.preventDefault(); input.click(); } }, 'choose files'),
    h('div', { class: 'muted' }, 'JPEG, PNG or WebP'), thumbs, input);
  const set = (list) => {
    const accepted = [...list].filter((f) => /^image\/(jpeg|png|webp)$/.test(f.type));
    files = multiple ? files.concat(accepted) : accepted.slice(0, 1);
    thumbs.replaceChildren(...files.map((f) => h('figure', {}, h('img', { src: URL.createObjectURL(f), alt: f.name }), h('figcaption', {}, f.name))));
    onChange(files);
  };
  input.addEventListener('change', () => set(input.files));
  zone.addEventListener('dragover', (e) => { e.preventDefault(); zone.classList.add('over'); });
  zone.addEventListener('dragleave', () => zone.classList.remove('over'));
  zone.addEventListener('drop', (e) => { e.preventDefault(); zone.classList.remove('over'); set(e.dataTransfer.files); });
  zone.input = input;
  return zone;
}

async function projectPicker() {
  const list = await api('GET', '/project?per_page=100');
  const select = h('select', { name: 'project' },
    list.projects.map((p) => h('option', { value: p.project_id }, p.project_name)),
    h('option', { value: '' }, 'New project…'));
  const name = h('input', { placeholder: 'project name', hidden: list.projects.length > 0, value: list.projects.length ? '' : 'console' });
  if (!list.projects.length) select.value = '';
  select.addEventListener('change', () => { name.hidden = select.value !== ''; });
  return {
    el: h('div', {}, h('label', {}, 'Project'), select, ' ', name),
    async resolve() {
      if (select.value) return { id: select.value, name: select.selectedOptions[0].textContent };
      const want = name.value.trim() || 'console';
      try {
        const p = await api('POST', '/project', { project_name: want });
        return { id: p.project_id, name: p.project_name };
      } catch (e) {
        if (e.status === 409 && e.body) return { id: e.body.project_id, name: e.body.project_name };
        throw e;
      }
    },
  };
}

// The create-packshot options of the API's own document.
async function schema() {
  if (!S.schema) S.schema = await fetch(`${BASE}/openapi.json`).then((r) => r.json()).catch(() => ({}));
  return S.schema;
}
function enumOf(doc, schemaName, field, fallback) {
  const seen = new Set();
  const walk = (s) => {
    if (!s || typeof s !== 'object' || seen.has(s)) return null;
    seen.add(s);
    if (s.$ref) return walk(doc.components.schemas[s.$ref.split('/').pop()]);
    if (Array.isArray(s.enum)) return s.enum.filter((v) => v !== null);
    for (const k of ['oneOf', 'anyOf', 'allOf']) for (const x of s[k] || []) { const r = walk(x); if (r) return r; }
    return null;
  };
  try { return walk(doc.components.schemas[schemaName].properties[field]) || fallback; } catch (_) { return fallback; }
}

// ---- views ----------------------------------------------------------------

const VIEWS = {
  jobs: ['Jobs', jobsView],
  new: ['New packshot', newPackshotView],
  job: [null, jobView],
  identities: ['Identities', identitiesView],
  swap: ['Model swap', swapView],
  profiles: ['Profiles', profilesView],
  webhooks: ['Webhooks', webhooksView],
  billing: ['Balance & usage', billingView],
  operator: ['Operator', operatorView],
};

// Whether the key is an operator's (the operator routes exist for it only): asked once per key.
async function isOperator() {
  if (S.operator === undefined || S.operatorKey !== S.key) {
    S.operatorKey = S.key;
    S.operator = await api('GET', '/admin/overview').then(() => true, () => false);
  }
  return S.operator;
}

async function render() {
  S.leave.abort();
  S.leave = new AbortController();
  const app = document.getElementById('app');
  if (!S.key) { app.replaceChildren(signinView()); return; }
  const [name, ...rest] = location.hash.replace(/^#\/?/, '').split('/');
  const operator = await isOperator();
  const view = VIEWS[name] && (name !== 'operator' || operator) ? name : 'jobs';
  const main = h('main', {});
  const nav = h('nav', {}, h('div', { class: 'brand' }, 'Atelier'),
    Object.entries(VIEWS).filter(([k, [title]]) => title && (k !== 'operator' || operator))
      .map(([k, [title]]) => h('a', { href: `#/${k}`, class: k === view || (view === 'job' && k === 'jobs') ? 'active' : '' }, title)),
    h('div', { class: 'foot' }, h('a', { href: `${BASE}/docs` }, 'API docs'), ' · ',
      h('a', { href: '#', onclick: (e) => { e.preventDefault(); signOut(); } }, 'Sign out')));
  app.replaceChildren(h('div', { class: 'shell' }, nav, main));
  try { await VIEWS[view][1](main, rest.map(decodeURIComponent), S.leave.signal); } catch (e) {
    if (e.status === 401) { signOut(); return; }
    if (!S.leave.signal.aborted) main.append(errorBox(e));
  }
}

function signOut() {
  S.key = ''; sessionStorage.removeItem('atelier.key'); localStorage.removeItem('atelier.key');
  render();
}

function signinView() {
  const key = h('input', { type: 'password', name: 'key', placeholder: 'atl_…', autocomplete: 'off', required: true });
  const remember = h('input', { type: 'checkbox' });
  const msg = h('div', {});
  const form = h('form', { class: 'panel', onsubmit: async (e) => {
    e.preventDefault();
    S.key = key.value.trim();
    try {
      await api('GET', '/billing/balance');
      (remember.checked ? localStorage : sessionStorage).setItem('atelier.key', S.key);
      if (!location.hash || location.hash === '#/') location.hash = '#/jobs'; else render();
    } catch (err) {
      S.key = '';
      msg.replaceChildren(errorBox(err.status === 401 ? 'That key is not valid (or was revoked).' : err));
    }
  } },
  h('h1', {}, 'Sign in to Atelier'), h('label', {}, 'API key'), key,
  h('p', {}, h('label', { style: 'display:inline' }, remember, ' keep me signed in on this browser')),
  h('button', { type: 'submit' }, 'Sign in'), msg,
  h('p', { class: 'muted' }, 'The key is kept in this browser only and sent to this server in the Authorization header.'));
  return h('div', { class: 'signin' }, form);
}

async function jobsView(main, _args, signal) {
  const filter = h('select', { onchange: () => load() }, ['', 'pending', 'processing', 'completed', 'failed', 'aborted']
    .map((s) => h('option', { value: s }, s || 'all states')));
  const body = h('div', {});
  main.append(h('div', { class: 'row', style: 'justify-content:space-between' }, h('h1', {}, 'Jobs'),
    h('div', {}, filter, ' ', h('a', { class: 'button', href: '#/new' }, 'New packshot'))), body);
  async function load() {
    const q = filter.value ? `&status=${filter.value}` : '';
    const list = await api('GET', `/jobs?per_page=50${q}`, undefined, { signal });
    if (!list.jobs.length) { body.replaceChildren(h('div', { class: 'panel muted' }, 'No jobs yet. Start with a new packshot.')); return list; }
    body.replaceChildren(h('table', { 'data-testid': 'jobs' },
      h('tr', {}, ['Job', 'Type', 'State', 'Progress', 'Credits', 'Project', 'Created'].map((t) => h('th', {}, t))),
      list.jobs.map((j) => h('tr', { class: 'link', onclick: () => { location.hash = `#/job/${j.job_id}`; } },
        h('td', { class: 'mono' }, j.job_id), h('td', {}, j.job_type), h('td', {}, status(j.status)),
        h('td', {}, bar(j.progress), h('span', { class: 'muted' }, `${j.processed_images}/${j.total_images}`)),
        h('td', {}, credits(j.credits_reserved)), h('td', {}, j.project_text || '—'), h('td', {}, when(j.created_at))))));
    return list;
  }
  let list = await load();
  // Refresh while something runs.
  while (!signal.aborted && list.jobs.some((j) => j.status === 'pending' || j.status === 'processing')) {
    await new Promise((r) => setTimeout(r, 3000));
    if (!signal.aborted) list = await load();
  }
}

async function jobView(main, [id], signal) {
  const head = h('div', {});
  const gallery = h('div', { class: 'gallery', 'data-testid': 'gallery' });
  const msg = h('div', {});
  main.append(head, msg, gallery);
  let pending = null;
  const refresh = async () => {
    const r = await api('GET', `/jobs/${encodeURIComponent(id)}/results`, undefined, { signal });
    const open = r.status === 'pending' || r.status === 'processing';
    head.replaceChildren(
      h('div', { class: 'row', style: 'justify-content:space-between' },
        h('h1', {}, `${r.job_type.replace(/_/g, ' ')} `, h('span', { class: 'mono muted' }, r.job_id)),
        h('div', {},
          open ? h('button', { class: 'danger', onclick: async () => {
            try { await api('POST', `/jobs/${encodeURIComponent(id)}/abort`, {}); await refresh(); } catch (e) { msg.replaceChildren(errorBox(e)); }
          } }, 'Abort') : null, ' ',
          r.summary.successful > 0 ? h('button', { class: 'secondary', onclick: async () => {
            try { const d = await api('POST', '/download', { job_id: id }); location.href = d.download_url; } catch (e) { msg.replaceChildren(errorBox(e)); }
          } }, 'Download ZIP') : null)),
      h('div', { class: 'panel' },
        h('div', { class: 'kv' },
          h('div', { class: 'muted' }, 'State'), h('div', { 'data-testid': 'job-status' }, status(r.status)),
          h('div', { class: 'muted' }, 'Progress'), h('div', {}, bar(r.progress), `${r.processed_images} of ${r.total_images} outputs`),
          h('div', { class: 'muted' }, 'Credits'), h('div', {}, r.credits_used === null ? `${credits(r.credits_reserved)} held` : `${credits(r.credits_used)} charged`),
          h('div', { class: 'muted' }, 'Project'), h('div', {}, r.project_text || '—'),
          h('div', { class: 'muted' }, 'Created'), h('div', {}, when(r.created_at)),
          r.error_message ? [h('div', { class: 'muted' }, 'Error'), h('div', { class: 'status failed' }, r.error_message)] : null)));
    gallery.replaceChildren(...r.results.map((o) => {
      const before = (o.inputs[0] && (o.inputs[0].thumbnail || o.inputs[0].full_size)) || null;
      const after = o.output.thumbnail || o.output.full_size;
      return h('div', { class: 'card', 'data-testid': 'result', 'data-status': o.status },
        h('div', { class: 'pair' },
          before ? h('img', { src: before, alt: 'before', loading: 'lazy' }) : h('div', { class: 'empty' }, 'input'),
          after ? h('img', { src: after, alt: `output ${o.image_index}.${o.group_index}`, loading: 'lazy' }) : h('div', { class: 'empty' }, o.status)),
        h('div', { class: 'meta' },
          h('div', {}, h('strong', {}, `#${o.image_index}.${o.group_index}`), status(o.status)),
          h('div', {}, h('span', { class: 'muted' }, 'model'), h('span', { 'data-testid': 'model-used' }, o.model_used || '—')),
          h('div', {}, h('span', { class: 'muted' }, 'credits'), h('span', {}, credits(o.credits))),
          o.processing_time !== null ? h('div', {}, h('span', { class: 'muted' }, 'time'), h('span', {}, `${o.processing_time.toFixed(2)} s`)) : null,
          o.error_message ? h('div', { class: 'status failed' }, o.error_message) : null,
          o.output.full_size ? h('div', {}, h('a', { href: o.output.full_size, download: o.download_filename, target: '_blank', rel: 'noopener' }, `Download ${o.output_format.toUpperCase()}`)) : null));
    }));
    return open;
  };
  const open = await refresh();
  if (!open) return;
  // Live: every event of this job refreshes the view (batched).
  follow([id], () => {
    if (pending) return;
    pending = setTimeout(async () => { pending = null; try { await refresh(); } catch (_) { /* next event */ } }, 250);
  }, signal);
}

async function newPackshotView(main, _args, signal) {
  const [doc, presets, picker] = await Promise.all([
    schema(), api('GET', '/preset?type=create_packshot&per_page=100', undefined, { signal }).catch(() => ({ presets: [] })), projectPicker()]);
  let files = [];
  const styles = enumOf(doc, 'PackshotInstruction', 'style', ['white_cutout', 'flat_lay', 'ghost_mannequin', 'marketing_ready', 'free']);
  const sizes = enumOf(doc, 'OutputOptions', 'size', ['1K', '2K', '4K']);
  const formats = enumOf(doc, 'OutputOptions', 'format', ['jpg', 'png']);
  const field = (label, el) => h('div', {}, h('label', {}, label), el);
  const style = h('select', { name: 'style' }, styles.map((s) => h('option', { value: s }, s.replace(/_/g, ' '))));
  const variations = h('input', { type: 'number', name: 'variations', min: '1', max: '4', value: '1', style: 'width:80px' });
  const size = h('select', { name: 'size' }, h('option', { value: '' }, 'default'), sizes.map((s) => h('option', { value: s }, s)));
  const format = h('select', { name: 'format' }, h('option', { value: '' }, 'default'), formats.map((s) => h('option', { value: s }, s)));
  const background = h('input', { name: 'background', placeholder: 'e.g. light grey' });
  const preset = h('select', { name: 'preset' }, h('option', { value: '' }, 'none'),
    (presets.presets || []).map((p) => h('option', { value: p.preset_code }, p.name)));
  const together = h('input', { type: 'checkbox', name: 'together' });
  const msg = h('div', {});
  const submit = h('button', { type: 'submit', disabled: true }, 'Create packshots');
  const zone = dropZone((f) => { files = f; submit.disabled = !files.length; });
  const form = h('form', { class: 'panel', onsubmit: async (e) => {
    e.preventDefault();
    submit.disabled = true;
    msg.replaceChildren(h('div', { class: 'notice' }, 'Uploading…'));
    try {
      const project = await picker.resolve();
      const ids = [];
      for (const f of files) ids.push(await upload(f, project.name));
      const instruction = { style: style.value, num_variations: Number(variations.value) || 1 };
      if (background.value.trim()) instruction.background = background.value.trim();
      if (preset.value) instruction.preset_code = preset.value;
      const options = {};
      if (size.value) options.size = size.value;
      if (format.value) options.format = format.value;
      if (Object.keys(options).length) instruction.options = options;
      const groups = together.checked ? [ids] : ids.map((i) => [i]);
      const jobs = [];
      for (const g of groups) {
        const r = await api('POST', '/create-packshot', { project_id: project.id, images: g, instructions: [instruction] });
        jobs.push(r.job_id);
      }
      location.hash = jobs.length === 1 ? `#/job/${jobs[0]}` : '#/jobs';
    } catch (err) {
      msg.replaceChildren(errorBox(err));
      submit.disabled = false;
    }
  } },
  picker.el, h('h2', {}, 'Photos'), zone,
  h('p', {}, h('label', { style: 'display:inline' }, together, ' all photos show one product (one job)')),
  h('h2', {}, 'Packshot'),
  h('div', { class: 'row' }, field('Style', style), field('Variations', variations), field('Size', size), field('Format', format),
    field('Background', background), field('Preset', preset)),
  h('p', {}, submit), msg);
  main.append(h('h1', {}, 'New packshot'), form);
}

async function identitiesView(main, _args, signal) {
  const list = await api('GET', '/identity?per_page=100', undefined, { signal });
  const msg = h('div', {});
  const name = h('input', { name: 'name', placeholder: 'name (optional)' });
  const tag = h('input', { name: 'tag', placeholder: 'tag (optional)' });
  let files = [];
  const submit = h('button', { type: 'submit', disabled: true }, 'Create identity (50 credits)');
  const zone = dropZone((f) => { files = f; submit.disabled = !files.length; }, { multiple: false, what: 'a photo of one face' });
  const form = h('form', { class: 'panel', onsubmit: async (e) => {
    e.preventDefault();
    submit.disabled = true;
    msg.replaceChildren(h('div', { class: 'notice' }, 'Checking the face…'));
    const fd = new FormData();
    fd.append('image', files[0]);
    if (name.value.trim()) fd.append('name', name.value.trim());
    if (tag.value.trim()) fd.append('tag', tag.value.trim());
    try { await api('POST', '/identity/upload', undefined, { form: fd }); render(); } catch (err) { msg.replaceChildren(errorBox(err)); submit.disabled = false; }
  } }, h('h2', { style: 'margin-top:0' }, 'New identity from a photo of one face'), zone, h('div', { class: 'row' }, name, tag, submit), msg);
  main.append(h('h1', {}, 'Identities'), form,
    h('table', { 'data-testid': 'identities' },
      h('tr', {}, ['', 'Name', 'Code', 'Preprocessing', 'Quality', 'Visibility', ''].map((t) => h('th', {}, t))),
      list.identities.map((i) => h('tr', {},
        h('td', {}, (i.face_link || i.link) ? h('img', { class: 'face', src: i.face_link || i.link, alt: i.name }) : ''),
        h('td', {}, i.name), h('td', { class: 'mono' }, i.identity_code), h('td', {}, status(i.preprocessing_status)),
        h('td', {}, i.quality_score === null ? '—' : i.quality_score.toFixed(2)), h('td', {}, i.visibility),
        h('td', {}, i.visibility === 'private' ? h('button', { class: 'secondary', onclick: async () => {
          if (!confirm(`Delete identity ${i.name}?`)) return;
          try { await api('DELETE', `/identity/${encodeURIComponent(i.identity_code)}`); render(); } catch (err) { msg.replaceChildren(errorBox(err)); }
        } }, 'Delete') : '')))));
}

async function swapView(main, _args, signal) {
  const [list, picker] = await Promise.all([api('GET', '/identity?per_page=100&preprocessing_status=completed', undefined, { signal }), projectPicker()]);
  const identity = h('select', { name: 'identity' }, list.identities.map((i) => h('option', { value: i.identity_code }, i.name)));
  let files = [];
  const msg = h('div', {});
  const submit = h('button', { type: 'submit', disabled: true }, 'Swap the model');
  const zone = dropZone((f) => { files = f; submit.disabled = !files.length || !list.identities.length; }, { what: 'photos of a model wearing the garments' });
  const form = h('form', { class: 'panel', onsubmit: async (e) => {
    e.preventDefault();
    submit.disabled = true;
    try {
      const project = await picker.resolve();
      const ids = [];
      for (const f of files.slice(0, 10)) ids.push(await upload(f, project.name));
      const r = await api('POST', '/model-swap', { project_id: project.id, identity_code: identity.value, images: ids });
      location.hash = `#/job/${r.job_id}`;
    } catch (err) { msg.replaceChildren(errorBox(err)); submit.disabled = false; }
  } }, picker.el, h('label', {}, 'Identity'), identity,
  list.identities.length ? null : h('div', { class: 'notice' }, 'No identity is ready yet: create one under Identities.'),
  h('h2', {}, 'Photos of the garments on a model (up to 10)'), zone, h('p', {}, submit), msg);
  main.append(h('h1', {}, 'Model swap'), form);
}

async function profilesView(main, _args, signal) {
  const r = await api('GET', '/v1/phota/profiles/ids', undefined, { signal });
  const ids = r.profile_ids || r.ids || (Array.isArray(r) ? r : []);
  const rows = await Promise.all(ids.map((id) => api('GET', `/v1/phota/profiles/${encodeURIComponent(id)}/status`, undefined, { signal }).catch((e) => ({ status: e.message }))));
  main.append(h('h1', {}, 'Profiles'),
    ids.length ? h('table', {}, h('tr', {}, ['Profile', 'State', 'Details'].map((t) => h('th', {}, t))),
      ids.map((id, n) => h('tr', {}, h('td', { class: 'mono' }, id), h('td', {}, status(rows[n].status)),
        h('td', { class: 'muted' }, rows[n].error_message || rows[n].message || ''))))
      : h('div', { class: 'panel muted' }, 'No profiles. Profiles are created through the API (POST /v1/phota/profiles/add).'));
}

async function webhooksView(main, _args, signal) {
  let hook = null;
  try { hook = await api('GET', '/webhooks', undefined, { signal }); } catch (e) { if (e.status !== 404) throw e; }
  const deliveries = hook ? await api('GET', '/webhooks/deliveries?per_page=20', undefined, { signal }).catch(() => null) : null;
  const url = h('input', { name: 'url', type: 'url', placeholder: 'your endpoint, e.g. hooks.example.com/atelier (https)', value: hook ? hook.url : '', style: 'width:420px' });
  const msg = h('div', {});
  const save = async () => {
    try {
      const r = await api('PUT', '/webhooks', { url: url.value.trim() });
      await render();
      document.querySelector('main').prepend(h('div', { class: 'notice' }, 'Signing secret (shown once): ', h('span', { class: 'mono', 'data-testid': 'secret' }, r.secret)));
    } catch (e) { msg.replaceChildren(errorBox(e)); }
  };
  const items = deliveries && deliveries.deliveries;
  main.append(h('h1', {}, 'Webhooks'),
    h('form', { class: 'panel', onsubmit: (e) => { e.preventDefault(); save(); } },
      h('label', {}, 'Endpoint'), url, ' ', h('button', { type: 'submit' }, hook ? 'Save and rotate secret' : 'Save'), ' ',
      hook ? h('button', { type: 'button', class: 'secondary', onclick: async () => {
        try { const r = await api('POST', '/webhooks/test', {}); msg.replaceChildren(h('div', { class: 'notice' }, r.message || 'Test ping queued')); } catch (e) { msg.replaceChildren(errorBox(e)); }
      } }, 'Send test ping') : null, ' ',
      hook ? h('button', { type: 'button', class: 'danger', onclick: async () => {
        try { await api('DELETE', '/webhooks'); render(); } catch (e) { msg.replaceChildren(errorBox(e)); }
      } }, 'Remove') : null,
      hook ? h('p', { class: 'muted' }, `Last answer: ${hook.last_response_status ?? '—'} at ${when(hook.last_response_at)}`) : null, msg),
    ...(items ? [h('h2', {}, 'Deliveries'), h('table', { 'data-testid': 'deliveries' }, h('tr', {}, ['Event', 'State', 'Attempts', 'Answer', 'At'].map((t) => h('th', {}, t))),
      items.map((d) => h('tr', {}, h('td', {}, d.event), h('td', {}, status(d.status)), h('td', {}, d.attempts),
        h('td', {}, d.last_response_status ?? d.last_error ?? '—'), h('td', {}, when(d.finished_at || d.created_at)))))] : []));
}

async function billingView(main, _args, signal) {
  const [balance, usage] = await Promise.all([api('GET', '/billing/balance', undefined, { signal }), api('GET', '/billing/credits', undefined, { signal })]);
  main.append(h('h1', {}, 'Balance & usage'),
    h('div', { class: 'panel kv', 'data-testid': 'balance' },
      h('div', { class: 'muted' }, 'Credits'), h('div', {}, credits(balance.user_credits)),
      h('div', { class: 'muted' }, 'Held by running jobs'), h('div', {}, credits(balance.in_progress_credits)),
      h('div', { class: 'muted' }, 'Available'), h('div', {}, h('strong', {}, credits(balance.available_credits))),
      h('div', { class: 'muted' }, 'Billed to'), h('div', {}, balance.billing_owner)),
    h('h2', {}, `Last 30 days: ${credits(usage.total_credits)} credits`),
    h('table', {}, h('tr', {}, ['Day', 'Kind', 'Jobs', 'Credits'].map((t) => h('th', {}, t))),
      usage.summary.map((u) => h('tr', {}, h('td', {}, new Date(u.period_start).toLocaleDateString()), h('td', {}, u.job_type), h('td', {}, u.job_count), h('td', {}, credits(u.total_credits))))));
}

function ago(secs) {
  if (typeof secs !== 'number') return '—';
  if (secs < 90) return `${Math.round(secs)} s`;
  if (secs < 5400) return `${Math.round(secs / 60)} min`;
  return `${(secs / 3600).toFixed(1)} h`;
}
function rate(n) { return typeof n === 'number' ? n.toLocaleString(undefined, { maximumFractionDigits: 1 }) : '—'; }

async function operatorView(main, _args, signal) {
  const body = h('div', {});
  const dead = h('div', {});
  main.append(h('h1', {}, 'Operator'), body, dead);
  async function showDead(queue) {
    const d = await api('GET', `/admin/dead-letters/${encodeURIComponent(queue)}?limit=20`, undefined, { signal });
    const msg = h('div', {});
    const replay = h('button', { type: 'button', disabled: !d.dead_letters, onclick: async () => {
      replay.disabled = true;
      try {
        const r = await api('POST', `/admin/dead-letters/${encodeURIComponent(queue)}/replay`, {});
        msg.replaceChildren(h('div', { class: 'notice', 'data-testid': 'replayed' }, `Moved ${r.replayed} back to ${r.queue}; ${r.dead_letters} left.`));
        await load();
      } catch (e) { msg.replaceChildren(errorBox(e)); replay.disabled = false; }
    } }, `Replay all to ${queue}`);
    dead.replaceChildren(h('h2', {}, `Dead letters of ${queue}: ${d.dead_letters}`),
      d.first.length ? h('table', { 'data-testid': 'dead-letters' },
        h('tr', {}, ['Reason', 'From', 'Job', 'Output', 'Attempt', 'Bytes'].map((t) => h('th', {}, t))),
        d.first.map((x) => h('tr', {}, h('td', {}, x.reason || '—'), h('td', {}, x.original_queue || '—'),
          h('td', { class: 'mono' }, x.job_id || '—'), h('td', {}, x.output_id ?? '—'), h('td', {}, x.attempt ?? '—'), h('td', {}, x.payload_bytes))))
        : h('p', { class: 'muted' }, 'None.'),
      h('p', {}, replay), msg);
  }
  async function load() {
    const o = await api('GET', '/admin/overview', undefined, { signal });
    const open = (q, s) => (q.open ? q.open[s] ?? 0 : '—');
    body.replaceChildren(
      h('p', { class: 'muted' }, `As of ${when(o.generated_at)} · queue: ${o.queue_kind || 'none'} · ${o.account_count} accounts`),
      h('h2', {}, 'Queues'),
      h('table', { 'data-testid': 'queues' },
        h('tr', {}, ['Queue', 'Ready', 'Dead letters', 'Pending', 'Dispatched', 'Running', 'Oldest wait', 'Done/min', 'Failed/min', 'Workers'].map((t) => h('th', {}, t))),
        o.queues.map((q) => h('tr', { 'data-queue': q.name },
          h('td', {}, h('strong', {}, q.name), h('div', { class: 'muted' }, q.role)), h('td', {}, q.depth ?? '—'),
          h('td', {}, String(q.dead_letters ?? '—'), ' ', h('a', { href: '#', onclick: (e) => { e.preventDefault(); showDead(q.name).catch((err) => dead.replaceChildren(errorBox(err))); } }, 'view')),
          h('td', {}, open(q, 'pending')), h('td', {}, open(q, 'dispatched')), h('td', {}, open(q, 'running')),
          h('td', {}, q.role === 'work' ? ago(q.oldest_waiting_seconds) : '—'),
          h('td', {}, rate(q.completed_per_minute)), h('td', {}, rate(q.failed_per_minute)),
          h('td', { class: q.role === 'work' && q.workers_alive === 0 && (open(q, 'pending') || 0) > 0 ? 'status failed' : '' }, q.workers_alive ?? '—')))),
      h('h2', {}, `Workers (${o.workers.filter((w) => w.alive).length} alive)`),
      o.workers.length ? h('table', { 'data-testid': 'workers' },
        h('tr', {}, ['Worker', 'State', 'Queues', 'Device', 'In flight', 'Finished', 'Last seen', 'Started', 'Version'].map((t) => h('th', {}, t))),
        o.workers.map((w) => h('tr', {},
          h('td', {}, h('div', { class: 'mono' }, w.worker), h('div', { class: 'muted' }, w.host)),
          h('td', {}, status(w.alive ? 'alive' : 'gone')), h('td', {}, w.queues.join(', ') || '—'), h('td', {}, w.device),
          h('td', {}, `${w.in_flight} / ${w.slots}`), h('td', {}, w.finished), h('td', {}, `${ago(w.seen_seconds_ago)} ago`),
          h('td', {}, when(w.started_at)), h('td', {}, w.version))))
        : h('div', { class: 'panel muted' }, 'No worker has reported. Workers write a presence record every worker.presence_secs.'),
      h('h2', {}, 'Accounts with work in flight or credits held'),
      o.accounts.length ? h('table', { 'data-testid': 'accounts' },
        h('tr', {}, ['Account', 'Plan', 'In flight', 'Active jobs', 'Credits', 'Held', 'Available'].map((t) => h('th', {}, t))),
        o.accounts.map((a) => h('tr', {},
          h('td', {}, h('div', {}, a.name, a.is_operator ? ' (operator)' : ''), h('div', { class: 'mono muted' }, a.id)),
          h('td', {}, a.plan), h('td', {}, a.in_flight), h('td', {}, a.active_jobs),
          h('td', {}, credits(a.credits)), h('td', {}, credits(a.reserved_credits)), h('td', {}, credits(a.available_credits)))))
        : h('div', { class: 'panel muted' }, 'No account has work in flight.'),
      h('details', { class: 'panel' }, h('summary', {}, 'Effective configuration (secrets redacted)'),
        h('pre', { 'data-testid': 'config' }, JSON.stringify(o.config, null, 2))));
  }
  await load();
  while (!signal.aborted) {
    await new Promise((r) => setTimeout(r, 5000));
    if (!signal.aborted) await load().catch(() => {});
  }
}

window.addEventListener('hashchange', render);
render();
