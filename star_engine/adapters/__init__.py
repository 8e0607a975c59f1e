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
"""
