import { test } from 'node:test';
import assert from 'node:assert/strict';
import { READY_TEXT, StatusState, parseServerStatus, statusView } from '../logic/status';

const st = (o: Partial<StatusState>): StatusState => ({ phase: 'running', pending: 0, enabled: true, ...o });
const srv = (kind: string, message = '') => parseServerStatus({ busy: false, kind, message });

test('parseServerStatus accepts the protocol shape and rejects others', () => {
  assert.deepEqual(parseServerStatus({ busy: true, kind: 'loading', message: 'm' }), { busy: true, kind: 'loading', message: 'm' });
  assert.deepEqual(parseServerStatus({ kind: 'generating' }), { busy: true, kind: 'generating', message: '' });
  assert.equal(parseServerStatus({ kind: 'sleeping' }), undefined);
  assert.equal(parseServerStatus(null), undefined);
  assert.equal(parseServerStatus('ready'), undefined);
});

test('the ready text is stable: "$(check) STAR ready"', () => {
  assert.equal(READY_TEXT, 'STAR ready');
  const v = statusView(st({ server: srv('ready') }));
  assert.equal(v.kind, 'ready');
  assert.equal(v.text, '$(check) STAR ready');
  assert.equal(v.severity, 'normal');
  assert.match(v.tooltip, /Click to show the STAR log/);
});

test('ready only once the client runs AND the server said ready', () => {
  assert.equal(statusView(st({ phase: 'starting' })).kind, 'starting');
  assert.equal(statusView(st({ phase: 'starting', server: srv('ready') })).kind, 'starting');
  assert.equal(statusView(st({ phase: 'starting', server: srv('loading') })).kind, 'loading');
  assert.equal(statusView(st({})).kind, 'loading');
  assert.equal(statusView(st({ server: srv('loading', 'SmolLM2') })).text, '$(loading~spin) STAR loading');
});

test('each server kind maps to its own text', () => {
  const texts = new Set<string>();
  for (const k of ['loading', 'ready', 'generating', 'repairing', 'slow', 'error']) {
    const v = statusView(st({ server: srv(k, 'why') }));
    assert.equal(v.kind, k);
    assert.ok(v.text.includes('STAR'));
    texts.add(v.text);
  }
  assert.equal(texts.size, 6);
  assert.equal(statusView(st({ server: srv('error', 'boom') })).severity, 'error');
  assert.match(statusView(st({ server: srv('error', 'boom') })).tooltip, /boom/);
  assert.equal(statusView(st({ server: srv('slow') })).severity, 'normal');
  assert.equal(statusView(st({ phase: 'stopped' })).severity, 'warning');
});

test('local generating, off, stopped and failed', () => {
  assert.equal(statusView(st({ server: srv('ready'), pending: 1 })).kind, 'generating');
  assert.equal(statusView(st({ server: srv('ready'), enabled: false })).kind, 'off');
  assert.equal(statusView(st({ server: srv('repairing'), enabled: false })).kind, 'repairing');
  assert.equal(statusView(st({ phase: 'stopped', server: srv('ready') })).kind, 'stopped');
  const f = statusView(st({ phase: 'failed', error: 'no star on PATH' }));
  assert.equal(f.kind, 'error');
  assert.match(f.tooltip, /no star on PATH/);
});
