"""From what a user types (`"gpt2"`, a path, `"synthetic:gpt2"`) to a Checkpoint.

A name is looked up, in order:
1. the directory named by $GPTSPEC_WEIGHTS: `<name>.safetensors` (canonical) or `<name>/`
   (a canonical `model.safetensors` or a Hugging Face directory);
2. the Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub):
   `models--<name>` or `models--openai-community--<name>` (a repo id `org/name` names its own
   `models--org--name`), the snapshot that refs/main names.
`synthetic:<preset>` (optionally `synthetic:<preset>:<seed>`) makes GPT-2-initialised
synthetic weights in memory. Nothing is ever downloaded.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from ..spec import PRESETS, ModelSpec, WeightsError
from .format import Checkpoint, is_canonical, read, read_safetensors
from .hf import find_weights_file, read_hf
from .llmc import MAGIC as LLMC_MAGIC, OTHER_MAGICS as LLMC_OTHER_MAGICS, read_llmc
from .nanogpt import read_nanogpt
from .synthetic import synthetic_params

ENV_VAR = "GPTSPEC_WEIGHTS"
HF_ORGS = ("", "openai-community")
NANOGPT_SUFFIXES = (".pt", ".pth", ".ckpt")


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def read_path(path: str | os.PathLike, *, progress=None) -> Checkpoint:
    """A canonical file, a directory holding one, a Hugging Face checkpoint, a nanoGPT `ckpt.pt`
    (or its out directory) or an llm.c `.bin` model file."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file or directory")
    if not path.is_dir() and not path.is_file():  # a FIFO or a device would block or never end
        raise WeightsError(f"{path}: not a regular file or a directory ({_kind(path)}); weights are read from files")
    if path.is_dir():
        weights = find_weights_file(path)
        if weights is None:
            if (path / "ckpt.pt").is_file():  # nanoGPT's out directory
                return read_nanogpt(path / "ckpt.pt", progress=progress)
            raise WeightsError(
                f"{path}: a directory with no weights (looked for model.safetensors, "
                "model.safetensors.index.json, pytorch_model.bin)"
            )
        if weights.name == "model.safetensors" and not (path / "config.json").exists():
            return read(weights)
        return read_hf(path)
    kind = sniff(path)
    if kind == "safetensors":
        # one cheap header read decides which layout it is
        _, metadata, _ = _header(path)
        return read(path) if is_canonical(metadata) else read_hf(path)
    if kind == "llmc":
        return read_llmc(path, progress=progress)
    if kind == "nanogpt":
        return read_nanogpt(path, progress=progress)
    return read_hf(path)


def _kind(path: Path) -> str:
    mode = path.stat().st_mode
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a plain file"


