"""GPT-2 in plain tinygrad, built from a ModelSpec (SPEC.md sections 2-4), with the attention
variants of section 10 (softmax1, softmax_c, learned sinks) and seed 002's of sections 16-19
(shared blocks, block forms, attention without values, the all-layer and early-exit losses, a
padded vocabulary); nGPT is in ngpt.py, the losses in losses.py.

Attribute paths are the spec's canonical names, so `nn.state.get_state_dict(model)` is a
canonical state; Linear weights are (out, in) as nn.Linear keeps them; the LM head is the
token embedding itself (`wte.weight` used twice, stored once).

    model = GPT(spec)                                  # GPT-2's init law, drawn lazily
    logits = model(tokens)                             # (B, T) int Tensor -> (B, T, padded vocab)
    loss = model.loss(tokens, targets)                 # float32 scalar; early_exit: (tokens, targets, draws)
    grads = loss.gradient(*nn.state.get_parameters(model))

    stats = model.residual_stats(tokens)               # {"input", "mid", "output", "normed"} -> (n_layer,)
    loss, logits, stats = model.loss_logits_and_stats(tokens, targets)   # all three from one forward

    cache = KVCache(model.spec, batch=B, dtype=model.wte.weight.dtype)   # generation (SPEC.md 12)
    logits = model(prompt, cache)                      # positions 0 .. T-1, kept in the cache
    logits = model(next_tokens, cache, last_only=True) # (B, 1) at position T: (B, 1, vocab)
"""
from __future__ import annotations

import math

import numpy as np
from tinygrad import Tensor, UOp, dtypes, nn

from ...spec import ModelSpec, param_table
from ...spec.checks import check_draws_layout, check_target_layout, check_token_layout
from ...spec.params import init_law
from ...weights.format import to_bfloat16_bits
from .attention import KVCache, attention_weights, cached_keys_values, causal_attention
from .losses import spec_loss


STAT_NAMES = ("input", "mid", "output", "normed")  # residual_stats' keys (SPEC.md 18.4), in this order


class CausalSelfAttention:
    def __init__(self, spec: ModelSpec):
        self.n_head = spec.n_head
        # attention_values="identity" (SPEC.md 17): q and k only, every head reads the input x itself, no c_proj
        self.identity, self.head_sum = spec.attention_values == "identity", spec.head_reduce == "sum"
        self.c_attn = nn.Linear(spec.n_embd, (2 if self.identity else 3) * spec.n_embd, bias=spec.bias == "on")
        # SPEC.md 10.1: a learned sink logit per head, or softmax1's / softmax_c's constant ln c, or none
        self.learned_sinks, self.sink_logit = spec.attention == "learned_sinks", spec.sink_logit
        if self.learned_sinks:  # here, so that the state dict keeps the canonical order
            self.sinks = Tensor.zeros(spec.n_head)
        if not self.identity:
            self.c_proj = nn.Linear(spec.n_embd, spec.n_embd, bias=spec.bias == "on")

    def __call__(self, x: Tensor, kv: Tensor | None = None, start: int | UOp = 0) -> Tensor:
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        heads = [t.reshape(B, T, H, D).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2)]
        # identity values: the cache keeps x itself as the values, in the heads' layout (the same C numbers
        # per position), so the cache and its writes are those of GPT-2
        q, k, v = heads if not self.identity else (*heads, x.reshape(B, T, H, D).transpose(1, 2))
        if kv is not None:
            k, v = cached_keys_values(kv, k, v, start)
        sink = self.sinks if self.learned_sinks else None
        if self.sink_logit is not None:
            sink = Tensor.full((H,), self.sink_logit, device=x.device)
        if self.identity:
            # sum_h A_h x = (sum_h A_h) x: the heads' weights reduced first, then one (T, L) @ (L, C) product
            w = attention_weights(q, k, 1 / math.sqrt(D), sink)
            w = w.sum(1) if self.head_sum else w.mean(1)
            values = x if kv is None else v.transpose(1, 2).reshape(B, v.shape[2], C)
            return (w @ values.float()).cast(x.dtype)
        y = causal_attention(q, k, v, 1 / math.sqrt(D), sink)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP:
    def __init__(self, spec: ModelSpec):
        self.c_fc = nn.Linear(spec.n_embd, 4 * spec.n_embd, bias=spec.bias == "on")
        self.c_proj = nn.Linear(4 * spec.n_embd, spec.n_embd, bias=spec.bias == "on")

    def __call__(self, x: Tensor) -> Tensor:
        # tinygrad's gelu is the tanh form. contiguous: stored once, as torch stores its activation; fused
        # into c_proj, the tanh is recomputed for every multiply-add (768x on gpt2): 5.3x slower c_proj
        # kernels, 13.2 s -> 8.5 s of kernels in a gpt2 loss-and-gradients call (B1xT64, float32, one core)
        return self.c_proj(activated(self.c_fc(x).gelu()))


