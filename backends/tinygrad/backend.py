"""The tinygrad backend behind gptspec.backends.load("tinygrad", ...) and the conformance suite.

Devices follow tinygrad's convention: with no device, tinygrad's default (DEV=CPU|CUDA|NV|METAL,
else the first device that opens); `device=` takes torch-style names and maps them onto tinygrad's
("cpu" -> "CPU", "cuda:1" -> "CUDA:1", "mps" -> "METAL"). tinygrad 0.14's CPU device builds its
worker programs and, with the default renderer, every kernel with clang ($CC): no clang, no CPU.

Generation (`extend`, SPEC.md 12) keeps a KVCache (model.py) of n_positions per layer: a prefill or
a chunk of tokens runs eagerly at its concrete positions; a decoding step (one token per row) has the
same shapes at every position, so it is one TinyJit per batch size, replayed with the position bound
to a Variable, as tinygrad's own gpt2 example decodes.

tinygrad keeps, within a process, the schedules and the generated kernels of every graph it has
run, so a second model of the same shapes and dtype (the next seed, a check's fresh copy) reuses
them; each jit here is keyed by model and shape for the repeated calls of one model. Kernels compile
under BEAM search when GPTSPEC_TINYGRAD_BEAM=n asks for it (off by default; docs/tinygrad.md).
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import shutil
import subprocess
import weakref
from typing import Mapping

import numpy as np
from tinygrad import Context, Device, Tensor, TinyJit, UOp, nn
from tinygrad.device import ALL_DEVICES
from tinygrad.helpers import EMULATED_DTYPES

from ...spec import DTYPES, BackendError
from ...spec.reference.training import TrainState
from ..base import Backend, LossAndGrads, StepStats
from .attention import KVCache
from .model import GPT, STAT_NAMES, LanguageModel, from_host
from .ngpt import NGPT
from .train import configure_optimizer, load_moments, optimizer_moments, train_step

NO_CLANG = ("tinygrad's CPU device compiles its kernels with clang, which is not installed "
            "(Debian/Ubuntu: sudo apt-get install clang; macOS: xcode-select --install; or set CC to a clang)")


def clang() -> str | None:
    """The C compiler tinygrad's CPU device runs ($CC, else clang), or None if there is none."""
    return shutil.which(os.environ.get("CC", "clang"))


def tinygrad_device(device: str | None = None) -> str:
    """'cpu', 'cuda', 'cuda:1', 'nv', 'metal', 'mps' (or tinygrad's 'CUDA:1'...) -> tinygrad's name.
    None -> tinygrad's own default, which honours DEV."""
    if device is None:
        try:
            return Device.DEFAULT
        except RuntimeError as e:  # tinygrad opened no device at all
            raise BackendError(f"tinygrad has no usable device here: {NO_CLANG if clang() is None else e}") from None
        except AssertionError as e:  # tinygrad refuses its environment, e.g. "CUDA=1 is deprecated, use DEV=CUDA"
            raise BackendError(refused(e)) from None
    kind, _, index = str(device).partition(":")
    kind = {"MPS": "METAL"}.get(kind.upper(), kind.upper())
    if kind not in ALL_DEVICES or not (index == "" or index.isdigit()):
        raise BackendError(f"tinygrad has no device {device!r}; it has {', '.join(d.lower() for d in ALL_DEVICES)}")
    return f"{kind}:{index}" if index not in ("", "0") else kind


def refused(e: AssertionError) -> str:
    return f"tinygrad refuses its device settings: {e}"


def why_not(dev: str) -> str | None:
    """Why tinygrad cannot run on `dev` (a tinygrad name), or None when it can."""
    if dev.split(":")[0] == "CPU" and clang() is None:
        return NO_CLANG
    try:
        Device[dev]  # opens it once; tinygrad caches the open device
    except Exception as e:  # noqa: BLE001 -- each runtime fails its own way (missing library, no GPU, no permission)
        return f"{type(e).__name__}: {e}"
    return None


def resolve_device(device: str | None) -> str:
    dev = tinygrad_device(device)
    if (why := why_not(dev)) is not None:
        raise BackendError(f"tinygrad cannot use device {device or dev!r}: {why}")
    return dev


