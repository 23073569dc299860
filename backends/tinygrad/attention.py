"""Attention and the KV cache of the tinygrad backend (SPEC.md 3, 10, 12), shared by GPT-2 and nGPT."""
from __future__ import annotations

import math

from tinygrad import Tensor, UOp, dtypes

from ...spec import InputError, ModelSpec
from ...spec.checks import check_cache_room


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, sink: Tensor | None = None) -> Tensor:
    """softmax(scale * q k^T, causal [, sink]) @ v for (B, H, T, D) queries and (B, H, L, D) keys and
    values, in float32, returned in v's dtype."""
    return (attention_weights(q, k, scale, sink) @ v.float()).cast(v.dtype)


def attention_weights(q: Tensor, k: Tensor, scale: float, sink: Tensor | None = None) -> Tensor:
    """softmax(scale * q k^T, causal [, sink]), float32 (B, H, T, L), for (B, H, T, D) queries and
    (B, H, L, D) keys.

    The T queries are the last T of the L positions (L > T with a KV cache): query i sees keys
    0 .. L-T+i, the causal mask aligned bottom-right (L == T without a cache). A lone query is the
    last position and sees every key, so it needs no mask: L may then be symbolic (a decoding step
    replayed by TinyJit at any position).

    Not Tensor.scaled_dot_product_attention: that casts the scores back to the input dtype before its
    softmax (and has no sinks), while SPEC.md 7 wants the softmax, and the p @ v it feeds, in float32.
    `sink` (H,) is a logit per head that joins every row with a zero value (SPEC.md 10), unscaled.
    """
    B, H, T, _ = q.shape
    L = k.shape[2]
    att = (q.float() @ k.float().transpose(-2, -1)) * scale
    if T > 1:
        att = Tensor.ones(T, L, dtype=dtypes.bool, device=q.device).tril(L - T).where(att, -math.inf)
    if sink is None:
        return att.softmax(-1)
    # The sink as an extra column of the scores, dropped after the softmax (gpt-oss's form). Why this
    # form: softmax subtracts the row max, which now includes the sink, so m = max(z, max_s S) is the
    # stable form of SPEC.md 10 (e^{z-m} <= 1 never overflows, however low the scores); the weights and
    # the sink's share come out of one float32 softmax by the reference's own formula; and the learned
    # sinks' gradient is left to autograd. The sigmoid form y * sigmoid(LSE - z) needs the LSE as a second
    # reduction and rescales y after p @ v. Scores, softmax and p @ v in float32, whatever the dtype
    # (SPEC.md 7): the sink only moves each weight by its share p0 (~1e-3 for softmax_c's c = 1e-3), which
    # probabilities rounded to bfloat16 (8 bits) would blur. The sink joins every query row, cached or not.
    z = sink.float().reshape(1, H, 1, 1).expand(B, H, T, 1)
    return att.cat(z, dim=-1).softmax(-1)[..., :L]


class KVCache:
    """Every layer's keys and values for generation (SPEC.md 12): one (2, B, H, n_positions, D) buffer
    per layer, in the model's dtype, allocated whole as tinygrad's own gpt2 and llm examples do. A call
    writes its keys and values at its positions and attends to the buffer's first n + t; the shapes of
    a decoding step never change, so TinyJit can replay it with the position as a Variable.
    `offset` is the number of positions held; `model(tokens, cache)` advances it."""

    def __init__(self, spec: ModelSpec, batch: int, dtype=dtypes.float32, device: str | None = None):
        self.n_positions, self.batch = spec.n_positions, batch
        shape = (2, batch, spec.n_head, spec.n_positions, spec.head_dim)
        # zeros, not empty: the buffer's tail is never read, but a debugger printing it should not meet NaNs
        self.layers = [Tensor.zeros(*shape, dtype=dtype, device=device).contiguous() for _ in range(spec.n_layer)]
        Tensor.realize(*self.layers)
        self.offset = 0

    def start(self, shape: tuple[int, ...]) -> int:
        """The position of the first of (B, t) new tokens, checking that they fit this cache."""
        B, t = shape
        if B != self.batch:
            raise InputError(f"tokens have {B} rows, the cache holds {self.batch}")
        check_cache_room(self.n_positions, self.offset, t)
        return self.offset


def cached_keys_values(kv: Tensor, k: Tensor, v: Tensor, start: int | UOp) -> tuple[Tensor, Tensor]:
    """Write (B, H, t, D) keys and values into a layer's cache buffer at positions start .. start+t-1
    and return the keys and values of positions 0 .. start+t-1 (symbolic when `start` is a Variable).

    Lazily: an assign to a view makes `kv` read as the buffer after the write, so the whole forward
    stays one graph, realized once with the cache (`Tensor.realize(logits, *kv)`). A realize here
    would not keep the layers below as buffers, and every layer would recompute them (L^2/2 layers)."""
    end = start + k.shape[2]
    kv[:, :, :, start:end].assign(Tensor.stack(k, v).cast(kv.dtype))
    return kv[0, :, :, :end], kv[1, :, :, :end]
