"""nanoGPT's training checkpoint (`out/ckpt.pt`): read and write.

karpathy/nanoGPT's `train.py` saves, with `torch.save`, a dict:

    model          the GPT's state dict: transformer.wte.weight, transformer.wpe.weight,
                   transformer.h.{i}.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}.{weight, bias},
                   transformer.ln_f.{weight, bias}, lm_head.weight (tied to wte). Linear weights are
                   torch.nn.Linear's (out, in), the canonical layout (Hugging Face's Conv1D stores them
                   transposed). Keys carry `_orig_mod.` when the model was torch.compile'd.
    model_args     n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout (GPTConfig's fields)
    optimizer      AdamW's state dict          iter_num, best_val_loss
    config         train.py's settings, plain Python values

Reading uses `torch.load(..., weights_only=True)` only: tensors and plain Python values, never an
arbitrary object. A checkpoint that holds anything else (an `argparse.Namespace` as its config, say)
is refused with the reason, and nothing of it is unpickled.

What the spec can and cannot hold: `bias=False` (nanoGPT's bias-free Linear and LayerNorm) is the
spec's `bias="off"` (SPEC.md 15). Formerly it was not
GPT-2 and is refused. nanoGPT's from-scratch default `vocab_size=50304` (GPT-2's 50257 rounded up to
a multiple of 64) is read as `vocab_size=50257, vocab_multiple=64` (SPEC.md 19): the 47 padding rows
are kept, never sampled, and outside the spec's loss (nanoGPT's softmax includes them; trained, their
logits are pushed far down, so the two losses differ negligibly). A padded model is written back with
nanoGPT's padded vocab_size, its true size in `config`. nanoGPT fixes LayerNorm's
eps at 1e-5. Its model.py computes GELU with erf (`nn.GELU()`) where GPT-2 and the spec use the tanh
form: the file does not record it, the weights are the same; a nanoGPT-trained model run by gptspec
(or by Hugging Face, or llm.c) uses the tanh form.

Writing gives a checkpoint that `train.py init_from='resume'` and `sample.py` accept: the model's
state dict (lm_head.weight sharing wte's storage), `model_args`, `iter_num` 0, `best_val_loss` 1e9
(train.py's starting value), a fresh AdamW state (no moments yet; nanoGPT's two parameter groups
and default hyperparameters, so `optimizer.load_state_dict` accepts it) and a `config` of plain
values that also says where the weights came from and whether they are synthetic.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from ..spec import ModelSpec, SpecError, WeightsError, canonical_dtype, param_table
from ..spec.checks import check_state_shapes
from .atomic import atomic_write
from .format import Checkpoint, _encode, check_finite
from .llmc import Progress, require_plain_gpt2

PREFIX = "transformer."
COMPILED_PREFIX = "_orig_mod."
_SIZE_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
# nanoGPT's train.py defaults, for the fresh optimizer state of a written checkpoint
_ADAMW = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _torch(path, doing: str):
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f"{path}: {doing} a nanoGPT checkpoint needs torch (pip install 'gptspec[torch]'); "
            "no other format needs it"
        ) from None
    return torch


class _Counting:
    """A binary file wrapper that reports the bytes that pass through it."""

    def __init__(self, f, task: str, total: int, progress: Progress):
        self._f, self._task, self._total, self._progress, self._done = f, task, max(total, 1), progress, 0

    def _tick(self, n: int):
        self._done += n
        self._progress(self._task, min(self._done, self._total), self._total)

    def write(self, b):
        n = self._f.write(b)
        self._tick(len(b) if n is None else n)
        return n

    def read(self, size=-1):
        b = self._f.read(size)
        self._tick(len(b))
        return b

    def readinto(self, buf):
        n = self._f.readinto(buf)
        self._tick(n or 0)
        return n

    def __getattr__(self, name):  # seek, tell, flush, readable, ...
        return getattr(self._f, name)


# -- reading ---------------------------------------------------------------------------
def _refusal(e: Exception) -> str:
    """What torch's weights_only unpickler refused, without its advice to turn the check off."""
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"it holds {m.group(1)}, which is neither a tensor nor a plain Python value"
    m = re.search(r"Unsupported[^\n]*", text)
    if m:
        return m.group(0).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(
        ("Weights only load failed", "Check the documentation", "(1)", "(2)"))]
    return lines[0] if lines else type(e).__name__


