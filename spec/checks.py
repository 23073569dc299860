"""Input checks shared by the reference and every backend.

Backends call these with plain Python facts about their own arrays (shape,
whether the dtype is an integer, min and max), so the rules and the wording
of every message live here once.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from .config import ModelSpec
from .errors import BackendError, InputError, WeightsError
from .params import param_shapes, param_table

# The target value that SPEC.md's loss skips (same as torch and Hugging Face).
IGNORE_INDEX = -100

DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
}


def canonical_dtype(dtype) -> str:
    """'bf16', torch.bfloat16, mx.bfloat16, dtypes.bfloat16 ... -> 'bfloat16'."""
    key = str(dtype).lower().rsplit(".", 1)[-1]
    try:
        return _DTYPE_ALIASES[key]
    except KeyError:
        raise BackendError(
            f"unknown dtype {dtype!r}; the spec defines {', '.join(DTYPES)}"
        ) from None


def check_dtype(dtype, supported: Iterable[str], where: str) -> str:
    name = canonical_dtype(dtype)
    supported = tuple(supported)
    if name not in supported:
        raise BackendError(f"{where} cannot run {name}; it supports {', '.join(supported)}")
    return name


def check_token_layout(spec: ModelSpec, shape: Sequence[int], is_integer: bool, name: str = "tokens") -> None:
    """What a native model call checks (SPEC.md 6): rank (B, T), an integer dtype, 1 <= T <= n_positions.
    Facts of the array's metadata only, so checking them never waits for the device."""
    shape = tuple(int(d) for d in shape)
    if len(shape) != 2:
        raise InputError(f"{name} must have shape (B, T), got shape {shape}")
    if not is_integer:
        raise InputError(f"{name} must be an integer array, got a non-integer dtype")
    B, T = shape
    if B < 1 or T < 1:
        raise InputError(f"{name} must be non-empty, got shape {shape}")
    if T > spec.n_positions:
        raise InputError(
            f"{name} has length T={T}, longer than the context length n_positions={spec.n_positions}"
        )


def check_tokens(
    spec: ModelSpec, shape: Sequence[int], is_integer: bool, lo: int | None, hi: int | None,
    name: str = "tokens",
) -> None:
    """tokens: (B, T) integers in [0, vocab_size) with 1 <= T <= n_positions."""
    check_token_layout(spec, shape, is_integer, name)
    if lo < 0 or hi >= spec.vocab_size:
        bad = lo if lo < 0 else hi
        raise InputError(
            f"{name} holds id {bad}, outside the vocabulary [0, {spec.vocab_size})"
        )


def check_target_layout(tokens_shape: Sequence[int], shape: Sequence[int], is_integer: bool) -> None:
    """What a native loss call checks (SPEC.md 6): targets have the tokens' shape and an integer dtype."""
    shape, tokens_shape = tuple(int(d) for d in shape), tuple(int(d) for d in tokens_shape)
    if shape != tokens_shape:
        raise InputError(f"targets must have the shape of tokens {tokens_shape}, got {shape}")
    if not is_integer:
        raise InputError("targets must be an integer array, got a non-integer dtype")


def check_targets(
    spec: ModelSpec, tokens_shape: Sequence[int], shape: Sequence[int], is_integer: bool,
    n_counted: int, lo: int, hi: int,
) -> None:
    """targets: tokens' shape, ids in [0, vocab_size) or IGNORE_INDEX, at least one counted.

    n_counted, lo and hi are the count, min and max of the targets that are not IGNORE_INDEX.
    """
    check_target_layout(tokens_shape, shape, is_integer)
    if n_counted == 0:
        raise InputError(
            f"every target equals the ignore index {IGNORE_INDEX}: the mean over zero targets is undefined"
        )
    if lo < 0 or hi >= spec.vocab_size:
        bad = lo if lo < 0 else hi
        raise InputError(
            f"targets hold id {bad}, neither in [0, {spec.vocab_size}) nor the ignore index {IGNORE_INDEX}"
        )


def check_targets_array(spec: ModelSpec, tokens_shape, targets) -> None:
    import numpy as np

    t = np.asarray(targets)
    is_int = t.dtype.kind in "iu"
    counted = t[t != IGNORE_INDEX] if is_int else t.ravel()
    lo, hi = (int(counted.min()), int(counted.max())) if (is_int and counted.size) else (0, 0)
    check_targets(spec, tokens_shape, t.shape, is_int, int(counted.size), lo, hi)


def check_tokens_array(spec: ModelSpec, tokens, name: str = "tokens") -> None:
    import numpy as np

    t = np.asarray(tokens)
    is_int = t.dtype.kind in "iu"
    lo, hi = (int(t.min()), int(t.max())) if (t.size and is_int) else (0, 0)
    check_tokens(spec, t.shape, is_int, lo, hi, name)


