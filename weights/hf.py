"""Hugging Face GPT-2 checkpoints: import to canonical form, export from it.

The Hugging Face layout differs from the canonical one in three ways only:
keys may carry a `transformer.` prefix, Conv1D weights are stored (in, out), and
files may carry the causal-mask buffers `attn.bias` / `attn.masked_bias` and a
copy of the tied head `lm_head.weight`. config.json gives the architecture.
"""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Mapping

import numpy as np

from ..spec import ModelSpec, SpecError, WeightsError, param_table
from ..spec.checks import check_claim, check_shapes, check_state_shapes
from .atomic import atomic_files
from .format import Checkpoint, MappedTensors, check_finite, read_safetensors, write_safetensors

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# activation_function values that are exactly the spec's tanh GELU
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


# -- config.json <-> ModelSpec -----------------------------------------------------------
def spec_from_config(config: Mapping, source: str) -> ModelSpec:
    def fail(why):
        raise WeightsError(f"{source}: {why}")

    if not isinstance(config, dict):
        fail(f"holds a JSON {type(config).__name__}, not the object of a Hugging Face config")
    if config.get("model_type", "gpt2") != "gpt2":
        fail(f"model_type is {config.get('model_type')!r}, not 'gpt2'")
    act = config.get("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        fail(f"activation_function {act!r} is not GPT-2's tanh GELU ({' or '.join(_TANH_GELUS)})")
    n_embd = config.get("n_embd")
    four_wide = 4 * n_embd if isinstance(n_embd, int) else None  # a non-int n_embd is ModelSpec's to name
    if config.get("n_inner") not in (None, four_wide):
        fail(f"n_inner {config.get('n_inner')} is not 4 * n_embd; the spec's MLP is 4x wide")
    for key, gpt2_value in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                            ("tie_word_embeddings", True), ("add_cross_attention", False)):
        if config.get(key, gpt2_value) != gpt2_value:
            fail(f"{key}={config[key]!r} is not GPT-2's ({gpt2_value}); the spec does not define it")
    try:
        return ModelSpec(
            vocab_size=config["vocab_size"], n_positions=config["n_positions"], n_embd=n_embd,
            n_layer=config["n_layer"], n_head=config["n_head"],
            norm_eps=config.get("layer_norm_epsilon", 1e-5),
        )
    except KeyError as e:
        fail(f"config lacks {e.args[0]!r}")
    except SpecError as e:
        fail(str(e))


def config_from_spec(spec: ModelSpec) -> dict:
    eos = 50256 if spec.vocab_size > 50256 else spec.vocab_size - 1
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": spec.vocab_size,
        "n_positions": spec.n_positions,
        "n_ctx": spec.n_positions,
        "n_embd": spec.n_embd,
        "n_layer": spec.n_layer,
        "n_head": spec.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": spec.norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
    }


# -- reading ---------------------------------------------------------------------------
def find_weights_file(directory: Path) -> Path | None:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    return None


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f"{path}: reading pytorch_model.bin needs torch (pip install 'gptspec[torch]'); "
            "a model.safetensors file needs nothing more"
        ) from None
    try:
        # weights_only: never unpickle arbitrary objects from a file we did not write
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for bad or unsafe files
        raise WeightsError(f"{path}: cannot be read as a weights-only torch file: {e}") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict")
    out = {}
    for k, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise WeightsError(f"{path}: entry {k!r} is a {type(t).__name__}, not a tensor")
        if t.dtype == torch.bfloat16:
            t = t.float()  # numpy has no bfloat16; widening is exact
        out[k] = t.numpy()
    return out


def shard_paths(index: Path) -> list[Path]:
    """The weight files a shard index (`*.index.json`) names, each checked to lie inside the index's
    directory (no absolute path, no '..') and to be a weights file of the index's kind, never another
    index. WeightsError naming the entry otherwise."""
    try:
        weight_map = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{index}: not a valid shard index ({e})") from None
    if isinstance(weight_map, dict):
        weight_map = weight_map.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{index}: not a valid shard index: its 'weight_map' must be a non-empty JSON object "
                           f"of tensor name -> shard file, got {type(weight_map).__name__}")
    kind = ".safetensors" if index.name.endswith(".safetensors.index.json") else ".bin"
    entries = {}
    for entry, name in weight_map.items():
        if not isinstance(name, str):
            raise WeightsError(f"{index}: weight_map[{entry!r}] is {name!r}, not a shard file name")
        entries.setdefault(name, entry)
    out = []
    for name, entry in sorted(entries.items()):
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if not name or os.path.isabs(name) or PureWindowsPath(name).drive or ".." in parts:
            raise WeightsError(f"{index}: weight_map[{entry!r}] names {name!r}, outside the checkpoint directory "
                               f"{index.parent}; a shard must lie inside it")
        if not name.endswith(kind) or name.endswith(".index.json"):
            raise WeightsError(f"{index}: weight_map[{entry!r}] names {name!r}, not a {kind} weights file")
        out.append(index.parent / name)
    return out


