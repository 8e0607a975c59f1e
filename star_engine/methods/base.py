"""The one interface every repair method implements, and typed configs built from user overrides."""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..session import RepairSession


class RepairMethod(ABC):
    """Edits the session's model in place until its cases are fixed or the method's budget is spent.

    The driver (star_engine.repair) owns everything around it, the same for every method: input
    checks, the snapshot, stop-when-fixed verification, restoring the weights on failure, the report.
    """

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()

    @abstractmethod
    def repair(self, session: RepairSession) -> None: ...

    def tightened(self) -> "RepairMethod | None":
        """A more local variant of this method to retry with when a repair moved too much of the model
        (the driver's locality guard); None when there is none."""
        return None


def field_help(config_cls: type) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(config_cls)}


def build_config(config_cls: type, overrides: dict | None):
    """A config from {field: value}, strings coerced to the field's type; unknown keys are an error."""
    overrides = dict(overrides or {})
    hints = typing.get_type_hints(config_cls)
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)} for {config_cls.__name__}; known: {sorted(known)}")
    values = {k: _coerce(hints[k], v, k) for k, v in overrides.items()}
    return config_cls(**values)


def _coerce(hint, value, name):
    if not isinstance(value, str):
        return value
    if hint is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be true or false, not {value!r}")
    if hint in (int, float):
        try:
            return hint(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, not {value!r}") from None
    if typing.get_origin(hint) is typing.Literal and value not in typing.get_args(hint):
        raise ValueError(f"{name} must be one of {typing.get_args(hint)}, not {value!r}")
    return value


def step_until_right(forward: Callable[[], torch.Tensor], opt: torch.optim.Optimizer, target: int, steps: int,
                     check: Callable[[], None] = lambda: None) -> int:
    """Up to `steps` optimiser steps on CE(forward(), target), stopping as soon as the argmax is the
    target (the gradient baselines' shared loop). `forward` returns the last-position logits. Returns
    the number of steps taken."""
    label = torch.tensor(target)
    for step in range(steps):
        check()
        opt.zero_grad(set_to_none=True)
        logits = forward()
        if int(logits.argmax()) == target:
            return step
        F.cross_entropy(logits, label).backward()
        opt.step()
    return steps
