// Test rig: a private redis-server on a free port, throwaway keys, and worker (and
// gateway) processes of the Python package: real Redis, real workers, no mocks.
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createClient } from 'redis';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const PYTHON = process.env.SEALSTREAM_PYTHON ?? path.join(ROOT, '.venv/bin/python');

export async function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.listen(0, '127.0.0.1', () => { const { port } = srv.address(); srv.close(() => resolve(port)); });
    srv.on('error', reject);
  });
}

/** Poll `check` until it returns a truthy value, or fail after `timeoutMs`. */
export async function waitFor(check, { timeoutMs = 20000, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await check().catch(() => null);
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function stopProcess(proc) {
  return new Promise((resolve) => {
    if (proc.exitCode !== null || proc.signalCode !== null) { resolve(); return; }
    const kill = setTimeout(() => proc.kill('SIGKILL'), 10000);
    proc.once('exit', () => { clearTimeout(kill); resolve(); });
    proc.kill('SIGTERM');
  });
}

/** Everything one test file needs; `await rig.stop()` at the end. */
export async function startRig({ gateway = false, demo = false } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sealstream-js-'));
  const port = await freePort();
  const procs = [];
  const redisProc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir], { stdio: 'ignore' });
  procs.push(redisProc);
  const url = `redis://127.0.0.1:${port}/0`;
  const prefix = `js${Math.random().toString(16).slice(2, 10)}`;
  const kid = execFileSync(PYTHON, ['-m', 'worker', 'keygen', '--dir', path.join(dir, 'keys')], { stdio: ['ignore', 'pipe', 'ignore'] }).toString().trim();
  const env = {
    ...process.env,
    SEALSTREAM_REDIS_URL: url,
    SEALSTREAM_PREFIX: prefix,
    SEALSTREAM_SERVICE_KEY_FILE: path.join(dir, 'keys/service.pem'),
    SEALSTREAM_MASTER_KEY_FILE: path.join(dir, 'keys/master.key'),
    SEALSTREAM_LOG_FORMAT: 'json',
    SEALSTREAM_GRACE_S: '5',
  };
  const redis = createClient({ url });
  redis.on('error', () => {});
  await waitFor(async () => { await redis.connect(); return true; }, { what: 'redis-server' });
  const log = fs.openSync(path.join(dir, 'worker.log'), 'a');
  procs.push(spawn(PYTHON, ['-m', 'worker', 'worker', '--concurrency', '8'], { cwd: ROOT, env, stdio: ['ignore', log, log] }));
  await waitFor(async () => (await redis.hGet(`${prefix}:config`, 'kid')) === kid, { what: 'the worker to publish its config' });
  const rig = { dir, url, prefix, kid, redis, env, gatewayUrl: null, servicePublicKeyPem: fs.readFileSync(path.join(dir, 'keys/service.pub.pem'), 'utf8') };
  if (gateway) {
    const gport = await freePort();
    const glog = fs.openSync(path.join(dir, 'gateway.log'), 'a');
    procs.push(spawn(PYTHON, ['-m', 'worker', 'gateway', '--port', String(gport), ...(demo ? ['--demo'] : [])], { cwd: ROOT, env, stdio: ['ignore', glog, glog] }));
    rig.gatewayUrl = `http://127.0.0.1:${gport}`;
    await waitFor(async () => (await fetch(`${rig.gatewayUrl}/v1/config`)).ok, { what: 'the gateway' });
  }
  rig.stop = async () => {
    await redis.quit().catch(() => {});
    for (const p of procs.reverse()) await stopProcess(p);
    fs.rmSync(dir, { recursive: true, force: true });
  };
  return rig;
}

/** A logger that keeps what it is told, for assertions. */
export function collectingLogger() {
  const events = [];
  return { events, warn(event, fields) { events.push({ event, ...fields }); } };
}
