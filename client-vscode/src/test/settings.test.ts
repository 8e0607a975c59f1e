import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  DEFAULT_SETTINGS,
  StarSettings,
  configSection,
  documentSelector,
  expandPath,
  findExecutable,
  languageEnabled,
  needsRestart,
  readSettings,
  resolveServerLaunch,
  toInitOptions,
} from '../logic/settings';

const ctx = { home: '/home/u', workspaceFolder: '/ws', workspaceFolders: ['/ws', '/ws2'], platform: 'linux' };
const s = (o: Partial<StarSettings> = {}): StarSettings => ({ ...DEFAULT_SETTINGS, ...o });

test('readSettings: defaults for missing or malformed values', () => {
  assert.deepEqual(readSettings(() => undefined), DEFAULT_SETTINGS);
  const bad: Record<string, unknown> = { enabled: 'yes', maxTokens: 'x', multiline: 'sometimes', enabledLanguages: 'python', repairMethod: '' };
  assert.deepEqual(readSettings((k) => bad[k]), DEFAULT_SETTINGS);
});

test('readSettings: values are trimmed, clamped and rounded', () => {
  const v: Record<string, unknown> = {
    enabled: false, enabledLanguages: [' python ', '', 'go', 3], serverCommand: ' /x/star ', maxTokens: 0, debounceMs: 12.6,
    multiline: 'never', repairMethod: 'mint', model: ' m ',
  };
  const r = readSettings((k) => v[k]);
  assert.equal(r.enabled, false);
  assert.deepEqual(r.enabledLanguages, ['python', 'go']);
  assert.equal(r.serverCommand, '/x/star');
  assert.equal(r.maxTokens, 1);
  assert.equal(r.debounceMs, 13);
  assert.equal(r.multiline, 'never');
  assert.equal(r.repairMethod, 'mint');
  assert.equal(r.model, 'm');
});

test('toInitOptions: the protocol keys, empty strings left out, paths expanded', () => {
  assert.deepEqual(toInitOptions(s(), ctx), { maxTokens: 48, multiline: 'auto', debounceMs: 0, repairMethod: 'star' });
  const o = toInitOptions(s({ model: '~/models/x.gguf', adaptersDir: '${workspaceFolder}/.star', maxTokens: 10, multiline: 'always', debounceMs: 50, repairMethod: 'lora' }), ctx);
  assert.deepEqual(o, { model: '/home/u/models/x.gguf', adaptersDir: '/ws/.star', maxTokens: 10, multiline: 'always', debounceMs: 50, repairMethod: 'lora' });
  assert.equal(toInitOptions(s({ model: 'smollm2-135m' }), ctx).model, 'smollm2-135m');
  assert.deepEqual(Object.keys(configSection(s({ model: 'a' }), ctx)).sort(), ['debounceMs', 'maxTokens', 'model', 'multiline', 'repairMethod']);
});

test('expandPath', () => {
  assert.equal(expandPath('~', ctx), '/home/u');
  assert.equal(expandPath('~/a', ctx), '/home/u/a');
  assert.equal(expandPath('${userHome}/b', ctx), '/home/u/b');
  assert.equal(expandPath('a~b', ctx), 'a~b');
  assert.equal(expandPath('${workspaceFolder}/c', { home: '/h' }), '${workspaceFolder}/c');
});

test('resolveServerLaunch: serverCommand > pythonPath > workspace .venv > PATH', () => {
  const none = { ...ctx, exists: () => false };
  assert.deepEqual(resolveServerLaunch(s({ serverCommand: '~/bin/star', pythonPath: '/py' }), none),
    { command: '/home/u/bin/star', args: ['serve'], source: 'star.serverCommand' });
  assert.deepEqual(resolveServerLaunch(s({ pythonPath: '/venv/bin/python' }), none),
    { command: '/venv/bin/python', args: ['-m', 'star_server'], source: 'star.pythonPath' });
  const second = { ...ctx, exists: (p: string) => p === '/ws2/.venv/bin/star' };
  assert.deepEqual(resolveServerLaunch(s(), second), { command: '/ws2/.venv/bin/star', args: ['serve'], source: 'workspace .venv' });
  assert.deepEqual(resolveServerLaunch(s(), none), { command: 'star', args: ['serve'], source: 'PATH' });
  const win = { home: 'C:\\u', workspaceFolders: ['C:\\ws'], platform: 'win32', exists: (p: string) => p === 'C:\\ws\\.venv\\Scripts\\star.exe' };
  assert.equal(resolveServerLaunch(s(), win).command, 'C:\\ws\\.venv\\Scripts\\star.exe');
});

test('findExecutable', () => {
  const files = new Set(['/usr/bin/star', '/abs/star']);
  const exists = (p: string) => files.has(p);
  assert.equal(findExecutable('star', { PATH: '/bin:/usr/bin' }, exists, 'linux'), '/usr/bin/star');
  assert.equal(findExecutable('nope', { PATH: '/bin:/usr/bin' }, exists, 'linux'), undefined);
  assert.equal(findExecutable('/abs/star', {}, exists, 'linux'), '/abs/star');
  assert.equal(findExecutable('/abs/missing', { PATH: '/abs' }, exists, 'linux'), undefined);
  assert.equal(findExecutable('star', { PATH: 'C:\\b', PATHEXT: '.EXE' }, (p) => p === 'C:\\b\\star.EXE', 'win32'), 'C:\\b\\star.EXE');
});

test('languages: enabled list, * and the document selector', () => {
  assert.equal(languageEnabled(s(), 'python'), true);
  assert.equal(languageEnabled(s(), 'go'), false);
  assert.equal(languageEnabled(s({ enabledLanguages: ['*'] }), 'go'), true);
  assert.equal(languageEnabled(s({ enabledLanguages: [] }), 'python'), false);
  assert.deepEqual(documentSelector(s()), [{ scheme: 'file', language: 'python' }, { scheme: 'untitled', language: 'python' }]);
  assert.deepEqual(documentSelector(s({ enabledLanguages: ['*'] })), [{ scheme: 'file' }, { scheme: 'untitled' }]);
  assert.deepEqual(documentSelector(s({ enabledLanguages: [] })), []);
});

test('needsRestart: server command, languages, model/adapters unset', () => {
  assert.equal(needsRestart(s(), s({ maxTokens: 3, enabled: false, multiline: 'never', repairMethod: 'sgd', model: 'x' })), false);
  assert.equal(needsRestart(s(), s({ serverCommand: '/x' })), true);
  assert.equal(needsRestart(s(), s({ pythonPath: '/py' })), true);
  assert.equal(needsRestart(s(), s({ enabledLanguages: ['python', 'go'] })), true);
  assert.equal(needsRestart(s({ model: 'x' }), s()), true);
  assert.equal(needsRestart(s({ adaptersDir: '/a' }), s()), true);
});
