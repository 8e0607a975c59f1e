/**
 * Building `star.applyFix` / `star.patches.*` arguments and turning results into messages.
 * No `vscode` import: unit-tested with Node's test runner.
 */
import type { FixTarget, Pos } from './store';

/** The ONE argument of `star.applyFix` (docs/protocol.md). */
export interface ApplyFixArgs {
  uri: string;
  position: Pos;
  completion: string;
  fix: string;
}

export function buildApplyFixArgs(uri: string, target: FixTarget, fix: string): ApplyFixArgs {
  return {
    uri,
    position: { line: target.position.line, character: target.position.character },
    completion: target.completion,
    fix,
  };
}

/** `star.applyFix` result (docs/protocol.md). Every field is optional here: old or partial servers. */
export interface ApplyFixResult {
  fixed: boolean;
  message?: string;
  seconds?: number;
  neurons?: number;
  layers?: number[] | number;
  patchId?: string | null;
}

export function parseApplyFixResult(r: unknown): ApplyFixResult {
  if (typeof r !== 'object' || r === null) return { fixed: false, message: 'the server returned no result' };
  const o = r as Record<string, unknown>;
  return {
    fixed: o.fixed === true,
    message: typeof o.message === 'string' ? o.message : undefined,
    seconds: typeof o.seconds === 'number' ? o.seconds : undefined,
    neurons: typeof o.neurons === 'number' ? o.neurons : undefined,
    layers: Array.isArray(o.layers) || typeof o.layers === 'number' ? (o.layers as number[] | number) : undefined,
    patchId: typeof o.patchId === 'string' ? o.patchId : null,
  };
}

/**
 * The notification text. It always starts with FIXED_PREFIX or NOT_FIXED_PREFIX (stable for
 * tests and users), then the server's message, or numbers when it sent no message.
 */
export const FIXED_PREFIX = 'STAR fixed the completion';
export const NOT_FIXED_PREFIX = 'STAR could not fix the completion';

/** Server messages may start with "STAR:"; the client adds its own prefix. */
export function stripStar(message: string): string {
  return message.replace(/^\s*STAR\b\s*:?\s*/, '').trim();
}

/** "STAR: <message>" for a server message, without saying STAR twice. */
export function starMessage(message: string | undefined, fallback: string): string {
  return `STAR: ${stripStar(message ?? '') || fallback}`;
}

export function formatFixResult(r: ApplyFixResult): string {
  const details: string[] = [];
  // "fixed: 3 neurons…" after our own "fixed the completion" would say it twice
  const message = stripStar(r.message ?? '')
    .replace(/^(not\s+fixed|could\s+not\s+fix|fixed)(\s+the\s+completion)?\b\s*[:,.\-—]?\s*/i, '')
    .trim();
  if (message) details.push(message);
  else {
    if (r.neurons !== undefined) details.push(`${r.neurons} neuron${r.neurons === 1 ? '' : 's'} patched`);
    const nl = Array.isArray(r.layers) ? r.layers.length : r.layers;
    if (nl !== undefined) details.push(`in ${nl} layer${nl === 1 ? '' : 's'}`);
    if (r.seconds !== undefined) details.push(`(${r.seconds.toFixed(1)} s)`);
  }
  const head = r.fixed ? FIXED_PREFIX : NOT_FIXED_PREFIX;
  return details.length ? `${head}: ${details.join(' ')}` : `${head}.`;
}

/**
 * The input box is one line, fixes may be several: `\n` stands for a new line, `\t` for a tab
 * and `\\` for a backslash. escapeForInput(x) is shown, unescapeFromInput(typed) is sent;
 * unescapeFromInput(escapeForInput(x)) === x for every x.
 */
export function escapeForInput(s: string): string {
  return s.replace(/\\/g, '\\\\').replace(/\r?\n/g, '\\n').replace(/\t/g, '\\t');
}

export function unescapeFromInput(s: string): string {
  return s.replace(/\\(\\|n|t)/g, (_m, c: string) => (c === 'n' ? '\n' : c === 't' ? '\t' : '\\'));
}

