"""Token shards as llm.c's data files: what `gptspec data llmc` writes.

llm.c's dataloader (llmc/dataloader.h; dev/data/data_common.py writes them) reads a header of 256
little-endian int32 (magic 20240520, version 1, the token count, zeros) followed by the uint16
tokens. gptspec's .bin files are nanoGPT's headerless ones, so llm.c gets copies with the header.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..spec import InputError
from ..weights.atomic import atomic_write
from .shards import DTYPE, SPLITS, TokenShards

LLMC_MAGIC = 20240520
LLMC_VERSION = 1
LLMC_HEADER_INTS = 256
_CHUNK_TOKENS = 1 << 24


def write_llmc_file(tokens: np.ndarray, path: Path) -> None:
    if len(tokens) >= 2 ** 31:
        raise InputError(f"{path}: llm.c's header holds at most 2**31 - 1 tokens, this split has {len(tokens)}")
    header = np.zeros(LLMC_HEADER_INTS, dtype="<i4")
    header[:3] = (LLMC_MAGIC, LLMC_VERSION, len(tokens))
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        for start in range(0, len(tokens), _CHUNK_TOKENS):
            f.write(np.asarray(tokens[start:start + _CHUNK_TOKENS], dtype=DTYPE).tobytes())


def export_llmc(directory, prefix) -> list[Path]:
    """Write PREFIX_train.bin and PREFIX_val.bin in llm.c's format from the shard folder `directory`."""
    ds = TokenShards.open(directory)
    prefix = Path(prefix)
    written = []
    for split in SPLITS:
        path = prefix.with_name(f"{prefix.name}_{split}.bin")
        write_llmc_file(ds.tokens(split), path)
        written.append(path)
    return written