def activated(h: Tensor) -> Tensor:
    """An MLP's activation, materialized before the down projection reads it (see MLP.__call__)."""
    return h.contiguous()


def make_norm(spec: ModelSpec):
    """SPEC.md 3 and 14: the spec's norm, its eps always explicit (the frameworks' defaults differ)."""
    if spec.norm == "rmsnorm":
        return nn.RMSNorm(spec.n_embd, eps=spec.norm_eps)
    if spec.norm == "layernorm" and spec.bias == "off":
        return GainOnlyLayerNorm(spec.n_embd, spec.norm_eps)
    return nn.LayerNorm(spec.n_embd, eps=spec.norm_eps, elementwise_affine=spec.norm == "layernorm")


class GainOnlyLayerNorm:
    """LayerNorm with a gain and no bias (nanoGPT's bias=False): tinygrad's has both or neither."""
    def __init__(self, dim: int, eps: float):
        self.weight, self.eps = Tensor.ones(dim), eps

    def __call__(self, x: Tensor) -> Tensor: return x.layernorm(eps=self.eps) * self.weight


class Block:
    def __init__(self, spec: ModelSpec):
        self.ln_1 = make_norm(spec)
        self.attn = CausalSelfAttention(spec)
        self.ln_2 = make_norm(spec)
        self.mlp = MLP(spec)
        self.form, self.c_a = spec.block_form, spec.parallel_attn_scale

    def __call__(self, x: Tensor, kv: Tensor | None = None, start: int | UOp = 0) -> tuple[Tensor, Tensor]:
        """SPEC.md 16.2's update forms: -> (output, mid), mid the block's intermediate stream (SPEC.md 16.2)."""
        n = _norm(self.ln_1, x)
        a = self.attn(n, kv, start)
        if self.form in ("parallel", "multiplicative"):  # both branches read x
            m = self.mlp(_norm(self.ln_2, x))
            mid = x + self.c_a * a if self.form == "parallel" else a * m
            return (mid + m if self.form == "parallel" else x + mid), mid
        mid = (n if self.form == "normed_residual" else x) + a
        m = self.mlp(_norm(self.ln_2, mid))
        # the stream the MLP's output joins: y (sequential, normed_residual), ln_1 x, or x
        return {"escape_normed": n, "escape_residual": x}.get(self.form, mid) + m, mid


def _norm(ln, x: Tensor) -> Tensor:
    # Statistics in float32, as torch does inside its half LayerNorm: in float16, x*x of the residual
    # stream loses bits (and overflows past 256). Measured on test-mini: float16 loss error 5.2e-5 -> 1.7e-5.
    return ln(x.float()).cast(x.dtype)


