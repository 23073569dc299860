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
from pathlib import Path

from ..spec import PRESETS, ModelSpec, WeightsError
from .format import Checkpoint, is_canonical, read, read_safetensors
from .hf import find_weights_file, read_hf
from .synthetic import synthetic_params

ENV_VAR = "GPTSPEC_WEIGHTS"
HF_ORGS = ("", "openai-community")


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def read_path(path: str | os.PathLike) -> Checkpoint:
    """A canonical file, a directory holding one, or a Hugging Face checkpoint."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file or directory")
    if path.is_dir():
        weights = find_weights_file(path)
        if weights is None:
            raise WeightsError(
                f"{path}: a directory with no weights (looked for model.safetensors, "
                "model.safetensors.index.json, pytorch_model.bin)"
            )
        if weights.name == "model.safetensors" and not (path / "config.json").exists():
            return read(weights)
        return read_hf(path)
    if path.suffix == ".safetensors":
        # one cheap header read decides which layout it is
        _, metadata, _ = _header(path)
        return read(path) if is_canonical(metadata) else read_hf(path)
    return read_hf(path)


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
        raise WeightsError(f"{name!r}: the seed must be an integer") from None
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


def load_checkpoint(source) -> Checkpoint:
    """A Checkpoint from a Checkpoint, a path, a `synthetic:` name, or a model name."""
    if isinstance(source, Checkpoint):
        return source
    text = os.fspath(source)
    if text.startswith("synthetic:"):
        return _synthetic(text)
    if os.path.exists(text) or (_looks_like_path(text) and not _REPO_ID.fullmatch(text)):
        return read_path(text)  # a path that does not exist is reported as such
    return read_path(locate(text))


_REPO_ID = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # e.g. openai-community/gpt2


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.endswith((".safetensors", ".bin", ".json"))