def _read_any(path: Path) -> tuple[Mapping[str, np.ndarray], dict[str, str], str]:
    if path.name.endswith(".index.json"):
        tensors, metadata, dtypes = MappedTensors({}), {}, set()
        for shard in shard_paths(path):
            t, m, d = _read_any(shard)
            tensors = tensors.merged(t)
            metadata.update(m)
            dtypes.add(d)
        return tensors, metadata, dtypes.pop() if len(dtypes) == 1 else "mixed"
    if path.suffix == ".bin":
        tensors = _read_torch_bin(path)
        dtypes = {str(a.dtype) for a in tensors.values()}
        return tensors, {}, dtypes.pop() if len(dtypes) == 1 else "mixed"
    return read_safetensors(path)


def hf_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The parameter table's shapes in the Hugging Face layout."""
    return {p.name: p.shape[::-1] if p.hf_transposed else p.shape for p in param_table(spec)}


def read_hf(path: str | os.PathLike) -> Checkpoint:
    """Read a Hugging Face GPT-2 checkpoint: a directory, or a weights file beside its config.json."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    weights = find_weights_file(path) if path.is_dir() else path
    if weights is None:
        raise WeightsError(f"{path}: no weights file (looked for {', '.join(WEIGHT_FILES)})")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise WeightsError(
            f"{weights}: no config.json beside it; a Hugging Face checkpoint needs its config for n_head"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{config_path}: not valid JSON: {e}") from None
    spec = spec_from_config(config, str(config_path))

    raw, metadata, stored = _read_any(weights)
    mapped = isinstance(raw, MappedTensors)
    shapes = raw.shapes if mapped else {k: a.shape for k, a in raw.items()}
    keys = {}  # canonical-ish name (prefix dropped) -> the file's key
    for key in shapes:
        name = key.removeprefix("transformer.")
        if not name.endswith(_IGNORED_SUFFIXES):
            keys[name] = key
    head_key = keys.pop("lm_head.weight", None)
    check_claim(spec, len(keys), str(weights))  # before hf_shapes builds the claimed table
    check_shapes(hf_shapes(spec), {n: shapes[k] for n, k in keys.items()}, f"{weights} (Hugging Face layout)")
    # compare the tied head after shapes are known to match
    if head_key is not None and not np.array_equal(raw[head_key], raw[keys["wte.weight"]]):
        raise WeightsError(
            f"{weights}: lm_head.weight differs from wte.weight; the spec's LM head is tied to the embedding"
        )
    if mapped:  # views of the mapped file, Conv1D weights as transposed views: nothing is copied here
        params = raw.renamed({p.name: (keys[p.name], p.hf_transposed) for p in param_table(spec)})
    else:
        params = {
            p.name: np.ascontiguousarray(raw[keys[p.name]].T) if p.hf_transposed else raw[keys[p.name]]
            for p in param_table(spec)
        }
    check_finite(params, str(weights))
    return Checkpoint(
        spec=spec, params=params, stored_dtype=stored, source=str(weights),
        synthetic=metadata.get("synthetic") == "true" or config.get("gptspec_synthetic") is True,
        metadata=metadata,
    )


# -- writing ---------------------------------------------------------------------------
def write_hf(
    directory: str | os.PathLike, spec: ModelSpec, params: Mapping[str, np.ndarray], dtype: str = "float32",
    *, synthetic: bool = False,
) -> Path:
    """Write config.json and model.safetensors as `GPT2LMHeadModel.save_pretrained` would."""
    from ..spec import OPTIONS

    for option, values in OPTIONS.items():
        if getattr(spec, option) != values[0]:
            raise WeightsError(
                f"the Hugging Face GPT-2 layout cannot hold {option}={getattr(spec, option)!r} "
                "(only GPT-2 itself); write a canonical gptspec file instead (gptspec.weights.save)"
            )
    if spec.vocab_multiple != 1:
        raise WeightsError(f"the Hugging Face GPT-2 layout cannot record vocab_multiple={spec.vocab_multiple} "
                           "(SPEC.md 19); write a canonical gptspec file instead (gptspec.weights.save)")
    check_state_shapes(spec, {n: np.shape(a) for n, a in params.items()}, "parameters to export")
    directory = Path(directory)
    tensors = {
        "transformer." + p.name: np.ascontiguousarray(np.asarray(params[p.name]).T) if p.hf_transposed
        else params[p.name]
        for p in param_table(spec)
    }
    # transformers refuses safetensors files without format=pt
    metadata = {"format": "pt", "synthetic": "true" if synthetic else "false"}
    config = config_from_spec(spec)
    if synthetic:
        config["gptspec_synthetic"] = True
    # both files are published together, config.json last (weights/atomic.py): a reader never sees new
    # weights beside an old config, and a failed write leaves the directory as it was
    with atomic_files(directory, ["model.safetensors", "config.json"]) as tmp:
        write_safetensors(tmp["model.safetensors"], tensors, dtype, metadata)
        tmp["config.json"].write_text(json.dumps(config, indent=2) + "\n")
    return directory
