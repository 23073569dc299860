"""The torch backend behind gptspec.backends.load("torch", ...) and the conformance suite."""
from __future__ import annotations

import contextlib
import warnings
from typing import Mapping

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from ...spec import BackendError, param_table
from ...spec.reference.training import TrainState
from ...weights.format import MappedTensors
from ..base import Backend, LossAndGrads, StepStats
from .model import GPT
from .ngpt import NGPT

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _MetaInitSkipped(TorchFunctionMode):
    """Initialisers do nothing on meta tensors (there is nothing to fill), but on meta they run through
    torch._refs, whose first use imports torch._dynamo: 1.5 s of a fresh process's load. Skip them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        initialiser = getattr(func, "__module__", None) == "torch.nn.init" or func in _IN_PLACE_FILLS
        if initialiser and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


_IN_PLACE_FILLS = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.fill_, torch.Tensor.zero_}


def _copied(array: np.ndarray, dtype: torch.dtype, dev) -> torch.Tensor:
    """A new contiguous tensor holding `array` (any strides: a transposed view is copied in the canonical
    row-major layout the old contiguous copies had, so the kernels and their bits are the same) in `dtype`."""
    if not array.dtype.isnative or any(stride < 0 for stride in array.strides):  # what from_numpy refuses
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
    out = torch.empty(array.shape, dtype=dtype, device=dev)
    with warnings.catch_warnings():
        # a read-only array (a mapped file) is only read here, by copy_, never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        source = torch.from_numpy(array)
    return out.copy_(source)


@contextlib.contextmanager
def _threads(n: int):
    """torch's intra-op threads kept to `n`, restored after (as ieee_float32 does). Loading's copies and casts
    are memory-bound: threads add little to them, and on a machine whose cores are busy they wait on one
    another (2 shared cores, casting gpt2 to bfloat16: 0.45 s of CPU with torch's default 2 threads, 0.15 s
    with 1)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(min(n, previous))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_STORED = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _file_pages(params: Mapping[str, np.ndarray], name: str, dtype: torch.dtype, dev) -> torch.Tensor | None:
    """The parameter as a view of the checkpoint file's own pages, where it would equal a copy bit for bit
    and in layout: a tensor of a file read by gptspec (weights/format.py MappedTensors), kept on the CPU in
    the file's dtype, stored in the canonical (out, in) layout. The view is of a private copy-on-write
    mapping, as transformers' from_pretrained does: the load reads nothing (the first forward faults the
    pages in from the page cache, shared with it), and an in-place write (normalize_, an optimizer step)
    makes that page the process's own, never touching the file. None where a copy is needed: a cast, another
    device, or a Hugging Face Conv1D weight, whose (in, out) bytes would give a transposed (non-contiguous)
    parameter: safetensors' save_file refuses those, and single-token matmuls (decoding) round differently
    from the contiguous layout's."""
    if not isinstance(params, MappedTensors) or dev.type != "cpu":
        return None
    stored = params.stored(name, private=True)
    if stored.transposed or _STORED[stored.dtype] != dtype or not stored.array.dtype.isnative:
        return None  # (a big-endian machine reads the little-endian file through _copied's byte swap)
    tensor = torch.from_numpy(stored.array)
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor  # numpy holds bfloat16 as uint16


