/**
 * The STAR VS Code extension: starts the star language server over stdio with
 * vscode-languageclient, shows its inline completions (the client's built-in inline completion
 * feature), and lets the user repair the model from a wrong completion.
 *
 * The contract with the server is docs/protocol.md. Pure logic lives in ./logic (no `vscode`
 * import, unit-tested); this file is the VS Code glue.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as vscode from 'vscode';
import {
  DidChangeConfigurationNotification,
  ExecuteCommandRequest,
  LanguageClient,
  LanguageClientOptions,
  MessageType,
  Middleware,
  ServerOptions,
  ShowMessageNotification,
  State,
  WorkDoneProgress,
} from 'vscode-languageclient/node';
import { CLIENT_ID, CLIENT_NAME, CONFIG_SECTION, SERVER_COMMANDS, STATUS_NOTIFICATION, UI_COMMANDS } from './logic/ids';
import {
  LaunchContext,
  StarSettings,
  configSection,
  documentSelector,
  findExecutable,
  languageEnabled,
  needsRestart,
  readSettings,
  resolveServerLaunch,
  toInitOptions,
} from './logic/settings';
import { StatusState, parseServerStatus, statusView } from './logic/status';
import { CompletionStore, DocLike, FixTarget, selectionTarget, targetFromServerArgument, visibleCompletion } from './logic/store';
import {
  ApplyFixResult,
  PatchInfo,
  ProgressTracker,
  buildApplyFixArgs,
  escapeForInput,
  formatFixResult,
  oneLine,
  parseApplyFixResult,
  parsePatchList,
  patchPickItems,
  starMessage,
  unescapeFromInput,
  validateFix,
} from './logic/fix';

/** How long after a repair the server's own `window/showMessage` about it is not shown again. */
const SERVER_MESSAGE_GRACE_MS = 3000;

function docLike(d: vscode.TextDocument): DocLike {
  return {
    uri: d.uri.toString(),
    version: d.version,
    getText: () => d.getText(),
    offsetAt: (p) => d.offsetAt(new vscode.Position(p.line, p.character)),
    positionAt: (o) => {
      const p = d.positionAt(o);
      return { line: p.line, character: p.character };
    },
    lineText: (l) => (l >= 0 && l < d.lineCount ? d.lineAt(l).text : ''),
  };
}

function errorText(e: unknown): string {
  if (e instanceof Error) return e.message;
  if (typeof e === 'object' && e !== null && typeof (e as { message?: unknown }).message === 'string') {
    return (e as { message: string }).message;
  }
  return String(e);
}

export class StarExtension implements vscode.Disposable {
  readonly output: vscode.LogOutputChannel;
  readonly statusItem: vscode.StatusBarItem;
  readonly store = new CompletionStore();
  readonly state: StatusState;
  settings: StarSettings;
  client: LanguageClient | undefined;
  private fixesInFlight = 0;
  private quietServerMessagesUntil = 0;
  private starting: Promise<void> | undefined;
  private readonly disposables: vscode.Disposable[] = [];

  constructor() {
    this.settings = this.readSettings();
    this.output = vscode.window.createOutputChannel('STAR', { log: true });
    this.statusItem = vscode.window.createStatusBarItem('starRepair.status', vscode.StatusBarAlignment.Right, 100);
    this.statusItem.name = 'STAR';
    this.statusItem.command = UI_COMMANDS.showLog;
    this.state = { phase: 'starting', pending: 0, enabled: this.settings.enabled };
    this.render();
    this.statusItem.show();
  }

