"""The spec's losses (SPEC.md 4 and 18) on logits, in float32 whatever the logits' dtype.

    loss = spec_loss(spec, [logits of each scored layer], targets, draws)

Each takes the logits of the layers it scores: the last layer's for loss="final", every layer's
for the all-layer and early-exit losses. Padded vocabulary columns (SPEC.md 19) are cut off here,
so they carry no probability and their rows of wte get exactly zero gradient from the head.
"""
from __future__ import annotations

from tinygrad import Tensor

from ...spec import IGNORE_INDEX, ModelSpec


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over targets != IGNORE_INDEX, in float32 whatever the logits' dtype."""
    nll = logits.float().sparse_categorical_crossentropy(targets, ignore_index=IGNORE_INDEX, reduction="none")
    counted = targets != IGNORE_INDEX
    n = counted.sum()
    # Two-pass mean. tinygrad sums in order: a hundred float32 losses near 7 lose up to ~3e-7 of their
    # mean (measured; torch's cascade sum ~1e-7), while each row is good to ~1e-8. Summing deviations
    # from a first estimate keeps the partial sums small, so the mean is good to ~0.5 ulp; the identity
    # is exact, and the gradient (counted / n per row) does not see the detached estimate.
    rough = (nll.sum() / n).detach()
    return rough + ((nll - rough) * counted).sum() / n


def confidence(z: Tensor) -> Tensor:
    """-log(1 - p_max) of float32 logits z (..., V), p_max the largest softmax probability.

    Why not -log(1 - exp(max - logsumexp)): an untrained model's p_max is ~1/V, and 1 - p_max
    rounded to float32 keeps only ~1e-5 of conf ~ p_max. With s = sum e^(z - max) (so p_max = 1/s)
    and r = s - 1, the sum of the other terms taken directly (no cancellation when p_max -> 1),
    conf = log(s / r) = 2 atanh(w), w = 1 / (s + r): for w <= 1/3 (p_max <= 1/2) atanh's odd series,
    8 terms (truncation < 2e-9 relative); above, log s - log r, both terms adding (conf >= log 2).
    The gradient flows through the max (m = z at the argmax), as the function needs."""
    m = z.max(-1, keepdim=True)
    e = (z - m).exp()
    s = e.sum(-1)
    r = (e * (z < m)).sum(-1) + ((z == m).sum(-1) - 1)  # a tied maximum counts once, as in s - 1
    w = 1 / (s + r)
    w2, series = w * w, 0.0
    for k in range(15, 0, -2):  # Horner: 1 + w2/3 + w2^2/5 + ... + w2^7/15
        series = 1 / k + w2 * series
    return (w <= 1 / 3).where(2 * w * series, s.log() - r.log())


def early_exit(layer_logits: list[Tensor], targets: Tensor, draws: Tensor) -> Tensor:
    """SPEC.md 18.3. A position exits at the first layer l whose draw u[l] < p_max (the last layer
    forces it); every layer it reaches adds conf, the exit layer conf * xe, each over the counted
    positions. The exit decisions and the active mask are constants: no gradient goes through them."""
    counted = targets != IGNORE_INDEX
    active, terms, last = counted, [], len(layer_logits) - 1
    for layer, z in enumerate(layer_logits):
        z = z.float()
        conf = confidence(z)
        xe = z.sparse_categorical_crossentropy(targets, ignore_index=IGNORE_INDEX, reduction="none")
        p_max = (z.max(-1) - z.logsumexp(-1)).exp().detach()
        exits = draws[layer].float() < p_max if layer < last else counted
        terms.append(active.where(exits.where(xe, 1.0) * conf, 0.0))  # xe where it exits
        active = active & exits.logical_not()
    return Tensor.stack(*terms).sum() / counted.sum()


def spec_loss(spec: ModelSpec, layer_logits: list[Tensor], targets: Tensor, draws: Tensor | None = None) -> Tensor:
    """The loss of `spec` (float32 scalar) on each scored layer's logits (B, T, padded_vocab_size)."""
    real = [z[..., :spec.vocab_size] for z in layer_logits]  # SPEC.md 19: padded ids carry no probability
    if spec.loss == "early_exit":
        return early_exit(real, targets, draws)
    losses = [cross_entropy(z, targets) for z in real]  # "final": one layer; the all-layer losses: their sum
    return sum(losses[1:], losses[0])