def table_size(spec: ModelSpec) -> tuple[int, int]:
    """(tensors, elements) of `spec`'s parameter table, without building it for the claimed n_layer:
    both grow linearly with n_layer, so a one- and a two-layer table give them. A ModelSpec read from a
    file may claim any n_layer (10**30 is a valid int), and the table itself is O(n_layer)."""
    def size(s: ModelSpec) -> tuple[int, int]:
        table = param_table(s)
        return len(table), sum(_prod(p.shape) for p in table)

    if spec.n_layer <= 2:
        return size(spec)
    (t1, e1), (t2, e2) = size(spec.replace(n_layer=1)), size(spec.replace(n_layer=2))
    extra = spec.n_layer - 1
    return t1 + extra * (t2 - t1), e1 + extra * (e2 - e1)


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def check_claim(spec: ModelSpec, held_tensors: int, source: str) -> None:
    """SPEC.md 8: a file's ModelSpec may not claim more tensors than the file can hold. Checked before
    anything proportional to the claim is built (the parameter table, the per-tensor comparison), so a
    lying n_layer fails in microseconds. The slack lets an honest near-miss (a tensor or a layer
    missing) reach check_state_shapes, whose listing names the tensors, at a cost bounded by the file."""
    claimed, _ = table_size(spec)
    if claimed > 2 * held_tensors + 64:
        raise WeightsError(
            f"{source}: its ModelSpec (n_layer={spec.n_layer}, n_embd={spec.n_embd}, vocab_size={spec.vocab_size}) "
            f"claims {claimed:,} tensors, but the file holds {held_tensors:,}; refusing to trust the claim"
        )


def check_state_shapes(
    spec: ModelSpec, shapes: Mapping[str, Sequence[int]], source: str
) -> None:
    """A state (name -> shape) must hold exactly the canonical parameters, each of its shape. The
    claim is bounded by the state's own size first (check_claim)."""
    check_claim(spec, len(shapes), source)
    check_shapes(param_shapes(spec), shapes, source)


def check_shapes(
    expected: Mapping[str, tuple[int, ...]], shapes: Mapping[str, Sequence[int]], source: str
) -> None:
    """`shapes` must hold exactly the names of `expected`, each of its shape."""
    missing = [n for n in expected if n not in shapes]
    unexpected = sorted(n for n in shapes if n not in expected)
    misshapen = [
        f"{n}: expected {expected[n]}, got {tuple(shapes[n])}"
        for n in expected
        if n in shapes and tuple(shapes[n]) != expected[n]
    ]
    if missing or unexpected or misshapen:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {_listing(unexpected)}")
        if misshapen:
            parts.append(f"misshapen {len(misshapen)} tensor(s): {_listing(misshapen)}")
        raise WeightsError(f"{source} does not match the spec's parameter table: " + "; ".join(parts))


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def check_cache_room(n_positions: int, cached: int, new: int) -> None:
    """SPEC.md 12: `new` tokens after `cached` ones must fit the context (it is never slid)."""
    if cached + new > n_positions:
        raise InputError(f"{new} tokens after the {cached} in the cache pass the context length "
                         f"n_positions={n_positions}")


def check_draws_layout(spec: ModelSpec, tokens_shape: Sequence[int], draws_shape: Sequence[int] | None,
                       is_float: bool = True) -> None:
    """What a native loss call checks (SPEC.md 6, 18.3): loss="early_exit" takes draws of shape
    (n_layer, B, T) in a floating-point dtype; every other loss takes none."""
    if spec.loss != "early_exit":
        if draws_shape is not None:
            raise InputError(f"draws are an input of loss='early_exit' only; this model's loss is {spec.loss!r}")
        return
    expected = (spec.n_layer, *(int(d) for d in tokens_shape))
    if draws_shape is None:
        raise InputError(f"loss='early_exit' needs its draws u: an array of shape {expected} (n_layer, B, T) "
                         "in [0, 1), e.g. numpy.random.default_rng(seed).random(shape)")
    shape = tuple(int(d) for d in draws_shape)
    if shape != expected:
        raise InputError(f"draws must have shape (n_layer, B, T) = {expected}, got {shape}")
    if not is_float:
        raise InputError("draws must be a floating-point array, got a non-float dtype")


def check_draws(spec: ModelSpec, tokens_shape: Sequence[int], draws_shape: Sequence[int] | None,
                is_float: bool = True, lo: float = 0.0, hi: float = 0.0) -> None:
    """SPEC.md 18.3: loss="early_exit" takes its uniform draws u as an input, shape (n_layer, B, T), each in
    [0, 1); every other loss takes none. lo and hi are the draws' min and max (NaN fails both bounds)."""
    check_draws_layout(spec, tokens_shape, draws_shape, is_float)
    if draws_shape is not None and not (lo >= 0.0 and hi < 1.0):
        raise InputError(f"draws must lie in [0, 1), got values in [{lo}, {hi}]")


def check_draws_array(spec: ModelSpec, tokens_shape, draws) -> None:
    import numpy as np

    if draws is None:
        return check_draws(spec, tokens_shape, None)
    u = np.asarray(draws)
    is_float = u.dtype.kind == "f"
    lo, hi = (float(u.min()), float(u.max())) if (u.size and is_float) else (0.0, 0.0)
    check_draws(spec, tokens_shape, u.shape, is_float, lo, hi)
