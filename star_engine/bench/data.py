"""Benchmark data: JSON Lines records -> repair cases, their other phrasings, and control prompts.

Prompt templates, one per dataset kind, the same for every method:

    python (CoNaLa)       "# {intent}\n"                 the target is the next line of code
    bash   (NL2Bash)      "#!/bin/bash\n# {intent}\n"    the target is the next line of the script
    asm    (Shellcode)    "; {intent}\n"                 NASM comment, then the instruction(s)

The kind is guessed from the file path (conala / nl2bash / shellcode) unless given.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..capture import encode, encode_case, target_text
from ..case import RepairCase
from ..generate import first_line_ids, writes_fix
from ..model import LoadedModel

TEMPLATES = {
    "python": "# {intent}\n",
    "bash": "#!/bin/bash\n# {intent}\n",
    "asm": "; {intent}\n",
}
MAX_TARGET_TOKENS = 48      # longer targets are skipped to keep a run CI-sized
CONTROL_TOKENS = 24         # a control's reference continuation: its greedy first line, at most this long


def guess_kind(path: str | Path) -> str:
    p = str(path).lower()
    if "nl2bash" in p or "bash" in p:
        return "bash"
    if "shellcode" in p or "asm" in p:
        return "asm"
    return "python"


def prompt_for(kind: str, intent: str) -> str:
    return TEMPLATES[kind].format(intent=intent)


def load_records(path: str | Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if not isinstance(r, dict) or not r.get("intent") or not r.get("target"):
                raise ValueError(f"{path}:{n}: a record needs non-empty 'intent' and 'target'")
            records.append(r)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


@dataclass
class Scored:
    """A prompt and the continuation whose tokens are scored by teacher forcing."""

    prompt_ids: tuple[int, ...]
    cont_ids: tuple[int, ...]


@dataclass
class BenchCase:
    record: dict
    case: RepairCase
    alternates: list[Scored] = field(default_factory=list)   # other phrasings, same target


@dataclass
class BenchData:
    kind: str
    cases: list[BenchCase]
    controls: list[Scored]
    checked: int          # records looked at to find the cases
    already_right: int    # ... of which the model already wrote the target
    too_long: int         # ... of which the target was over MAX_TARGET_TOKENS


def _alternates(lm: LoadedModel, kind: str, record: dict, by_target: dict[str, list[dict]]) -> list[Scored]:
    intents = []
    alt = record.get("intent_alt")
    if alt and alt != record["intent"]:
        intents.append(alt)
    for other in by_target.get(record["target"], []):
        if other["intent"] != record["intent"] and other["intent"] not in intents:
            intents.append(other["intent"])
    cont = tuple(encode(lm, target_text(record["target"])))
    return [Scored(tuple(encode(lm, prompt_for(kind, i))), cont) for i in intents]


def build(lm: LoadedModel, records: list[dict], *, kind: str, limit: int, seed: int, n_controls: int,
          max_target_tokens: int = MAX_TARGET_TOKENS, progress=None) -> BenchData:
    """Cases: the first `limit` records, after a seeded shuffle, whose target fits and that the model gets
    wrong (its greedy completion is not the target). Controls: a seeded sample of the other records."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    by_target: dict[str, list[dict]] = {}
    for r in records:
        by_target.setdefault(r["target"], []).append(r)
    cases, checked, right, too_long, used = [], 0, 0, 0, set()
    for idx in order:
        if len(cases) >= limit:
            break
        r = records[idx]
        checked += 1
        case = RepairCase(prompt=prompt_for(kind, r["intent"]), fix=r["target"])
        enc = encode_case(lm, case)
        if len(enc.target_ids) > max_target_tokens:
            too_long += 1
            continue
        if writes_fix(lm, enc)[0]:
            right += 1
            continue
        used.add(idx)
        cases.append(BenchCase(r, case, _alternates(lm, kind, r, by_target)))
        if progress:
            progress()
    case_targets = {c.record["target"] for c in cases}
    pool = [i for i in range(len(records)) if i not in used and records[i]["target"] not in case_targets]
    sample = sorted(random.Random(seed + 1).sample(pool, min(n_controls, len(pool))))
    controls = []
    for i in sample:
        p = tuple(encode(lm, prompt_for(kind, records[i]["intent"])))
        line = tuple(first_line_ids(lm, p, CONTROL_TOKENS))
        if line:
            controls.append(Scored(p, line))
    return BenchData(kind, cases, controls, checked, right, too_long)
