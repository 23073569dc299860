"""llm.c's GPT-2 checkpoint (`gpt2_124M.bin`, `gpt2_124M_bf16.bin`): read and write, numpy only.

The layout is the one karpathy/llm.c's `train_gpt2.py` (`write_model`) writes and `train_gpt2.c`
/ `train_gpt2.cu` (`gpt2_build_from_checkpoint`) read:

    header   256 little-endian int32 (1024 bytes), unused slots zero:
             [0] magic 20240326   [1] version: 3 = every tensor float32, 5 = every tensor bfloat16
             [2] maxT (n_positions)   [3] V (vocab_size)   [4] L (n_layer)   [5] NH (n_head)
             [6] C (n_embd)   [7] Vp (padded vocab size: V rounded up to a multiple of 128)
    params   back to back, in this order, each (out, in) like torch.nn.Linear (not transposed):
             wte (Vp, C): V rows, then Vp - V padding rows (zeros)     wpe (maxT, C)
             ln1w (L, C)  ln1b (L, C)  qkvw (L, 3C, C)  qkvb (L, 3C)  attprojw (L, C, C)  attprojb (L, C)
             ln2w (L, C)  ln2b (L, C)  fcw (L, 4C, C)  fcb (L, 4C)  fcprojw (L, C, 4C)  fcprojb (L, C)
             lnfw (C)  lnfb (C)

llm.c computes GPT-2 as specified (tanh GELU, LayerNorm eps 1e-5 fixed in its kernels, the LM
head tied to wte, logits over the first V rows only), so the padding rows are dropped on read and
written as zeros, as llm.c's `pad_vocab` does. The format has no room for metadata; a file written
here from synthetic weights carries a marker in two header slots llm.c leaves unused (254, 255),
so that it still says it is synthetic when read back. Files of real weights get llm.c's header
exactly.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ..spec import OPTIONS, ModelSpec, SpecError, WeightsError, canonical_dtype, param_table
from ..spec.checks import check_state_shapes
from .atomic import atomic_write
from .format import Checkpoint, _encode, check_finite, from_bfloat16_bits

MAGIC = 20240326
VERSIONS = {3: "float32", 5: "bfloat16"}
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
PAD_MULTIPLE = 128
# The least average size of a tensor an llm.c file may claim, in bytes (GPT-2's is 3 MiB; test-tiny's,
# in bfloat16, about 190)
MIN_TENSOR_BYTES = 64
# other llm.c files that start with a magic of their own: named in the error when given one
OTHER_MAGICS = {
    20240327: "an llm.c debug state file (gpt2_124M_debug_state.bin: inputs, logits, gradients)",
    20240328: "an llm.c tokenizer file (gpt2_tokenizer.bin)",
    20240520: "an llm.c token data shard",
    20240801: "an llm.c Llama 3 checkpoint",
    20240803: "an llm.c Llama 3 checkpoint",
}
# header slots 254/255: gptspec's synthetic marker (llm.c reads slots 0..7 only)
_MARK_SLOT, _MARK = 254, 0x53545047  # b"GPTS" little-endian
_SYNTHETIC_SLOT = 255

# A progress callback: (task, bytes done, bytes in all). Called after each tensor.
Progress = Callable[[str, int, int], None]

# llm.c's per-layer tensors, in file order: (llm.c name, canonical name within h.{i})
_LAYER_TENSORS = (
    ("ln1w", "ln_1.weight"), ("ln1b", "ln_1.bias"),
    ("qkvw", "attn.c_attn.weight"), ("qkvb", "attn.c_attn.bias"),
    ("attprojw", "attn.c_proj.weight"), ("attprojb", "attn.c_proj.bias"),
    ("ln2w", "ln_2.weight"), ("ln2b", "ln_2.bias"),
    ("fcw", "mlp.c_fc.weight"), ("fcb", "mlp.c_fc.bias"),
    ("fcprojw", "mlp.c_proj.weight"), ("fcprojb", "mlp.c_proj.bias"),
)


def require_plain_gpt2(spec: ModelSpec, layout: str, *, norm_eps_fixed: bool = True,
                       also: tuple[str, ...] = ()) -> None:
    """`layout` can hold GPT-2 itself only (and the options named in `also`): refuse any other
    variant and, where the format fixes LayerNorm's eps at 1e-5 (llm.c, nanoGPT), any other eps."""
    for option, values in OPTIONS.items():
        if getattr(spec, option) != values[0] and option not in also:
            raise WeightsError(
                f"the {layout} format cannot hold {option}={getattr(spec, option)!r} (only GPT-2 itself); "
                "write a canonical gptspec file instead (gptspec convert ... --to canonical)"
            )
    if spec.vocab_multiple != 1 and "vocab_multiple" not in also:
        raise WeightsError(f"the {layout} format cannot record vocab_multiple={spec.vocab_multiple} (SPEC.md 19); "
                           "write a canonical gptspec file instead (gptspec convert ... --to canonical)")
    if norm_eps_fixed and spec.norm_eps != 1e-5:
        raise WeightsError(
            f"the {layout} format fixes LayerNorm eps at 1e-5; this model uses norm_eps={spec.norm_eps}, "
            "which it cannot record (write a canonical or Hugging Face checkpoint instead)"
        )


