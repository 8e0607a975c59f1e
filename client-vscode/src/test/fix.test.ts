import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  FIXED_PREFIX,
  NOT_FIXED_PREFIX,
  ProgressTracker,
  buildApplyFixArgs,
  escapeForInput,
  formatFixResult,
  oneLine,
  parseApplyFixResult,
  parsePatchList,
  patchPickItems,
  promptTail,
  starMessage,
  unescapeFromInput,
  validateFix,
} from '../logic/fix';

test('buildApplyFixArgs: exactly {uri, position, completion, fix}', () => {
  const args = buildApplyFixArgs('file:///a.py', {
    source: 'accepted', position: { line: 2, character: 10 }, completion: ' a - b',
    replace: { start: { line: 2, character: 10 }, end: { line: 2, character: 16 } },
  }, ' a + b');
  assert.deepEqual(args, { uri: 'file:///a.py', position: { line: 2, character: 10 }, completion: ' a - b', fix: ' a + b' });
  assert.deepEqual(Object.keys(args), ['uri', 'position', 'completion', 'fix']);
  assert.deepEqual(JSON.parse(JSON.stringify(args)), args);
});

test('escape / unescape round-trip', () => {
  for (const s of ['', 'a + b', 'x\ny', 'a\\nb', '\t\\\n\\\\n', 'print("a\\nb")\n', 'c:\\temp', 'line\r\nnext']) {
    const back = unescapeFromInput(escapeForInput(s));
    assert.equal(back, s.replace(/\r\n/g, '\n'));
    assert.ok(!escapeForInput(s).includes('\n'));
  }
  assert.equal(unescapeFromInput('return a + b\\n'), 'return a + b\n');
  assert.equal(unescapeFromInput('\\x stays'), '\\x stays');
});

test('validateFix', () => {
  assert.equal(validateFix(' a + b', ' a - b'), undefined);
  assert.match(validateFix('   ', ' a - b') ?? '', /right code/);
  assert.match(validateFix(escapeForInput(' a\n'), ' a\n') ?? '', /wrong completion itself/);
});

test('parseApplyFixResult and formatFixResult', () => {
  const r = parseApplyFixResult({ fixed: true, message: 'patched 3 neurons in 1.2 s', seconds: 1.2, neurons: 3, layers: [4, 5], patchId: 'p1' });
  assert.deepEqual(r, { fixed: true, message: 'patched 3 neurons in 1.2 s', seconds: 1.2, neurons: 3, layers: [4, 5], patchId: 'p1' });
  assert.equal(formatFixResult(r), `${FIXED_PREFIX}: patched 3 neurons in 1.2 s`);
  assert.equal(formatFixResult({ fixed: true, neurons: 1, layers: [7], seconds: 0.5 }), `${FIXED_PREFIX}: 1 neuron patched in 1 layer (0.5 s)`);
  assert.equal(formatFixResult({ fixed: false, message: 'no neuron found' }), `${NOT_FIXED_PREFIX}: no neuron found`);
  assert.equal(formatFixResult({ fixed: false }), `${NOT_FIXED_PREFIX}.`);
  assert.equal(formatFixResult({ fixed: true, message: 'Fixed: 3 neurons, 2.0 s' }), `${FIXED_PREFIX}: 3 neurons, 2.0 s`);
  assert.equal(formatFixResult({ fixed: false, message: 'not fixed - the fix is already the completion' }), `${NOT_FIXED_PREFIX}: the fix is already the completion`);
  assert.equal(formatFixResult({ fixed: true, message: 'fixedness 3' }), `${FIXED_PREFIX}: fixedness 3`);
  assert.equal(formatFixResult({ fixed: true, message: 'STAR: fixed — 5 neurons in 0.8 s' }), `${FIXED_PREFIX}: 5 neurons in 0.8 s`);
  assert.equal(formatFixResult({ fixed: false, message: 'STAR: not fixed: the fix is too long' }), `${NOT_FIXED_PREFIX}: the fix is too long`);
  assert.equal(formatFixResult({ fixed: true, message: 'STAR fixed the completion: 12 neuron(s) in layer(s) 3, 17.0 s' }),
    `${FIXED_PREFIX}: 12 neuron(s) in layer(s) 3, 17.0 s`);
  assert.equal(formatFixResult({ fixed: false, message: 'STAR could not fix the completion: budget exhausted' }),
    `${NOT_FIXED_PREFIX}: budget exhausted`);
  assert.equal(formatFixResult({ fixed: true, message: 'STARS align' }), `${FIXED_PREFIX}: STARS align`);
  assert.equal(parseApplyFixResult(null).fixed, false);
  assert.equal(parseApplyFixResult({ fixed: 'yes' }).fixed, false);
  assert.ok(FIXED_PREFIX.includes('fixed') && !NOT_FIXED_PREFIX.startsWith(FIXED_PREFIX));
});

test('patch list parsing and quick pick items (newest first)', () => {
  const list = parsePatchList([
    { id: 'p1', enabled: true, method: 'star', prompt: 'def add(a, b):\n    return', completion: ' a - b', fix: ' a + b', neurons: 4, layers: [3, 9], created: '2026-01-01' },
    { id: 'p2', enabled: false, method: 'mint', fix: 'x\ny' },
    { nope: 1 },
    'junk',
  ]);
  assert.equal(list.length, 2);
  const items = patchPickItems(list);
  assert.deepEqual(items.map((i) => i.id), ['p2', 'p1']);
  assert.equal(items[0].label, '$(circle-slash) x ⏎ y');
  assert.equal(items[1].description, 'enabled · star · 4 neurons · 2 layers · p1');
  assert.match(items[1].detail, /was:  a - b/);
  assert.deepEqual(parsePatchList(null), []);
});

test('starMessage: one STAR prefix', () => {
  assert.equal(starMessage('STAR: undid patch p1', 'x'), 'STAR: undid patch p1');
  assert.equal(starMessage('removed patch p1', 'x'), 'STAR: removed patch p1');
  assert.equal(starMessage(undefined, 'no patch to undo'), 'STAR: no patch to undo');
  assert.equal(starMessage('STAR:', 'fallback'), 'STAR: fallback');
});

test('oneLine / promptTail', () => {
  assert.equal(oneLine('a\nb'), 'a ⏎ b');
  assert.equal(oneLine('x'.repeat(100), 10), 'xxxxxxxxx…');
  assert.equal(promptTail('abcdef', 4), '…def');
});

test('ProgressTracker: $/progress values to increments', () => {
  const t = new ProgressTracker();
  assert.deepEqual(t.step({ kind: 'begin', title: 'Repairing', percentage: 0 }), { message: 'Repairing' });
  assert.deepEqual(t.step({ kind: 'report', message: 'locating neurons', percentage: 30 }), { message: 'locating neurons', increment: 30 });
  assert.deepEqual(t.step({ kind: 'report', percentage: 25 }), undefined);
  assert.deepEqual(t.step({ kind: 'report', percentage: 80 }), { increment: 50 });
  assert.deepEqual(t.step({ kind: 'end', message: 'done' }), { message: 'done', increment: 20 });
  assert.equal(t.step({ kind: 'other' }), undefined);
  assert.equal(t.step(null), undefined);
});