  activate(context: vscode.ExtensionContext): void {
    const reg = (id: string, fn: (...args: unknown[]) => unknown) =>
      this.disposables.push(vscode.commands.registerCommand(id, fn));
    reg(UI_COMMANDS.markWrong, (arg?: unknown) => this.markWrong(arg));
    reg(UI_COMMANDS.undoLastPatch, () => this.undoLastPatch());
    reg(UI_COMMANDS.showPatches, () => this.showPatches());
    reg(UI_COMMANDS.importAdapter, () => this.importAdapter());
    reg(UI_COMMANDS.exportPatch, (id?: unknown) => this.exportPatch(typeof id === 'string' ? id : undefined));
    reg(UI_COMMANDS.toggle, () => this.toggle());
    reg(UI_COMMANDS.showLog, () => this.output.show(true));
    reg(UI_COMMANDS.restartServer, () => this.restart());
    this.disposables.push(
      vscode.workspace.onDidChangeConfiguration((e) => {
        if (e.affectsConfiguration(CONFIG_SECTION)) void this.onSettingsChanged();
      }),
      vscode.workspace.onDidCloseTextDocument((d) => this.store.forget(d.uri.toString())),
    );
    context.subscriptions.push(this);
    void this.start();
  }

  // ---------------------------------------------------------------- server lifecycle

  private readSettings(): StarSettings {
    const cfg = vscode.workspace.getConfiguration(CONFIG_SECTION);
    return readSettings((k) => cfg.get(k));
  }

  private launchContext(): LaunchContext {
    const folders = (vscode.workspace.workspaceFolders ?? []).filter((f) => f.uri.scheme === 'file').map((f) => f.uri.fsPath);
    return { home: os.homedir(), workspaceFolder: folders[0], workspaceFolders: folders, exists: (p) => fs.existsSync(p), platform: process.platform };
  }

  start(): Promise<void> {
    this.starting ??= this.doStart().finally(() => (this.starting = undefined));
    return this.starting;
  }

  private async doStart(): Promise<void> {
    const ctx = this.launchContext();
    const launch = resolveServerLaunch(this.settings, ctx);
    this.state.phase = 'starting';
    this.state.server = undefined;
    this.state.error = undefined;
    this.render();
    const exe = findExecutable(launch.command, process.env, ctx.exists, ctx.platform);
    if (exe === undefined) {
      const why =
        launch.source === 'PATH'
          ? 'no .venv/bin/star in the workspace and no `star` on PATH'
          : `${launch.command} (from ${launch.source}) does not exist`;
      return this.failed(`STAR: cannot find the star server: ${why}. Install star or set "star.serverCommand".`);
    }
    const initializationOptions = toInitOptions(this.settings, ctx);
    this.output.appendLine(`[star] starting ${exe} ${launch.args.join(' ')} (from ${launch.source})`);
    this.output.appendLine(`[star] initializationOptions ${JSON.stringify(initializationOptions)}`);
    // No `transport`: stdio without the `--stdio` argument TransportKind.stdio would append.
    const serverOptions: ServerOptions = {
      command: exe,
      args: launch.args,
      options: { cwd: ctx.workspaceFolder ?? os.homedir(), env: { ...process.env } },
    };
    const clientOptions: LanguageClientOptions = {
      documentSelector: documentSelector(this.settings),
      outputChannel: this.output,
      initializationOptions,
      middleware: this.middleware(),
      initializationFailedHandler: (err) => {
        this.output.appendLine(`[star] initialize failed: ${errorText(err)}`);
        return false;
      },
    };
    const client = new LanguageClient(CLIENT_ID, CLIENT_NAME, serverOptions, clientOptions);
    this.client = client;
    client.onNotification(STATUS_NOTIFICATION, (p: unknown) => {
      if (this.client !== client) return;
      const s = parseServerStatus(p);
      if (!s) return;
      if (s.kind === 'error' || s.kind === 'slow') this.output.appendLine(`[star] status ${s.kind}: ${s.message}`);
      this.state.server = s;
      this.render();
    });
    // Replaces the client's default handler: during a repair, the fix command shows the result
    // itself (with actions), so the server's message about it would be a duplicate.
    client.onNotification(ShowMessageNotification.type, (m) => {
      this.output.appendLine(`[server message] ${m.message}`);
      const repairing = this.fixesInFlight > 0 || Date.now() < this.quietServerMessagesUntil;
      if (repairing && m.type !== MessageType.Error) return;
      if (m.type === MessageType.Error) void vscode.window.showErrorMessage(m.message);
      else if (m.type === MessageType.Warning) void vscode.window.showWarningMessage(m.message);
      else if (m.type === MessageType.Info) void vscode.window.showInformationMessage(m.message);
    });
    client.onDidChangeState((e) => {
      if (this.client !== client) return;
      if (e.newState === State.Starting) {
        this.state.phase = 'starting';
        this.state.server = undefined;
      } else if (e.newState === State.Running) {
        this.state.phase = 'running';
      } else if (e.newState === State.Stopped && this.state.phase !== 'failed') {
        this.state.phase = 'stopped';
      }
      this.render();
    });
    try {
      await client.start();
    } catch (e) {
      if (this.client === client) return this.failed(`STAR: the server did not start: ${errorText(e)}`);
      return;
    }
    if (this.client !== client) return;
    this.state.phase = 'running';
    this.render();
  }

