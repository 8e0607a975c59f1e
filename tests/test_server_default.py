"""The language server on the real default model (SmolLM2-135M): a completion, and the issue's
end-to-end repair: the model writes something else after "# Reverse the list `a`", the user marks it
wrong and types `a.reverse()`, STAR patches the model with progress, and the next completion there is
the fix."""

from __future__ import annotations

import pytest
import pytest_asyncio
from lsprotocol import types

from lsp_harness import apply_the_demo_fix, command, end_of, inline, inline_text, open_doc, ready_client, server_command

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
    reply, before, at = await apply_the_demo_fix(client, tmp_path / "adapters", "file:///tmp/reverse.py")
    assert (await command(client, "star.patches.undoLast"))["removed"] == reply["patchId"]
    assert await inline_text(client, "file:///tmp/reverse.py", at) == before
