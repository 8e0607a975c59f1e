/**
 * Remembers the inline completions the server returned ("shown"), so that
 * "STAR: Mark completion as wrong / provide fix" knows what was wrong and where.
 * No `vscode` import: unit-tested with Node's test runner.
 *
 * Semantics of a fix target (what is sent to `star.applyFix`):
 *  - `position` is where the completion was shown: the server's prompt is the document text
 *    before it. Anything after it — including the wrong completion if it was already accepted —
 *    is not part of the prompt.
 *  - `completion` is the full wrong completion as the server returned it (or the selected text).
 *  - `replace` is the range of the document that holds the wrong code (the accepted completion,
 *    or the part of it typed so far, or the selection); on success the extension replaces it
 *    with the fix. Without `replace` (the completion was only shown as ghost text) the fix is
 *    inserted at `position`.
 */

export interface Pos {
  line: number;
  character: number;
}

/** The part of a text document the store needs (vscode.TextDocument has all of it). */
export interface DocLike {
  readonly uri: string;
  readonly version: number;
  getText(): string;
  offsetAt(p: Pos): number;
  positionAt(offset: number): Pos;
  lineText(line: number): string;
}

export type TargetSource = 'shown' | 'accepted' | 'selection';

export interface FixTarget {
  source: TargetSource;
  position: Pos;
  completion: string;
  replace?: { start: Pos; end: Pos };
}

interface Entry {
  uri: string;
  version: number;
  position: Pos;
  linePrefix: string;
  text: string;
  at: number;
  seq: number;
}

/** A plain copy: `{...p}` would lose the getters of a vscode.Position (its fields are private). */
export function pos(p: Pos): Pos {
  return { line: p.line, character: p.character };
}

function samePos(a: Pos, b: Pos): boolean {
  return a.line === b.line && a.character === b.character;
}

/**
 * The text an inline item shows at `position`. An item may replace a range that starts before
 * the cursor (its insert text then repeats what is typed there); only the part after the cursor
 * is the completion. Returns undefined when the item does not extend the text at the cursor.
 */
export function visibleCompletion(
  insertText: string,
  typedInRange: string | undefined,
): string | undefined {
  if (typedInRange === undefined || typedInRange === '') return insertText;
  return insertText.startsWith(typedInRange) ? insertText.slice(typedInRange.length) : undefined;
}

export class CompletionStore {
  private entries = new Map<string, Entry[]>();
  private seq = 0;

  constructor(private readonly maxPerDocument = 20) {}

  /** Records a completion shown at `position` of `doc` (empty texts are ignored). */
  remember(doc: DocLike, position: Pos, text: string, now = Date.now()): void {
    if (text === '') return;
    const list = this.entries.get(doc.uri) ?? [];
    const linePrefix = doc.lineText(position.line).slice(0, position.character);
    // same place, same prompt line: the newer one replaces the older
    const kept = list.filter((e) => !(samePos(e.position, position) && e.linePrefix === linePrefix && e.text === text));
    kept.push({ uri: doc.uri, version: doc.version, position: pos(position), linePrefix, text, at: now, seq: ++this.seq });
    while (kept.length > this.maxPerDocument) kept.shift();
    this.entries.set(doc.uri, kept);
  }

  forget(uri: string): void {
    this.entries.delete(uri);
  }

  size(uri: string): number {
    return this.entries.get(uri)?.length ?? 0;
  }