def padded_vocab_size(vocab_size: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-vocab_size // multiple) * multiple


def _layout(L: int, C: int, maxT: int, Vp: int) -> list[tuple[str, tuple[int, ...]]]:
    """llm.c's 16 parameter tensors in file order, with their shapes."""
    shapes = {
        "ln1w": (C,), "ln1b": (C,), "qkvw": (3 * C, C), "qkvb": (3 * C,), "attprojw": (C, C), "attprojb": (C,),
        "ln2w": (C,), "ln2b": (C,), "fcw": (4 * C, C), "fcb": (4 * C,), "fcprojw": (C, 4 * C), "fcprojb": (C,),
    }
    return [("wte", (Vp, C)), ("wpe", (maxT, C))] + [(n, (L, *shapes[n])) for n, _ in _LAYER_TENSORS] + [
        ("lnfw", (C,)), ("lnfb", (C,))]


# -- reading ---------------------------------------------------------------------------
def read_header(path: str | os.PathLike) -> dict[str, int]:
    """The header of an llm.c model file, validated against the file's length."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < 4:
        raise WeightsError(f"{path}: {size} bytes, too short to be an llm.c checkpoint (header is {HEADER_BYTES} bytes)")
    magic = int(np.frombuffer(raw[:4], "<i4")[0])
    if magic != MAGIC:
        what = OTHER_MAGICS.get(magic)
        raise WeightsError(
            f"{path}: " + (f"{what}, not an llm.c GPT-2 model checkpoint" if what else
                           f"magic number {magic}, not llm.c's GPT-2 checkpoint magic {MAGIC}; not an llm.c model file")
        )
    if len(raw) < HEADER_BYTES:
        raise WeightsError(f"{path}: truncated: {size} bytes, shorter than llm.c's {HEADER_BYTES}-byte header")
    h = np.frombuffer(raw, "<i4").astype(np.int64)
    version = int(h[1])
    if version not in VERSIONS:
        raise WeightsError(
            f"{path}: llm.c checkpoint version {version}; gptspec reads versions 3 (float32) and 5 (bfloat16), "
            "the padded-vocab versions llm.c writes today (re-export it with llm.c's train_gpt2.py)"
        )
    fields = dict(max_seq_len=int(h[2]), vocab_size=int(h[3]), num_layers=int(h[4]), num_heads=int(h[5]),
                  channels=int(h[6]), padded_vocab_size=int(h[7]))
    bad = [f"{k}={v}" for k, v in fields.items() if v < 1]
    if bad:
        raise WeightsError(f"{path}: header holds impossible sizes: {', '.join(bad)}")
    if fields["padded_vocab_size"] < fields["vocab_size"]:
        raise WeightsError(
            f"{path}: header's padded vocab size {fields['padded_vocab_size']} is below its vocab size "
            f"{fields['vocab_size']}"
        )
    itemsize = 4 if version == 3 else 2
    n = sum(math.prod(s) for _, s in _layout(fields["num_layers"], fields["channels"],
                                                fields["max_seq_len"], fields["padded_vocab_size"]))
    expected = HEADER_BYTES + n * itemsize
    if size != expected:
        why = "truncated" if size < expected else "longer than its header says"
        raise WeightsError(
            f"{path}: {why}: the header (version {version}, {VERSIONS[version]}; "
            + ", ".join(f"{k} {v}" for k, v in fields.items())
            + f") makes {n:,} parameters = {expected:,} bytes, the file has {size:,}"
        )
    # The header's few ints decide how many tensors the reader makes, each costing a few hundred bytes
    # of bookkeeping whatever its size: a file must pay for them (SPEC.md 8), so that many layers of
    # width 1 cannot make reading cost many times the file's size.
    tensors = 4 + len(_LAYER_TENSORS) * fields["num_layers"]
    if size - HEADER_BYTES < MIN_TENSOR_BYTES * tensors:
        raise WeightsError(
            f"{path}: its header claims {tensors:,} tensors (num_layers {fields['num_layers']}, channels "
            f"{fields['channels']}) in {size - HEADER_BYTES:,} bytes of parameters, under {MIN_TENSOR_BYTES} bytes "
            "a tensor; refusing a layout no GPT-2 has"
        )
    fields["version"] = version
    fields["synthetic"] = int(h[_MARK_SLOT] == _MARK and h[_SYNTHETIC_SLOT] == 1)
    return fields


def read_llmc(path: str | os.PathLike, *, progress: Progress | None = None) -> Checkpoint:
    """Read an llm.c GPT-2 checkpoint (version 3 or 5) into canonical form; padding rows are dropped."""
    path = Path(path)
    hdr = read_header(path)
    L, C, maxT, V, Vp = (hdr["num_layers"], hdr["channels"], hdr["max_seq_len"], hdr["vocab_size"],
                         hdr["padded_vocab_size"])
    try:
        spec = ModelSpec(vocab_size=V, n_positions=maxT, n_embd=C, n_layer=L, n_head=hdr["num_heads"])
    except SpecError as e:
        raise WeightsError(f"{path}: its header is not a valid GPT-2: {e}") from None
    stored = VERSIONS[hdr["version"]]
    disk = np.dtype("<f4") if stored == "float32" else np.dtype("<u2")
    layout = _layout(L, C, maxT, Vp)
    total = sum(math.prod(s) for _, s in layout) * disk.itemsize
    done = 0
    params: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        for name, shape in layout:
            count = math.prod(shape)
            raw = np.fromfile(f, dtype=disk, count=count)
            if raw.size != count:  # the file shrank after its header was checked
                raise WeightsError(f"{path}: truncated while reading {name}")
            x = (raw if stored == "float32" else from_bfloat16_bits(raw)).astype(np.float32, copy=False)
            x = x.reshape(shape)
            if name == "wte":
                params["wte.weight"] = np.ascontiguousarray(x[:V])  # drop llm.c's padding rows
            elif name == "wpe":
                params["wpe.weight"] = x
            elif name == "lnfw":
                params["ln_f.weight"] = x
            elif name == "lnfb":
                params["ln_f.bias"] = x
            else:
                canonical = dict(_LAYER_TENSORS)[name]
                for i in range(L):
                    params[f"h.{i}.{canonical}"] = x[i]
            done += count * disk.itemsize
            if progress:
                progress(f"reading {path.name}", done, total)
    check_state_shapes(spec, {n: a.shape for n, a in params.items()}, str(path))
    check_finite(params, str(path))
    return Checkpoint(
        spec=spec, params={p.name: params[p.name] for p in param_table(spec)}, stored_dtype=stored,
        source=str(path), synthetic=bool(hdr["synthetic"]),
        metadata={"format": "llm.c", "llmc_version": str(hdr["version"]), "llmc_padded_vocab_size": str(Vp)},
    )


# -- writing ---------------------------------------------------------------------------
def write_llmc(
    path: str | os.PathLike, spec: ModelSpec, params: Mapping[str, np.ndarray], dtype: str = "float32",
    *, synthetic: bool = False, progress: Progress | None = None,
) -> Path:
    """Write an llm.c checkpoint: version 3 (float32) or 5 (bfloat16), vocab padded with zero rows
    to a multiple of 128. Atomic (weights/atomic.py)."""
    dtype = canonical_dtype(dtype)
    if dtype not in ("float32", "bfloat16"):
        raise WeightsError(f"llm.c checkpoints hold float32 (version 3) or bfloat16 (version 5), not {dtype}")
    require_plain_gpt2(spec, "llm.c")
    check_state_shapes(spec, {n: np.shape(a) for n, a in params.items()}, "parameters to export")
    version = 3 if dtype == "float32" else 5
    L, C, V, maxT = spec.n_layer, spec.n_embd, spec.vocab_size, spec.n_positions
    Vp = padded_vocab_size(V)
    header = np.zeros(HEADER_INTS, "<i4")
    header[:8] = [MAGIC, version, maxT, V, L, spec.n_head, C, Vp]
    if synthetic:
        header[_MARK_SLOT], header[_SYNTHETIC_SLOT] = _MARK, 1
    layout = _layout(L, C, maxT, Vp)
    itemsize = 4 if dtype == "float32" else 2
    total = sum(math.prod(s) for _, s in layout) * itemsize

    def pieces(name):
        if name == "wte":
            yield "wte.weight", params["wte.weight"]
            if Vp > V:
                yield "wte padding", np.zeros((Vp - V, C), np.float32)  # llm.c pads with zeros
        elif name == "wpe":
            yield "wpe.weight", params["wpe.weight"]
        elif name in ("lnfw", "lnfb"):
            n = "ln_f.weight" if name == "lnfw" else "ln_f.bias"
            yield n, params[n]
        else:
            canonical = dict(_LAYER_TENSORS)[name]
            for i in range(L):
                yield f"h.{i}.{canonical}", params[f"h.{i}.{canonical}"]

    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        done = 0
        for name, _ in layout:
            for tensor_name, x in pieces(name):
                buf = _encode(tensor_name, x, dtype)
                f.write(buf.tobytes())
                done += buf.nbytes
                if progress:
                    progress(f"writing {path.name}", done, total)
    return path
