"""The backend contract: what the conformance suite, `load` and the CLI ask of a framework.

A backend builds its framework's native model from a ModelSpec and canonical numpy parameters,
and answers questions about it in numpy: the logits, the loss with the gradient of every
parameter (canonical names and layout), the KV-cache step, the residual statistics.

The public methods below are written once, here: each checks its inputs where they enter
(spec/checks.py, on numpy, so the device never waits for a check inside the model) and says
once what is and is not defined, then calls the backend's hook of the same name with a leading
underscore. A backend folder holds the same files in every framework: backend.py (the hooks),
model.py (GPT-2), attention.py (attention and the KV cache), losses.py (the spec's losses and
their float32 accuracy), ngpt.py (nGPT).
"""
from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..spec import BackendError, InputError, ModelSpec, SpecError, param_table
from ..spec.checks import (
    check_draws_array, check_dtype, check_state_shapes, check_targets_array, check_tokens_array,
)
from ..spec.reference.training import TrainResult, TrainState
from ..spec.train import TrainingDiverged, TrainSpec
from ..weights import Checkpoint, load_checkpoint
from ..weights.format import shapes_of


@dataclass
class LossAndGrads:
    loss: float
    logits: np.ndarray            # (B, T, vocab) float32
    grads: dict[str, np.ndarray]  # canonical name -> float32, canonical layout
    stats: dict[str, np.ndarray] | None = None  # residual_stats of the same tokens, when asked for (gpt2 only)


@dataclass
class StepStats:
    """What one optimizer step reports (SPEC.md 20): the step's loss (the mean of its micro-batches'
    losses), the global gradient norm before clipping, and the learning rate it used."""
    loss: float
    grad_norm: float
    lr: float


