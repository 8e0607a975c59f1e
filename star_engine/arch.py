"""Architecture registry: where each model family keeps the parts STAR touches.

STAR only needs four things from a model: its transformer blocks, each block's MLP and the MLP's
output projection (whose *input* is the neuron activation vector and whose weight columns are the
neurons' write vectors), the final norm, and the unembedding. One entry per family, no scattered ifs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    family: str
    blocks: str            # dotted path from the CausalLM to the list of blocks
    mlp: str               # attribute of a block
    out_proj: str          # attribute of the MLP: the FFN output projection
    final_norm: str        # dotted path from the CausalLM
    unembed: str = "lm_head"
    conv1d: bool = False   # GPT-2 Conv1D stores the weight as (d_ff, d): neurons are rows, not columns


# model_type (from the HF config) -> where things are
REGISTRY: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "model.layers", "mlp", "down_proj", "model.norm"),
    "qwen2": ArchSpec("qwen2", "model.layers", "mlp", "down_proj", "model.norm"),
    "mistral": ArchSpec("mistral", "model.layers", "mlp", "down_proj", "model.norm"),
    "gpt2": ArchSpec("gpt2", "transformer.h", "mlp", "c_proj", "transformer.ln_f", conv1d=True),
    "starcoder2": ArchSpec("starcoder2", "model.layers", "mlp", "c_proj", "model.norm"),
    "codegen": ArchSpec("codegen", "transformer.h", "mlp", "fc_out", "transformer.ln_f"),
}


class UnsupportedModel(ValueError):
    pass


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def spec_for(model: nn.Module) -> ArchSpec:
    model_type = getattr(model.config, "model_type", None)
    try:
        return REGISTRY[model_type]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise UnsupportedModel(f"model type {model_type!r} is not supported (known: {known})") from None


class Arch:
    """A model bound to its ArchSpec: typed accessors for the parts STAR reads and edits."""

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None):
        self.model = model
        self.spec = spec or spec_for(model)

    @property
    def n_layers(self) -> int:
        return len(self.blocks())

    def blocks(self) -> nn.ModuleList:
        return _get(self.model, self.spec.blocks)

    def mlp(self, layer: int) -> nn.Module:
        return getattr(self.blocks()[layer], self.spec.mlp)

    def out_proj(self, layer: int) -> nn.Module:
        return getattr(self.mlp(layer), self.spec.out_proj)

    def out_proj_name(self, layer: int) -> str:
        """Module path of the output projection, as PEFT names target modules."""
        return f"{self.spec.blocks}.{layer}.{self.spec.mlp}.{self.spec.out_proj}"

    def weight(self, layer: int) -> torch.Tensor:
        """The output-projection weight W_l as stored (a Parameter)."""
        return self.out_proj(layer).weight

    def columns(self, layer: int) -> torch.Tensor:
        """W_l in the (d, d_ff) layout: column j is neuron j's write vector. A view: edits go through."""
        w = self.weight(layer)
        return w.T if self.spec.conv1d else w

    def as_columns(self, layer: int, tensor: torch.Tensor) -> torch.Tensor:
        """Bring a weight-shaped tensor (e.g. a gradient) into the (d, d_ff) layout."""
        return tensor.T if self.spec.conv1d else tensor

    def final_norm(self) -> nn.Module:
        return _get(self.model, self.spec.final_norm)

    def unembedding(self) -> torch.Tensor:
        return _get(self.model, self.spec.unembed).weight

    @property
    def d_model(self) -> int:
        return self.columns(0).shape[0]

    @property
    def d_ff(self) -> int:
        return self.columns(0).shape[1]
