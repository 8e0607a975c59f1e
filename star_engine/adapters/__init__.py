"""Patches as PEFT adapter files, and the patch stack (persist → accumulate → undo → share → hot-reload).

Public API (used by the CLI and by the language server):

    save_adapter(lm, result, directory, *, name=None) -> Path
        Write one fixed RepairResult as a PEFT LoRA adapter directory (atomic).
    load_adapter(lm, directory) -> Adapter
        Validate (before touching the model) and read an adapter; raises AdapterError(one-line reason).

    class PatchStack(lm, folder):
        lock                          threading.RLock held by every mutation (callers that mutate the model
                                      themselves, e.g. a repair, hold it too)
        load() -> list[str]           apply every enabled patch in manifest order; returns problems found
        add(result) -> PatchInfo      persist a fixed RepairResult (already applied in memory) on top
        list() -> list[PatchInfo]
        set_enabled(id, enabled), remove(id), undo_last() -> PatchInfo | None
        import_(path) -> PatchInfo, export(id, path) -> Path
        verify() -> list[VerifyRow]
        watch(on_change) -> Watcher   hot reload (watchdog); on_change(list[str]) after changes applied

Additions beyond the contract above:

    PatchStack(lm, folder=None, *, max_bytes=512 MiB, check_regressions=True)
        folder=None -> default_folder(): $STAR_ADAPTERS_DIR or platformdirs user_data_dir("star")/adapters
    add(result, *, name=None, keep_going=False), set_enabled(id, enabled, *, keep_going=False),
    import_(path, *, keep_going=False)
        raise RegressionError (an AdapterError, .rows: list[VerifyRow]) when the patch would break a case an
        earlier patch fixed, after restoring the previous weights; keep_going=True applies it anyway and
        puts the regression in PatchInfo.messages.
    sync() -> list[str]               re-read the folder now (what the watcher calls)
    applied -> list[str]              ids whose deltas are in the model, in order
    touched_layers() -> list[int]     layers whose output projection the stack has ever changed
    base_columns(layer) -> Tensor     the unpatched (d, d_ff) weight of a layer
    AdapterFolder(folder)             the same folder without a model (list, enable/disable, remove, export)
    load_adapter(lm, dir, *, base_digest=None, max_bytes=MAX_BYTES)
    AdapterError(ValueError)          every refusal; the message is one line
    ReadOnlyFolderError(AdapterError) a change asked of a folder that cannot be written (it is still read)

See docs/adapters.md for the format, the policies and the guarantees.
"""

from importlib import import_module

# Lazy: `star` imports this package to build its parser; the heavy parts load on first use.
_EXPORTS = {
    "ARCHIVE_SUFFIX": "folder",
    "MANIFEST": "folder",
    "AdapterFolder": "folder",
    "PatchInfo": "folder",
    "ReadOnlyFolderError": "folder",
    "default_folder": "folder",
    "MAX_BYTES": "format",
    "Adapter": "format",
    "AdapterError": "untrusted",
    "load_adapter": "format",
    "save_adapter": "format",
    "PatchStack": "stack",
    "RegressionError": "stack",
    "VerifyRow": "stack",
    "Watcher": "watch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
