/**
 * Loads the compiled extension with a `vscode` stub and a LanguageClient whose start/sendRequest
 * are fakes: checks command registration, the status bar, the inline middleware and the
 * "mark as wrong" round trip.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Position, Range, hookVscode, makeVscode } from './vscodeStub';
import { SERVER_COMMANDS, UI_COMMANDS } from '../logic/ids';
import { docFromText } from '../logic/store';
import { FIXED_PREFIX } from '../logic/fix';

const ROOT = path.resolve(__dirname, '..', '..');
const { api, rec } = makeVscode({ serverCommand: process.execPath, enabledLanguages: ['python'] });
const unhook = hookVscode(api);
// eslint-disable-next-line @typescript-eslint/no-require-imports
const lc = require('vscode-languageclient/node');
// eslint-disable-next-line @typescript-eslint/no-require-imports
const ext = require('../extension') as typeof import('../extension');

const handlers = new Map<string, (p: unknown) => void>();
const requests: { method: string; params: any }[] = [];
const notifications: { method: string; params: any }[] = [];
let replies: Record<string, unknown> = {};
let constructed: any[] = [];

before(() => {
  const proto = lc.LanguageClient.prototype;
  const onNotification = proto.onNotification;
  proto.onNotification = function (type: any, handler: any) {
    handlers.set(typeof type === 'string' ? type : type.method, handler);
    return onNotification.call(this, type, handler);
  };
  proto.start = async function () { constructed.push(this); };
  proto.stop = async function () {};
  proto.sendRequest = async function (type: any, params: any) {
    const method = typeof type === 'string' ? type : type.method;
    requests.push({ method, params });
    return replies[params?.command ?? method];
  };
  proto.onProgress = () => ({ dispose() {} });
  proto.sendNotification = async function (type: any, params: any) {
    notifications.push({ method: typeof type === 'string' ? type : type.method, params });
  };
});

after(() => unhook());

const context = { subscriptions: [] as { dispose(): void }[] };
let star: ReturnType<typeof ext.activate>;

async function until(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 200 && !cond(); i++) await new Promise((r) => setTimeout(r, 5));
  assert.ok(cond(), what);
}

test('activate registers exactly the contributed UI commands, none of them a server command', async () => {
  star = ext.activate(context as any);
  await until(() => star.state.phase === 'running', 'the client started');
  const registered = [...rec.commands.keys()].sort();
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8'));
  const contributed = pkg.contributes.commands.map((c: { command: string }) => c.command).sort();
  assert.deepEqual(registered, contributed);
  assert.deepEqual(registered, Object.values(UI_COMMANDS).sort());
  const server = new Set<string>(Object.values(SERVER_COMMANDS));
  for (const id of registered) {
    assert.ok(!server.has(id), `${id} is a server command`);
    assert.ok(!id.startsWith('star.'), `${id} is in the server's namespace`);
  }
  for (const m of pkg.contributes.menus['editor/context']) assert.ok(registered.includes(m.command));
  assert.equal(constructed.length, 1);
});

test('the client is configured from the settings: stdio without --stdio, init options, selector', () => {
  const c = constructed[0];
  assert.equal(c._serverOptions.command, process.execPath);
  assert.deepEqual(c._serverOptions.args, ['serve']);
  assert.equal(c._serverOptions.transport, undefined);
  assert.deepEqual(c.clientOptions.initializationOptions, { maxTokens: 48, multiline: 'auto', debounceMs: 0, repairMethod: 'star' });
  assert.deepEqual(c.clientOptions.documentSelector, [{ scheme: 'file', language: 'python' }, { scheme: 'untitled', language: 'python' }]);
});

test('status bar: loading until star/status ready, then "STAR ready"; generating; error', () => {
  const item = rec.statusItems[0];
  assert.equal(item.text, '$(loading~spin) STAR loading');
  assert.equal(item.command, UI_COMMANDS.showLog);
  const status = handlers.get('star/status');
  assert.ok(status, 'a star/status handler is registered');
  status!({ busy: false, kind: 'ready', message: 'smollm2-135m' });
  assert.equal(item.text, '$(check) STAR ready');
  status!({ busy: true, kind: 'generating', message: '' });
  assert.equal(item.text, '$(loading~spin) STAR generating');
  status!({ busy: false, kind: 'bogus' });
  assert.equal(item.text, '$(loading~spin) STAR generating');
  status!({ busy: false, kind: 'ready', message: '' });
  assert.equal(item.text, '$(check) STAR ready');
});

const PROMPT = 'def add(a, b):\n    return';
const AT = new Position(1, 10);

function fakeDocument(text: string, version: number, languageId = 'python') {
  const d = docFromText('file:///ws/demo.py', text, version);
  return {
    uri: { toString: () => 'file:///ws/demo.py', fsPath: '/ws/demo.py', scheme: 'file' },
    version,
    languageId,
    isClosed: false,
    lineCount: text.split('\n').length,
    getText: (r?: Range) => (r ? text.slice(d.offsetAt(r.start), d.offsetAt(r.end)) : text),
    offsetAt: (p: Position) => d.offsetAt(p),
    positionAt: (o: number) => { const p = d.positionAt(o); return new Position(p.line, p.character); },
    lineAt: (l: number) => ({ text: d.lineText(l) }),
  };
}

test('inline middleware: language filter, enabled toggle, remembers what was shown', async () => {
  const mw = constructed[0].clientOptions.middleware;
  let calls = 0;
  const next = async () => { calls++; return [{ insertText: ' a - b', range: new Range(AT, AT) }]; };
  const go = await mw.provideInlineCompletionItems(fakeDocument(PROMPT, 1, 'go'), AT, {}, {}, next);
  assert.equal(go, null);
  assert.equal(calls, 0);
  const r = await mw.provideInlineCompletionItems(fakeDocument(PROMPT, 1), AT, {}, {}, next);
  assert.equal(calls, 1);
  assert.equal(r[0].insertText, ' a - b');
  assert.equal(star.store.size('file:///ws/demo.py'), 1);
  assert.equal(star.state.pending, 0);
  assert.equal(mw.provideCompletionItem(), undefined);
  rec.settings.enabled = false;
  for (const l of rec.configListeners) l({ affectsConfiguration: (s: string) => s === 'star' });
  await until(() => star.settings.enabled === false, 'settings re-read');
  assert.equal(await mw.provideInlineCompletionItems(fakeDocument(PROMPT, 1), AT, {}, {}, next), null);
  assert.equal(calls, 1);
  assert.equal((rec.statusItems[0] as any).text, '$(circle-slash) STAR off');
  rec.settings.enabled = true;
  for (const l of rec.configListeners) l({ affectsConfiguration: (s: string) => s === 'star' });
  await until(() => star.settings.enabled === true, 'settings re-read');
  // a settings change that needs no restart is sent as didChangeConfiguration (not a new client)
  assert.equal(constructed.length, 1);
  const dcc = notifications.filter((n) => n.method === 'workspace/didChangeConfiguration');
  assert.ok(dcc.length >= 1);
  assert.deepEqual(dcc[dcc.length - 1].params, { settings: { star: { maxTokens: 48, multiline: 'auto', debounceMs: 0, repairMethod: 'star' } } });
});

test('mark as wrong after accepting: star.applyFix with ONE argument, fix replaces the accepted text', async () => {
  const accepted = fakeDocument(PROMPT + ' a - b', 2);
  const end = new Position(1, 16);
  rec.window.activeTextEditor = { document: accepted, selection: { isEmpty: true, active: end, start: end, end } };
  let shownValue: string | undefined;
  rec.window.showInputBox = async (o: { value: string }) => { shownValue = o.value; return ' a + b'; };
  let progressTitle = '';
  rec.window.withProgress = async (o: { title: string }, fn: any) => {
    progressTitle = o.title;
    return fn({ report() {} }, { isCancellationRequested: false, onCancellationRequested: () => ({ dispose() {} }) });
  };
  replies = { [SERVER_COMMANDS.applyFix]: { fixed: true, message: 'patched 2 neurons', seconds: 1, neurons: 2, layers: [3], patchId: 'p1' } };
  requests.length = 0;
  rec.messages.length = 0;
  rec.edits.length = 0;
  await rec.commands.get(UI_COMMANDS.markWrong)!();
  assert.equal(shownValue, ' a - b');
  assert.match(progressTitle, /repairing/);
  assert.equal(requests.length, 1);
  assert.equal(requests[0].method, 'workspace/executeCommand');
  assert.equal(requests[0].params.command, 'star.applyFix');
  assert.deepEqual(requests[0].params.arguments, [
    { uri: 'file:///ws/demo.py', position: { line: 1, character: 10 }, completion: ' a - b', fix: ' a + b' },
  ]);
  assert.ok(rec.messages.some((m) => m.level === 'info' && m.text.startsWith(FIXED_PREFIX)), JSON.stringify(rec.messages));
  assert.equal(rec.edits.length, 1);
  assert.equal(rec.edits[0].text, ' a + b');
  assert.deepEqual([rec.edits[0].range.start, rec.edits[0].range.end].map((p) => [p.line, p.character]), [[1, 10], [1, 16]]);
});

test('mark as wrong with a selection; not fixed gives a warning and no edit', async () => {
  const doc = fakeDocument('x = compute()\n', 3);
  const s = new Position(0, 4);
  const e = new Position(0, 13);
  rec.window.activeTextEditor = { document: doc, selection: { isEmpty: false, active: e, start: s, end: e } };
  rec.window.showInputBox = async () => 'compute(1)';
  replies = { [SERVER_COMMANDS.applyFix]: { fixed: false, message: 'no neuron found' } };
  requests.length = 0;
  rec.messages.length = 0;
  rec.edits.length = 0;
  await rec.commands.get(UI_COMMANDS.markWrong)!();
  assert.deepEqual(requests[0].params.arguments[0], { uri: 'file:///ws/demo.py', position: { line: 0, character: 4 }, completion: 'compute()', fix: 'compute(1)' });
  assert.ok(rec.messages.some((m) => m.level === 'warning' && m.text.includes('could not fix') && m.text.includes('no neuron found')));
  assert.equal(rec.edits.length, 0);
});

test('mark as wrong from the server code action argument {uri, position, completion, accepted}', async () => {
  const doc = fakeDocument(PROMPT + ' a - b\n', 7);
  api.workspace.textDocuments = [doc];
  rec.window.activeTextEditor = undefined;
  rec.window.showInputBox = async () => ' a + b';
  replies = { [SERVER_COMMANDS.applyFix]: { fixed: true, message: 'STAR: fixed (2 neurons)' } };
  requests.length = 0;
  rec.messages.length = 0;
  rec.edits.length = 0;
  await rec.commands.get(UI_COMMANDS.markWrong)!({ uri: 'file:///ws/demo.py', position: { line: 1, character: 10 }, completion: ' a - b', accepted: true });
  assert.deepEqual(requests[0].params.arguments, [
    { uri: 'file:///ws/demo.py', position: { line: 1, character: 10 }, completion: ' a - b', fix: ' a + b' },
  ]);
  assert.equal(rec.messages[0].text, `${FIXED_PREFIX}: (2 neurons)`);
  assert.deepEqual([rec.edits[0].range.start, rec.edits[0].range.end].map((p) => [p.line, p.character]), [[1, 10], [1, 16]]);
});

test('mark as wrong with nothing at the cursor explains what to do and sends nothing', async () => {
  const doc = fakeDocument('print(1)\n', 4);
  const p = new Position(0, 3);
  rec.window.activeTextEditor = { document: doc, selection: { isEmpty: true, active: p, start: p, end: p } };
  requests.length = 0;
  rec.messages.length = 0;
  await rec.commands.get(UI_COMMANDS.markWrong)!();
  assert.equal(requests.length, 0);
  assert.match(rec.messages[0].text, /no completion here/);
});

test('undo and patch commands call the protocol commands', async () => {
  replies = { [SERVER_COMMANDS.patchesUndoLast]: { removed: 'p1', message: 'removed patch p1' } };
  requests.length = 0;
  rec.messages.length = 0;
  await rec.commands.get(UI_COMMANDS.undoLastPatch)!();
  assert.deepEqual(requests.map((r) => [r.params.command, r.params.arguments]), [['star.patches.undoLast', []]]);
  assert.equal(rec.messages[0].text, 'STAR: removed patch p1');
  replies = { [SERVER_COMMANDS.patchesUndoLast]: { removed: null, message: 'STAR: no patch to undo' } };
  rec.messages.length = 0;
  await rec.commands.get(UI_COMMANDS.undoLastPatch)!();
  assert.equal(rec.messages[0].text, 'STAR: no patch to undo');
  replies = { [SERVER_COMMANDS.patchesList]: [] };
  requests.length = 0;
  rec.messages.length = 0;
  await rec.commands.get(UI_COMMANDS.showPatches)!();
  assert.deepEqual(requests.map((r) => r.params.command), ['star.patches.list']);
  assert.match(rec.messages[0].text, /no patches yet/);
});

test('deactivate stops the client', async () => {
  await ext.deactivate();
  assert.equal(star.client, undefined);
});
