"""Reading HellaSwag's public jsonl layout (SPEC.md 23): one JSON object per line, of which gptspec
uses `ctx` (the context), `endings` (four candidate endings) and `label` (the index of the right one);
the other fields (`ind`, `activity_label`, `ctx_a`, `ctx_b`, `split`, `split_type`, `source_id`) are
kept as they are, for the per-example results. The data is the user's: nothing is downloaded.

A line that is not such an object is an InputError naming the file, the line number, the field, what
was expected and what was found; blank lines are skipped.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..spec import InputError

N_ENDINGS = 4


@dataclass(frozen=True)
class Example:
    ctx: str
    endings: tuple[str, ...]
    label: int
    source: str = ""                                    # the file it was read from ("": built in memory)
    line: int = 0                                       # its 1-based line there
    extra: dict[str, Any] = field(default_factory=dict, compare=False)   # the layout's other fields

    @property
    def where(self) -> str:
        """'file:line' for error messages and results."""
        return f"{self.source}:{self.line}" if self.source else "an example given in memory"


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_example(obj: Any, source: str = "", line: int = 0) -> Example:
    """An Example from one decoded JSON value; an InputError names `source`:`line`."""
    where = f"{source}:{line}" if source else "example"
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object with ctx, endings and label, got a {_kind(obj)}")
    missing = [k for k in ("ctx", "endings", "label") if k not in obj]
    if missing:
        hint = " (HellaSwag's test split has no labels: evaluate the val split)" if missing == ["label"] else ""
        raise InputError(f"{where}: missing field(s) {', '.join(map(repr, missing))}{hint}; "
                         f"the line has {sorted(obj)}")
    ctx, endings, label = obj["ctx"], obj["endings"], obj["label"]
    if not isinstance(ctx, str):
        raise InputError(f"{where}: 'ctx' must be text, got a {_kind(ctx)}: {ctx!r:.60}")
    if not ctx:
        raise InputError(f"{where}: 'ctx' is empty; an ending is scored given at least one context token")
    if not isinstance(endings, list) or len(endings) != N_ENDINGS:
        got = f"a list of {len(endings)}" if isinstance(endings, list) else f"a {_kind(endings)}"
        raise InputError(f"{where}: 'endings' must be a list of {N_ENDINGS} strings, got {got}")
    for i, ending in enumerate(endings):
        if not isinstance(ending, str):
            raise InputError(f"{where}: endings[{i}] must be text, got a {_kind(ending)}: {ending!r:.60}")
    # bool is an int subclass in Python: true/false is not an index
    if not isinstance(label, int) or isinstance(label, bool):
        raise InputError(f"{where}: 'label' must be an integer 0..{N_ENDINGS - 1}, got a {_kind(label)}: "
                         f"{label!r:.60}")
    if not 0 <= label < N_ENDINGS:
        raise InputError(f"{where}: 'label' must be 0..{N_ENDINGS - 1}, got {label}")
    extra = {k: v for k, v in obj.items() if k not in ("ctx", "endings", "label")}
    return Example(ctx, tuple(endings), label, source, line, extra)


def iter_examples(path: str | os.PathLike) -> Iterator[Example]:
    """The examples of a HellaSwag jsonl file, in order, each checked as it is read."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (HellaSwag data is supplied by the user, e.g. "
                         "hellaswag_val.jsonl from github.com/rowanz/hellaswag; nothing is downloaded)")
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield parse_example(obj, str(path), number)


def read_examples(path: str | os.PathLike, limit: int | None = None) -> list[Example]:
    """The first `limit` examples of the file (None: all); lines after them are not read."""
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}")
    out: list[Example] = []
    for example in iter_examples(path):
        out.append(example)
        if limit is not None and len(out) == limit:
            break
    if not out:
        raise InputError(f"{path}: holds no examples")
    return out
