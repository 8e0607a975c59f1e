"""The patch stack as the server sees it: `star_engine.adapters.PatchStack` (one PEFT adapter directory
per fix in a folder, hot-reloaded), and its entries as the protocol's patch objects."""

from __future__ import annotations

from star_engine.adapters import AdapterError, PatchStack
from star_engine.model import LoadedModel

PatchError = AdapterError   # every refusal of the stack; its message is one line


def open_stack(lm: LoadedModel, folder) -> PatchStack:
    """The PatchStack on `folder` (None: its default folder, $STAR_ADAPTERS_DIR or the user data dir)."""
    return PatchStack(lm, folder)


def info_json(info) -> dict | None:
    """A PatchInfo as the protocol's patch object (plus `name`, `applied`, `problem`, `messages`)."""
    if info is None:
        return None
    case = info.cases[0] if info.cases else None
    prompt, fix = (case.prompt, case.fix) if case else ("", "")
    # The stored case starts the fix with the prompt's healed last token (prompting.py); show the
    # whitespace part of it where the user sees it, at the end of the code before the cursor.
    lead = fix[: len(fix) - len(fix.lstrip())]
    return {
        "id": info.id,
        "enabled": info.enabled,
        "method": info.method,
        "prompt": prompt + lead,
        "completion": (case.wrong or "") if case else "",
        "fix": fix[len(lead):],
        "neurons": info.neurons,
        "layers": list(info.layers),
        "created": info.created,
        "name": info.name,
        "applied": info.applied,
        "problem": info.problem,
        "messages": list(info.messages),
    }