  private failed(message: string): void {
    this.output.appendLine(`[star] ${message}`);
    this.state.phase = 'failed';
    this.state.error = message.replace(/^STAR: /, '');
    this.render();
    void vscode.window.showErrorMessage(message, 'Open settings', 'Show log').then((choice) => {
      if (choice === 'Open settings') void vscode.commands.executeCommand('workbench.action.openSettings', 'star.');
      else if (choice === 'Show log') this.output.show(true);
    });
  }

  async stop(): Promise<void> {
    const client = this.client;
    this.client = undefined;
    if (client) {
      try {
        await client.stop(5000);
      } catch (e) {
        this.output.appendLine(`[star] stop: ${errorText(e)}`);
      }
    }
    this.state.phase = 'stopped';
    this.state.server = undefined;
    this.render();
  }

  async restart(): Promise<void> {
    await this.starting?.catch(() => undefined);
    await this.stop();
    await this.start();
  }

  private async onSettingsChanged(): Promise<void> {
    const old = this.settings;
    this.settings = this.readSettings();
    this.state.enabled = this.settings.enabled;
    this.render();
    if (needsRestart(old, this.settings)) {
      this.output.appendLine('[star] settings changed: restarting the server');
      await this.restart();
      return;
    }
    const client = this.client;
    if (client && this.state.phase === 'running') {
      const star = configSection(this.settings, this.launchContext());
      await client.sendNotification(DidChangeConfigurationNotification.type, { settings: { [CONFIG_SECTION]: star } });
    }
  }

  // ---------------------------------------------------------------- completions

  private middleware(): Middleware {
    return {
      provideInlineCompletionItems: async (document, position, context, token, next) => {
        if (!this.settings.enabled || !languageEnabled(this.settings, document.languageId)) return null;
        this.state.pending++;
        this.render();
        try {
          const result = await next(document, position, context, token);
          this.remember(document, position, result);
          return result;
        } finally {
          this.state.pending = Math.max(0, this.state.pending - 1);
          this.render();
        }
      },
      // The server's textDocument/completion is a fallback for clients without inline
      // completion. VS Code has it: asking both would run the model twice per keystroke and
      // pop up the suggest widget, whose Tab would win over the ghost text.
      provideCompletionItem: () => undefined,
    };
  }

  private remember(
    document: vscode.TextDocument,
    position: vscode.Position,
    result: vscode.InlineCompletionItem[] | vscode.InlineCompletionList | null | undefined,
  ): void {
    const items = Array.isArray(result) ? result : result?.items ?? [];
    const first = items[0];
    if (!first) return;
    const insert = typeof first.insertText === 'string' ? first.insertText : first.insertText.value;
    let typed: string | undefined;
    if (first.range && !first.range.start.isEqual(position)) {
      if (!first.range.start.isBefore(position)) return;
      typed = document.getText(new vscode.Range(first.range.start, position));
    }
    const text = visibleCompletion(insert, typed);
    if (text) this.store.remember(docLike(document), { line: position.line, character: position.character }, text);
  }

  // ---------------------------------------------------------------- status bar

  render(): void {
    const v = statusView(this.state);
    this.statusItem.text = v.text;
    this.statusItem.tooltip = v.tooltip;
    this.statusItem.backgroundColor =
      v.severity === 'error'
        ? new vscode.ThemeColor('statusBarItem.errorBackground')
        : v.severity === 'warning'
          ? new vscode.ThemeColor('statusBarItem.warningBackground')
          : undefined;
  }

  // ---------------------------------------------------------------- commands

