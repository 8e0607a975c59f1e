"""What flows between the pipeline stages: a repair case, its token form, and one failing point."""

from __future__ import annotations

from dataclasses import dataclass


class RepairInputError(ValueError):
    """The request cannot be repaired as given (empty fix, already right, too long, ...)."""


@dataclass(frozen=True)
class RepairCase:
    """One user fix: the code before the cursor, the right code, and what the model wrote instead."""

    prompt: str
    fix: str
    wrong: str | None = None

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "fix": self.fix, "wrong": self.wrong}


@dataclass(frozen=True)
class EncodedCase:
    """A case as token ids. `target_ids` is the fix followed by the end of its line, so that a repaired
    model not only writes the fix but also stops there."""

    case: RepairCase
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    target_text: str

    @property
    def ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.target_ids

    def context(self, position: int) -> tuple[int, ...]:
        """Prompt + the first `position` target tokens: the context that predicts target token `position`."""
        return self.prompt_ids + self.target_ids[:position]

    @property
    def multiline(self) -> bool:
        return "\n" in self.case.fix.strip("\n")


@dataclass(frozen=True)
class FailurePoint:
    """A teacher-forced position where the current model's argmax is not the target token."""

    case_index: int
    position: int
    context_ids: tuple[int, ...]
    target: int
    predicted: int
