// The codecs alone (no Redis): what cannot be sent is refused, not silently changed.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { decodeJson, decodeMsgpack, encodeJson, encodeMsgpack } from '../src/index.js';

test('values the encodings cannot carry are refused in both encodings', () => {
  /** Dates, Maps, class instances, functions, NaN, lone surrogates: TypeError, as Python refuses them. */
  class Point { constructor() { this.x = 1; } }
  for (const bad of [new Date(0), new Map([['a', 1]]), new Point(), () => 1, NaN, Infinity, '\ud800', { k: Symbol('s') }]) {
    assert.throws(() => encodeMsgpack({ v: bad }), TypeError, String(bad));
    assert.throws(() => encodeJson({ v: bad }), TypeError, String(bad));
  }
  assert.throws(() => encodeJson({ big: 2n ** 70n }), TypeError);
});

test('both encodings round-trip what they carry', () => {
  /** Nested maps, arrays, strings, integers (BigInt past 2^53 in MessagePack), floats, null, booleans. */
  const value = { s: 'é😀', i: -129, f: 1.5, big: 2n ** 60n, a: [null, true, false, { z: [] }], o: Object.create(null) };
  assert.deepEqual(decodeMsgpack(encodeMsgpack(value)), { ...value, o: {} });
  const { big, ...json } = value;
  assert.deepEqual(decodeJson(encodeJson(json)), { ...json, o: {} });
  assert.equal(typeof big, 'bigint');
});