@functools.cache
def _clang_has_bf16(cc: str, arch: str) -> bool:
    # tinygrad's ClangRenderer renders bf16 as __bf16, which clang >= 17 takes on x86 and clang 14
    # (Debian 12) rejects: "__bf16 is not supported on this target". Same target as tinygrad's.
    src = b"__bf16 f(__bf16 x) { return x; }"
    cmd = [cc, "-x", "c", "-c", "-o", os.devnull, f"--target={arch}-none-unknown-elf", "-"]
    return subprocess.run(cmd, input=src, capture_output=True).returncode == 0


def ensure_bfloat16(dev: str) -> None:
    """Turn on tinygrad's bf16 emulation (EMULATED_DTYPES=bfloat16: float32 arithmetic, bf16 storage)
    when `dev` compiles with a clang that has no __bf16. Process-wide: tinygrad realizes lazily, so a
    model's kernels may compile long after load() returns. Other renderers report what they lack
    themselves (Renderer.supported_dtypes) and tinygrad emulates it without being asked."""
    d = Device[dev]
    if type(d.renderer).__name__ != "ClangRenderer" or _clang_has_bf16(clang(), d.arch.split(",")[0]):
        return
    emulated = [x for x in EMULATED_DTYPES.value.split(",") if x]
    if "bfloat16" not in emulated:
        EMULATED_DTYPES.value = ",".join(emulated + ["bfloat16"])


BEAM_VARIABLE = "GPTSPEC_TINYGRAD_BEAM"


def beam_width() -> int:
    """The BEAM search width the backend's calls compile with: $GPTSPEC_TINYGRAD_BEAM, 0 (off) when unset.
    BEAM=n times candidate optimizations of each new kernel on the device and keeps the fastest; the
    search runs once per kernel, and tinygrad's disk cache keeps its choice for later processes."""
    raw = os.environ.get(BEAM_VARIABLE, "").strip()
    if raw == "":
        return 0
    if not raw.isdigit():
        raise BackendError(f"{BEAM_VARIABLE} must be a whole number >= 0 (tinygrad's BEAM search width; "
                           f"0 or unset: off, 2: the usual choice), got {raw!r}")
    return int(raw)


def searched(hook):
    """A backend hook whose kernels compile under BEAM search when $GPTSPEC_TINYGRAD_BEAM asks for it;
    otherwise tinygrad's own setting (its BEAM variable) stands."""
    @functools.wraps(hook)
    def wrapper(*args, **kwargs):
        width = beam_width()
        if width == 0:
            return hook(*args, **kwargs)
        with Context(BEAM=width):
            return hook(*args, **kwargs)
    return wrapper


# TinyJits per model and input shape. Kept beside the model, not on it: nn.state.get_state_dict would
# find the captured Tensors; weak, so that a model's jits (and their buffers) die with it.
_jits: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _logits(ref, tokens: Tensor) -> Tensor:
    return ref().forward(tokens).float()


def _extend(ref, tokens: Tensor, kv: list[Tensor], start: int | UOp, last_only: bool = False) -> Tensor:
    # the cache's layers go in as a list: TinyJit takes the Tensors of a list argument as inputs, so a
    # replay writes into (and reads) whichever cache it is given, not the one it was captured with
    logits = ref().forward(tokens, kv, start, last_only).float()
    Tensor.realize(logits, *kv)  # the cache's writes and the logits in one schedule
    return logits


def _loss_and_grads(ref, tokens: Tensor, targets: Tensor, *draws: Tensor) -> tuple[Tensor, ...]:
    model = ref()
    loss, logits = model.loss_and_logits(tokens, targets, *draws)  # draws: loss="early_exit" only
    return _with_grads(model, loss, logits.float())


def _loss_grads_and_stats(ref, tokens: Tensor, targets: Tensor, *draws: Tensor) -> tuple[Tensor, ...]:
    model = ref()
    loss, logits, stats = model.loss_logits_and_stats(tokens, targets, *draws)
    return _with_grads(model, loss, logits.float(), *stats.values())


def _with_grads(model: LanguageModel, loss: Tensor, *outputs: Tensor) -> tuple[Tensor, ...]:
    # one realize for all: the forward runs once and the backward shares it (TinyJit realizes the returns together);
    # gradients in the state dict's (canonical) order, which loss_and_grads names them by
    grads = loss.gradient(*nn.state.get_state_dict(model).values())
    return (loss, *outputs, *(g.float() for g in grads))