  private runningClient(): LanguageClient | undefined {
    if (this.client && this.state.phase === 'running') return this.client;
    void vscode.window.showWarningMessage(
      `STAR: the server is not running (${statusView(this.state).kind}). "STAR: Show log" tells why.`,
    );
    return undefined;
  }

  private async exec(client: LanguageClient, command: string, arg?: unknown, token?: vscode.CancellationToken): Promise<unknown> {
    return client.sendRequest(ExecuteCommandRequest.type, { command, arguments: arg === undefined ? [] : [arg] }, token);
  }

  private async guarded(what: string, fn: () => Promise<void>): Promise<void> {
    try {
      await fn();
    } catch (e) {
      this.output.appendLine(`[star] ${what} failed: ${errorText(e)}`);
      void vscode.window.showErrorMessage(`STAR: ${what} failed: ${errorText(e)}`);
    }
  }

  /**
   * "STAR: Mark completion as wrong / provide fix". From the palette or the context menu: no
   * argument, the target comes from the selection or the store of shown completions. From the
   * server's code action: one argument {uri, position, completion, accepted}.
   */
  async markWrong(arg?: unknown): Promise<void> {
    const client = this.runningClient();
    if (!client) return;
    const fromServer = typeof arg === 'object' && arg !== null && typeof (arg as { uri?: unknown }).uri === 'string';
    const editor = vscode.window.activeTextEditor;
    const doc = fromServer
      ? vscode.workspace.textDocuments.find((d) => d.uri.toString() === (arg as { uri: string }).uri)
      : editor?.document;
    if (!doc) {
      void vscode.window.showWarningMessage('STAR: open the file with the wrong completion first.');
      return;
    }
    const dl = docLike(doc);
    let target: FixTarget | undefined;
    if (fromServer) {
      target = targetFromServerArgument(dl, arg);
      if (!target) {
        void vscode.window.showWarningMessage('STAR: that completion is no longer in the document.');
        return;
      }
    } else if (editor && !editor.selection.isEmpty) {
      target = selectionTarget(dl, editor.selection.start, editor.selection.end);
    } else {
      const candidates = editor ? this.store.candidates(dl, editor.selection.active) : [];
      if (candidates.length === 0) {
        void vscode.window.showWarningMessage(
          'STAR: no completion here. Put the cursor where the wrong completion was shown (or right after it, ' +
            'if you accepted it), or select the wrong code.',
        );
        return;
      }
      target = candidates.length === 1 ? candidates[0] : await this.pickTarget(candidates);
      if (!target) return;
    }
    const wrong = target.completion;
    const typed = await vscode.window.showInputBox({
      title: 'STAR: the right code',
      prompt: `Wrong: ${oneLine(wrong, 70)}  —  type what it should have been (\\n = new line)`,
      value: escapeForInput(wrong),
      valueSelection: [0, escapeForInput(wrong).length],
      ignoreFocusOut: true,
      validateInput: (v) => validateFix(v, wrong),
    });
    if (typed === undefined) return;
    const fix = unescapeFromInput(typed);
    const args = buildApplyFixArgs(doc.uri.toString(), target, fix);
    const at = new vscode.Position(target.position.line, target.position.character);
    const range = target.replace
      ? new vscode.Range(target.replace.start.line, target.replace.start.character, target.replace.end.line, target.replace.end.character)
      : new vscode.Range(at, at);
    const before = doc.getText(range);
    this.output.appendLine(`[star] applyFix ${JSON.stringify(args)}`);

    let result: ApplyFixResult;
    let cancelled = false;
    this.fixesInFlight++;
    try {
      result = await vscode.window.withProgress(
        { location: vscode.ProgressLocation.Notification, title: 'STAR: repairing the model', cancellable: true },
        async (progress, token) => {
          token.onCancellationRequested(() => (cancelled = true));
          progress.report({ message: `${oneLine(wrong, 30)} → ${oneLine(fix, 30)}` });
          const workDoneToken = `starRepair.applyFix.${Date.now()}`;
          const tracker = new ProgressTracker();
          const sub = client.onProgress(WorkDoneProgress.type, workDoneToken, (v) => {
            const step = tracker.step(v);
            if (step) progress.report(step);
          });
          try {
            const r = await client.sendRequest(
              ExecuteCommandRequest.type,
              { command: SERVER_COMMANDS.applyFix, arguments: [args], workDoneToken },
              token,
            );
            return parseApplyFixResult(r);
          } finally {
            sub.dispose();
          }
        },
      );
    } catch (e) {
      if (cancelled) {
        void vscode.window.showInformationMessage('STAR: repair cancelled.');
      } else {
        this.output.appendLine(`[star] applyFix failed: ${errorText(e)}`);
        void vscode.window.showErrorMessage(`STAR: the repair failed: ${errorText(e)}`);
      }
      return;
    } finally {
      this.fixesInFlight--;
      this.quietServerMessagesUntil = Date.now() + SERVER_MESSAGE_GRACE_MS;
    }
    const message = formatFixResult(result);
    this.output.appendLine(`[star] ${message} ${JSON.stringify(result)}`);
    if (result.fixed) {
      await this.replaceWithFix(doc, range, before, fix);
      void vscode.window.showInformationMessage(message, 'Undo patch', 'Show patches').then((choice) => {
        if (choice === 'Undo patch') void this.undoLastPatch();
        else if (choice === 'Show patches') void this.showPatches();
      });
    } else {
      void vscode.window.showWarningMessage(message, 'Insert fix anyway').then((choice) => {
        if (choice) void this.replaceWithFix(doc, range, before, fix);
      });
    }
  }

