/**
 * Settings (`star.*`) → server start command, `initializationOptions`, document selector.
 * No `vscode` import: unit-tested with Node's test runner.
 */
import * as path from 'node:path';

export type Multiline = 'auto' | 'always' | 'never';

export interface StarSettings {
  enabled: boolean;
  enabledLanguages: string[];
  serverCommand: string;
  pythonPath: string;
  model: string;
  adaptersDir: string;
  maxTokens: number;
  multiline: Multiline;
  debounceMs: number;
  repairMethod: string;
}

export const DEFAULT_SETTINGS: StarSettings = {
  enabled: true,
  enabledLanguages: ['python'],
  serverCommand: '',
  pythonPath: '',
  model: '',
  adaptersDir: '',
  maxTokens: 48,
  multiline: 'auto',
  debounceMs: 0,
  repairMethod: 'star',
};

/** Reads settings through a getter such as `vscode.workspace.getConfiguration('star').get`. */
export function readSettings(get: (key: string) => unknown): StarSettings {
  const str = (k: keyof StarSettings): string => {
    const v = get(k);
    return typeof v === 'string' ? v.trim() : (DEFAULT_SETTINGS[k] as string);
  };
  const int = (k: keyof StarSettings, min: number): number => {
    const v = get(k);
    return typeof v === 'number' && Number.isFinite(v) ? Math.max(min, Math.round(v)) : (DEFAULT_SETTINGS[k] as number);
  };
  const langs = get('enabledLanguages');
  const multiline = str('multiline');
  return {
    enabled: typeof get('enabled') === 'boolean' ? (get('enabled') as boolean) : DEFAULT_SETTINGS.enabled,
    enabledLanguages: Array.isArray(langs)
      ? langs.filter((l): l is string => typeof l === 'string' && l.trim() !== '').map((l) => l.trim())
      : [...DEFAULT_SETTINGS.enabledLanguages],
    serverCommand: str('serverCommand'),
    pythonPath: str('pythonPath'),
    model: str('model'),
    adaptersDir: str('adaptersDir'),
    maxTokens: int('maxTokens', 1),
    multiline: (['auto', 'always', 'never'] as const).includes(multiline as Multiline)
      ? (multiline as Multiline)
      : DEFAULT_SETTINGS.multiline,
    debounceMs: int('debounceMs', 0),
    repairMethod: str('repairMethod') || DEFAULT_SETTINGS.repairMethod,
  };
}

export interface PathContext {
  home: string;
  /** fsPath of the first workspace folder, if any. */
  workspaceFolder?: string;
}

/** Expands `~`, `${userHome}` and `${workspaceFolder}` in a path setting. */
export function expandPath(p: string, ctx: PathContext): string {
  let out = p.trim();
  if (out === '') return out;
  if (out === '~' || out.startsWith('~/') || out.startsWith('~\\')) out = ctx.home + out.slice(1);
  out = out.replace(/\$\{userHome\}/g, ctx.home);
  if (ctx.workspaceFolder !== undefined) out = out.replace(/\$\{workspaceFolder\}/g, ctx.workspaceFolder);
  return out;
}

/** The keys of docs/protocol.md's `initializationOptions` table. Empty strings are left out (server default). */
export interface InitOptions {
  model?: string;
  adaptersDir?: string;
  maxTokens: number;
  multiline: Multiline;
  debounceMs: number;
  repairMethod: string;
}

export function toInitOptions(s: StarSettings, ctx: PathContext): InitOptions {
  const o: InitOptions = {
    maxTokens: s.maxTokens,
    multiline: s.multiline,
    debounceMs: s.debounceMs,
    repairMethod: s.repairMethod,
  };
  if (s.model) o.model = looksLikePath(s.model) ? expandPath(s.model, ctx) : s.model;
  if (s.adaptersDir) o.adaptersDir = expandPath(s.adaptersDir, ctx);
  return o;
}

function looksLikePath(s: string): boolean {
  return s.startsWith('~') || s.includes('/') || s.includes('\\') || s.includes('${');
}

export interface ServerLaunch {
  command: string;
  args: string[];
  /** Human-readable origin, for the log and error messages. */
  source: 'star.serverCommand' | 'star.pythonPath' | 'workspace .venv' | 'PATH';
}

