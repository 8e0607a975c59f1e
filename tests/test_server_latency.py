"""The server's latency machinery end to end (a real server on the tiny model, a real LSP client): a
completion its budget cut goes on in the background, so the next request at that spot, or after the user
took what was shown, is answered from what is already computed — and with the very text a plain greedy
decode writes. (That a later request re-uses the fed tokens themselves, beyond what the cache holds, is
tests/test_decode.py's.)"""

from __future__ import annotations

import asyncio

from lsprotocol import types

from lsp_harness import command, end_of, inline, open_doc, tiny_server
from star_engine.decode import Decoder
from star_engine.generate import complete_prompt
from star_engine.model import load_model
from star_server.prompting import Context, build_prompt, postprocess

TEXT = "def add(a, b):\n    return a + b\n\nprint(add"


def expected_completion(model_dir, text: str) -> str:
    """The server's pipeline in this process: prompt, healing, one plain decode, post-processing."""
    lm = load_model(str(model_dir))
    prompt = build_prompt(Context.at(text, len(text), 384), lm.tokenizer)
    return postprocess(complete_prompt(Decoder(lm), prompt.text, max_new_tokens=prompt.max_new_tokens,
                                       heal=prompt.heal, speculate=False).text, prompt)


def change(client, uri: str, version: int, at: types.Position, text: str) -> None:
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[types.TextDocumentContentChangePartial(range=types.Range(start=at, end=at), text=text)],
    ))


async def test_a_cut_completion_continues_in_the_background(tiny_model_dir, tmp_path):
    full = expected_completion(tiny_model_dir, TEXT)
    assert len(full) > 8, "the tiny model writes a long line here"
    async with tiny_server(tiny_model_dir, tmp_path, options={"latencyBudgetMs": 1}) as client:
        uri = "file:///tmp/cut.py"
        open_doc(client, uri, TEXT)
        cut = await inline(client, uri, end_of(TEXT), automatic=True)
        partial = cut.items[0].insert_text
        assert partial and len(partial) < len(full) and full.startswith(partial)
        stats = await command(client, "star.stats")
        for _ in range(600):   # the background decode of a tiny model takes well under a second
            if stats["continued"]:
                break
            await asyncio.sleep(0.05)
            stats = await command(client, "star.stats")
        assert stats["continued"] == 1 and stats["truncated"] == 1
        # asked again at the same spot (invoked: never cut): the whole line, from the cache
        again = await inline(client, uri, end_of(TEXT))
        assert [i.insert_text for i in again.items] == [full]
        assert (await command(client, "star.stats"))["cached"] == stats["cached"] + 1
        # the user took the partial line: the rest, from the cache too (typing-forward), nothing decoded
        change(client, uri, 2, end_of(TEXT), partial)
        rest = await inline(client, uri, end_of(TEXT + partial), automatic=True)
        after = await command(client, "star.stats")
        assert [i.insert_text for i in rest.items] == [full[len(partial):]]
        assert (after["generated"], after["cached"]) == (stats["generated"], stats["cached"] + 2)
