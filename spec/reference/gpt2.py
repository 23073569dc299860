"""The GPT-2 architecture (SPEC.md sections 3, 10 and 14-19) in float64: forward with caches, backward.

Every sub-layer is a forward returning (out, cache) and a backward taking d out. A block's backward
writes its parameters' gradients into a fresh dict that the caller adds into the total, so a block
applied several times (blocks="shared") or a head applied at every layer (the all-layer losses)
sums its gradients over its applications, as autodiff does.
"""
from __future__ import annotations

import math

import numpy as np

from ..checks import IGNORE_INDEX
from .ops import (
    causal_attention_backward, causal_attention_forward, cross_entropy_backward, cross_entropy_forward,
    gelu_tanh_backward, gelu_tanh_forward, linear_backward, linear_forward, norm_backward, norm_forward,
)


def split_heads(x, n_head):
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def attention_sink(spec, p, h):
    """The sink logit per head of SPEC.md 10.1, or None for the standard softmax."""
    if spec.attention == "softmax":
        return None
    if spec.attention == "learned_sinks":
        return p[h + "attn.sinks"]
    c = 1.0 if spec.attention == "softmax1" else spec.softmax_c
    return np.full(spec.n_head, math.log(c))


def block_prefix(spec, layer: int) -> str:
    """The parameters layer `layer` applies: its own, or with blocks="shared" the one block h.0 (SPEC.md 16)."""
    return f"h.{layer if spec.blocks == 'independent' else 0}."


# -- sub-layers -------------------------------------------------------------------
def _attention_forward(spec, p, h, x):
    qkv, c_attn = linear_forward(x, p[h + "attn.c_attn.weight"], p.get(h + "attn.c_attn.bias"))
    scale, sink = 1.0 / math.sqrt(spec.head_dim), attention_sink(spec, p, h)
    if spec.attention_values == "identity":  # SPEC.md 17: every head reads the input x itself
        q, k = (split_heads(t, spec.n_head) for t in np.split(qkv, 2, axis=-1))
        y, attn = causal_attention_forward(q, k, x[:, None], scale, sink)  # (B, H, T, C)
        y = y.sum(1) if spec.head_reduce == "sum" else y.mean(1)
        return y, (c_attn, attn, None)
    q, k, v = (split_heads(t, spec.n_head) for t in np.split(qkv, 3, axis=-1))
    y, attn = causal_attention_forward(q, k, v, scale, sink)
    y, proj = linear_forward(merge_heads(y), p[h + "attn.c_proj.weight"], p.get(h + "attn.c_proj.bias"))
    return y, (c_attn, attn, proj)


def _attention_backward(spec, h, dy, cache, grads):
    c_attn, attn, proj = cache
    if proj is None:
        H = spec.n_head
        dyh = np.broadcast_to(dy[:, None], (dy.shape[0], H) + dy.shape[1:])
        dq, dk, dv, d_sink = causal_attention_backward(dyh if spec.head_reduce == "sum" else dyh / H, attn)
        dx_values = dv.sum(1)  # x was broadcast over the heads
        dqkv = np.concatenate([merge_heads(dq), merge_heads(dk)], axis=-1)
    else:
        dy, grads[h + "attn.c_proj.weight"], grads[h + "attn.c_proj.bias"] = linear_backward(dy, proj)
        dq, dk, dv, d_sink = causal_attention_backward(split_heads(dy, spec.n_head), attn)
        dx_values = 0.0
        dqkv = np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)
    if spec.attention == "learned_sinks":
        grads[h + "attn.sinks"] = d_sink
    dx, grads[h + "attn.c_attn.weight"], grads[h + "attn.c_attn.bias"] = linear_backward(dqkv, c_attn)
    return dx + dx_values


def _mlp_forward(p, h, x):
    m, fc = linear_forward(x, p[h + "mlp.c_fc.weight"], p.get(h + "mlp.c_fc.bias"))
    m, gelu = gelu_tanh_forward(m)
    m, proj = linear_forward(m, p[h + "mlp.c_proj.weight"], p.get(h + "mlp.c_proj.bias"))
    return m, (fc, gelu, proj)


def _mlp_backward(h, dm, cache, grads):
    fc, gelu, proj = cache
    dm, grads[h + "mlp.c_proj.weight"], grads[h + "mlp.c_proj.bias"] = linear_backward(dm, proj)
    dm = gelu_tanh_backward(dm, gelu)
    dx, grads[h + "mlp.c_fc.weight"], grads[h + "mlp.c_fc.bias"] = linear_backward(dm, fc)
    return dx


