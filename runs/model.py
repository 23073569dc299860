"""The model a run starts from: a preset through the spec's init law, or any checkpoint gptspec reads.

A preset's initial weights come from weights.synthetic_params(spec, seed, init="gpt2"): GPT-2's init
law (SPEC.md, "Synthetic weights"; nGPT's matrices normalized), computed once in numpy from the run's
seed and handed to the backend through the canonical layout, so every backend starts from the same
bits. A checkpoint (a canonical file, a Hugging Face directory, nanoGPT's ckpt.pt, llm.c's .bin) is
fine-tuning: its spec is the model, and it cannot be resized.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..spec import PRESETS, InputError, ModelSpec
from ..spec.variants import get_variant


@dataclass
class StartingModel:
    spec: ModelSpec
    params: dict[str, np.ndarray]
    origin: str            # for people: "init law gpt2, seed 1337" or the checkpoint's description


def starting_model(model: str, variant: str | None, sizes: dict, seed: int, data_vocab_size: int) -> StartingModel:
    """The spec and float32 weights a new run starts from.

    For a preset, vocab_size defaults to the data's (a character vocabulary of 65 ids trains a model of
    65 ids, as nanoGPT's shakespeare_char does); --vocab-size overrides it."""
    if model in PRESETS:
        from ..weights import synthetic_params

        spec = ModelSpec.preset(model)
        if variant:
            spec = get_variant(variant).apply(spec)
        spec = spec.replace(**{"vocab_size": data_vocab_size, **sizes})
        return StartingModel(spec, synthetic_params(spec, seed, init="gpt2"),
                             f"{model} at the init law (gpt2), seed {seed}")
    from ..weights import load_checkpoint

    if sizes:
        raise InputError(f"--model {model} is a checkpoint (fine-tuning): its size is its own, so "
                         f"{', '.join('--' + k.replace('_', '-') for k in sizes)} cannot change it; "
                         f"give a preset ({', '.join(PRESETS)}) to train a resized model from the init law")
    ckpt = load_checkpoint(model)
    if variant:
        wanted = get_variant(variant).apply(ckpt.spec)
        if wanted != ckpt.spec:
            raise InputError(f"--model {model} is a checkpoint of another variant than {variant!r}: its spec is "
                             f"{ckpt.spec.to_json()}; a checkpoint is fine-tuned as it is (leave out --variant)")
    return StartingModel(ckpt.spec, {n: np.asarray(a, np.float32) for n, a in ckpt.params.items()},
                         ckpt.describe())