def _load(path: Path, progress: Progress | None):
    torch = _torch(path, "reading")
    with open(path, "rb") as raw:
        head = raw.read(4)
    if not (head == b"PK\x03\x04" or head[:1] == b"\x80"):  # torch's zip format, or a legacy pickle
        raise WeightsError(f"{path}: not a torch checkpoint (neither torch.save's zip format nor a pickle)")
    try:
        with open(path, "rb") as raw:
            f = _Counting(raw, f"reading {path.name}", path.stat().st_size, progress) if progress else raw
            return torch, torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"{path}: refused by torch.load(weights_only=True), which loads tensors and plain Python values "
            f"only: {_refusal(e)}. gptspec never unpickles arbitrary objects (they can run code). Re-save the "
            "checkpoint with plain values (e.g. 'config': vars(args) rather than args), or load it yourself "
            "if you trust it and save {'model': ..., 'model_args': ...}"
        ) from None
    except Exception as e:  # torch raises several types for files that are not torch files
        raise WeightsError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {e}") from None


def _plain_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _vocabulary(path: Path, rows: int, config: dict) -> tuple[int, int]:
    """(vocab_size, vocab_multiple) of a checkpoint whose embedding has `rows` rows (SPEC.md 19): as gptspec
    wrote it (its config says), GPT-2's 50257 padded to 50304 (nanoGPT's from-scratch default), or unpadded."""
    vocab, multiple = config.get("gptspec_vocab_size"), config.get("gptspec_vocab_multiple")
    if _plain_int(vocab) and _plain_int(multiple) and vocab >= 1 and multiple >= 1:
        if -(-vocab // multiple) * multiple != rows:
            raise WeightsError(f"{path}: config's gptspec_vocab_size={vocab} padded to a multiple of {multiple} "
                               f"is not model_args' vocab_size={rows}")
        return vocab, multiple
    return (50257, 64) if rows == 50304 else (rows, 1)


def read_nanogpt(path: str | os.PathLike, *, progress: Progress | None = None) -> Checkpoint:
    """Read a nanoGPT `ckpt.pt` into canonical form (torch.load with weights_only=True only)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    torch, obj = _load(path, progress)
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not nanoGPT's checkpoint dict")
    if "model" not in obj or "model_args" not in obj:
        missing = [k for k in ("model", "model_args") if k not in obj]
        bare = obj and all(isinstance(v, torch.Tensor) for v in obj.values())
        raise WeightsError(
            f"{path}: not a nanoGPT checkpoint: no {' or '.join(repr(k) for k in missing)} entry"
            + (" (it is a bare state dict; nanoGPT's checkpoint carries model_args, which give n_head)"
               if bare else f" (it holds {', '.join(map(repr, list(obj)[:8]))})")
        )
    args, state = obj["model_args"], obj["model"]
    if not isinstance(args, dict) or not isinstance(state, dict):
        raise WeightsError(f"{path}: 'model_args' and 'model' must be dicts")
    missing = [k for k in _SIZE_ARGS if k not in args]
    if missing:
        raise WeightsError(f"{path}: model_args lacks {', '.join(missing)} (it holds {', '.join(map(str, args))})")
    bad = [f"{k}={args[k]!r}" for k in _SIZE_ARGS if not _plain_int(args[k])]
    if bad:
        raise WeightsError(f"{path}: model_args must hold integers: {', '.join(bad)}")
    if args.get("bias", True) not in (True, False):
        raise WeightsError(f"{path}: model_args has bias={args['bias']!r}; nanoGPT's bias is True or False")
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    vocab, multiple = _vocabulary(path, args["vocab_size"], config)
    try:
        spec = ModelSpec(vocab_size=vocab, vocab_multiple=multiple, n_positions=args["block_size"],
                         n_embd=args["n_embd"], n_layer=args["n_layer"], n_head=args["n_head"],
                         bias="on" if args.get("bias", True) else "off")  # SPEC.md 15
    except SpecError as e:
        raise WeightsError(f"{path}: model_args do not make a valid GPT-2: {e}") from None

    tensors, head = {}, None
    for key, t in state.items():
        name = key.removeprefix(COMPILED_PREFIX)
        if not isinstance(t, torch.Tensor):
            raise WeightsError(f"{path}: model entry {key!r} is a {type(t).__name__}, not a tensor")
        if name == "lm_head.weight":
            head = t
        elif name.endswith(".attn.bias"):
            continue  # the causal-mask buffer of nanoGPT's non-flash attention
        else:
            tensors[name.removeprefix(PREFIX)] = t
    check_state_shapes(spec, {n: tuple(t.shape) for n, t in tensors.items()}, f"{path} (nanoGPT layout)")
    if head is not None and not torch.equal(head, tensors["wte.weight"]):
        raise WeightsError(
            f"{path}: lm_head.weight differs from transformer.wte.weight; the spec's LM head is tied to the embedding"
        )
    params, dtypes = {}, set()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    done = 0
    for p in param_table(spec):
        t = tensors[p.name].detach()
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise WeightsError(f"{path}: {p.name} is {t.dtype}; the spec's weights are float32, float16 or bfloat16")
        dtypes.add(str(t.dtype).removeprefix("torch."))
        # numpy has no bfloat16: widening to float32 is exact
        params[p.name] = (t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy()
        done += t.numel() * t.element_size()
        if progress:
            progress(f"converting {path.name}", done, total)
    check_finite(params, str(path))
    metadata = {"format": "nanoGPT"}
    for key in ("iter_num", "best_val_loss"):
        if key in obj:
            v = obj[key]
            metadata[f"nanogpt_{key}"] = str(v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v)
    if "dropout" in args:
        metadata["nanogpt_dropout"] = str(args["dropout"])
    if isinstance(config.get("gptspec_origin"), str) and config["gptspec_origin"]:
        metadata["origin"] = config["gptspec_origin"]
    return Checkpoint(
        spec=spec, params=params, stored_dtype=dtypes.pop() if len(dtypes) == 1 else "mixed", source=str(path),
        synthetic=config.get("gptspec_synthetic") is True, metadata=metadata,
    )


# -- writing ---------------------------------------------------------------------------
def fresh_optimizer_state(spec: ModelSpec) -> dict:
    """AdamW's state dict before its first step, as nanoGPT's `configure_optimizers` groups the
    parameters: matrices and embeddings (dim >= 2) decayed, biases and norms (dim < 2) not."""
    decay = [p for p in param_table(spec) if len(p.shape) >= 2]
    n_decay, n_other = len(decay), len(param_table(spec)) - len(decay)
    flags = dict(amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=True)
    group = {k: v for k, v in _ADAMW.items() if k != "weight_decay"}
    return {"state": {}, "param_groups": [
        {"weight_decay": _ADAMW["weight_decay"], **group, **flags, "params": list(range(n_decay))},
        {"weight_decay": 0.0, **group, **flags, "params": list(range(n_decay, n_decay + n_other))},
    ]}


def write_nanogpt(
    path: str | os.PathLike, spec: ModelSpec, params: Mapping[str, np.ndarray], dtype: str = "float32",
    *, synthetic: bool = False, origin: str = "", progress: Progress | None = None,
) -> Path:
    """Write a nanoGPT `ckpt.pt` (float32, bfloat16 or float16 tensors). Atomic."""
    dtype = canonical_dtype(dtype)
    require_plain_gpt2(spec, "nanoGPT", also=("bias", "vocab_multiple"))
    check_state_shapes(spec, {n: np.shape(a) for n, a in params.items()}, "parameters to export")
    path = Path(path)
    torch = _torch(path, "writing")
    state = {}
    for p in param_table(spec):
        buf = _encode(p.name, params[p.name], dtype)  # the NaN/Inf and float16-range checks of every writer
        a = buf.view(np.int16) if dtype == "bfloat16" else buf
        t = torch.from_numpy(a if a.flags.writeable else a.copy())  # shares memory: torch.save only reads it
        state[PREFIX + p.name] = t.view(torch.bfloat16) if dtype == "bfloat16" else t
    state["lm_head.weight"] = state[PREFIX + "wte.weight"]  # tied: one storage, saved once
    model_args = dict(n_layer=spec.n_layer, n_head=spec.n_head, n_embd=spec.n_embd, block_size=spec.n_positions,
                      bias=spec.bias == "on", vocab_size=spec.padded_vocab_size, dropout=0.0)
    checkpoint = {
        "model": state,
        "optimizer": fresh_optimizer_state(spec),
        "model_args": model_args,
        "iter_num": 0,
        "best_val_loss": 1e9,
        "config": {**model_args, "dtype": dtype, "gptspec_origin": origin, "gptspec_synthetic": bool(synthetic),
                   "gptspec_vocab_size": spec.vocab_size, "gptspec_vocab_multiple": spec.vocab_multiple},
    }
    total = sum(t.numel() * t.element_size() for k, t in state.items() if k != "lm_head.weight")
    with atomic_write(path) as tmp, open(tmp, "wb") as raw:
        torch.save(checkpoint, _Counting(raw, f"writing {path.name}", total, progress) if progress else raw)
    return path
