"""The LoRA fine-tuning baseline's math: low-rank adapters on the FFN output projections, trained with the
same token loss and per-failure step budget as STAR, then merged into the base weights.

    W_l' = W_l + (alpha / r) * B_l A_l        A_l (r x d_ff) random, B_l (d x r) zero at the start
    L    = CE(logits at the last position of the context c_i, t_i)       Adam on (A_l, B_l) only

Merging turns the adapters into an ordinary dense weight delta on the output projections, so the driver
sees (and saves, undoes, verifies) it like any other patch; no peft wrapper stays in the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def lora_adapters(model: nn.Module, target_modules: list[str], rank: int, alpha: float, fan_in_fan_out: bool,
                  seed: int) -> Iterator[list[nn.Parameter]]:
    """Inject LoRA adapters into `model` in place; yields their trainable parameters. On a normal exit the
    adapters are merged into the base weights, on an exception they are dropped; either way the model is
    left without any peft module or attribute."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=target_modules,
                        fan_in_fan_out=fan_in_fan_out, init_lora_weights=True)
    had_peft_config = hasattr(model, "peft_config")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    try:
        yield params
    except BaseException:
        peft_model.unload()
        raise
    else:
        with torch.no_grad():
            peft_model.merge_and_unload()
    finally:
        if not had_peft_config and hasattr(model, "peft_config"):
            del model.peft_config