# -- blocks (SPEC.md 16: the update forms) ------------------------------------------
def _block_forward(spec, p, h, x):
    """-> out, mid (the block's intermediate stream, SPEC.md 16.2), cache. x is the block input."""
    def ln(name, t):
        return norm_forward(spec, p, h + name, t)

    def attn(t):
        return _attention_forward(spec, p, h, t)

    def mlp(t):
        return _mlp_forward(p, h, t)

    c = {}
    form = spec.block_form
    if form == "sequential":          # y = x + A(ln1 x); out = y + M(ln2 y)
        a, c["ln_1"] = ln("ln_1", x)
        a, c["attn"] = attn(a)
        mid = x + a
        m, c["ln_2"] = ln("ln_2", mid)
        m, c["mlp"] = mlp(m)
        return mid + m, mid, c
    if form in ("parallel", "multiplicative"):  # both read x: x + c_a A(ln1 x) + M(ln2 x); x + A(ln1 x) * M(ln2 x)
        a, c["ln_1"] = ln("ln_1", x)
        a, c["attn"] = attn(a)
        m, c["ln_2"] = ln("ln_2", x)
        m, c["mlp"] = mlp(m)
        if form == "parallel":
            mid = x + spec.parallel_attn_scale * a
            return mid + m, mid, c
        c["a"], c["m"] = a, m
        return x + a * m, a * m, c
    # the residual-through-norm forms: the normed input, not x, is (part of) what flows on
    n, c["ln_1"] = ln("ln_1", x)
    a, c["attn"] = attn(n)
    mid = (n if form == "normed_residual" else x) + a
    m, c["ln_2"] = ln("ln_2", mid)
    m, c["mlp"] = mlp(m)
    if form == "normed_residual":     # y = ln1 x + A(ln1 x); out = y + M(ln2 y)
        return mid + m, mid, c
    if form == "escape_normed":       # y = x + A(ln1 x); out = ln1 x + M(ln2 y)
        return n + m, mid, c
    return x + m, mid, c              # escape_residual: y = x + A(ln1 x); out = x + M(ln2 y)


def _block_backward(spec, h, dout, c, grads):
    """d block input from d out; the block's parameter gradients go into `grads` (a fresh dict)."""
    def ln(name, d):
        return norm_backward(spec, h + name, d, c[name], grads)

    def attn(d):
        return _attention_backward(spec, h, d, c["attn"], grads)

    def mlp(d):
        return _mlp_backward(h, d, c["mlp"], grads)

    form = spec.block_form
    if form == "sequential":
        dmid = dout + ln("ln_2", mlp(dout))
        return dmid + ln("ln_1", attn(dmid))
    if form == "parallel":
        return dout + ln("ln_1", attn(spec.parallel_attn_scale * dout)) + ln("ln_2", mlp(dout))
    if form == "multiplicative":
        return dout + ln("ln_1", attn(dout * c["m"])) + ln("ln_2", mlp(dout * c["a"]))
    dmid = ln("ln_2", mlp(dout))
    if form == "normed_residual":
        dmid = dmid + dout
        return ln("ln_1", dmid + attn(dmid))
    if form == "escape_normed":
        return dmid + ln("ln_1", dout + attn(dmid))
    return dout + dmid + ln("ln_1", attn(dmid))  # escape_residual


def _accumulate(total, grads):
    for name, g in grads.items():
        if g is not None:  # bias="off": linear_backward's None
            total[name] = total[name] + g if name in total else g


# -- the stack, the head, the losses -------------------------------------------------------------
def _stack_forward(spec, p, tokens):
    """-> the residual streams [h_0 (embeddings), h_1, ..., h_L], the mids, the block caches."""
    T = tokens.shape[1]
    hs, mids, caches = [p["wte.weight"][tokens] + p["wpe.weight"][:T]], [], []
    for layer in range(spec.n_layer):
        out, mid, c = _block_forward(spec, p, block_prefix(spec, layer), hs[-1])
        hs.append(out)
        mids.append(mid)
        caches.append(c)
    return hs, mids, caches


def _head_forward(spec, p, x):
    """ln_f, then the LM head tied to the token embedding: logits (B, T, padded_vocab_size)."""
    xf, ln_f = norm_forward(spec, p, "ln_f", x)
    return xf @ p["wte.weight"].T, (ln_f, xf)


def _head_backward(spec, p, dlogits, cache, grads):
    ln_f, xf = cache
    V, C = p["wte.weight"].shape
    grads["wte.weight"] = dlogits.reshape(-1, V).T @ xf.reshape(-1, C)
    return norm_backward(spec, "ln_f", dlogits @ p["wte.weight"], ln_f, grads)


def forward(spec, p, tokens):
    """-> logits (B, T, padded_vocab_size) of the last layer, and the cache for loss_and_grads."""
    hs, mids, caches = _stack_forward(spec, p, tokens)
    logits, head = _head_forward(spec, p, hs[-1])
    return logits, (hs, caches, head)


def residual_stats(spec, p, tokens):
    """SPEC.md 18.4 ("SIZE COMPARISON"): per layer, the mean over (b, t) of the Bessel-corrected std over
    channels of the block input, its intermediate stream, its output, and ln_f of its output."""
    hs, mids, _ = _stack_forward(spec, p, tokens)

    def size(x):
        return float(x.std(-1, ddof=1).mean())

    return {
        "input": np.array([size(h) for h in hs[:-1]]),
        "mid": np.array([size(m) for m in mids]),
        "output": np.array([size(h) for h in hs[1:]]),
        "normed": np.array([size(norm_forward(spec, p, "ln_f", h)[0]) for h in hs[1:]]),
    }


