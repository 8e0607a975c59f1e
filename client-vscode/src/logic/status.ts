/**
 * The status bar item, driven by the server's `star/status` notification (docs/protocol.md).
 * No `vscode` import: unit-tested with Node's test runner.
 *
 * The READY text is a stable signal for tests and users: the item's visible text is
 * "STAR ready" (after a check-mark icon) exactly when the client is running, the server has
 * said `kind: "ready"` and completions are enabled.
 */

export type ServerKind = 'loading' | 'ready' | 'generating' | 'repairing' | 'slow' | 'error';

export interface ServerStatus {
  busy: boolean;
  kind: ServerKind;
  message: string;
}

/** Client-side lifecycle, independent of what the server says. */
export type ClientPhase = 'starting' | 'running' | 'stopped' | 'failed';

export interface StatusState {
  phase: ClientPhase;
  /** The last `star/status` received since the server (re)started. */
  server?: ServerStatus;
  /** Inline completion requests in flight (set by the middleware). */
  pending: number;
  /** `star.enabled`. */
  enabled: boolean;
  /** Error text when `phase` is `failed`. */
  error?: string;
}

export type ViewKind = 'starting' | ServerKind | 'off' | 'stopped';

export interface StatusView {
  kind: ViewKind;
  text: string;
  tooltip: string;
  /** Render with the error / warning background. */
  severity: 'normal' | 'warning' | 'error';
}

export const READY_TEXT = 'STAR ready';

const TEXTS: Record<ViewKind, string> = {
  starting: '$(loading~spin) STAR starting',
  loading: '$(loading~spin) STAR loading',
  ready: `$(check) ${READY_TEXT}`,
  generating: '$(loading~spin) STAR generating',
  repairing: '$(tools) STAR repairing',
  slow: '$(watch) STAR slow',
  error: '$(error) STAR error',
  off: '$(circle-slash) STAR off',
  stopped: '$(debug-disconnect) STAR stopped',
};

const KINDS: readonly ServerKind[] = ['loading', 'ready', 'generating', 'repairing', 'slow', 'error'];

/** Validates a `star/status` payload; unknown shapes give undefined (ignored). */
export function parseServerStatus(p: unknown): ServerStatus | undefined {
  if (typeof p !== 'object' || p === null) return undefined;
  const o = p as Record<string, unknown>;
  if (typeof o.kind !== 'string' || !KINDS.includes(o.kind as ServerKind)) return undefined;
  return {
    kind: o.kind as ServerKind,
    busy: typeof o.busy === 'boolean' ? o.busy : o.kind === 'loading' || o.kind === 'generating' || o.kind === 'repairing',
    message: typeof o.message === 'string' ? o.message : '',
  };
}

export function statusView(s: StatusState): StatusView {
  const kind = viewKind(s);
  const lines: string[] = [];
  switch (kind) {
    case 'starting': lines.push('STAR: starting the language server…'); break;
    case 'stopped': lines.push('STAR: the language server is not running.'); break;
    case 'off': lines.push('STAR: completions are off ("STAR: Toggle completions" turns them on).'); break;
    case 'error': lines.push(`STAR error: ${s.phase === 'failed' ? s.error ?? 'the server failed' : s.server?.message || 'see the log'}`); break;
    default: lines.push(`STAR: ${kind}${s.server?.message ? ` — ${s.server.message}` : ''}`);
  }
  lines.push('Click to show the STAR log.');
  return {
    kind,
    text: TEXTS[kind],
    tooltip: lines.join('\n'),
    // "slow" is common on small CPUs: informative, not alarming (no warning colour)
    severity: kind === 'error' ? 'error' : kind === 'stopped' ? 'warning' : 'normal',
  };
}

function viewKind(s: StatusState): ViewKind {
  if (s.phase === 'failed') return 'error';
  if (s.phase === 'stopped') return 'stopped';
  if (s.phase === 'starting') return s.server?.kind === 'loading' || s.server?.kind === 'error' ? s.server.kind : 'starting';
  // running
  const server = s.server?.kind;
  if (server === undefined) return 'loading'; // started, but the model is not announced ready yet
  if (server === 'loading' || server === 'error' || server === 'repairing') return server;
  if (!s.enabled) return 'off';
  if (server === 'generating' || s.pending > 0) return 'generating';
  return server; // ready | slow
}