  /** Puts the fix where the wrong code is (or was shown), unless the document changed there. */
  private async replaceWithFix(doc: vscode.TextDocument, range: vscode.Range, before: string, fix: string): Promise<void> {
    if (doc.isClosed || doc.getText(range) !== before) {
      this.output.appendLine('[star] the document changed during the repair: the fix is not inserted');
      return;
    }
    const edit = new vscode.WorkspaceEdit();
    edit.replace(doc.uri, range, fix);
    await vscode.workspace.applyEdit(edit);
  }

  private async pickTarget(candidates: FixTarget[]): Promise<FixTarget | undefined> {
    const items = candidates.map((t) => ({
      label: t.source === 'accepted' ? '$(check) The accepted completion' : '$(eye) The completion suggested at the cursor',
      description: oneLine(t.completion, 60),
      target: t,
    }));
    const pick = await vscode.window.showQuickPick(items, { title: 'STAR: which completion is wrong?', ignoreFocusOut: true });
    return pick?.target;
  }

  async undoLastPatch(): Promise<void> {
    const client = this.runningClient();
    if (!client) return;
    await this.guarded('undo', async () => {
      const r = (await this.exec(client, SERVER_COMMANDS.patchesUndoLast)) as { removed?: string | null; message?: string } | null;
      void vscode.window.showInformationMessage(
        starMessage(r?.message, r?.removed ? `removed patch ${r.removed}` : 'no patch to undo'),
      );
    });
  }

  private async listPatches(client: LanguageClient): Promise<PatchInfo[]> {
    return parsePatchList(await this.exec(client, SERVER_COMMANDS.patchesList));
  }

  private async pickPatch(patches: PatchInfo[], title: string): Promise<PatchInfo | undefined> {
    if (patches.length === 0) {
      void vscode.window.showInformationMessage(
        'STAR: no patches yet. "STAR: Mark completion as wrong / provide fix" makes one.',
      );
      return undefined;
    }
    const pick = await vscode.window.showQuickPick(patchPickItems(patches), {
      title,
      matchOnDescription: true,
      matchOnDetail: true,
    });
    return pick ? patches.find((p) => p.id === pick.id) : undefined;
  }