/** Input box validation: undefined = OK. */
export function validateFix(typed: string, wrong: string): string | undefined {
  const fix = unescapeFromInput(typed);
  if (fix.trim() === '') return 'Type the right code (\\n for a new line).';
  if (fix === wrong) return 'That is the wrong completion itself: type the code it should have been.';
  return undefined;
}

/** `star.patches.list` item (docs/protocol.md). */
export interface PatchInfo {
  id: string;
  enabled: boolean;
  method?: string;
  prompt?: string;
  completion?: string;
  fix?: string;
  neurons?: number;
  layers?: number[] | number;
  created?: string | number;
}

export function parsePatchList(r: unknown): PatchInfo[] {
  if (!Array.isArray(r)) return [];
  return r
    .filter((p): p is Record<string, unknown> => typeof p === 'object' && p !== null && typeof (p as { id?: unknown }).id === 'string')
    .map((p) => ({
      id: p.id as string,
      enabled: p.enabled !== false,
      method: typeof p.method === 'string' ? p.method : undefined,
      prompt: typeof p.prompt === 'string' ? p.prompt : undefined,
      completion: typeof p.completion === 'string' ? p.completion : undefined,
      fix: typeof p.fix === 'string' ? p.fix : undefined,
      neurons: typeof p.neurons === 'number' ? p.neurons : undefined,
      layers: Array.isArray(p.layers) || typeof p.layers === 'number' ? (p.layers as number[] | number) : undefined,
      created: typeof p.created === 'string' || typeof p.created === 'number' ? p.created : undefined,
    }));
}

/** One line, shortened with an ellipsis; new lines shown as ⏎. */
export function oneLine(s: string, max = 60): string {
  const flat = s.replace(/\r?\n/g, ' ⏎ ').replace(/\t/g, ' ');
  return flat.length > max ? flat.slice(0, max - 1) + '…' : flat;
}

/** The end of a prompt, one line. */
export function promptTail(s: string, max = 50): string {
  const flat = s.replace(/\r?\n/g, ' ⏎ ');
  return flat.length > max ? '…' + flat.slice(flat.length - max + 1) : flat;
}

export interface PatchPickItem {
  id: string;
  label: string;
  description: string;
  detail: string;
}

export function patchPickItems(patches: PatchInfo[]): PatchPickItem[] {
  // stack order: the newest last on the server; show the newest first
  return [...patches].reverse().map((p) => {
    const nl = Array.isArray(p.layers) ? p.layers.length : p.layers;
    const bits = [p.enabled ? 'enabled' : 'disabled', p.method, p.neurons !== undefined ? `${p.neurons} neurons` : undefined,
      nl !== undefined ? `${nl} layers` : undefined, p.id];
    return {
      id: p.id,
      label: `${p.enabled ? '$(check)' : '$(circle-slash)'} ${oneLine(p.fix ?? p.id, 50)}`,
      description: bits.filter((b) => b !== undefined).join(' · '),
      detail: `was: ${oneLine(p.completion ?? '?', 40)}   after: ${promptTail(p.prompt ?? '?')}`,
    };
  });
}

/** `$/progress` (WorkDoneProgress begin/report/end) → what to pass to vscode's progress.report. */
export interface ProgressStep {
  message?: string;
  increment?: number;
}

export class ProgressTracker {
  private last = 0;
  step(v: unknown): ProgressStep | undefined {
    if (typeof v !== 'object' || v === null) return undefined;
    const o = v as { kind?: unknown; message?: unknown; title?: unknown; percentage?: unknown };
    if (o.kind !== 'begin' && o.kind !== 'report' && o.kind !== 'end') return undefined;
    const out: ProgressStep = {};
    if (typeof o.message === 'string' && o.message !== '') out.message = o.message;
    else if (o.kind === 'begin' && typeof o.title === 'string') out.message = o.title;
    const pct = o.kind === 'end' ? 100 : typeof o.percentage === 'number' ? Math.max(0, Math.min(100, o.percentage)) : undefined;
    if (pct !== undefined && pct > this.last) {
      out.increment = pct - this.last;
      this.last = pct;
    }
    return out.message === undefined && out.increment === undefined ? undefined : out;
  }
}
