"""Server settings: the command line gives the defaults, `initializationOptions` and
`workspace/didChangeConfiguration` (section `star`) override them. Keys are the camelCase names of
docs/protocol.md. Bad values never fail a request: they are skipped and reported as one-line problems."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from star_engine.guard import GuardConfig

MULTILINE_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class Settings:
    model: str | None = None           # None: the engine's default model
    adapters_dir: str | None = None    # None: the user data dir
    max_tokens: int = 48               # new tokens for a multi-line completion
    max_line_tokens: int = 24          # new tokens for a single-line completion (also capped by max_tokens)
    context_tokens: int = 384          # prompt budget (prefix + suffix), in tokens
    multiline: str = "auto"
    debounce_ms: int = 0               # server-side debounce of *automatic* completion requests
    latency_budget_ms: int = 500       # automatic single-line completions stop here with a partial line (0: off)
    multiline_budget_ms: int = 350     # automatic multi-line completions show the lines ready by then (0: off)
    speculate: bool = True             # prompt-lookup drafts in decoding (the output is the same either way)
    repair_method: str = "star"
    locality_budget: float = GuardConfig().budget   # a fix may move at most this share of unrelated predictions (1: off)
    mark_wrong_command: str = "starRepair.markWrong"   # client command run by the code action

    def generation_key(self) -> tuple:
        """The settings a completion depends on (part of the cache key)."""
        return (self.max_tokens, self.max_line_tokens, self.context_tokens, self.multiline)

    def updated(self, options: Any, defaults: "Settings | None" = None) -> tuple["Settings", list[str]]:
        """A copy with `options` (a dict of camelCase keys) applied; unknown keys are ignored, null or ""
        puts a key back to its value in `defaults` (the command line's settings)."""
        if options is None:
            return self, []
        if not isinstance(options, dict):
            return self, [f"settings must be an object, got {type(options).__name__}"]
        changes, problems = {}, []
        for key, value in options.items():
            spec = _KEYS.get(key)
            if spec is None:
                continue
            name, check = spec
            if value is None or value == "":
                changes[name] = getattr(defaults or Settings(), name)
                continue
            try:
                changes[name] = check(value)
            except (TypeError, ValueError) as e:
                problems.append(f"setting {key}: {e}")
        return replace(self, **changes), problems

    def to_json(self) -> dict:
        return {_CAMEL[f.name]: getattr(self, f.name) for f in fields(self)}


def _string(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _int_in(low: int, high: int):
    def check(value) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise TypeError(f"expected an integer, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"{value} is outside {low}..{high}")
        return int(value)

    return check


def _boolean(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


def _fraction(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    if not 0 <= value <= 1:
        raise ValueError(f"{value} is outside 0..1")
    return float(value)


def _multiline(value) -> str:
    if value is True:
        return "always"
    if value is False:
        return "never"
    if value not in MULTILINE_MODES:
        raise ValueError(f"expected one of {', '.join(MULTILINE_MODES)}, got {value!r}")
    return value


_KEYS = {
    "model": ("model", _string),
    "adaptersDir": ("adapters_dir", _string),
    "maxTokens": ("max_tokens", _int_in(1, 1024)),
    "maxLineTokens": ("max_line_tokens", _int_in(1, 1024)),
    "contextTokens": ("context_tokens", _int_in(16, 32768)),
    "multiline": ("multiline", _multiline),
    "debounceMs": ("debounce_ms", _int_in(0, 5000)),
    "latencyBudgetMs": ("latency_budget_ms", _int_in(0, 600000)),
    "multilineBudgetMs": ("multiline_budget_ms", _int_in(0, 600000)),
    "speculate": ("speculate", _boolean),
    "repairMethod": ("repair_method", _string),
    "localityBudget": ("locality_budget", _fraction),
    "markWrongCommand": ("mark_wrong_command", _string),
}
_CAMEL = {name: key for key, (name, _) in _KEYS.items()}


def section(settings: Any) -> Any:
    """The `star` section of a didChangeConfiguration payload (which may also be the section itself)."""
    if isinstance(settings, dict) and isinstance(settings.get("star"), dict):
        return settings["star"]
    return settings
