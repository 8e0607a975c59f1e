"""A patch is a set of column deltas on FFN output projections, kept exactly so that it can be saved,
re-applied on another copy of the base model, and undone bit for bit.

Deltas are held at their storage precision (float16, where it fits) before the fix is verified, so that the
weights a repair checks are bit for bit the weights any reload of its adapter gives."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .arch import Arch

STORAGE_DTYPE = torch.float16   # a delta's precision in the adapter file: half of float32, 11 significant bits


def storable(delta: torch.Tensor) -> torch.Tensor:
    """The delta rounded to STORAGE_DTYPE (as float32), or unchanged where a value would not fit it."""
    rounded = delta.to(STORAGE_DTYPE)
    return rounded.to(delta.dtype) if bool(torch.isfinite(rounded).all()) else delta


def is_storable(delta: torch.Tensor) -> bool:
    """True when STORAGE_DTYPE holds every value of the delta exactly."""
    return torch.equal(storable(delta), delta)


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

    @torch.no_grad()
    def settle(self) -> Patch:
        """The change made since the snapshot, rounded to storage precision, and the weights set to exactly
        what applying that patch to the snapshot gives (the same operation as any reload of it)."""
        patch = Patch()
        for l, ld in self.diff().layers.items():
            delta = storable(ld.delta)
            keep = (delta != 0).any(dim=0)
            if bool(keep.any()):
                patch.layers[l] = LayerDelta(ld.columns[keep], delta[:, keep].contiguous())
        self.restore()
        apply_patch(self.arch, patch)
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
