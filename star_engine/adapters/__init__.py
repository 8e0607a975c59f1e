"""Patches as PEFT adapter files, and the patch stack (persist → accumulate → undo → share → hot-reload).

Public API (used by the CLI and by the language server):

    save_adapter(lm, result, directory, *, name=None) -> Path
        Write one fixed RepairResult as a PEFT LoRA adapter directory (atomic).
    load_adapter(lm, directory, *, base_digest=None, max_bytes=MAX_BYTES) -> Adapter
        Validate (before touching the model) and read an adapter; raises AdapterError(one-line reason).

    class PatchStack(lm, folder=None, *, max_bytes=512 MiB, check_regressions=True):
        folder=None -> default_folder(): $STAR_ADAPTERS_DIR or platformdirs user_data_dir("star")/adapters
        lock                          threading.RLock held by every mutation (callers that mutate the model
                                      themselves, e.g. a repair, hold it too)
        load() -> list[str]           apply every enabled patch in manifest order; returns problems found
        sync() -> list[str]           re-read the folder now (what the watcher calls)
        add(result, *, name=None, keep_going=False) -> PatchInfo
                                      persist a fixed RepairResult (already applied in memory) on top
        list() -> list[PatchInfo]
        set_enabled(id, enabled, *, keep_going=False), remove(id), undo_last() -> PatchInfo | None
        import_(path, *, keep_going=False) -> PatchInfo, export(id, path) -> Path
        verify() -> list[VerifyRow]
        watch(on_change) -> Watcher   hot reload (watchdog); on_change(list[str]) after changes applied
        applied -> list[str]          ids whose deltas are in the model, in order
        touched_layers() -> list[int] layers whose output projection the stack has ever changed
        base_columns(layer) -> Tensor the unpatched (d, d_ff) weight of a layer
    add, set_enabled(id, True) and import_ raise RegressionError (an AdapterError, .rows: list[VerifyRow])
    when the patch would break a case an earlier patch fixed, after restoring the previous weights;
    keep_going=True applies it anyway and puts the regression in PatchInfo.messages.

    AdapterFolder(folder)             the same folder without a model (list, enable/disable, remove, export)
    AdapterError(ValueError)          every refusal; the message is one line
    ReadOnlyFolderError(AdapterError) a change asked of a folder that cannot be written (it is still read)

See docs/adapters.md for the format, the policies and the guarantees.
"""

from importlib import import_module

# Lazy: `star` imports this package to build its parser; the heavy parts load on first use.
_MODULES = {
    "folder": ("ARCHIVE_SUFFIX", "MANIFEST", "AdapterFolder", "PatchInfo", "ReadOnlyFolderError", "default_folder"),
    "format": ("MAX_BYTES", "Adapter", "load_adapter", "save_adapter"),
    "untrusted": ("AdapterError",),
    "stack": ("PatchStack", "RegressionError", "VerifyRow"),
    "watch": ("Watcher",),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
