"""The spec's losses (SPEC.md 4 and 18) in torch, in float32 whatever the logits' dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...spec import IGNORE_INDEX


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy over targets != IGNORE_INDEX, computed in float32 whatever the logits' dtype,
    over the first `vocab_size` logits (SPEC.md 19: padded ids carry no probability)."""
    return F.cross_entropy(logits[..., :vocab_size].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def early_exit_loss(layer_logits: list[torch.Tensor], targets: torch.Tensor, draws: torch.Tensor,
                    vocab_size: int) -> torch.Tensor:
    """SPEC.md 18.3, in float32: at each layer a position still active exits where its draw is below its top
    probability p_max (always at the last layer); it adds conf = -log(1 - p_max) at every layer it is active,
    times its cross-entropy at the layer it exits. Decisions are constants: no gradient flows through them."""
    counted = targets != IGNORE_INDEX
    safe_t = targets.clamp_min(0).unsqueeze(-1)
    active = torch.ones_like(counted)
    total = 0.0
    for i, z in enumerate(layer_logits):
        z = z[..., :vocab_size].float()
        lse = z.logsumexp(-1)
        p_max = torch.exp(z.amax(-1) - lse)
        conf = -torch.log1p(-p_max)
        exits = (draws[i] < p_max.detach()) if i < len(layer_logits) - 1 else torch.ones_like(counted)
        just = active & exits
        xe = lse - z.gather(-1, safe_t).squeeze(-1)
        factor = torch.where(just, xe, torch.ones_like(xe))
        total = total + (factor * conf)[active & counted].sum()
        active = active & ~exits
    return total / counted.sum()
