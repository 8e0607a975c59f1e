"""A patch is a set of column deltas on FFN output projections, kept exactly so that it can be saved,
re-applied on another copy of the base model, and undone bit for bit."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .arch import Arch


@dataclass
class LayerDelta:
    columns: torch.Tensor   # (k,) neuron indices, ascending
    delta: torch.Tensor     # (d, k): new write vectors minus old ones


@dataclass
class Patch:
    layers: dict[int, LayerDelta] = field(default_factory=dict)

    @property
    def n_neurons(self) -> int:
        return sum(len(ld.columns) for ld in self.layers.values())

    @property
    def layer_ids(self) -> list[int]:
        return sorted(self.layers)


@dataclass
class SavedColumns:
    """The original values of the columns a patch touched: restoring them is an exact undo."""

    columns: dict[int, tuple[torch.Tensor, torch.Tensor]]   # layer -> (indices, original (d, k))


class WeightSnapshot:
    """A copy of every output-projection weight, taken before a repair."""

    def __init__(self, arch: Arch):
        self.arch = arch
        self.original = {l: arch.columns(l).detach().clone() for l in range(arch.n_layers)}

    @torch.no_grad()
    def restore(self) -> None:
        for l, w in self.original.items():
            self.arch.columns(l).copy_(w)

    @torch.no_grad()
    def diff(self) -> Patch:
        patch = Patch()
        for l, before in self.original.items():
            after = self.arch.columns(l)
            cols = (after != before).any(dim=0).nonzero().flatten()
            if len(cols):
                patch.layers[l] = LayerDelta(cols, (after[:, cols] - before[:, cols]).clone())
        return patch

    def saved_columns(self, patch: Patch) -> SavedColumns:
        return SavedColumns({l: (ld.columns, self.original[l][:, ld.columns].clone()) for l, ld in patch.layers.items()})


@torch.no_grad()
def apply_patch(arch: Arch, patch: Patch) -> SavedColumns:
    """W[:, cols] += delta for every layer; returns the columns as they were, for an exact undo."""
    saved = {}
    for l, ld in patch.layers.items():
        cols = arch.columns(l)
        saved[l] = (ld.columns, cols[:, ld.columns].clone())
        cols[:, ld.columns] += ld.delta.to(cols.dtype)
    return SavedColumns(saved)


@torch.no_grad()
def restore_columns(arch: Arch, saved: SavedColumns) -> None:
    for l, (idx, values) in saved.columns.items():
        arch.columns(l)[:, idx] = values
