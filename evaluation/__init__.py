"""Evaluation beyond the loss: HellaSwag-style multiple-choice accuracy (SPEC.md 23), computed the
same way over every backend's logits.

    hellaswag.py        the public jsonl layout (ctx, endings, label) and its errors
    multiple_choice.py  rendering (tokens, padding, left truncation), scoring, accuracy and its error
    run.py              evaluate(backend, model, examples) -> EvalResult
"""
from .hellaswag import Example, iter_examples, parse_example, read_examples
from .multiple_choice import Rendered, Scores, accuracy, render, score
from .run import PAD_MULTIPLE, EvalResult, ExampleResult, evaluate

__all__ = ["Example", "iter_examples", "parse_example", "read_examples", "Rendered", "Scores", "accuracy",
           "render", "score", "evaluate", "EvalResult", "ExampleResult", "PAD_MULTIPLE"]
