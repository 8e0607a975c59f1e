"""The SGD baseline's math: plain gradient descent on one failure's token loss (star_method.md §4.4).

    L = CE(logits at the last position of the context c_i, t_i)
    W_l <- W_l - lr * dL/dW_l        for the FFN output projection W_l of every layer

The same trainable set, loss and step budget as STAR; only the update rule differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..base import step_until_right


def descend(
    forward: Callable[[], torch.Tensor],
    params: Sequence[torch.nn.Parameter],
    target: int,
    steps: int,
    lr: float,
    check: Callable[[], None] = lambda: None,
) -> int:
    """Up to `steps` plain SGD steps (no momentum, no weight decay) on one failure's token loss,
    stopping as soon as the argmax is the target. Returns the number of steps taken."""
    opt = torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=0.0)
    return step_until_right(forward, opt, target, steps, check)