  /**
   * Candidates for the cursor, best first, at most one of each kind:
   *  - `accepted`: a completion whose text (all of it, or a prefix of it that the user typed or
   *    accepted word by word) sits in the document right before the cursor, starting where it
   *    was shown, on an unchanged prompt line;
   *  - `shown`: the newest completion shown exactly at the cursor, in the current document
   *    version (i.e. nothing was typed since: it is, or just was, the ghost text on screen).
   */
  candidates(doc: DocLike, cursor: Pos): FixTarget[] {
    const list = this.entries.get(doc.uri);
    if (!list || list.length === 0) return [];
    const text = doc.getText();
    const c = doc.offsetAt(cursor);
    let accepted: FixTarget | undefined;
    let shown: FixTarget | undefined;
    for (const e of [...list].sort((a, b) => b.seq - a.seq)) {
      if (e.position.line >= lineCount(text)) continue;
      if (doc.lineText(e.position.line).slice(0, e.position.character) !== e.linePrefix) continue;
      if (doc.lineText(e.position.line).length < e.position.character) continue;
      const off = doc.offsetAt(e.position);
      if (c < off || c > off + e.text.length) continue;
      const typed = text.slice(off, c);
      if (typed !== e.text.slice(0, typed.length)) continue;
      if (typed.length === 0) {
        if (!shown && e.version === doc.version) shown = { source: 'shown', position: pos(e.position), completion: e.text };
      } else if (!accepted) {
        accepted = {
          source: 'accepted',
          position: pos(e.position),
          completion: e.text,
          replace: { start: pos(e.position), end: pos(cursor) },
        };
      }
      if (accepted && shown) break;
    }
    return [accepted, shown].filter((t): t is FixTarget => t !== undefined);
  }
}

function lineCount(text: string): number {
  let n = 1;
  for (let i = 0; i < text.length; i++) if (text.charCodeAt(i) === 10) n++;
  return n;
}

/** The target when the user selected the wrong code: the prompt is the text before the selection. */
export function selectionTarget(doc: DocLike, start: Pos, end: Pos): FixTarget {
  const a = doc.offsetAt(start);
  const b = doc.offsetAt(end);
  const [s, e] = a <= b ? [start, end] : [end, start];
  return {
    source: 'selection',
    position: pos(s),
    completion: doc.getText().slice(Math.min(a, b), Math.max(a, b)),
    replace: { start: pos(s), end: pos(e) },
  };
}

/** A minimal DocLike over a string (tests, and the fake document in the extension test). */
export function docFromText(uri: string, text: string, version = 1): DocLike {
  const starts = [0];
  for (let i = 0; i < text.length; i++) if (text[i] === '\n') starts.push(i + 1);
  const lineText = (line: number): string => {
    if (line < 0 || line >= starts.length) return '';
    const end = line + 1 < starts.length ? starts[line + 1] - 1 : text.length;
    return text.slice(starts[line], end).replace(/\r$/, '');
  };
  return {
    uri,
    version,
    getText: () => text,
    lineText,
    offsetAt: (p) => {
      const line = Math.max(0, Math.min(p.line, starts.length - 1));
      return starts[line] + Math.max(0, Math.min(p.character, lineText(line).length));
    },
    positionAt: (o) => {
      const off = Math.max(0, Math.min(o, text.length));
      let line = 0;
      while (line + 1 < starts.length && starts[line + 1] <= off) line++;
      return { line, character: off - starts[line] };
    },
  };
}

/**
 * The argument of the server's "mark as wrong" code action, which runs the UI command
 * `starRepair.markWrong` (server setting markWrongCommand) with
 * `{uri, position, completion, accepted}`: the server's own record of what it showed.
 * Gives the target, with `replace` only when an accepted completion is still in the text.
 */
export function targetFromServerArgument(doc: DocLike, arg: unknown): FixTarget | undefined {
  if (typeof arg !== 'object' || arg === null) return undefined;
  const a = arg as { uri?: unknown; position?: { line?: unknown; character?: unknown }; completion?: unknown; accepted?: unknown };
  if (a.uri !== doc.uri || typeof a.completion !== 'string' || typeof a.position !== 'object' || a.position === null) return undefined;
  const { line, character } = a.position;
  if (typeof line !== 'number' || typeof character !== 'number' || line < 0 || character < 0) return undefined;
  const position = { line, character };
  if (a.accepted !== true) return { source: 'shown', position, completion: a.completion };
  const off = doc.offsetAt(position);
  const there = doc.getText().slice(off, off + a.completion.length) === a.completion;
  return there
    ? { source: 'accepted', position, completion: a.completion, replace: { start: position, end: doc.positionAt(off + a.completion.length) } }
    : { source: 'accepted', position, completion: a.completion };
}
