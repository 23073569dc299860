"""Hugging Face GPT-2 checkpoints: import to canonical form, export from it.

The Hugging Face layout differs from the canonical one in three ways only:
keys may carry a `transformer.` prefix, Conv1D weights are stored (in, out), and
files may carry the causal-mask buffers `attn.bias` / `attn.masked_bias` and a
copy of the tied head `lm_head.weight`. config.json gives the architecture.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ..spec import ModelSpec, SpecError, WeightsError, param_table
from ..spec.checks import check_shapes, check_state_shapes
from .atomic import atomic_write
from .format import Checkpoint, read_safetensors, write_safetensors

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# activation_function values that are exactly the spec's tanh GELU
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


# -- config.json <-> ModelSpec -----------------------------------------------------------
def spec_from_config(config: Mapping, source: str) -> ModelSpec:
    def fail(why):
        raise WeightsError(f"{source}: {why}")

    if config.get("model_type", "gpt2") != "gpt2":
        fail(f"model_type is {config.get('model_type')!r}, not 'gpt2'")
    act = config.get("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        fail(f"activation_function {act!r} is not GPT-2's tanh GELU ({' or '.join(_TANH_GELUS)})")
    n_embd = config.get("n_embd")
    if config.get("n_inner") not in (None, 4 * (n_embd or 0)):
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


def _read_any(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{path}: not a valid shard index ({e})") from None
        tensors, metadata, dtypes = {}, {}, set()
        for shard in sorted(set(weight_map.values())):
            t, m, d = _read_any(path.parent / shard)
            tensors.update(t)
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
    except ValueError as e:
        raise WeightsError(f"{config_path}: not valid JSON: {e}") from None
    spec = spec_from_config(config, str(config_path))

    raw, metadata, stored = _read_any(weights)
    tensors = {}
    for key, array in raw.items():
        name = key.removeprefix("transformer.")
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        tensors[name] = array
    head = tensors.pop("lm_head.weight", None)
    check_shapes(hf_shapes(spec), {n: a.shape for n, a in tensors.items()}, f"{weights} (Hugging Face layout)")
    # compare the tied head after shapes are known to match
    if head is not None and not np.array_equal(head, tensors["wte.weight"]):
        raise WeightsError(
            f"{weights}: lm_head.weight differs from wte.weight; the spec's LM head is tied to the embedding"
        )
    transposed = {p.name for p in param_table(spec) if p.hf_transposed}
    params = {
        p.name: np.ascontiguousarray(tensors[p.name].T) if p.name in transposed else tensors[p.name]
        for p in param_table(spec)
    }
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
    directory.mkdir(parents=True, exist_ok=True)
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
    # config.json is renamed into place only once the weights are complete too, so a failed write
    # leaves neither file changed (and the two renames follow each other at once)
    with atomic_write(directory / "config.json") as config_tmp:
        config_tmp.write_text(json.dumps(config, indent=2) + "\n")
        write_safetensors(directory / "model.safetensors", tensors, dtype, metadata)
    return directory
