"""The repair's locality guard settings (no heavy imports: the command line's parser reads the defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GuardConfig:
    budget: float = field(
        default=0.01,
        metadata={"help": "largest share of the guard's corpus positions whose next-token argmax a fix may change"},
    )
    tokens: int = field(default=1024, metadata={"help": "corpus positions the guard checks (stat half)"})
    retries: int = field(default=2, metadata={"help": "retries with a tightened method (fewer neurons, stronger protection)"})
    seconds: float = field(default=120.0, metadata={"help": "no retry starts after this many seconds of repair"})


def guard_for(budget: float) -> GuardConfig | None:
    """The guard for a user-facing budget (a share of predictions); 1 or more turns it off."""
    return None if budget >= 1 else GuardConfig(budget=budget)
