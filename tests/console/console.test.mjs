// The web console in a real browser (Debian's Chromium, driven by
// playwright-core) against `atelier serve` on embedded defaults with the
// real models: sign in, upload by file picker and by drag-and-drop, create
// packshots, follow them live, see the results gallery, create an identity,
// read the balance. Screenshots go to $ATELIER_SCREENSHOTS.
//
//   node tests/console/console.test.mjs BINARY
// (scripts/console-test installs what it needs and runs it.)

import { chromium } from 'playwright-core';
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { createServer } from 'node:http';
import { mkdtempSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const binary = process.argv[2];
assert.ok(binary, 'usage: console.test.mjs BINARY');
const shots = process.env.ATELIER_SCREENSHOTS || join(tmpdir(), 'atelier-console-screenshots');
mkdirSync(shots, { recursive: true });
const KEY = 'atl_console_test_key_0123456789abcdefghijkl';

function log(m) { process.stderr.write(`[console-test] ${m}\n`); }

// `atelier serve` on a free port with a fresh data directory.
async function serve() {
  const data = mkdtempSync(join(tmpdir(), 'atelier-console-'));
  const child = spawn(binary, ['serve'], {
    env: {
      ...process.env,
      ATELIER_DATA_DIR: data,
      ATELIER_SERVER__LISTEN: '127.0.0.1:0',
      ATELIER_BOOTSTRAP__API_KEY: KEY,
      ATELIER_MODELS__DIR: join(root, 'models'),
      ATELIER_MODELS__AUTO_FETCH: 'false',
      ATELIER_LOG__LEVEL: 'warn',
      // The test's webhook receiver listens on loopback.
      ATELIER_EGRESS__ALLOW: '127.0.0.1',
    },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const base = await new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`no listen line in 120 s: ${out}`)), 120_000);
    child.stdout.on('data', (b) => {
      out += b;
      const m = out.match(/atelier listening on (http:\/\/\S+)/);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    child.on('exit', (code) => reject(new Error(`atelier exited with ${code}: ${out}`)));
  });
  return { base, stop: () => { child.kill('SIGTERM'); rmSync(data, { recursive: true, force: true }); } };
}

