"""Forward hooks that read the neuron activations (the input of each FFN output projection) and that
bypass a layer's MLP for FFN-skip attribution."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

import torch

from .arch import Arch


@contextmanager
def record_activations(arch: Arch, layers: Iterable[int], grads: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """Yields {layer: activations (batch, positions, d_ff)}, filled by the next forward pass.

    With grads=True the activations keep their gradients (for grad x activation scores): the input
    embeddings are made to require grad so that every activation is part of the graph.
    """
    acts: dict[int, torch.Tensor] = {}

    def reader(layer):
        def hook(module, inputs):
            a = inputs[0]
            if grads:
                a.retain_grad()
            acts[layer] = a
        return hook

    with ExitStack() as hooks:   # a hook handle is a context manager: leaving removes it
        for layer in layers:
            hooks.enter_context(arch.out_proj(layer).register_forward_pre_hook(reader(layer)))
        if grads:
            hooks.enter_context(graph_from_the_embeddings(arch.model))
        yield acts


@contextmanager
def record_projections(arch: Arch, layers: Iterable[int]) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Yields {layer: (z, y)}, the input (batch, positions, d_ff; detached) and the output (batch, positions, d)
    of each output projection in the next forward pass. The embeddings require grad, so a gradient with
    respect to y can be taken while no weight requires one."""
    io: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def reader(layer):
        def hook(module, inputs, output):
            io[layer] = (inputs[0].detach(), output)
        return hook

    with ExitStack() as hooks:
        for layer in layers:
            hooks.enter_context(arch.out_proj(layer).register_forward_hook(reader(layer)))
        hooks.enter_context(graph_from_the_embeddings(arch.model))
        yield io


def graph_from_the_embeddings(model):
    """Make the input embeddings require grad, so every activation after them is part of the autograd graph
    even when no parameter requires grad. Returns the hook's handle (remove it to undo)."""
    embed = model.get_input_embeddings()
    return embed.register_forward_hook(lambda m, i, out: out.detach().requires_grad_(True))


@contextmanager
def skip_mlp(arch: Arch, layer: int):
    """Bypass one MLP: its output is replaced by its own (normalised) input, as in the reference method."""
    handle = arch.mlp(layer).register_forward_hook(lambda module, inputs, output: inputs[0])
    try:
        yield
    finally:
        handle.remove()