class Backend(ABC):
    name: str          # registry name, e.g. "torch"
    extra: str         # pip extra that installs it, e.g. "gptspec[torch]"
    #: The option values (spec/config.py OPTIONS) this backend implements, listed explicitly in each
    #: backend: a value added to the spec is implemented nowhere until a backend claims it. A spec
    #: outside the table is "not implemented": a visible gap in the conformance table, a clear error from load().
    implements: Mapping[str, tuple[str, ...]] = {}
    #: architecture -> the framework's native model class (GPT, NGPT), each built as cls(spec, ...)
    models: Mapping[str, type] = {}

    # -- what this backend implements ----------------------------------------------------------
    def unsupported(self, spec: ModelSpec) -> str | None:
        """None if this backend implements every option of `spec`, else which one it lacks and where to add it."""
        for name, value in ((n, getattr(spec, n)) for n in _option_names()):
            if value not in self.implements.get(name, ()):
                return (f"{self.name} does not implement {name}={value!r} (its table: "
                        f"{', '.join(map(repr, self.implements.get(name, ()))) or 'none'}); "
                        f"a port adds it to backends/{self.name}/ and then to `implements` in "
                        f"backends/{self.name}/backend.py (docs/porting.md)")
        return None

    def check_supported(self, spec: ModelSpec) -> None:
        reason = self.unsupported(spec)
        if reason:
            raise BackendError(reason)

    def model_class(self, spec: ModelSpec) -> type:
        """The native model class for `spec`'s architecture."""
        self.check_supported(spec)
        return self.models[spec.architecture]

    def version(self) -> str:
        """The framework and its version, e.g. 'torch 2.13.0'."""
        return self.name

    def unavailable_reason(self) -> str | None:
        """None when usable here; otherwise what is missing and how to install it."""
        return None

    @abstractmethod
    def devices(self) -> list[str]:
        """The devices usable on this machine, default first (e.g. ["cpu", "cuda"])."""

    @abstractmethod
    def dtypes(self, device: str) -> tuple[str, ...]:
        """The spec dtypes this backend runs on `device`."""

    def threads(self, n: int) -> contextlib.AbstractContextManager:
        """A context in which the backend's own threads (intra-op threads, a parallel compile) keep to `n` CPU
        cores: the conformance suite's main process shares the machine with its worker processes (BLAS libraries
        are limited apart from this, conformance/workers.py sharing_cores). By default, nothing changes."""
        return contextlib.nullcontext()

    # -- building --------------------------------------------------------------------------------
    def build(self, spec: ModelSpec, params: Mapping[str, np.ndarray], dtype: str = "float32",
              device: str | None = None) -> Any:
        """The native model with `params` (canonical names/layout) cast to `dtype` on `device`. The
        model never aliases the caller's arrays."""
        self.check_supported(spec)
        dev = self._device(device)
        where = self._device_name(dev)
        dtype = check_dtype(dtype, self.dtypes(where), f"{self.name} on {where}")
        check_state_shapes(spec, shapes_of(params), f"weights for {self.name}")  # the header's: maps nothing
        model = self._new_model(spec, dev)
        self._check_parameters(spec, model)
        return self._assign(model, params, dtype, dev)

    def load(self, source, dtype: str | None = None, device: str | None = None) -> Any:
        """The native model for a name, path or Checkpoint (see gptspec.weights.load_checkpoint)."""
        ckpt: Checkpoint = load_checkpoint(source)
        self.check_supported(ckpt.spec)
        return self.build(ckpt.spec, ckpt.params, "float32" if dtype is None else dtype, device)

    def _check_parameters(self, spec: ModelSpec, model: Any) -> None:
        """The native model must hold exactly the canonical table's parameters, under their names."""
        table = [p.name for p in param_table(spec)]
        held = list(self._parameter_names(model))
        missing = [n for n in table if n not in set(held)]
        extra = [n for n in held if n not in set(table)]
        if missing or extra:
            parts = ([f"lacks {', '.join(missing)}"] if missing else []) + (
                [f"has {', '.join(extra)}, which the table does not"] if extra else [])
            raise BackendError(
                f"{self.name}'s {type(model).__name__} does not hold the canonical parameter table of this spec "
                f"(spec/params.py): it {'; it '.join(parts)}. Give the model in backends/{self.name}/ "
                f"({'ngpt.py' if spec.architecture == 'ngpt' else 'model.py'}, attention.py) these parameters "
                f"under their canonical names (docs/porting.md)")

    # -- what conformance, generation and the CLI call: inputs checked here, once ----------------
    def forward(self, model: Any, tokens: np.ndarray) -> np.ndarray:
        """Logits as float32 numpy for (B, T) integer tokens."""
        tokens = np.asarray(tokens)
        check_tokens_array(model.spec, tokens)
        return self._forward(model, tokens)

    def loss_and_grads(self, model: Any, tokens: np.ndarray, targets: np.ndarray,
                       draws: np.ndarray | None = None, *, stats: bool = False) -> LossAndGrads:
        """The spec's loss (SPEC.md 4 and 18), the last layer's logits and every parameter's gradient.
        `draws`: the (n_layer, B, T) uniforms of loss="early_exit" (spec.checks.check_draws), else None.
        `stats`: the residual statistics of `tokens` too (what residual_stats gives, architecture gpt2),
        from the same forward where the backend can: the conformance runner's one pass per case."""
        tokens, targets = np.asarray(tokens), np.asarray(targets)
        check_tokens_array(model.spec, tokens)
        check_targets_array(model.spec, tokens.shape, targets)
        check_draws_array(model.spec, tokens.shape, draws)
        draws = None if draws is None else np.asarray(draws)
        if not stats:
            return self._loss_and_grads(model, tokens, targets, draws)
        _check_stats_defined(model.spec)
        return self._loss_grads_and_stats(model, tokens, targets, draws)

    def extend(self, model: Any, tokens: np.ndarray, cache: Any, last_only: bool = False) -> tuple[np.ndarray, Any]:
        """SPEC.md 12: logits (B, t, vocab) float32 of `tokens` (B, t) at the positions after those in
        `cache` (None: empty), and the grown cache; `last_only` returns the last position's only (B, 1, vocab)."""
        tokens = np.asarray(tokens)
        check_tokens_array(model.spec, tokens)
        return self._extend(model, tokens, cache, last_only)

    def residual_stats(self, model: Any, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """SPEC.md 18.4 ("SIZE COMPARISON"): {"input", "mid", "output", "normed"} -> (n_layer,) float64."""
        _check_stats_defined(model.spec)
        tokens = np.asarray(tokens)
        check_tokens_array(model.spec, tokens)
        return self._residual_stats(model, tokens)

    def normalize(self, model: Any) -> None:
        """SPEC.md 11.3: the post-step weight normalization, in place (a no-op without unit-norm weights)."""
        if model.spec.has_unit_norm_weights:
            self._normalize(model)

    @abstractmethod
    def state(self, model: Any) -> dict[str, np.ndarray]:
        """The model's current weights, canonical names and layouts, as float32 numpy."""

    # -- training (SPEC.md 20): the framework's own optimizer, configured to the spec ----------------
    def optimizer(self, model: Any, train_spec: TrainSpec, state: TrainState | None = None) -> Any:
        """The framework's own AdamW for `model` (float32 master weights), configured to `train_spec`:
        two parameter groups by spec.train.decay_split. With `state`, its moments and step count (the
        weights are the model's: build the model from state.params to resume)."""
        if not isinstance(train_spec, TrainSpec):
            raise SpecError(f"train_spec must be a TrainSpec, got {type(train_spec).__name__}")
        optimizer = self._optimizer(model, train_spec)
        if state is not None:
            state.check(model.spec)
            self._load_optimizer_state(model, optimizer, state)
        return optimizer

    def train_step(self, model: Any, optimizer: Any, train_spec: TrainSpec, it: int,
                   micro_batches: Sequence[tuple[np.ndarray, np.ndarray]],
                   draws: Sequence[np.ndarray] | None = None) -> StepStats:
        """Iteration `it` (0-based; its learning rate is spec.train.lr_at(train_spec, it)): the gradient
        accumulated over grad_accum micro-batches (tokens, targets), clipped, one optimizer step, and
        nGPT's normalization. A non-finite loss or gradient raises TrainingDiverged before the update."""
        micro_batches = check_micro_batches(model.spec, train_spec, it, micro_batches, draws)
        return self._train_step(model, optimizer, train_spec, it, micro_batches,
                                None if draws is None else [np.asarray(u, np.float32) for u in draws])

    def optimizer_state(self, model: Any, optimizer: Any, dtype: str = "float64") -> TrainState:
        """The model's weights and the optimizer's step count and moments, canonical names, float64 numpy;
        dtype="float32" gives the same values (every backend trains float32 weights and moments) in half
        the memory."""
        if dtype not in ("float64", "float32"):
            raise InputError(f"an optimizer state is exported as float64 or float32, not {dtype!r}")
        return self._optimizer_state(model, optimizer, np.dtype(dtype))

    def train(self, model: Any, train_spec: TrainSpec, batches: Sequence[Sequence[tuple]],
              draws: Sequence[Sequence[np.ndarray]] | None = None, state: TrainState | None = None,
              state_dtype: str = "float64") -> TrainResult:
        """len(batches) optimizer steps on `model`, in place, from `state` (None: fresh moments at step 0),
        with the same arguments as the float64 reference (spec.reference.train), and its result type;
        the result's state in `state_dtype` (optimizer_state's dtype)."""
        optimizer = self.optimizer(model, train_spec, state)
        if draws is not None and len(draws) != len(batches):
            raise InputError(f"draws hold {len(draws)} step(s), batches {len(batches)}: one entry per step")
        start, result = (0 if state is None else int(state.step)), TrainResult()
        for i, micro_batches in enumerate(batches):
            stats = self.train_step(model, optimizer, train_spec, start + i, micro_batches,
                                    None if draws is None else draws[i])
            result.losses.append(stats.loss)
            result.grad_norms.append(stats.grad_norm)
            result.lrs.append(stats.lr)
        result.state = self.optimizer_state(model, optimizer, state_dtype)
        return result

    # -- the hooks each backend writes -------------------------------------------------------------
    @abstractmethod
    def _device(self, device: str | None) -> Any:
        """The framework's device for a name (None: the framework's default); BackendError if unusable."""

    def _device_name(self, dev: Any) -> str:
        """The name dtypes() takes for a resolved device."""
        return str(dev)

    def _new_model(self, spec: ModelSpec, dev: Any) -> Any:
        """A native model of `spec` whose parameters are placeholders (no memory, or lazy: _assign replaces them)."""
        return self.model_class(spec)(spec)

    @abstractmethod
    def _parameter_names(self, model: Any) -> list[str]:
        """The names of the parameters the native model holds."""

    @abstractmethod
    def _assign(self, model: Any, params: Mapping[str, np.ndarray], dtype: str, dev: Any) -> Any:
        """The model with copies of `params` rounded to `dtype` on `dev` in place of its placeholders."""

    @abstractmethod
    def _forward(self, model: Any, tokens: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _loss_and_grads(self, model: Any, tokens: np.ndarray, targets: np.ndarray,
                        draws: np.ndarray | None) -> LossAndGrads: ...

    def _loss_grads_and_stats(self, model: Any, tokens: np.ndarray, targets: np.ndarray,
                              draws: np.ndarray | None) -> LossAndGrads:
        """_loss_and_grads with the residual statistics. This default runs the two hooks one after the
        other (two forwards); a backend whose framework can take both from one forward overrides it."""
        out = self._loss_and_grads(model, tokens, targets, draws)
        out.stats = self._residual_stats(model, tokens)
        return out

    def _extend(self, model: Any, tokens: np.ndarray, cache: Any, last_only: bool) -> tuple[np.ndarray, Any]:
        raise BackendError(f"{self.name} does not implement generation (a KV cache)")

    def _residual_stats(self, model: Any, tokens: np.ndarray) -> dict[str, np.ndarray]:
        raise BackendError(f"{self.name} does not implement the residual-stream statistics")

    def _normalize(self, model: Any) -> None:
        raise BackendError(f"{self.name} does not implement the weight normalization (SPEC.md 11.3)")

    def _optimizer(self, model: Any, train_spec: TrainSpec) -> Any:
        raise BackendError(f"{self.name} does not implement training (SPEC.md 20)")

    def _load_optimizer_state(self, model: Any, optimizer: Any, state: TrainState) -> None:
        raise BackendError(f"{self.name} does not implement reading an optimizer state")

    def _optimizer_state(self, model: Any, optimizer: Any, dtype: np.dtype) -> TrainState:
        raise BackendError(f"{self.name} does not implement writing an optimizer state")

    def _train_step(self, model: Any, optimizer: Any, train_spec: TrainSpec, it: int,
                    micro_batches: list[tuple[np.ndarray, np.ndarray]], draws: list[np.ndarray] | None) -> StepStats:
        raise BackendError(f"{self.name} does not implement training (SPEC.md 20)")


def check_micro_batches(spec: ModelSpec, train_spec: TrainSpec, it: int, micro_batches, draws) -> list:
    """Where training data enters a backend (SPEC.md 6): grad_accum micro-batches of valid tokens and
    targets (and draws for loss="early_exit"), checked on the host before any device work."""
    n = train_spec.grad_accum
    if len(micro_batches) != n:
        raise InputError(f"step {it} has {len(micro_batches)} micro-batch(es); grad_accum={n} needs {n}")
    if draws is not None and len(draws) != n:
        raise InputError(f"draws of step {it} hold {len(draws)} micro-batch(es); grad_accum={n} needs {n}")
    out = []
    for k, (tokens, targets) in enumerate(micro_batches):
        tokens, targets = np.asarray(tokens), np.asarray(targets)
        try:
            check_tokens_array(spec, tokens)
            check_targets_array(spec, tokens.shape, targets)
            check_draws_array(spec, tokens.shape, None if draws is None else draws[k])
        except InputError as e:
            raise InputError(f"step {it}, micro-batch {k}: {e}") from None
        out.append((tokens, targets))
    return out


def check_finite_step(it: int, loss: float, grad_norm: float,
                      grads: Callable[[], Mapping[str, np.ndarray]]) -> None:
    """Before the update: a non-finite loss or gradient stops training (SPEC.md 20.10), naming the step
    and the first tensor, in canonical order, whose gradient went non-finite. The norm is a sum over every
    gradient, so it is finite exactly when they all are: `grads()` is only fetched on the way to the error."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    bad = next((name for name, g in grads().items() if not np.isfinite(g).all()), None)
    what = (f"the gradient of {bad!r} is not finite" if bad else f"the loss is {loss!r}" if not math.isfinite(loss)
            else f"the global gradient norm overflowed to {grad_norm!r}")
    raise TrainingDiverged(f"training iteration it={it}: {what}; training stopped before the update", it, bad)


def _check_stats_defined(spec: ModelSpec) -> None:
    if spec.architecture != "gpt2":
        raise SpecError(f"residual_stats are defined for architecture='gpt2' (SPEC.md 18.4), "
                        f"not {spec.architecture!r}")


def _option_names() -> tuple[str, ...]:
    from ..spec import OPTIONS

    return tuple(OPTIONS)
