// The demo page in a real headless Chromium: it handshakes and sends requests in
// both algorithms through a real gateway and worker. The screenshot is kept in
// test-artifacts/ (SEALSTREAM_ARTIFACTS) for people to look at.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { chromium } from 'playwright-core';
import { ROOT, startRig } from './harness.mjs';

const CHROMIUM = process.env.SEALSTREAM_CHROMIUM ?? '/usr/bin/chromium';
const ARTIFACTS = process.env.SEALSTREAM_ARTIFACTS ?? path.join(ROOT, 'test-artifacts');
const missing = !fs.existsSync(CHROMIUM);
if (missing && process.env.CI) throw new Error(`${CHROMIUM} is needed in CI (scripts/lib.sh installs Debian's chromium)`);

let rig;
let browser;
before(async () => {
  if (missing) return;
  rig = await startRig({ gateway: true, demo: true });
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
});
after(async () => {
  await browser?.close();
  await rig?.stop();
});

test('the demo page completes a handshake and requests in both algorithms', { skip: missing && `no ${CHROMIUM}` }, async () => {
  /** In the browser: WebCrypto handshake, 4 requests (SK and RSA) through the gateway, all verified. */
  const page = await browser.newPage({ viewport: { width: 1100, height: 640 } });
  const errors = [];
  page.on('pageerror', (err) => errors.push(err.message));
  await page.goto(`${rig.gatewayUrl}/demo?kid=${rig.kid}`);
  await page.waitForSelector('body:not([data-status="running"])', { timeout: 60000 });
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  await page.screenshot({ path: path.join(ARTIFACTS, 'gateway-demo.png'), fullPage: true });
  const status = await page.getAttribute('body', 'data-status');
  const summary = await page.textContent('#summary');
  const algs = await page.$$eval('#rows tr td:nth-child(2)', (tds) => tds.map((td) => td.textContent));
  assert.deepEqual(['done', '4 of 4 requests answered and verified'], [status, summary]);
  assert.deepEqual(['SK+A256GCM', 'SK+A256GCM', 'RSA-OAEP-256+A256GCM', 'RSA-OAEP-256+A256GCM'], algs);
  assert.match(await page.textContent('#sid'), /^[0-9a-f]{32}$/);
  assert.deepEqual([], errors);
});