class LanguageModel:
    """What GPT and NGPT share: checked calls around their unchecked `forward`."""
    spec: ModelSpec

    def forward(self, tokens: Tensor, kv: list[Tensor] | None = None, start: int | UOp = 0,
                last_only: bool = False) -> Tensor:
        """Logits (B, T, vocab_size) in the parameters' dtype; no input checks (what TinyJit captures).
        With `kv` (a KVCache's layers) the tokens sit at positions start .. start+T-1 and their keys
        and values join the cache; `last_only`: the last position's logits only (B, 1, vocab_size)."""
        raise NotImplementedError

    def __call__(self, tokens: Tensor, cache: KVCache | None = None, last_only: bool = False) -> Tensor:
        """Logits (B, T, vocab_size) for (B, T) integer token ids; with `cache`, at the positions after
        those it holds, which the tokens join (SPEC.md 12)."""
        check_tokens(self.spec, tokens)
        if cache is None:
            return self.forward(tokens, last_only=last_only)
        n = cache.start(tokens.shape)
        logits = self.forward(tokens, cache.layers, n, last_only)
        Tensor.realize(logits, *cache.layers)  # the writes into the cache happen with the logits, once
        cache.offset = n + tokens.shape[1]
        return logits

    def loss_and_logits(self, tokens: Tensor, targets: Tensor, draws: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The spec's loss (float32 scalar) and the last layer's logits, from one forward."""
        logits = self.forward(tokens)
        return spec_loss(self.spec, [logits], targets, draws), logits

    def loss(self, tokens: Tensor, targets: Tensor, draws: Tensor | None = None) -> Tensor:
        """The spec's loss (float32 scalar) of the logits for `tokens` against `targets`; loss="early_exit"
        takes its uniform draws (n_layer, B, T) in [0, 1) (SPEC.md 18.3)."""
        check_tokens(self.spec, tokens)
        check_target_layout(tokens.shape, targets.shape, dtypes.is_int(targets.dtype))
        check_draws_layout(self.spec, tokens.shape, None if draws is None else draws.shape,
                           draws is None or dtypes.is_float(draws.dtype))
        return self.loss_and_logits(tokens, targets, draws)[0]


class GPT(LanguageModel):
    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.wte = nn.Embedding(spec.padded_vocab_size, spec.n_embd)  # SPEC.md 19: padded rows, never a target
        self.wpe = nn.Embedding(spec.n_positions, spec.n_embd)
        self.h = [Block(spec) for _ in range(spec.n_layer if spec.blocks == "independent" else 1)]  # shared: h.0
        self.ln_f = make_norm(spec)
        # the spec's init law (spec.params.init_law) in place of tinygrad's defaults; lazy, so free when loading replaces it
        state = nn.state.get_state_dict(self)
        for p in param_table(spec):
            mean, std = init_law(spec, p)
            state[p.name].replace(Tensor.normal(*p.shape, mean=mean, std=std) if std else Tensor.full(p.shape, mean))

    def layers(self, tokens: Tensor, kv: list[Tensor] | None = None, start: int | UOp = 0,
               local: bool = False) -> list[tuple[Tensor, Tensor, Tensor]]:
        """(input, mid, output) of every layer. `local` (loss="all_layers_local", SPEC.md 18.2): each layer
        after the first reads its input detached, so each layer's loss trains that layer alone."""
        x = embed_tokens(self.spec, self.wte, tokens) + self.wpe.weight[start:start + tokens.shape[1]]  # learned positions from `start`
        out = []
        for i in range(self.spec.n_layer):
            x = x.detach() if local and i > 0 else x
            block = self.h[i if self.spec.blocks == "independent" else 0]  # SPEC.md 16.1: shared, h.0 every time
            y, mid = block(x, kv[i] if kv is not None else None, start)
            out.append((x, mid, y))
            x = y
        return out

    def head(self, x: Tensor, backward: bool = False) -> Tensor:
        """The LM head, tied to the token embedding. `backward`: a gradient will be taken. The head's input
        gradient then reads wte down its columns (a sum over the vocabulary at a stride of n_embd), which on the
        CPU is ~6x slower than along the rows of a transposed copy: the product reads such a copy there (the
        same values, bit for bit; gpt2's forward and backward of the head, one core: 2.4 s -> 0.8 s)."""
        w = self.wte.weight.T
        devices = w.device if isinstance(w.device, tuple) else (w.device,)  # a tuple: sharded over devices
        if backward and all(d.split(":")[0] == "CPU" for d in devices):
            w = w.contiguous()
        return _norm(self.ln_f, x) @ w

    def forward(self, tokens: Tensor, kv: list[Tensor] | None = None, start: int | UOp = 0,
                last_only: bool = False) -> Tensor:
        x = self.layers(tokens, kv, start)[-1][2]
        return self.head(x[:, -1:] if last_only else x)

    def loss_and_logits(self, tokens: Tensor, targets: Tensor, draws: Tensor | None = None) -> tuple[Tensor, Tensor]:
        loss, logits, _ = self.loss_logits_and_stats(tokens, targets, draws)
        return loss, logits

    def loss_logits_and_stats(self, tokens: Tensor, targets: Tensor,
                              draws: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """loss_and_logits and residual_stats of the same tokens from one forward; the statistics stay
        lazy (and cost nothing) unless realized."""
        layers = self.layers(tokens, local=self.spec.loss == "all_layers_local")
        # the all-layer and early-exit losses score every layer's output through ln_f and the head (SPEC.md 18)
        outputs = [y for _, _, y in layers]
        logits = [self.head(y, backward=True) for y in (outputs if self.spec.loss != "final" else outputs[-1:])]
        return spec_loss(self.spec, logits, targets, draws), logits[-1], self._stats(layers)

    def residual_stats(self, tokens: Tensor) -> dict[str, Tensor]:
        """SPEC.md 18.4: per layer, the mean over (b, t) of the Bessel-corrected std over channels of the
        block's input, mid stream, output and ln_f(output); float32 (n_layer,) Tensors."""
        check_tokens(self.spec, tokens)
        return self._stats(self.layers(tokens))

    def _stats(self, layers: list[tuple[Tensor, Tensor, Tensor]]) -> dict[str, Tensor]:
        # a detached input (all_layers_local) has the values of the attached one
        streams = [(x.float(), mid.float(), y.float(), self.ln_f(y.float())) for x, mid, y in layers]
        return {name: Tensor.stack(*(s[i].std(-1, correction=1).mean() for s in streams))
                for i, name in enumerate(STAT_NAMES)}


def embed_tokens(spec: ModelSpec, wte, tokens: Tensor) -> Tensor:
    """wte's rows for the ids, NaN for an id outside [0, vocab_size) (SPEC.md 6): inside TinyJit nothing can
    raise on a value, and tinygrad's one-hot embedding gives a zero row (plausible logits) for any id out of range."""
    valid = (tokens >= 0) & (tokens < spec.vocab_size)
    return valid.unsqueeze(-1).where(wte(tokens), float("nan"))


def check_tokens(spec: ModelSpec, tokens: Tensor) -> None:
    """What the native call checks (SPEC.md 6): the Tensor's shape and dtype, never its values, which
    would realize it and wait for the device. Ids are checked where data enters: the Backend methods,
    generate, the CLI."""
    check_token_layout(spec, tokens.shape, dtypes.is_int(tokens.dtype))


def from_host(a: np.ndarray, dtype: str, device: str) -> Tensor:
    """A fresh Tensor of `a` rounded on the host exactly as the reference rounds (nearest, ties to even).
    numpy has no bfloat16, so bf16 travels as its bit pattern. Always a fresh host array: Tensor(ndarray)
    wraps the array itself (tinygrad's NPY device) until realized, and a model must never alias the
    caller's arrays (which may be read-only; normalize_ writes into the model's own buffers only)."""
    if dtype == "bfloat16":
        return Tensor(to_bfloat16_bits(a), device=device).bitcast(dtypes.bfloat16)
    return Tensor(np.array(a, dtype=dtype, order="C"), device=device)