def jit(model: LanguageModel, fn, *shapes) -> TinyJit:
    """The model's TinyJit of `fn` for these input shapes (call 1 runs eagerly, 2 captures, 3+ replay).
    A capture holds the weights' buffers; normalize_ assigns into those same buffers, so it stays valid."""
    per_model = _jits.setdefault(model, {})
    if (key := (fn, shapes)) not in per_model:
        per_model[key] = TinyJit(functools.partial(fn, weakref.ref(model)))
    return per_model[key]


#: host bytes read between realizes while loading: a load holds at most this (plus one tensor) beyond the model
REALIZE_BYTES = 64 << 20


class TinygradBackend(Backend):
    name = "tinygrad"
    extra = "gptspec[tinygrad]"
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
        return f"tinygrad {importlib.metadata.version('tinygrad')}"

    def devices(self) -> list[str]:
        if self._settings_refused():  # every tensor would fail on tinygrad's default device
            return []
        try:
            default = tinygrad_device(None)
        except BackendError:
            default = None
        return [d.lower() for d in dict.fromkeys(filter(None, (default, "CPU"))) if why_not(d) is None]

    @staticmethod
    def _settings_refused() -> str | None:
        try:
            Device.DEFAULT
        except AssertionError as e:
            return refused(e)
        except Exception:  # noqa: BLE001 -- no device at all: devices() says so in its own words
            return None
        return None

    def unavailable_reason(self) -> str | None:
        if self.devices():
            return None
        if (why := self._settings_refused()) is not None:
            return why
        return NO_CLANG if clang() is None else f"tinygrad opens no device here: {why_not('CPU')}"

    def dtypes(self, device: str) -> tuple[str, ...]:
        resolve_device(device)
        return DTYPES  # what a renderer lacks, tinygrad emulates (bf16 on CPU: see ensure_bfloat16)

    def threads(self, n: int):
        # tinygrad's CPU kernels run on one core; it generates a schedule's new kernels in a pool of processes,
        # one per core (its PARALLEL), and PARALLEL=0 generates them in this process
        return Context(PARALLEL=0 if n <= 1 else n)

    def _device(self, device) -> str:
        return resolve_device(device)

    def _parameter_names(self, model: LanguageModel) -> list[str]:
        return list(nn.state.get_state_dict(model))  # its init is lazy, so listing it computes nothing

    def _assign(self, model: LanguageModel, params: Mapping[str, np.ndarray], dtype: str, dev: str) -> LanguageModel:
        if dtype == "bfloat16":
            ensure_bfloat16(dev)
        # Realized in batches of REALIZE_BYTES as they are read: from_host's fresh host copies (and a mapped
        # checkpoint's arrays, weights/format.py MappedTensors) are freed as it goes, never all held at once;
        # batches, not single tensors, since each realize walks the graph of every live tensor.
        state, pending, pending_bytes = {}, [], 0
        for name, array in params.items():
            state[name] = from_host(array, dtype, dev)
            pending.append(state[name])
            pending_bytes += np.asarray(array).nbytes
            del array
            if pending_bytes >= REALIZE_BYTES:
                Tensor.realize(*pending)
                pending, pending_bytes = [], 0
        Tensor.realize(*pending)
        nn.state.load_state_dict(model, state, verbose=False, realize=False)
        return model

    @searched
    def _normalize(self, model: LanguageModel) -> None:
        model.normalize_()

    def state(self, model: LanguageModel) -> dict[str, np.ndarray]:
        return {n: t.float().numpy() for n, t in nn.state.get_state_dict(model).items()}

    def _ids(self, model: LanguageModel, array: np.ndarray) -> Tensor:
        # int32: ids and -100 fit, and it is every device's native int
        return Tensor(np.ascontiguousarray(array, dtype=np.int32), device=model.wte.weight.device)

    @searched
    def _forward(self, model: LanguageModel, tokens: np.ndarray) -> np.ndarray:
        return jit(model, _logits, tokens.shape)(self._ids(model, tokens)).numpy()

    @searched
    def _extend(self, model: LanguageModel, tokens: np.ndarray, cache: KVCache | None,
                last_only: bool = False) -> tuple[np.ndarray, KVCache]:
        w = model.wte.weight
        cache = KVCache(model.spec, tokens.shape[0], w.dtype, w.device) if cache is None else cache
        n = cache.start(tokens.shape)  # checks the batch and the context (n + t <= n_positions)
        ids = self._ids(model, tokens)
        if tokens.shape[1] == 1:  # one shape at every position: replayed, the position a Variable
            start = UOp.variable("start_pos", 0, model.spec.n_positions - 1).bind(n)
            logits = jit(model, _extend, tokens.shape)(ids, cache.layers, start)
        else:  # a prefill or a chunk: eagerly, at concrete positions (tinygrad reuses the kernels it compiled)
            logits = _extend(weakref.ref(model), ids, cache.layers, n, last_only)
        out = logits.numpy()
        cache.offset = n + tokens.shape[1]
        return out, cache

    @searched
    def _loss_and_grads(self, model: LanguageModel, tokens: np.ndarray, targets: np.ndarray,
                        draws: np.ndarray | None) -> LossAndGrads:
        fn = jit(model, _loss_and_grads, tokens.shape)
        loss, logits, *grads = fn(self._ids(model, tokens), self._ids(model, targets), *self._draws(model, draws))
        return LossAndGrads(loss.item(), logits.numpy(), self._named(model, grads))

    @searched
    def _loss_grads_and_stats(self, model: GPT, tokens: np.ndarray, targets: np.ndarray,
                              draws: np.ndarray | None) -> LossAndGrads:
        # the statistics ride on the loss's forward: one schedule, no second forward
        fn = jit(model, _loss_grads_and_stats, tokens.shape)
        loss, logits, *rest = fn(self._ids(model, tokens), self._ids(model, targets), *self._draws(model, draws))
        stats = dict(zip(STAT_NAMES, (t.numpy().astype(np.float64) for t in rest[:len(STAT_NAMES)])))
        return LossAndGrads(loss.item(), logits.numpy(), self._named(model, rest[len(STAT_NAMES):]), stats)

    def _draws(self, model: LanguageModel, draws: np.ndarray | None) -> tuple[Tensor, ...]:
        # float32 draws: the exit test u < p_max is taken in float32, and the inputs keep the margin of SPEC.md 18.3
        return () if draws is None else (Tensor(np.array(draws, dtype=np.float32), device=model.wte.weight.device),)

    def _named(self, model: LanguageModel, grads) -> dict[str, np.ndarray]:
        return {n: g.numpy() for n, g in zip(nn.state.get_state_dict(model), grads)}

    @searched
    def _residual_stats(self, model: LanguageModel, tokens: np.ndarray) -> dict[str, np.ndarray]:
        stats = model.residual_stats(self._ids(model, tokens))
        Tensor.realize(*stats.values())  # one schedule: the forward once for all four
        return {name: t.numpy().astype(np.float64) for name, t in stats.items()}

    # -- training (SPEC.md 20): train.py, tinygrad's own AdamW ---------------------------------------
    def _optimizer(self, model: LanguageModel, train_spec) -> nn.optim.OptimizerGroup:
        return configure_optimizer(model, train_spec)

    def _load_optimizer_state(self, model: LanguageModel, optimizer: nn.optim.OptimizerGroup,
                              state: TrainState) -> None:
        load_moments(model, optimizer, int(state.step), state.m, state.v)

    def _optimizer_state(self, model: LanguageModel, optimizer: nn.optim.OptimizerGroup,
                         dtype: np.dtype) -> TrainState:
        moments = optimizer_moments(model, optimizer)
        return TrainState(int(optimizer.steps_taken),
                          {n: a.astype(dtype, copy=False) for n, a in self.state(model).items()},
                          {n: m.numpy().astype(dtype, copy=False) for n, (m, _) in moments.items()},
                          {n: v.numpy().astype(dtype, copy=False) for n, (_, v) in moments.items()})

    @searched
    def _train_step(self, model: LanguageModel, optimizer: nn.optim.OptimizerGroup, train_spec, it: int,
                    micro_batches, draws) -> StepStats:
        return StepStats(*train_step(model, optimizer, train_spec, it, micro_batches, draws))