def resolve_device(device) -> torch.device:
    try:
        dev = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError, ValueError):  # torch's own words list devices this backend never runs on
        raise BackendError(f"torch backend runs on cpu, cuda or mps, not {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"torch cannot use device {str(dev)!r}: torch.cuda.is_available() is False")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BackendError(f"torch cannot use device {str(dev)!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise BackendError("torch cannot use device 'mps': torch.backends.mps.is_available() is False")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise BackendError(f"torch backend runs on cpu, cuda or mps, not {str(dev)!r}")
    return dev


@contextlib.contextmanager
def ieee_float32():
    """Full-precision float32 matmuls (no TF32) for the duration of a conformance call."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class TorchBackend(Backend):
    name = "torch"
    extra = "gptspec[torch]"
    models = {"gpt2": GPT, "ngpt": NGPT}
    implements = {
        "architecture": ("gpt2", "ngpt"),
        "activation": ("gelu_tanh",),
        "norm": ("layernorm", "layernorm_noaffine", "rmsnorm"),
        "bias": ("on", "off"),
        "attention": ("softmax", "softmax1", "softmax_c", "learned_sinks"),
        "positions": ("learned", "rope", "none"),
        "mlp": ("gelu", "swiglu"),
        "ngpt_alpha": ("abs", "signed"),
        "ngpt_scale": ("inv_sqrt_d", "inv_d"),
        "blocks": ("independent", "shared"),
        "block_form": ("sequential", "parallel", "multiplicative", "normed_residual", "escape_normed",
                       "escape_residual"),
        "attention_values": ("projected", "identity"),
        "head_reduce": ("mean", "sum"),
        "loss": ("final", "all_layers", "all_layers_local", "early_exit"),
    }

    def version(self) -> str:
        return f"torch {torch.__version__}"

    def devices(self) -> list[str]:
        out = ["cpu"]
        if torch.cuda.is_available():
            out.insert(0, "cuda")
        if torch.backends.mps.is_available():
            out.insert(0, "mps")
        return out

    def dtypes(self, device: str) -> tuple[str, ...]:
        dev = resolve_device(device)
        if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            return ("float32", "float16")
        return ("float32", "bfloat16", "float16")

    def _device(self, device) -> torch.device:
        return resolve_device(device)

    def threads(self, n: int):
        return _threads(n)

    def _new_model(self, spec, dev) -> torch.nn.Module:
        with torch.device("meta"), _MetaInitSkipped():
            return self.model_class(spec)(spec)  # no memory, no init: every tensor is replaced in _assign

    def _parameter_names(self, model) -> list[str]:
        return [n for n, _ in model.named_parameters()]

    def _assign(self, model, params: Mapping[str, np.ndarray], dtype: str, dev) -> torch.nn.Module:
        # One tensor at a time, each a view of the file's private pages where that equals a copy (_file_pages),
        # else copied (cast on the way) into a new contiguous tensor: the model never aliases (normalize_
        # never writes into) the caller's arrays or the file, and a mapped checkpoint's source
        # (weights/format.py MappedTensors) is dropped, so unmapped, before the next one is read.
        state = {}
        with _threads(1):
            for name in params:
                state[name] = _file_pages(params, name, _DTYPES[dtype], dev)
                if state[name] is None:
                    array = np.asarray(params[name])
                    state[name] = _copied(array, _DTYPES[dtype], dev)
                    del array
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def _normalize(self, model) -> None:
        model.normalize_()

    def state(self, model) -> dict[str, np.ndarray]:
        return {n: p.detach().float().cpu().numpy() for n, p in model.named_parameters()}

    def _tensor(self, model, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(model.wte.weight.device)

    def _ids(self, model, array: np.ndarray) -> torch.Tensor:
        """Token or target ids of any integer dtype SPEC.md 6 allows (int8 ... uint64, checked in range
        already) as the int64 torch's embedding and cross-entropy index with."""
        return self._tensor(model, np.asarray(array, dtype=np.int64))

    def _forward(self, model, tokens: np.ndarray) -> np.ndarray:
        with torch.no_grad(), ieee_float32():
            logits = model(self._ids(model, tokens))
        return logits.float().cpu().numpy()

    def _extend(self, model, tokens: np.ndarray, cache, last_only: bool = False):
        cache = model.make_cache() if cache is None else cache
        with torch.no_grad(), ieee_float32():
            logits = model(self._ids(model, tokens), cache=cache, last_only=last_only)
        return logits.float().cpu().numpy(), cache

    def _loss_and_grads(self, model, tokens: np.ndarray, targets: np.ndarray, draws) -> LossAndGrads:
        draws_t = None if draws is None else self._tensor(model, draws.astype(np.float32))
        model.zero_grad(set_to_none=True)
        with ieee_float32():
            loss, logits = model.loss_and_logits(self._ids(model, tokens), self._ids(model, targets), draws_t)
            loss.backward()
        grads = {n: p.grad.float().cpu().numpy() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return LossAndGrads(float(loss.detach()), logits.detach().float().cpu().numpy(), grads)

    def _residual_stats(self, model, tokens: np.ndarray) -> dict[str, np.ndarray]:
        with ieee_float32():
            stats = model.residual_stats(self._ids(model, tokens))
        return {k: v.double().cpu().numpy() for k, v in stats.items()}

    # -- training (SPEC.md 20): backends/torch/train.py's loop, imported on use because it builds on
    # this module's ieee_float32
    def _optimizer(self, model, train_spec) -> torch.optim.AdamW:
        from .train import configure_optimizer

        held = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()} - {"float32"})
        if held:
            raise BackendError(f"training keeps float32 master weights (SPEC.md 20.9), but this model holds "
                               f"{', '.join(held)} parameters: build it with dtype='float32' and train with "
                               f"TrainSpec(precision='mixed_bfloat16') for bfloat16 compute")
        return configure_optimizer(model, train_spec)

    def _train_step(self, model, optimizer, train_spec, it, micro_batches, draws) -> StepStats:
        from .train import train_step

        batches = [(self._ids(model, tokens), self._ids(model, targets)) for tokens, targets in micro_batches]
        draws_t = None if draws is None else [self._tensor(model, u) for u in draws]
        return StepStats(*train_step(model, optimizer, train_spec, it, batches, draws_t))

    def _optimizer_state(self, model, optimizer, dtype: np.dtype) -> TrainState:
        # FSDP (SPEC.md 25.7): sharded tensors are gathered one at a time, every rank taking part in canonical
        # order; rank 0 alone keeps them (it writes the checkpoint), the others get the step alone
        from .train import full_tensor, is_fully_sharded, is_sharded, reshard

        if is_fully_sharded(model):
            reshard(model)  # the sharded parameters the optimizer's state is keyed by
        sharded = any(is_sharded(p) for p in model.parameters())
        keep = not sharded or torch.distributed.get_rank() == 0

        wide = getattr(torch, dtype.name)

        def exported(t):
            whole = full_tensor(t.detach())
            return whole.to(wide, copy=True).cpu().numpy() if keep else None  # a copy: training goes on in place

        def zeros(p):
            return np.zeros(tuple(p.shape), dtype) if keep else None

        step, params, m, v = 0, {}, {}, {}
        by_name = dict(model.named_parameters())
        for name in (info.name for info in param_table(model.spec)):  # canonical order, as the reference's
            p = by_name[name]
            state = optimizer.state.get(p)  # empty until the first update: step 0, zero moments
            if state:
                step = int(state["step"].item())
            params[name] = exported(p)
            m[name] = exported(state["exp_avg"]) if state else zeros(p)
            v[name] = exported(state["exp_avg_sq"]) if state else zeros(p)
        return TrainState(step, params, m, v) if keep else TrainState(step, {}, {}, {})

    def _load_optimizer_state(self, model, optimizer, state: TrainState) -> None:
        # torch.optim.AdamW's own layout: a float32 scalar step (on the CPU unless the step is fused or
        # capturable) and the moments in the parameter's dtype on its device
        from .train import like_param

        on_device = any(g["fused"] or g["capturable"] for g in optimizer.param_groups)
        for name, p in model.named_parameters():
            optimizer.state[p] = {
                "step": torch.tensor(float(state.step), dtype=torch.float32, device=p.device if on_device else "cpu"),
                "exp_avg": like_param(state.m[name], p),
                "exp_avg_sq": like_param(state.v[name], p),
            }