const server = await serve();
log(`server at ${server.base}`);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});
const problems = [];
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') problems.push(`console error: ${m.text()}`); });
  page.on('response', (r) => { if (r.status() >= 400) problems.push(`${r.status()} ${r.request().method()} ${new URL(r.url()).pathname}`); });
  page.setDefaultTimeout(30_000);

  // Sign in: a wrong key is refused in words, the right one opens the jobs.
  await page.goto(server.base + '/');
  await page.fill('input[name=key]', 'atl_wrong_key_0000000000000000000000000');
  await page.click('button[type=submit]');
  await page.waitForSelector('.error');
  assert.match(await page.textContent('.error'), /not valid/);
  await page.fill('input[name=key]', KEY);
  await page.click('button[type=submit]');
  await page.waitForSelector('text=No jobs yet');
  const balance0 = await balance(page);

  // New packshot: one photo through the file picker, one dropped.
  await page.click('a[href="#/new"]');
  await page.waitForSelector('[data-testid=drop]');
  await page.setInputFiles('[data-testid=drop] input[type=file]', join(root, 'testdata/garment.jpg'));
  const dress = readFileSync(join(root, 'testdata/dress.jpg')).toString('base64');
  await page.evaluate((b64) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const dt = new DataTransfer();
    dt.items.add(new File([bytes], 'dress.jpg', { type: 'image/jpeg' }));
    const zone = document.querySelector('[data-testid=drop]');
    zone.dispatchEvent(new DragEvent('dragover', { dataTransfer: dt, bubbles: true, cancelable: true }));
    zone.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
  }, dress);
  await page.waitForFunction(() => document.querySelectorAll('[data-testid=drop] figure').length === 2);
  const styles = await page.$$eval('select[name=style] option', (o) => o.map((x) => x.value));
  for (const s of ['white_cutout', 'flat_lay', 'ghost_mannequin']) assert.ok(styles.includes(s), `style ${s} in ${styles}`);
  await page.selectOption('select[name=style]', 'white_cutout');
  await page.fill('input[name=variations]', '2');
  await page.screenshot({ path: join(shots, '1-new-packshot.png') });
  await page.click('button[type=submit]');

  // Two photos, two jobs: the jobs list, live.
  await page.waitForURL(/#\/jobs$/);
  await page.waitForFunction(() => document.querySelectorAll('[data-testid=jobs] tr.link').length === 2);
  await page.screenshot({ path: join(shots, '2-jobs-live.png') });

  // One job: progress from the event stream, then the gallery.
  await page.click('[data-testid=jobs] tr.link');
  await page.waitForSelector('[data-testid=job-status]');
  await page.screenshot({ path: join(shots, '3-job-progress.png') });
  await page.waitForFunction(() => document.querySelector('[data-testid=job-status]').textContent === 'completed', null, { timeout: 180_000 });
  await page.waitForFunction(() => {
    const imgs = [...document.querySelectorAll('[data-testid=result] img')];
    return imgs.length === 4 && imgs.every((i) => i.complete && i.naturalWidth > 0);
  }, null, { timeout: 60_000 });
  const cards = await page.$$eval('[data-testid=result]', (c) => c.map((x) => ({
    status: x.dataset.status, model: x.querySelector('[data-testid=model-used]').textContent,
  })));
  assert.equal(cards.length, 2, 'two variations');
  for (const c of cards) {
    assert.equal(c.status, 'completed');
    assert.ok(c.model && c.model !== '—', `model_used shown: ${c.model}`);
  }
  assert.ok(await page.isVisible('text=Download ZIP'));
  await page.screenshot({ path: join(shots, '4-results-gallery.png'), fullPage: true });

  // Both jobs end; the balance shows what they cost.
  await page.click('a[href="#/jobs"]');
  await page.waitForFunction(() => [...document.querySelectorAll('[data-testid=jobs] .status')].map((s) => s.textContent).join() === 'completed,completed', null, { timeout: 180_000 });
  await page.screenshot({ path: join(shots, '5-jobs-done.png') });
  const balance1 = await balance(page);
  assert.ok(balance1 < balance0, `credits were charged: ${balance0} -> ${balance1}`);

  // An identity from a face photo, with its face crop.
  await page.click('a[href="#/identities"]');
  await page.waitForSelector('[data-testid=drop]');
  await page.setInputFiles('[data-testid=drop] input[type=file]', join(root, 'models/testdata/newton.png'));
  await page.fill('input[name=name]', 'Isaac');
  await page.click('button[type=submit]');
  await page.waitForFunction(() => [...document.querySelectorAll('[data-testid=identities] tr')].some((r) => r.textContent.includes('Isaac') && r.textContent.includes('completed')), null, { timeout: 120_000 });
  await page.waitForFunction(() => { const i = document.querySelector('[data-testid=identities] img.face'); return i && i.complete && i.naturalWidth > 0; });
  await page.screenshot({ path: join(shots, '6-identities.png') });

  // Refusals are shown in words: a second identity with the same name.
  await page.setInputFiles('[data-testid=drop] input[type=file]', join(root, 'models/testdata/newton.png'));
  await page.fill('input[name=name]', 'Isaac');
  await page.click('button[type=submit]');
  await page.waitForSelector('.error');
  assert.match(await page.textContent('.error'), /already exists/i);

  // The other pages render (no webhook yet: its read is a 404).
  await page.click('a[href="#/swap"]');
  await page.waitForSelector('select[name=identity] option', { state: 'attached' });
  assert.equal(await page.textContent('select[name=identity] option'), 'Isaac');
  // Webhooks: save (the secret is shown once), ping, rotate; the receiver
  // checks every delivery's signature with the secret the page showed.
  const received = [];
  const receiver = createServer((req, res) => {
    let body = '';
    req.on('data', (c) => { body += c; });
    req.on('end', () => { received.push({ headers: req.headers, body }); res.end('ok'); });
  });
  await new Promise((r) => receiver.listen(0, '127.0.0.1', r));
  const hook = `http://127.0.0.1:${receiver.address().port}/hook`;
  const signedBy = (secret, d) => d.headers['x-webhook-signature'] === `sha256=${createHmac('sha256', secret).update(d.body).digest('hex')}`;
  const until = async (what, ok) => {
    for (let t = 0; !ok(); t += 100) {
      assert.ok(t < 30_000, `waited 30 s for ${what}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  };
  await page.click('a[href="#/webhooks"]');
  await page.waitForSelector('input[name=url]');
  await page.fill('input[name=url]', hook);
  await page.click('button[type=submit]');
  const secret1 = (await page.textContent('[data-testid=secret]', { timeout: 30_000 })).trim();
  assert.match(secret1, /^[0-9a-f]{64}$/);
  await until('the ping of a saved webhook', () => received.length >= 1);
  assert.ok(signedBy(secret1, received[0]), 'signed with the secret shown');
  await page.click('text=Send test ping');
  await until('the test ping', () => received.length >= 2);
  assert.ok(signedBy(secret1, received[1]));
  await page.click('button[type=submit]'); // save again: a new secret
  await page.waitForFunction((old) => { const s = document.querySelector('[data-testid=secret]'); return s && s.textContent.trim() !== old; }, secret1);
  const secret2 = (await page.textContent('[data-testid=secret]')).trim();
  await until('the ping after rotation', () => received.length >= 3);
  assert.ok(signedBy(secret2, received[2]) && !signedBy(secret1, received[2]), 'the rotated secret signs');
  await page.click('a[href="#/profiles"]');
  await page.click('a[href="#/webhooks"]');
  // The list is read when the page opens: reopen it until the last
  // delivery is recorded as delivered.
  for (let t = 0; ; t += 500) {
    const states = await page.$$eval('[data-testid=deliveries] .status', (x) => x.map((s) => s.textContent));
    if (states.filter((s) => s === 'delivered').length >= 3) break;
    if (t >= 30_000) await page.screenshot({ path: join(shots, 'failed-webhooks.png') });
    assert.ok(t < 30_000, `deliveries: ${states} (${received.length} received): ${await page.innerText('main')}`);
    await page.click('a[href="#/profiles"]');
    await page.click('a[href="#/webhooks"]');
    await page.waitForSelector('input[name=url]');
    await new Promise((r) => setTimeout(r, 500));
  }
  await page.screenshot({ path: join(shots, '8-webhooks.png') });
  receiver.close();
  await page.click('a[href="#/profiles"]');
  await page.waitForSelector('h1:has-text("Profiles")');

  await page.click('a[href="#/billing"]');
  await page.waitForSelector('[data-testid=balance]');
  await page.screenshot({ path: join(shots, '7-balance.png') });

  // The operator view (the test's key is the bootstrap operator's): the
  // embedded worker alive on its queues, every queue, the configuration
  // with its secrets hidden, a queue's dead letters.
  await page.click('a[href="#/operator"]');
  await page.waitForSelector('[data-testid=workers] .status.alive');
  const queues = await page.$$eval('[data-testid=queues] tr[data-queue]', (rows) => rows.map((r) => r.dataset.queue));
  for (const q of ['packshot', 'swap', 'identity', 'generate', 'training', 'outcomes', 'scheduler']) assert.ok(queues.includes(q), `queues: ${queues}`);
  const worker = await page.innerText('[data-testid=workers]');
  assert.match(worker, /packshot/, worker);
  assert.match(worker, /\bcpu\b/, worker);
  const config = await page.textContent('[data-testid=config]');
  assert.ok(config.includes('<redacted>') && !config.includes(KEY), 'the configuration hides its secrets');
  await page.click('[data-queue=packshot] a');
  await page.waitForSelector('h2:has-text("Dead letters of packshot")');
  await page.screenshot({ path: join(shots, '9-operator.png'), fullPage: true });

  // The API refused the wrong key and the duplicate name, as it should;
  // nothing else failed.
  const expected = ['401 GET /billing/balance', '409 POST /identity/upload', '404 GET /webhooks'];
  // (Each refusal also logs a "Failed to load resource" line: its response is
  // checked against `expected` instead.)
  const unexpected = problems.filter((p) => !/Failed to load resource: the server responded with a status of 4/.test(p) && !expected.includes(p));
  for (const e of expected) assert.ok(problems.includes(e), `${e} in ${problems}`);
  assert.deepEqual(unexpected, [], 'no script errors and no policy violations');
  log(`ok: 9 screenshots in ${shots}`);
} finally {
  await browser.close();
  server.stop();
}

async function balance(page) {
  return page.evaluate(async () => {
    const key = sessionStorage.getItem('atelier.key');
    const r = await fetch('/billing/balance', { headers: { Authorization: `Bearer ${key}` } });
    return (await r.json()).available_credits;
  });
}