def _safetensors_header(head: bytes, size: int) -> bool:
    """Whether `head` (a file's first 9 bytes) opens a safetensors file: a little-endian u64 header
    length that fits the file, then the header's JSON object."""
    return len(head) == 9 and 2 <= int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{"


def sniff(path: Path) -> str:
    """Which reader a file goes to, from its first bytes and its name: 'safetensors' (a .safetensors
    name, or a safetensors header under any name), 'llmc' (an llm.c magic number, or a .bin that is
    neither a torch file nor beside a config.json), 'nanogpt' (.pt/.pth/.ckpt, or a torch file with no
    config.json beside it) or 'hf' (pytorch_model.bin beside its config.json)."""
    with open(path, "rb") as f:
        first = f.read(9)
    head = first[:4]
    if path.suffix == ".safetensors":
        return "safetensors"
    if len(head) == 4 and int.from_bytes(head, "little", signed=True) in (LLMC_MAGIC, *LLMC_OTHER_MAGICS):
        return "llmc"
    if _safetensors_header(first, path.stat().st_size):
        return "safetensors"
    if path.suffix in NANOGPT_SUFFIXES:
        return "nanogpt"
    torch_file = head[:4] == b"PK\x03\x04" or head[:2] == b"\x80\x02"  # torch's zip or legacy pickle
    has_config = (path.parent / "config.json").is_file()
    if torch_file and not has_config:
        return "nanogpt"
    if path.suffix == ".bin" and not torch_file and not has_config:
        return "llmc"  # its reader says what is wrong with the header
    return "hf"


CONVERT_FORMATS = ("canonical", "hf", "nanogpt", "llmc")
_SUFFIX_FORMATS = {".safetensors": "canonical", ".pt": "nanogpt", ".pth": "nanogpt", ".ckpt": "nanogpt",
                   ".bin": "llmc"}


def format_of_destination(dest: str) -> str:
    """The format a destination's name asks for (one of CONVERT_FORMATS): .safetensors canonical,
    .pt/.pth/.ckpt nanoGPT, .bin llm.c, a directory (existing, ending in a separator, or without a
    suffix) Hugging Face. The writing counterpart of `sniff`, which reads a file's first bytes."""
    path = Path(dest)
    if path.is_dir() or dest.endswith(("/", os.sep)) or not path.suffix:
        return "hf"
    if path.suffix in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[path.suffix]
    raise WeightsError(
        f"{dest}: cannot tell the output format from its name (.safetensors: canonical, .pt: nanoGPT, "
        f".bin: llm.c, a directory: Hugging Face); name it so or give --to {{{','.join(CONVERT_FORMATS)}}}"
    )


def _header(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return None, dict(f.metadata() or {}), None
    except SafetensorError:
        return read_safetensors(path)  # raises the full, file-naming error


def _hf_snapshot(repo_dir: Path) -> Path | None:
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        candidates = [snapshots / ref.read_text().strip()]
    elif snapshots.is_dir():
        candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    else:
        return None
    for snap in candidates:
        if (snap / "config.json").is_file() and find_weights_file(snap):
            return snap
    return None


def _synthetic(name: str) -> Checkpoint:
    parts = name.split(":")
    preset = parts[1] if len(parts) > 1 else ""
    if len(parts) > 3 or preset not in PRESETS:
        raise WeightsError(
            f"{name!r}: write synthetic:<preset>[:<seed>] with a preset from {', '.join(PRESETS)}"
        )
    try:
        seed = int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        seed = -1
    if seed < 0:
        raise WeightsError(f"{name!r}: the seed must be a non-negative integer, got {parts[2]!r}")
    spec = ModelSpec.preset(preset)
    return Checkpoint(
        spec=spec, params=synthetic_params(spec, seed, "gpt2"), source=f"synthetic:{preset}:{seed}",
        synthetic=True,
    )


def candidates(name: str) -> list[tuple[Path, str]]:
    """Every place `name` is looked for, with the reason it was (or was not) a hit."""
    out = []
    env = os.environ.get(ENV_VAR)
    if env:
        for p in (Path(env) / f"{name}.safetensors", Path(env) / name):
            out.append((p, "found" if p.exists() else "missing"))
    else:
        out.append((Path(f"${ENV_VAR}"), "unset"))
    hub = hf_hub_cache()
    repo_ids = [name] if "/" in name else [f"{org}/{name}" if org else name for org in HF_ORGS]
    for repo_id in repo_ids:
        repo = hub / ("models--" + repo_id.replace("/", "--"))
        snap = _hf_snapshot(repo) if repo.is_dir() else None
        out.append((snap or repo, "found" if snap else ("no complete snapshot" if repo.is_dir() else "missing")))
    return out


def locate(name: str) -> Path:
    """Where the weights called `name` are; WeightsError saying where it looked if nowhere."""
    looked = candidates(name)
    for path, status in looked:
        if status == "found":
            return path
    where = "\n".join(f"  {p}: {status}" for p, status in looked)
    hint = (
        f"set {ENV_VAR} to a directory holding {name}.safetensors or a Hugging Face directory {name}/, "
        f"or pass a path; without real weights, 'synthetic:{name}' gives synthetic ones"
        if name in PRESETS else "pass a path to a weights file or directory"
    )
    raise WeightsError(f"no weights found for {name!r}. Looked in:\n{where}\nTo provide them: {hint}.")


def load_checkpoint(source, *, progress=None) -> Checkpoint:
    """A Checkpoint from a Checkpoint, a path, a `synthetic:` name, or a model name.

    `progress(task, bytes_done, bytes_total)`, if given, is called as the nanoGPT and llm.c readers
    go (per tensor); the other formats read without reporting."""
    if isinstance(source, Checkpoint):
        return source
    text = os.fspath(source)
    if text.startswith("synthetic:"):
        return _synthetic(text)
    if os.path.exists(text) or names_a_path(text):
        return read_path(text, progress=progress)  # a path that does not exist is reported as such
    return read_path(locate(text), progress=progress)


_REPO_ID = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # e.g. openai-community/gpt2


def names_a_path(text: str) -> bool:
    """Whether `text` is meant as a path (a separator or a weights suffix), not a name to look up (a
    Hugging Face repo id such as openai-community/gpt2 is a name)."""
    return looks_like_path(text) and not _REPO_ID.fullmatch(text)


def looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.endswith((".safetensors", ".bin", ".json", *NANOGPT_SUFFIXES))
