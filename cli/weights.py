"""`gptspec info`, `convert` and `synthetic`: weights files described, converted and made."""
from __future__ import annotations

import argparse

from ..spec import DTYPES, PRESETS, WeightsError
from ..weights.resolve import CONVERT_FORMATS, format_of_destination
from .console import ConvertProgress, check_output, console


def cmd_info(args) -> int:
    from ..weights import load_checkpoint

    ckpt = load_checkpoint(args.source)
    console.print(ckpt.describe())
    console.print(ckpt.spec.to_json())
    return 0


def cmd_convert(args) -> int:
    from ..weights import load_checkpoint, save, write_hf, write_llmc, write_nanogpt

    fmt = args.to or format_of_destination(args.dest)
    check_output(args.dest, directory=fmt == "hf")  # before reading a large source
    with ConvertProgress() as bars:
        ckpt = load_checkpoint(args.source, progress=bars.report)
        dtype = args.dtype or (ckpt.stored_dtype if ckpt.stored_dtype in DTYPES else "float32")
        if fmt == "llmc" and not args.dtype and dtype == "float16":
            dtype = "float32"  # llm.c holds float32 or bfloat16; widening float16 is exact
        common = dict(synthetic=ckpt.synthetic)
        if fmt == "hf":
            bars.step(f"writing {args.dest}", lambda: write_hf(args.dest, ckpt.spec, ckpt.params, dtype, **common))
        elif fmt == "canonical":
            bars.step(f"writing {args.dest}", lambda: save(args.dest, ckpt.spec, ckpt.params, dtype,
                                                           origin=ckpt.source, **common))
        elif fmt == "nanogpt":
            write_nanogpt(args.dest, ckpt.spec, ckpt.params, dtype, origin=ckpt.source, progress=bars.report,
                          **common)
        else:
            write_llmc(args.dest, ckpt.spec, ckpt.params, dtype, progress=bars.report, **common)
    console.print(f"wrote {args.dest} ({fmt}, {dtype}) from {ckpt.describe()}")
    return 0


def cmd_synthetic(args) -> int:
    from ..spec import ModelSpec
    from ..spec.variants import get_variant
    from ..weights import save, synthetic_params, write_hf

    spec = get_variant(args.variant).apply(ModelSpec.preset(args.preset))
    to = args.to or format_of_destination(args.dest)
    if to not in ("canonical", "hf"):
        raise WeightsError(f"{args.dest}: synthetic weights are written as a canonical .safetensors file or a "
                           f"Hugging Face directory, not {to}; name it so or give --to canonical|hf")
    if to == "hf" and args.to is None and args.variant != "gpt2":
        raise WeightsError(f"{args.dest}: a directory means the Hugging Face layout, which holds GPT-2 only, not "
                           f"variant {args.variant!r}: name the file {args.dest.rstrip('/')}.safetensors "
                           "(a canonical file, which carries its spec) or give --to canonical")
    check_output(args.dest, directory=to == "hf")
    params = synthetic_params(spec, args.seed, args.init)
    if to == "hf":
        write_hf(args.dest, spec, params, args.dtype, synthetic=True)
    else:
        save(args.dest, spec, params, args.dtype, synthetic=True,
             origin=f"synthetic:{args.preset}:{args.seed} ({args.init} init)")
    console.print(f"wrote SYNTHETIC {args.preset} weights ({args.init} init, seed {args.seed}) to {args.dest}")
    return 0


def seed(text: str) -> int:
    """argparse's type for a seed: a non-negative integer, as numpy's generators take."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"the seed must be a non-negative integer, got {text!r}")
    return value


def add_parsers(sub) -> None:
    i = sub.add_parser("info", help="describe a weights file, directory or name")
    i.add_argument("source")
    i.set_defaults(func=cmd_info)

    v = sub.add_parser("convert", help="convert weights between the canonical, Hugging Face, nanoGPT and llm.c formats")
    v.add_argument("source", help="a name, file or directory (canonical, Hugging Face, nanoGPT ckpt.pt, llm.c .bin)")
    v.add_argument("dest")
    v.add_argument("--to", choices=CONVERT_FORMATS,
                   help="output format (default: from DEST: .safetensors canonical, .pt nanoGPT, .bin llm.c, "
                        "a directory Hugging Face)")
    v.add_argument("--dtype", choices=DTYPES)
    v.set_defaults(func=cmd_convert)

    s = sub.add_parser("synthetic", help="write deterministic synthetic weights")
    s.add_argument("preset", choices=list(PRESETS))
    s.add_argument("dest")
    s.add_argument("--seed", type=seed, default=0, help="a non-negative integer (default 0)")
    s.add_argument("--init", choices=("gpt2", "conformance"), default="gpt2")
    s.add_argument("--dtype", choices=DTYPES, default="float32")
    s.add_argument("--variant", default="gpt2", help="architecture variant (gptspec variants); "
                                                    "variants other than gpt2 need a canonical file")
    s.add_argument("--to", choices=("canonical", "hf"), default=None,
                   help="output format (default: from DEST: .safetensors canonical, a directory Hugging Face)")
    s.set_defaults(func=cmd_synthetic)
