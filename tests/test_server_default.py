"""The language server on the real default model (SmolLM2-135M): a completion, and the issue's
end-to-end repair: the model writes something else after "# Reverse the list `a`", the user marks it
wrong and types `a.reverse()`, STAR patches the model with progress, and the next completion there is
the fix."""

from __future__ import annotations

import pytest
import pytest_asyncio
from lsprotocol import types

from lsp_harness import (
    FIX,
    FIX_PROMPT,
    command,
    end_of,
    fix_args,
    inline,
    inline_text,
    open_doc,
    ready_client,
    server_command,
)

pytestmark = pytest.mark.slow


@pytest_asyncio.fixture
async def client(tmp_path):
    async with ready_client(server_command(None, tmp_path / "adapters"), ready_timeout=600) as c:
        yield c


async def test_default_model_completes_code(client):
    text = "import os\n\nfor root, dirs, files in os."
    open_doc(client, "file:///tmp/walk.py", text)
    result = await inline(client, "file:///tmp/walk.py", end_of(text))
    (item,) = result.items
    assert item.insert_text.startswith("walk(")
    assert "\n" not in item.insert_text
    assert item.range == types.Range(start=end_of(text), end=end_of(text))


async def test_apply_fix_on_the_default_model_end_to_end(client, tmp_path):
    uri = "file:///tmp/reverse.py"
    open_doc(client, uri, FIX_PROMPT)
    at = end_of(FIX_PROMPT)
    before = await inline_text(client, uri, at)
    assert before != FIX

    reply = await command(client, "star.applyFix", fix_args(uri, at, before or "", FIX))
    assert reply["fixed"], reply
    (reports,) = client.progress_reports.values()
    assert isinstance(reports[0], types.WorkDoneProgressBegin)
    assert any(isinstance(r, types.WorkDoneProgressReport) for r in reports)
    assert isinstance(reports[-1], types.WorkDoneProgressEnd) and reports[-1].message == "fixed"
    assert any(m.type == types.MessageType.Info and m.message.startswith("STAR fixed") for m in client.messages)

    assert await inline_text(client, uri, at) == FIX
    assert (tmp_path / "adapters" / reply["patchId"]).is_dir()

    assert (await command(client, "star.patches.undoLast"))["removed"] == reply["patchId"]
    assert await inline_text(client, uri, at) == before
