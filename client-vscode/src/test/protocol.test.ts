/**
 * The client's constants against the contract, docs/protocol.md (skipped when the extension is
 * built outside the repository).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { SERVER_COMMANDS, STATUS_NOTIFICATION, UI_COMMANDS } from '../logic/ids';
import { DEFAULT_SETTINGS, toInitOptions } from '../logic/settings';

const DOC = path.resolve(__dirname, '..', '..', '..', 'docs', 'protocol.md');
const doc = fs.existsSync(DOC) ? fs.readFileSync(DOC, 'utf8') : undefined;
const skip = doc === undefined ? 'docs/protocol.md not found' : false;

// The contract is one-way: everything the client sends must be documented; the server may offer
// more (e.g. diagnostics commands and settings the extension does not expose).
test('every server command the client uses is in docs/protocol.md', { skip }, () => {
  const table = doc!.slice(doc!.indexOf('## Commands'), doc!.indexOf('## Notifications'));
  const inDoc = new Set([...table.matchAll(/^\|\s*`(star\.[\w.]+)`/gm)].map((m) => m[1]));
  const missing = Object.values(SERVER_COMMANDS).filter((id) => !inDoc.has(id));
  assert.deepEqual(missing, []);
});

test('no UI command ID is a server command ID', () => {
  const server = new Set<string>(Object.values(SERVER_COMMANDS));
  for (const id of Object.values(UI_COMMANDS)) assert.ok(!server.has(id) && !id.startsWith('star.'), id);
});

test('star/status and the initializationOptions keys are in docs/protocol.md', { skip }, () => {
  assert.ok(doc!.includes('`' + STATUS_NOTIFICATION + '`'));
  const table = doc!.slice(doc!.indexOf('initializationOptions'), doc!.indexOf('## Completions'));
  const keys = new Set([...table.matchAll(/^\|\s*`(\w+)`/gm)].map((m) => m[1]));
  const ours = Object.keys(toInitOptions({ ...DEFAULT_SETTINGS, model: 'm', adaptersDir: '/a' }, { home: '/h' }));
  assert.deepEqual(ours.filter((key) => !keys.has(key)), []);
});