  async showPatches(): Promise<void> {
    const client = this.runningClient();
    if (!client) return;
    await this.guarded('show patches', async () => {
      const patches = await this.listPatches(client);
      const p = await this.pickPatch(patches, `STAR patches (${patches.length}, newest first)`);
      if (!p) return;
      const actions = [
        { label: p.enabled ? '$(circle-slash) Disable' : '$(check) Enable', action: 'toggle' },
        { label: '$(trash) Remove', action: 'remove' },
        { label: '$(export) Export…', action: 'export' },
      ];
      const a = await vscode.window.showQuickPick(actions, { title: `STAR patch ${p.id}` });
      if (!a) return;
      if (a.action === 'toggle') {
        await this.exec(client, SERVER_COMMANDS.patchesSetEnabled, { id: p.id, enabled: !p.enabled });
        void vscode.window.showInformationMessage(`STAR: patch ${p.id} ${p.enabled ? 'disabled' : 'enabled'}.`);
      } else if (a.action === 'remove') {
        const ok = await vscode.window.showWarningMessage(`Remove STAR patch ${p.id}?`, { modal: true }, 'Remove');
        if (ok !== 'Remove') return;
        await this.exec(client, SERVER_COMMANDS.patchesRemove, { id: p.id });
        void vscode.window.showInformationMessage(`STAR: patch ${p.id} removed.`);
      } else {
        await this.exportPatch(p.id);
      }
    });
  }

  async importAdapter(): Promise<void> {
    const client = this.runningClient();
    if (!client) return;
    const kind = await vscode.window.showQuickPick(
      [
        { label: '$(file-zip) A patch archive (.star.zip)', folder: false },
        { label: '$(folder) An adapter folder', folder: true },
      ],
      { title: 'STAR: import what?' },
    );
    if (!kind) return;
    const picked = await vscode.window.showOpenDialog({
      canSelectFiles: !kind.folder,
      canSelectFolders: kind.folder,
      canSelectMany: false,
      openLabel: 'Import',
      filters: kind.folder ? undefined : { 'STAR patch archive': ['zip'] },
    });
    if (!picked || picked.length === 0) return;
    await this.guarded('import', async () => {
      const r = (await this.exec(client, SERVER_COMMANDS.patchesImport, { path: picked[0].fsPath })) as { id?: string; message?: string } | null;
      void vscode.window.showInformationMessage(starMessage(r?.message, `imported patch ${r?.id ?? ''}`.trim()));
    });
  }

  async exportPatch(id?: string): Promise<void> {
    const client = this.runningClient();
    if (!client) return;
    await this.guarded('export', async () => {
      if (id === undefined) {
        const p = await this.pickPatch(await this.listPatches(client), 'STAR: export which patch?');
        if (!p) return;
        id = p.id;
      }
      const dir = vscode.workspace.workspaceFolders?.[0]?.uri.fsPath ?? os.homedir();
      const uri = await vscode.window.showSaveDialog({
        defaultUri: vscode.Uri.file(path.join(dir, `${id.replace(/[^\w.-]+/g, '_')}.star.zip`)),
        filters: { 'STAR patch archive': ['zip'] },
        saveLabel: 'Export',
      });
      if (!uri) return;
      const r = (await this.exec(client, SERVER_COMMANDS.patchesExport, { id, path: uri.fsPath })) as { path?: string } | null;
      void vscode.window.showInformationMessage(`STAR: exported patch ${id} to ${r?.path ?? uri.fsPath}`);
    });
  }

  async toggle(): Promise<void> {
    const cfg = vscode.workspace.getConfiguration(CONFIG_SECTION);
    const info = cfg.inspect<boolean>('enabled');
    const target =
      info?.workspaceFolderValue !== undefined
        ? vscode.ConfigurationTarget.WorkspaceFolder
        : info?.workspaceValue !== undefined
          ? vscode.ConfigurationTarget.Workspace
          : vscode.ConfigurationTarget.Global;
    const next = !this.settings.enabled;
    await cfg.update('enabled', next, target);
    void vscode.window.showInformationMessage(`STAR: completions ${next ? 'on' : 'off'}.`);
  }

  dispose(): void {
    for (const d of this.disposables.splice(0)) d.dispose();
    this.statusItem.dispose();
    this.output.dispose();
  }
}

let extension: StarExtension | undefined;

export function activate(context: vscode.ExtensionContext): StarExtension {
  extension = new StarExtension();
  extension.activate(context);
  return extension;
}

export async function deactivate(): Promise<void> {
  const e = extension;
  extension = undefined;
  await e?.stop();
}
