"""`evaluate(backend, model, examples)`: multiple-choice accuracy (SPEC.md 23) of any backend's model,
one forward pass of the four candidates per example, scored once, in multiple_choice.py.

    from gptspec import backends
    from gptspec.evaluation import evaluate, read_examples

    backend = backends.get("torch")
    model = backend.load("gpt2", dtype="bfloat16")
    result = evaluate(backend, model, read_examples("hellaswag_val.jsonl", limit=500))
    result.acc_norm, result.acc_norm_stderr

`backend` is anything with `forward(model, tokens) -> logits` (a gptspec Backend, or the float64
reference of conformance/multiple_choice.py) and `model` anything with a `.spec` (every backend's
native model).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..spec import InputError
from .hellaswag import Example
from .multiple_choice import TOKENIZER_VOCAB, Scores, accuracy, encoding, render, score

#: rows are padded to a multiple of this many positions: a compiling backend (tinygrad) then builds
#: kernels for a few lengths instead of one per example; padding is never scored
PAD_MULTIPLE = 32


@dataclass(frozen=True)
class ExampleResult:
    example: Example
    scores: Scores
    truncated: int                # context tokens dropped from the left

    @property
    def pred(self) -> int:
        return self.scores.pred

    @property
    def pred_norm(self) -> int:
        return self.scores.pred_norm

    def to_dict(self) -> dict:
        ex, s = self.example, self.scores
        return {"line": ex.line, "label": ex.label, "pred": s.pred, "pred_norm": s.pred_norm,
                "correct": s.pred == ex.label, "correct_norm": s.pred_norm == ex.label,
                "losses": list(s.losses), "avg_losses": list(s.avg_losses), "n_tokens": list(s.n_tokens),
                "truncated_tokens": self.truncated, **({"ind": ex.extra["ind"]} if "ind" in ex.extra else {})}


@dataclass
class EvalResult:
    examples: list[ExampleResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n(self) -> int:
        return len(self.examples)

    @property
    def acc(self) -> float:
        return accuracy([e.pred == e.example.label for e in self.examples])[0]

    @property
    def acc_stderr(self) -> float | None:
        return accuracy([e.pred == e.example.label for e in self.examples])[1]

    @property
    def acc_norm(self) -> float:
        return accuracy([e.pred_norm == e.example.label for e in self.examples])[0]

    @property
    def acc_norm_stderr(self) -> float | None:
        return accuracy([e.pred_norm == e.example.label for e in self.examples])[1]

    @property
    def truncated(self) -> int:
        """How many examples had their context cut from the left."""
        return sum(1 for e in self.examples if e.truncated)

    @property
    def examples_per_s(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> dict:
        return {"n": self.n, "acc": self.acc, "acc_stderr": self.acc_stderr, "acc_norm": self.acc_norm,
                "acc_norm_stderr": self.acc_norm_stderr, "truncated_examples": self.truncated,
                "seconds": self.seconds, "examples_per_s": self.examples_per_s}

    def to_dict(self) -> dict:
        return {**self.summary(), "examples": [e.to_dict() for e in self.examples]}


def check_vocabulary(spec) -> None:
    if spec.vocab_size < TOKENIZER_VOCAB:
        raise InputError(f"the model has a vocabulary of {spec.vocab_size} ids; multiple-choice evaluation "
                         f"tokenizes text with the GPT-2 tokenizer, whose ids need a vocabulary of {TOKENIZER_VOCAB}")


def evaluate(backend, model, examples: Sequence[Example], *, pad_multiple: int = PAD_MULTIPLE,
             on_example: Callable[[int, ExampleResult], None] | None = None) -> EvalResult:
    """Every example through `backend.forward(model, (4, T) tokens)`, scored; `on_example(i, result)`
    after each (progress). Raises InputError before any forward pass if the model cannot take GPT-2
    tokens, and at an example whose endings do not fit the model's positions."""
    spec, examples = model.spec, list(examples)
    check_vocabulary(spec)
    if not examples:
        raise InputError("no examples to evaluate")
    if pad_multiple < 1:
        raise InputError(f"pad_multiple must be >= 1, got {pad_multiple}")
    enc, result = encoding(), EvalResult()
    start = time.perf_counter()
    for i, example in enumerate(examples):
        rendered = render(example, spec.n_positions, pad_multiple, enc)
        logits = np.asarray(backend.forward(model, rendered.tokens))
        item = ExampleResult(example, score(logits, rendered, spec.vocab_size), rendered.truncated)
        result.examples.append(item)
        if on_example:
            on_example(i, item)
    result.seconds = time.perf_counter() - start
    return result