export interface LaunchContext extends PathContext {
  /** fsPaths of all workspace folders, first one first. */
  workspaceFolders: string[];
  exists: (p: string) => boolean;
  platform: string;
}

/**
 * Which server to start:
 * 1. `star.serverCommand` → `<cmd> serve`
 * 2. `star.pythonPath` → `<python> -m star_server`
 * 3. the first workspace folder with `.venv/bin/star` (`.venv\Scripts\star.exe` on Windows) → `<that> serve`
 * 4. `star serve` from PATH.
 * The language client adds no transport argument: stdio is the default (see extension.ts).
 */
export function resolveServerLaunch(s: StarSettings, ctx: LaunchContext): ServerLaunch {
  if (s.serverCommand) return { command: expandPath(s.serverCommand, ctx), args: ['serve'], source: 'star.serverCommand' };
  if (s.pythonPath) return { command: expandPath(s.pythonPath, ctx), args: ['-m', 'star_server'], source: 'star.pythonPath' };
  const win = ctx.platform === 'win32';
  const rel = win ? path.win32.join('.venv', 'Scripts', 'star.exe') : path.posix.join('.venv', 'bin', 'star');
  for (const folder of ctx.workspaceFolders) {
    const candidate = win ? path.win32.join(folder, rel) : path.posix.join(folder, rel);
    if (ctx.exists(candidate)) return { command: candidate, args: ['serve'], source: 'workspace .venv' };
  }
  return { command: 'star', args: ['serve'], source: 'PATH' };
}

/** Whether inline completions are wanted for a language. `*` enables every language. */
export function languageEnabled(s: Pick<StarSettings, 'enabledLanguages'>, languageId: string): boolean {
  return s.enabledLanguages.includes('*') || s.enabledLanguages.includes(languageId);
}

export interface DocumentFilter {
  scheme: string;
  language?: string;
}

/** Documents synchronised with the server: files and untitled buffers of the enabled languages. */
export function documentSelector(s: Pick<StarSettings, 'enabledLanguages'>): DocumentFilter[] {
  const schemes = ['file', 'untitled'];
  if (s.enabledLanguages.includes('*')) return schemes.map((scheme) => ({ scheme }));
  return s.enabledLanguages.flatMap((language) => schemes.map((scheme) => ({ scheme, language })));
}


/**
 * Settings for `workspace/didChangeConfiguration` (`{settings: {star: …}}`): the init option keys.
 * `model` / `adaptersDir` are left out when empty; a change from set to empty restarts the
 * server instead (see needsRestart), so the server never has to interpret "".
 */
export function configSection(s: StarSettings, ctx: PathContext): InitOptions {
  return toInitOptions(s, ctx);
}

/** Settings whose change needs a new server process (or a new document selector). */
export function needsRestart(a: StarSettings, b: StarSettings): boolean {
  return (
    a.serverCommand !== b.serverCommand ||
    a.pythonPath !== b.pythonPath ||
    a.enabledLanguages.join('\u0000') !== b.enabledLanguages.join('\u0000') ||
    (a.model !== '' && b.model === '') ||
    (a.adaptersDir !== '' && b.adaptersDir === '')
  );
}

/**
 * Whether a command can be started: an absolute/relative path must exist; a bare name must be
 * found in PATH. Returns the resolved file or undefined.
 */
export function findExecutable(
  command: string,
  env: { PATH?: string; PATHEXT?: string },
  exists: (p: string) => boolean,
  platform: string,
): string | undefined {
  const win = platform === 'win32';
  const p = win ? path.win32 : path.posix;
  const exts = win ? ['', ...(env.PATHEXT ?? '.EXE;.CMD;.BAT').split(';').filter(Boolean)] : [''];
  if (command.includes('/') || (win && command.includes('\\'))) {
    return exts.map((e) => command + e).find(exists);
  }
  for (const dir of (env.PATH ?? '').split(win ? ';' : ':')) {
    if (!dir) continue;
    for (const e of exts) {
      const candidate = p.join(dir, command + e);
      if (exists(candidate)) return candidate;
    }
  }
  return undefined;
}