def _real(spec, logits):
    """SPEC.md 19: the loss sees the vocabulary's own logits only; padded ids carry no probability."""
    return logits[..., : spec.vocab_size]


def _padded(spec, d):
    extra = spec.padded_vocab_size - spec.vocab_size
    return np.concatenate([d, np.zeros(d.shape[:-1] + (extra,))], -1) if extra else d


def _early_exit_loss(spec, layer_logits, targets, draws):
    """SPEC.md 18.3 with its gradient: -> value, d value / d logits of every layer."""
    counted = targets != IGNORE_INDEX
    safe_t = np.where(counted, targets, 0)
    active = np.ones(targets.shape, dtype=bool)
    total, grads = 0.0, []
    last = len(layer_logits) - 1
    for layer, z in enumerate(layer_logits):
        z = _real(spec, z)
        zmax = z.max(-1, keepdims=True)
        e = np.exp(z - zmax)
        s = e.sum(-1)
        probs = e / s[..., None]
        p_max = 1.0 / s                                     # = e^{-nll}, nll = lse - max
        conf = -np.log1p(-p_max)                            # -log(1 - p_max)
        xe = np.log(s) + zmax[..., 0] - np.take_along_axis(z, safe_t[..., None], -1)[..., 0]
        exits = draws[layer] < p_max if layer < last else np.ones_like(active)
        just = active & exits
        factor = np.where(just, xe, 1.0)
        w = (active & counted) / counted.sum()
        total += float((w * factor * conf).sum())
        onehot_max = np.zeros_like(z)
        np.put_along_axis(onehot_max, z.argmax(-1)[..., None], 1.0, -1)
        onehot_t = np.zeros_like(z)
        np.put_along_axis(onehot_t, safe_t[..., None], 1.0, -1)
        d_conf = (-p_max / (1.0 - p_max))[..., None] * (probs - onehot_max)   # d conf / d z
        d_xe = probs - onehot_t
        dz = w[..., None] * (factor[..., None] * d_conf + (just * conf)[..., None] * d_xe)
        grads.append(_padded(spec, dz))
        active = active & ~exits
    return total, grads


def _loss(spec, layer_logits, targets, draws):
    if spec.loss == "early_exit":
        return _early_exit_loss(spec, layer_logits, targets, draws)
    total, grads = 0.0, []
    for z in layer_logits:  # "final": one layer; the all-layer losses: the sum over layers
        value, ce = cross_entropy_forward(_real(spec, z), targets)
        total += float(value)
        grads.append(_padded(spec, cross_entropy_backward(ce)))
    return total, grads


def loss_and_grads(spec, p, tokens, targets, draws=None):
    """-> loss, logits of the last layer, every parameter's gradient (SPEC.md 4 and 18)."""
    hs, _, caches = _stack_forward(spec, p, tokens)
    L = spec.n_layer
    scored = [L] if spec.loss == "final" else list(range(1, L + 1))  # which h_l meet the head
    heads = {layer: _head_forward(spec, p, hs[layer]) for layer in scored}
    value, dlogits = _loss(spec, [heads[layer][0] for layer in scored], targets, draws)
    grads: dict[str, np.ndarray] = {}
    dh = [np.zeros_like(h) for h in hs]
    for layer, d in zip(scored, dlogits):
        g = {}
        dh[layer] += _head_backward(spec, p, d, heads[layer][1], g)
        _accumulate(grads, g)
    for layer in range(L, 0, -1):
        g = {}
        d_in = _block_backward(spec, block_prefix(spec, layer - 1), dh[layer], caches[layer - 1], g)
        _accumulate(grads, g)
        if not (spec.loss == "all_layers_local" and layer >= 2):  # SPEC.md 18.2: stop-gradient between layers
            dh[layer - 1] += d_in
    C = p["wte.weight"].shape[1]
    np.add.at(grads["wte.weight"], tokens.reshape(-1), dh[0].reshape(-1, C))  # embedding: scatter-add over ids
    d_wpe = np.zeros_like(p["wpe.weight"])
    d_wpe[: tokens.shape[1]] = dh[0].sum(0)
    grads["wpe.weight"] = d_wpe
    return value, heads[L][0], grads


def exit_probabilities(spec, p, tokens):
    """(n_layer, B, T): p_max of each layer's prediction, the probability that loss="early_exit" exits there."""
    hs, _, _ = _stack_forward(spec, p, tokens)
    out = []
    for h in hs[1:]:
        z = _real(spec, _head_forward(spec, p, h)[0])
        out.append(1.0 / np.exp(z - z.max(-1, keepdims=True)).sum(-1))
    return np.stack(out)
