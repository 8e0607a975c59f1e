/**
 * Every identifier shared with the server (docs/protocol.md) and every UI command ID, in one place.
 * No `vscode` import: unit-tested with Node's test runner.
 */

/** Server commands (`workspace/executeCommand`), docs/protocol.md "Commands". */
export const SERVER_COMMANDS = {
  applyFix: 'star.applyFix',
  completionAccepted: 'star.completion.accepted',
  patchesList: 'star.patches.list',
  patchesUndoLast: 'star.patches.undoLast',
  patchesSetEnabled: 'star.patches.setEnabled',
  patchesRemove: 'star.patches.remove',
  patchesImport: 'star.patches.import',
  patchesExport: 'star.patches.export',
} as const;

/**
 * UI commands registered by the extension. They must never equal a server command ID:
 * vscode-languageclient registers every command the server lists in `executeCommandProvider`
 * as a VS Code command itself, and a second registration of the same ID throws.
 */
export const UI_COMMANDS = {
  markWrong: 'starRepair.markWrong',
  undoLastPatch: 'starRepair.undoLastPatch',
  showPatches: 'starRepair.showPatches',
  importAdapter: 'starRepair.importAdapter',
  exportPatch: 'starRepair.exportPatch',
  toggle: 'starRepair.toggle',
  showLog: 'starRepair.showLog',
  restartServer: 'starRepair.restartServer',
} as const;

/** Server → client notification, docs/protocol.md "Notifications". */
export const STATUS_NOTIFICATION = 'star/status';

/** The configuration section (settings `star.*`, also sent in `workspace/didChangeConfiguration`). */
export const CONFIG_SECTION = 'star';

export const CLIENT_ID = 'star';
export const CLIENT_NAME = 'STAR';
