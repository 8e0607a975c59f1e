/**
 * A `require('vscode')` stand-in for loading the compiled extension in plain Node: the parts the
 * extension uses are real little fakes (recorders), everything else is a catch-all Proxy that is
 * callable and constructible (vscode-languageclient touches many APIs when it loads).
 */
import Module from 'node:module';

type AnyFn = (...args: unknown[]) => unknown;

export function universal(name = 'vscode'): any {
  const cache = new Map<PropertyKey, unknown>();
  const target = function () { /* callable, constructible */ };
  return new Proxy(target, {
    get(_t, prop) {
      if (prop === Symbol.toPrimitive) return () => name;
      if (prop === 'then') return undefined; // not a thenable
      if (prop === 'prototype') return {};
      if (prop === 'toString') return () => name;
      if (!cache.has(prop)) cache.set(prop, universal(`${name}.${String(prop)}`));
      return cache.get(prop);
    },
    set(_t, prop, value) {
      cache.set(prop, value);
      return true;
    },
    apply: () => universal(`${name}()`),
    construct: () => universal(`new ${name}`),
  });
}

/** Like vscode.Position: private fields behind getters, so `{...p}` loses line/character. */
export class Position {
  #line: number;
  #character: number;
  constructor(line: number, character: number) {
    this.#line = line;
    this.#character = character;
  }
  get line(): number { return this.#line; }
  get character(): number { return this.#character; }
  isEqual(o: Position): boolean { return o.line === this.line && o.character === this.character; }
  isBefore(o: Position): boolean { return this.line < o.line || (this.line === o.line && this.character < o.character); }
}

export class Range {
  readonly start: Position;
  readonly end: Position;
  constructor(a: Position | number, b: Position | number, c?: number, d?: number) {
    if (typeof a === 'number') {
      this.start = new Position(a, b as number);
      this.end = new Position(c as number, d as number);
    } else {
      this.start = a;
      this.end = b as Position;
    }
  }
}

export interface Recorder {
  commands: Map<string, AnyFn>;
  settings: Record<string, unknown>;
  messages: { level: string; text: string; items: unknown[] }[];
  edits: { uri: unknown; range: Range; text: string }[];
  statusItems: Record<string, unknown>[];
  window: Record<string, unknown>;
  configListeners: AnyFn[];
}

export function makeVscode(settings: Record<string, unknown>): { api: any; rec: Recorder } {
  const rec: Recorder = { commands: new Map(), settings, messages: [], edits: [], statusItems: [], window: {}, configListeners: [] };
  const disposable = { dispose() {} };
  const message = (level: string) => async (text: string, ...items: unknown[]) => {
    rec.messages.push({ level, text, items });
    return undefined;
  };
  const window = Object.assign(universal('vscode.window'), {
    createOutputChannel: () => Object.assign(universal('output'), { lines: [] as string[] }),
    createStatusBarItem: () => {
      const item: Record<string, unknown> = { show() {}, hide() {}, dispose() {} };
      rec.statusItems.push(item);
      return item;
    },
    showInformationMessage: message('info'),
    showWarningMessage: message('warning'),
    showErrorMessage: message('error'),
    activeTextEditor: undefined,
  });
  rec.window = window;
  class WorkspaceEdit {
    replace(uri: unknown, range: Range, text: string) { rec.edits.push({ uri, range, text }); }
  }
  const api = new Proxy(
    {
      version: '1.91.0',
      Position,
      Range,
      WorkspaceEdit,
      ThemeColor: class { constructor(readonly id: string) {} },
      StatusBarAlignment: { Left: 1, Right: 2 },
      ProgressLocation: { SourceControl: 1, Window: 10, Notification: 15 },
      ConfigurationTarget: { Global: 1, Workspace: 2, WorkspaceFolder: 3 },
      Disposable: class { constructor(private fn?: () => void) {} dispose() { this.fn?.(); } static from() { return disposable; } },
      window,
      commands: Object.assign(universal('vscode.commands'), {
        registerCommand: (id: string, fn: AnyFn) => {
          if (rec.commands.has(id)) throw new Error(`command '${id}' already exists`);
          rec.commands.set(id, fn);
          return { dispose: () => rec.commands.delete(id) };
        },
        executeCommand: async () => undefined,
      }),
      workspace: Object.assign(universal('vscode.workspace'), {
        workspaceFolders: [],
        getConfiguration: () => ({
          get: (k: string) => rec.settings[k],
          inspect: () => ({}),
          update: async (k: string, v: unknown) => {
            rec.settings[k] = v;
            for (const l of rec.configListeners) l({ affectsConfiguration: (s: string) => s === 'star' });
          },
        }),
        onDidChangeConfiguration: (l: AnyFn) => {
          rec.configListeners.push(l);
          return disposable;
        },
        onDidCloseTextDocument: () => disposable,
        applyEdit: async () => true,
      }),
    } as Record<PropertyKey, unknown>,
    {
      get(t, prop) {
        if (!(prop in t)) t[prop] = universal(`vscode.${String(prop)}`);
        return t[prop];
      },
    },
  );
  return { api, rec };
}

/** Makes `require('vscode')` return `api` until the returned function is called. */
export function hookVscode(api: unknown): () => void {
  const M = Module as unknown as { _load: (request: string, ...rest: unknown[]) => unknown };
  const original = M._load;
  M._load = function (request: string, ...rest: unknown[]) {
    if (request === 'vscode') return api;
    return original.call(this, request, ...rest);
  };
  return () => {
    M._load = original;
  };
}
