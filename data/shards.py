"""Token shards on disk (SPEC.md 21) and the reader the training loop uses.

    ds = TokenShards.open("data/shakespeare_char")
    x, y = ds.batch("train", batch_size=12, block_size=64, seed=1337, step=0, micro=0)

A shard directory holds `train.bin` and `val.bin` (flat little-endian uint16 token ids, nanoGPT's
layout: `np.memmap(path, dtype=np.uint16, mode="r")` reads them) and `meta.json` (format, version,
tokenizer, per-split token count and sha256, source). Char-level directories also hold nanoGPT's
`meta.pkl`, which gptspec writes for nanoGPT and never reads.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..spec import InputError, WeightsError
from .tokenizers import tokenizer_from_meta

FORMAT = "gptspec-token-shards"
VERSION = 1
SPLITS = ("train", "val")
SPLIT_IDS = {"train": 0, "val": 1}
# eval batches draw from their own streams, so they never coincide with training batches by construction
EVAL_STREAM_OFFSET = 2
DTYPE = np.dtype("<u2")
META = "meta.json"
# sha256 of shards up to this many bytes (both splits) is checked on every open; above it only with verify=True
VERIFY_LIMIT_BYTES = 256 << 20
_HASH_CHUNK = 1 << 24


def file_digest(path: Path) -> tuple[str, int]:
    """sha256 of a .bin file and its largest token id (one pass, in chunks)."""
    h, largest = hashlib.sha256(), -1
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            largest = max(largest, int(np.frombuffer(chunk, dtype=DTYPE).max()))
    return h.hexdigest(), largest


def is_shard_dir(path: Path) -> bool:
    """Whether `path` holds a meta.json of this format (any version): what `prepare` may replace."""
    try:
        meta = json.loads((Path(path) / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _field(meta: dict, key: str, kind, where: str):
    value = meta.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise WeightsError(f"{where}: field {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def read_meta(directory: Path) -> dict:
    """meta.json of a shard directory, checked for shape; WeightsError naming the file otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsError(f"{directory}: no such data directory (expected train.bin, val.bin and {META} "
                           "from `gptspec data prepare`)")
    path = directory / META
    if not path.is_file():
        found = sorted(p.name for p in directory.iterdir())[:8]
        raise WeightsError(f"{directory}: not a token-shard directory: no {META} (found {found or 'nothing'}); "
                           "make one with `gptspec data prepare`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise WeightsError(f"{path}: format must be {FORMAT!r}, got {got!r}")
    if meta.get("version") != VERSION:
        raise WeightsError(f"{path}: format version {meta.get('version')!r}; this gptspec reads version "
                           f"{VERSION}: prepare the data again with `gptspec data prepare`")
    if meta.get("dtype") != "uint16" or meta.get("byteorder") != "little":
        raise WeightsError(f"{path}: shards must be little-endian uint16, meta.json says dtype="
                           f"{meta.get('dtype')!r} byteorder={meta.get('byteorder')!r}")
    splits = _field(meta, "splits", dict, str(path))
    for split in SPLITS:
        entry = splits.get(split)
        if not isinstance(entry, dict):
            raise WeightsError(f"{path}: splits.{split} is missing")
        where = f"{path} splits.{split}"
        if _field(entry, "file", str, where) != f"{split}.bin":
            raise WeightsError(f"{where}: file must be {split}.bin, got {entry['file']!r}")
        if _field(entry, "tokens", int, where) < 1:
            raise WeightsError(f"{where}: tokens must be at least 1, got {entry['tokens']}")
        sha = _field(entry, "sha256", str, where)
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise WeightsError(f"{where}: sha256 must be 64 lowercase hex digits, got {sha!r}")
    return meta


def fingerprint_of(meta: dict) -> str:
    """16 hex digits identifying the data: the tokenizer and each split's count and sha256. Where the
    text came from (paths, descriptions) is left out, so the same shards moved or re-prepared from the
    same text have the same fingerprint."""
    ident = {"tokenizer": meta["tokenizer"],
             "splits": {s: {k: meta["splits"][s][k] for k in ("tokens", "sha256")} for s in SPLITS}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


class TokenShards:
    """An opened, checked shard directory. Build with `TokenShards.open(path)`."""

    def __init__(self, directory: Path, meta: dict, tokenizer, tokens: dict[str, np.memmap]):
        self.directory, self.meta, self.tokenizer, self._tokens = directory, meta, tokenizer, tokens
        self.vocab_size = tokenizer.vocab_size
        self.fingerprint = fingerprint_of(meta)

    @classmethod
    def open(cls, path, verify: bool | None = None) -> "TokenShards":
        """Open and check a shard directory: meta.json, both .bin files present with the byte size
        their token counts give. The sha256 of each file (and that every id is below vocab_size) is
        checked when `verify` is True, or when it is None (the default) and the shards together are
        at most VERIFY_LIMIT_BYTES (256 MiB); verify=False skips it."""
        directory = Path(path)
        meta = read_meta(directory)
        tokenizer = tokenizer_from_meta(meta, str(directory / META))
        sizes = {}
        for split in SPLITS:
            file = directory / f"{split}.bin"
            if not file.is_file():
                raise WeightsError(f"{directory}: {split}.bin is missing (meta.json lists it)")
            sizes[split] = file.stat().st_size
            expected = meta["splits"][split]["tokens"] * DTYPE.itemsize
            if sizes[split] != expected:
                raise WeightsError(f"{file}: {sizes[split]} bytes, but meta.json's {meta['splits'][split]['tokens']} "
                                   f"uint16 tokens make {expected}: the file is truncated or not this data's")
        if verify is None:
            verify = sum(sizes.values()) <= VERIFY_LIMIT_BYTES
        if verify:
            for split in SPLITS:
                file = directory / f"{split}.bin"
                digest, largest = file_digest(file)
                if digest != meta["splits"][split]["sha256"]:
                    raise WeightsError(f"{file}: sha256 {digest[:16]}... differs from meta.json's "
                                       f"{meta['splits'][split]['sha256'][:16]}...: the file changed after it was written")
                if largest >= tokenizer.vocab_size:
                    raise WeightsError(f"{file}: holds token id {largest}, outside the {tokenizer.name} "
                                       f"vocabulary of {tokenizer.vocab_size}")
        tokens = {s: np.memmap(directory / f"{s}.bin", dtype=DTYPE, mode="r") for s in SPLITS}
        return cls(directory, meta, tokenizer, tokens)

    def __repr__(self) -> str:
        counts = ", ".join(f"{s} {len(self._tokens[s]):,}" for s in SPLITS)
        return f"TokenShards({str(self.directory)!r}, {self.tokenizer.name}, vocab {self.vocab_size}, {counts})"

    def tokens(self, split: str) -> np.memmap:
        """The split's token ids, a read-only uint16 memmap."""
        if split not in SPLIT_IDS:
            raise InputError(f"{self.directory}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        return self._tokens[split]

    def check_usable(self, spec, batch_size: int, block_size: int) -> None:
        """Refuse, before training starts, data this model cannot train on: ids beyond the model's
        vocabulary (another tokenizer), a block longer than the model's positions, or a split too
        short for one block of inputs and targets."""
        if self.vocab_size > spec.vocab_size:
            raise InputError(f"{self.directory}: the data's {self.tokenizer.name} tokenizer has {self.vocab_size} "
                             f"ids but the model's vocabulary has {spec.vocab_size}: the data was prepared with a "
                             "different tokenizer than the model's (prepare it with one whose vocabulary fits, or "
                             f"use a model with vocab_size >= {self.vocab_size})")
        _positive(batch_size=batch_size, block_size=block_size)
        if block_size > spec.n_positions:
            raise InputError(f"block_size {block_size} is larger than the model's n_positions {spec.n_positions}")
        for split in SPLITS:
            self._check_long_enough(split, block_size)

    def _check_long_enough(self, split: str, block_size: int) -> int:
        n = len(self.tokens(split))
        if n < block_size + 1:
            raise InputError(f"{self.directory}: the {split} split has {n} tokens, too few for one batch of "
                             f"block_size {block_size} (needs at least {block_size + 1}: inputs plus the "
                             "shifted targets); use more text, a smaller block or another --val-fraction")
        return n

    def _gather(self, split: str, offsets: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
        window = offsets[:, None] + np.arange(block_size + 1)
        rows = np.asarray(self._tokens[split][window], dtype=np.int64)
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

    def _offsets(self, split: str, batch_size: int, block_size: int, entropy: list[int]) -> np.ndarray:
        n = self._check_long_enough(split, block_size)
        return np.random.default_rng(entropy).integers(0, n - block_size, size=batch_size)

    def batch(self, split: str, batch_size: int, block_size: int, *, seed: int, step: int,
              micro: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """nanoGPT's get_batch: batch_size offsets uniform in [0, len - block_size), inputs
        tokens[i:i+T] and targets tokens[i+1:i+1+T], int64 (B, T). The offsets come from
        np.random.default_rng([seed, split_id, step, micro]) (split_id train 0, val 1), so a batch
        is a pure function of (seed, split, step, micro): resuming needs only the step."""
        self.tokens(split)
        _positive(batch_size=batch_size, block_size=block_size)
        _non_negative(seed=seed, step=step, micro=micro)
        offsets = self._offsets(split, batch_size, block_size, [seed, SPLIT_IDS[split], step, micro])
        return self._gather(split, offsets, block_size)

    def eval_batches(self, split: str, batch_size: int, block_size: int, n: int, *,
                     seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """`n` batches for evaluation, fixed for a run (the same at every eval): batch k draws its
        offsets from np.random.default_rng([seed, 2 + split_id, k, 0]), a stream training batches
        never use."""
        self.tokens(split)
        _positive(batch_size=batch_size, block_size=block_size, n=n)
        _non_negative(seed=seed)
        stream = EVAL_STREAM_OFFSET + SPLIT_IDS[split]
        return [self._gather(split, self._offsets(split, batch_size, block_size, [seed, stream, k, 0]), block_size)
                for k in range(n)]


def _positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")


def _non_negative(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise InputError(f"{name} must be a non-negative integer, got {value!r}")
