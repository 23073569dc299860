"""A trained checkpoint as a conformance case, beside the synthetic ones (SPEC.md 9).

Weights at the init law give near-uniform attention and logits of a few hundredths; trained weights have
peaked attention, logits of several units and larger activations, which is where a precision bug (a
softmax without its max, a low-precision accumulation, a lost bias) shows. The case is test-mini's shape
(2 layers, 4 heads, 64 wide, 64 positions, 257 ids of which the vendored Shakespeare slice's 65 characters
are used), trained with `gptspec.runs` on that slice and shipped as a float32 canonical file of 486 KB:

    python -m gptspec.conformance.trained            # regenerate weights/data/trained-shakespeare-char.safetensors

Regenerating on one machine gives the same weights bit for bit (measured: the safetensors header may list
the metadata in another order, the tensors and metadata are equal); another machine or torch version may
round differently and produce other trained weights, which is fine: the case checks the backends against
the float64 reference on whatever weights the file holds. Its inputs are real text: the first characters
of the slice's validation split, encoded with the same vocabulary.

`trained_cases(tier)` is what conformance/cases.py adds to its tiers; `sharpness` measures what makes
trained weights different (docs/experiments.md, "The trained conformance case").
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..spec import IGNORE_INDEX, ModelSpec, WeightsError
from .cases import Case

TRAINED_FILE = Path(__file__).resolve().parent.parent / "weights" / "data" / "trained-shakespeare-char.safetensors"
CORPUS = "shakespeare-slice"
# test-mini's shape exactly: its vocabulary of 257 pads the slice's 65 characters (ids 65..256 never occur, as
# nanoGPT's 50304 pads GPT-2's 50257), so that with the synthetic test-mini case's input shape (B2 x T48) a
# backend that compiles per shape (tinygrad) reuses that case's kernels instead of compiling its own
SIZES = {"n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 64, "vocab_size": 257}
LENGTH = 48
STEPS, BATCH, BLOCK, SEED = 2000, 16, 64, 1337
REGENERATE = "python -m gptspec.conformance.trained"


@dataclass(frozen=True)
class TrainedCase(Case):
    """test-mini's shape with trained weights (the shipped file) and real text as its input."""

    @property
    def id(self) -> str:
        return f"trained:{self.preset}/shakespeare-char/B{self.batch}xT{self.length}"

    def inputs(self, spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, targets) int64 (B, T): consecutive rows of the slice's validation text and the next
        characters; every 7th target is the ignore index, as in the synthetic cases."""
        stream = validation_text(spec.vocab_size)
        B, T = self.batch, self.length
        rows = np.asarray(stream[: B * (T + 1)], dtype=np.int64).reshape(B, T + 1)
        tokens, targets = rows[:, :T].copy(), rows[:, 1:].copy()
        targets.reshape(-1)[3::7] = IGNORE_INDEX
        return tokens, targets


def trained_cases(tier: str = "default") -> list[Case]:
    """The trained case of a tier: two rows of 48 characters, test-mini's synthetic case's shape, in both tiers."""
    if not TRAINED_FILE.exists():
        raise WeightsError(f"the trained conformance checkpoint {TRAINED_FILE} is missing; regenerate it with "
                           f"{REGENERATE}")
    return [TrainedCase("test-mini", 0, batch=2, length=LENGTH, weights=str(TRAINED_FILE))]


@lru_cache(maxsize=1)
def _slice_stream() -> tuple[np.ndarray, int]:
    """The slice's character stream and where its validation split starts, as `gptspec data prepare` makes
    them (the same tokenizer and split rule, so the ids are those the model was trained on)."""
    from ..data.corpus import load_sources
    from ..data.prepare import encode_corpus, make_tokenizer, split_point

    corpus = load_sources([CORPUS])
    tok = make_tokenizer("char", corpus)
    stream = encode_corpus(tok, corpus)
    return stream, split_point(len(stream), 0.1)


def validation_text(vocab_size: int) -> np.ndarray:
    stream, start = _slice_stream()
    ids = stream[start:]
    if int(stream.max()) + 1 > vocab_size:
        raise WeightsError(f"{TRAINED_FILE}: its vocabulary has {vocab_size} ids, but the {CORPUS} characters need "
                           f"{int(stream.max()) + 1}; regenerate it with {REGENERATE}")
    return ids


# -- making it ----------------------------------------------------------------------------------------------
def run_config(data_dir, backend: str = "torch"):
    """The run that trains the case: nanoGPT's shakespeare_char recipe (float32) at test-mini's shape."""
    from ..runs import RunConfig
    from ..spec.train import TrainSpec

    ts = TrainSpec.preset("nanogpt-shakespeare-char").replace(precision="float32", max_steps=STEPS, seed=SEED)
    return RunConfig(backend=backend, model="test-mini", data=str(data_dir), steps=STEPS, train_spec=ts,
                     sizes=dict(SIZES), batch_size=BATCH, block_size=BLOCK, eval_interval=500, eval_iters=20,
                     ckpt_interval=STEPS, sample_tokens=64, compile=False)


def regenerate(out=TRAINED_FILE, work_dir=None, observer=None, log=print) -> Path:
    """Train the case on the vendored slice and write its weights (float32, canonical) to `out`."""
    from ..data.prepare import prepare
    from ..runs.loop import train_run
    from ..weights import load_checkpoint, save

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        data = Path(tmp) / "shards"
        prepare([CORPUS], data, tokenizer="char")
        config = run_config(data)
        result = train_run(config, Path(tmp) / "run", observer=observer)
        if result.status != "done":
            raise RuntimeError(f"training the trained case stopped: {result.message}")
        ckpt = load_checkpoint(result.checkpoint / "model.safetensors")
        origin = (f"trained by {REGENERATE}: {config.backend}, {STEPS} steps of {BATCH} x {BLOCK} characters of "
                  f"{CORPUS}, TrainSpec nanogpt-shakespeare-char (float32, seed {SEED}); val loss "
                  f"{result.val_loss:.4f}")
        path = save(out, ckpt.spec, ckpt.params, "float32", synthetic=False, origin=origin)
    log(f"wrote {path} ({path.stat().st_size:,} bytes): {origin}")
    return path


# -- what makes trained weights different ----------------------------------------------------------------
def sharpness(spec: ModelSpec, params, tokens: np.ndarray) -> dict[str, float]:
    """Attention peakedness, logit scale and activation outliers of a gpt2-architecture model on `tokens`,
    from the float64 reference's own intermediate values:

    attn_max         mean over heads, layers and query rows (from the 8th key on) of the largest weight
    attn_entropy     mean entropy of those rows over the log of their key count (1: uniform, 0: one key)
    logit_std        the logits' std over the vocabulary, averaged over positions
    logit_max        max |logit|
    resid_outlier    max |h| over the residual stream's rms, at the last block's output
    """
    from ..spec.reference import gpt2

    p = {n: np.asarray(a, np.float64) for n, a in params.items()}
    hs, _, caches = gpt2._stack_forward(spec, p, np.asarray(tokens))
    logits, _ = gpt2._head_forward(spec, p, hs[-1])
    maxes, entropies = [], []
    for c in caches:
        probs = c["attn"][1][3]                                 # (B, H, T, T): causal_attention_forward's p
        T = probs.shape[-1]
        for t in range(min(7, T - 1), T):                       # rows with at least 8 keys: uniform is clearly < 1
            row = probs[..., t, : t + 1]
            maxes.append(row.max(-1).mean())
            ent = -(row * np.log(np.where(row > 0, row, 1.0))).sum(-1)
            entropies.append((ent / math.log(t + 1)).mean())
    z = logits[..., : spec.vocab_size]
    h = hs[-1]
    return {"attn_max": float(np.mean(maxes)), "attn_entropy": float(np.mean(entropies)),
            "logit_std": float(z.std(-1).mean()), "logit_max": float(np.abs(z).max()),
            "resid_outlier": float(np.abs(h).max() / np.sqrt((h ** 2).mean()))}


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m gptspec.conformance.trained",
                                 description="Regenerate the trained conformance checkpoint (minutes on a CPU).")
    ap.add_argument("--out", default=str(TRAINED_FILE), help="where to write it (default: the shipped file)")
    args = ap.parse_args(argv)
    from ..cli.train import Display

    regenerate(Path(args.out), observer=Display())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
