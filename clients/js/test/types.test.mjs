// The TypeScript declarations: the documented usage compiles under `strict`, misuse does not.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import { promisify } from 'node:util';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const TSC = path.join(HERE, '../node_modules/typescript/bin/tsc');
const tsc = (args) => promisify(execFile)(process.execPath, [TSC, ...args])
  .then(() => ({ code: 0, out: '' }), (err) => ({ code: err.code, out: err.stdout }));

test('the documented usage type-checks', async () => {
  /** test/types/usage.ts compiles against src/*.d.ts with strict on. */
  assert.deepEqual({ code: 0, out: '' }, await tsc(['-p', path.join(HERE, 'types/tsconfig.json')]));
});

test('misuse is a type error', async () => {
  /** A bad encoding, a bad alg and a non-string type are each caught by the declarations. */
  const { code, out } = await tsc(['-p', path.join(HERE, 'types/tsconfig.misuse.json')]);
  assert.notEqual(0, code);
  assert.equal(3, out.split('\n').filter((l) => l.includes('error TS')).length, out);
});
