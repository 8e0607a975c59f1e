import { test } from 'node:test';
import assert from 'node:assert/strict';
import { CompletionStore, docFromText, selectionTarget, targetFromServerArgument, visibleCompletion } from '../logic/store';

const URI = 'file:///ws/demo.py';
const PROMPT = 'import os\ndef add(a, b):\n    return';
const END = { line: 2, character: 10 };

test('docFromText offsets and lines', () => {
  const d = docFromText(URI, PROMPT);
  assert.equal(d.offsetAt(END), PROMPT.length);
  assert.deepEqual(d.positionAt(PROMPT.length), END);
  assert.equal(d.lineText(1), 'def add(a, b):');
  assert.equal(d.lineText(9), '');
});

test('shown, not accepted: the cursor is where the ghost text was', () => {
  const store = new CompletionStore();
  const d = docFromText(URI, PROMPT, 5);
  store.remember(d, END, ' a - b');
  assert.deepEqual(store.candidates(d, END), [{ source: 'shown', position: END, completion: ' a - b' }]);
  // elsewhere: nothing
  assert.deepEqual(store.candidates(d, { line: 1, character: 3 }), []);
  // once the user typed something else at the cursor, the ghost text is gone
  assert.deepEqual(store.candidates(docFromText(URI, PROMPT + ' x', 6), { line: 2, character: 12 }), []);
});

test('accepted: the completion was inserted; position is where it started, replace covers it', () => {
  const store = new CompletionStore();
  store.remember(docFromText(URI, PROMPT, 5), END, ' a - b');
  const d = docFromText(URI, PROMPT + ' a - b', 6);
  const end = { line: 2, character: 16 };
  assert.deepEqual(store.candidates(d, end), [
    { source: 'accepted', position: END, completion: ' a - b', replace: { start: END, end } },
  ]);
  // partially accepted / typed over: still this completion, replace only what is there
  const d2 = docFromText(URI, PROMPT + ' a', 6);
  const c2 = store.candidates(d2, { line: 2, character: 12 });
  assert.equal(c2.length, 1);
  assert.equal(c2[0].source, 'accepted');
  assert.equal(c2[0].completion, ' a - b');
  assert.deepEqual(c2[0].replace, { start: END, end: { line: 2, character: 12 } });
  // typed something different: not this completion
  assert.deepEqual(store.candidates(docFromText(URI, PROMPT + ' a * b', 7), end), []);
});

test('multi-line accepted completion', () => {
  const store = new CompletionStore();
  const p = 'def f(x):';
  store.remember(docFromText(URI, p), { line: 0, character: 9 }, '\n    return x\n');
  const d = docFromText(URI, p + '\n    return x\n', 2);
  assert.deepEqual(store.candidates(d, { line: 2, character: 0 }), [
    { source: 'accepted', position: { line: 0, character: 9 }, completion: '\n    return x\n', replace: { start: { line: 0, character: 9 }, end: { line: 2, character: 0 } } },
  ]);
});

test('accepted and a new suggestion at its end: both offered, accepted first', () => {
  const store = new CompletionStore();
  store.remember(docFromText(URI, PROMPT, 5), END, ' a - b');
  const d = docFromText(URI, PROMPT + ' a - b', 6);
  const end = { line: 2, character: 16 };
  store.remember(d, end, '\n');
  const c = store.candidates(d, end);
  assert.deepEqual(c.map((t) => t.source), ['accepted', 'shown']);
  assert.equal(c[1].completion, '\n');
});

test('the prompt line must be unchanged', () => {
  const store = new CompletionStore();
  store.remember(docFromText(URI, PROMPT, 5), END, ' a - b');
  const d = docFromText(URI, 'import os\ndef add(a, b):\n  return a - b', 9);
  assert.deepEqual(store.candidates(d, { line: 2, character: 14 }), []);
});

test('newest wins; the same completion twice is stored once; capacity is bounded; forget', () => {
  const store = new CompletionStore(3);
  const d = docFromText(URI, PROMPT, 5);
  store.remember(d, END, ' first');
  store.remember(d, END, ' second');
  assert.equal(store.candidates(d, END)[0].completion, ' second');
  store.remember(d, END, ' second');
  assert.equal(store.size(URI), 2);
  store.remember(d, { line: 0, character: 0 }, 'x');
  store.remember(d, { line: 0, character: 1 }, 'y');
  assert.equal(store.size(URI), 3);
  store.remember(d, END, '');
  assert.equal(store.size(URI), 3);
  store.forget(URI);
  assert.equal(store.size(URI), 0);
  assert.deepEqual(store.candidates(d, END), []);
});

test('selectionTarget: prompt before the selection, completion = selected text, either direction', () => {
  const d = docFromText(URI, PROMPT + ' a - b');
  const a = { line: 2, character: 10 };
  const b = { line: 2, character: 16 };
  const want = { source: 'selection', position: a, completion: ' a - b', replace: { start: a, end: b } };
  assert.deepEqual(selectionTarget(d, a, b), want);
  assert.deepEqual(selectionTarget(d, b, a), want);
});

test('visibleCompletion: items whose range starts before the cursor', () => {
  assert.equal(visibleCompletion(' a - b', undefined), ' a - b');
  assert.equal(visibleCompletion('return a + b', 'ret'), 'urn a + b');
  assert.equal(visibleCompletion('print()', 'ret'), undefined);
});

test('targetFromServerArgument: the code action argument {uri, position, completion, accepted}', () => {
  const d = docFromText(URI, PROMPT + ' a - b\n');
  assert.deepEqual(targetFromServerArgument(d, { uri: URI, position: END, completion: ' a - b', accepted: true }), {
    source: 'accepted', position: END, completion: ' a - b', replace: { start: END, end: { line: 2, character: 16 } },
  });
  // accepted but edited since: no replace range (nothing will be edited)
  assert.deepEqual(targetFromServerArgument(d, { uri: URI, position: END, completion: ' a * b', accepted: true }), {
    source: 'accepted', position: END, completion: ' a * b',
  });
  assert.deepEqual(targetFromServerArgument(docFromText(URI, PROMPT), { uri: URI, position: END, completion: ' x', accepted: false }), {
    source: 'shown', position: END, completion: ' x',
  });
  assert.equal(targetFromServerArgument(d, { uri: 'file:///other.py', position: END, completion: 'x' }), undefined);
  assert.equal(targetFromServerArgument(d, { uri: URI, position: { line: -1, character: 0 }, completion: 'x' }), undefined);
  assert.equal(targetFromServerArgument(d, undefined), undefined);
  assert.equal(targetFromServerArgument(d, 'junk'), undefined);
});
