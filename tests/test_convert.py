"""Conversion between the canonical file, Hugging Face, nanoGPT's ckpt.pt and llm.c's .bin.

Round trips are checked bit for bit. Each foreign format is also checked against an oracle that
does not use gptspec's reader: nanoGPT's file is opened with plain torch.load and loaded into a
torch module built the way nanoGPT's model.py builds its GPT (names, nn.Linear layouts, tied head,
AdamW groups), whose forward must match the float64 reference; llm.c's file is parsed here with
struct and numpy following llm.c's documented header and parameter order.
"""
from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from gptspec.spec import ModelSpec, WeightsError, param_table, reference
from gptspec.weights import (
    load_checkpoint, read, read_hf, read_llmc, read_nanogpt, round_to_dtype, save, synthetic_params, write_hf,
    write_llmc, write_nanogpt, write_synthetic,
)
from gptspec.weights.format import to_bfloat16_bits

SPEC = ModelSpec.preset("test-mini")  # V=257: llm.c pads it to 384
TINY = ModelSpec.preset("test-tiny")


@pytest.fixture(scope="module")
def params():
    # non-zero biases and norm parameters: a swapped or dropped tensor changes values, not just shapes
    return synthetic_params(SPEC, 7, "conformance")


def assert_same_bits(got: dict, want: dict):
    assert list(got) == list(want)
    for name in want:
        a, b = np.asarray(got[name]), np.asarray(want[name])
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert np.array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}")), name


def rounded(params, dtype):
    """The float32 values each parameter takes once stored in dtype."""
    return {n: round_to_dtype(a, dtype).astype(np.float32) for n, a in params.items()}


# -- round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_canonical_nanogpt_canonical_is_bit_exact(tmp_path, params, dtype):
    pytest.importorskip("torch")
    first = read(save(tmp_path / "a.safetensors", SPEC, params, dtype, synthetic=True, origin="test"))
    write_nanogpt(tmp_path / "ckpt.pt", first.spec, first.params, dtype, synthetic=first.synthetic,
                  origin=first.source)
    mid = read_nanogpt(tmp_path / "ckpt.pt")
    assert mid.spec == SPEC and mid.stored_dtype == dtype and mid.synthetic
    back = read(save(tmp_path / "b.safetensors", mid.spec, mid.params, dtype, synthetic=mid.synthetic))
    assert_same_bits(back.params, first.params)
    assert_same_bits({n: a.astype(np.float32) for n, a in back.params.items()}, rounded(params, dtype))


def test_nanogpt_bias_false_round_trips_as_bias_off(tmp_path):
    torch = pytest.importorskip("torch")
    spec = SPEC.replace(bias="off")
    params = synthetic_params(spec, 3, "conformance")
    write_nanogpt(tmp_path / "ckpt.pt", spec, params, "float32")
    raw = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    assert raw["model_args"]["bias"] is False and not any(k.endswith(".bias") for k in raw["model"])
    back = read_nanogpt(tmp_path / "ckpt.pt")
    assert back.spec == spec
    assert_same_bits(back.params, params)


def test_canonical_llmc_fp32_canonical_is_bit_exact(tmp_path, params):
    first = read(save(tmp_path / "a.safetensors", SPEC, params, "float32"))
    write_llmc(tmp_path / "m.bin", first.spec, first.params, "float32")
    mid = read_llmc(tmp_path / "m.bin")
    assert mid.spec == SPEC and mid.stored_dtype == "float32" and not mid.synthetic
    back = read(save(tmp_path / "b.safetensors", mid.spec, mid.params, "float32"))
    assert_same_bits(back.params, params)


def test_llmc_bf16_is_the_bf16_rounding_of_fp32(tmp_path, params):
    write_llmc(tmp_path / "m.bin", SPEC, params, "bfloat16", synthetic=True)
    ckpt = read_llmc(tmp_path / "m.bin")
    assert ckpt.stored_dtype == "bfloat16" and ckpt.synthetic
    assert_same_bits(ckpt.params, rounded(params, "bfloat16"))
    # and bfloat16 -> bfloat16 loses nothing more
    write_llmc(tmp_path / "m2.bin", SPEC, ckpt.params, "bfloat16", synthetic=True)
    assert (tmp_path / "m.bin").read_bytes() == (tmp_path / "m2.bin").read_bytes()


def test_hf_llmc_hf_is_bit_exact(tmp_path):
    from safetensors.numpy import load_file

    write_synthetic(tmp_path / "hf", SPEC, seed=4)
    src = read_hf(tmp_path / "hf")
    write_llmc(tmp_path / "m.bin", src.spec, src.params, synthetic=src.synthetic)
    mid = load_checkpoint(str(tmp_path / "m.bin"))
    write_hf(tmp_path / "hf2", mid.spec, mid.params, synthetic=mid.synthetic)
    back = read_hf(tmp_path / "hf2")
    assert back.synthetic and back.spec == SPEC
    assert_same_bits(back.params, src.params)
    # the Hugging Face files themselves (Conv1D weights transposed) hold the same bits
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_hf_nanogpt_llmc_nanogpt_chain(tmp_path):
    pytest.importorskip("torch")
    write_synthetic(tmp_path / "hf", SPEC, seed=5, init="conformance")
    src = read_hf(tmp_path / "hf")
    write_nanogpt(tmp_path / "a.pt", src.spec, src.params, synthetic=True)
    a = read_nanogpt(tmp_path / "a.pt")
    write_llmc(tmp_path / "b.bin", a.spec, a.params, synthetic=a.synthetic)
    b = read_llmc(tmp_path / "b.bin")
    write_nanogpt(tmp_path / "c.pt", b.spec, b.params, synthetic=b.synthetic)
    c = read_nanogpt(tmp_path / "c.pt")
    assert c.synthetic
    assert_same_bits(c.params, src.params)


# -- nanoGPT: the external oracle ---------------------------------------------------------------
def _nanogpt_names(n_layer):
    """The state-dict keys of nanoGPT's GPT (model.py), in its order."""
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(n_layer):
        for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names += [f"transformer.h.{i}.{m}.weight", f"transformer.h.{i}.{m}.bias"]
    return names + ["transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"]


def _nanogpt_like(torch, a):
    """A GPT put together as nanoGPT's model.py puts it (module names, nn.Linear (out, in) weights,
    LayerNorm eps 1e-5, lm_head tied to wte), with GPT-2's tanh GELU."""
    nn, F = torch.nn, torch.nn.functional
    C = a["n_embd"]

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = (t.view(B, T, a["n_head"], -1).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(C), Attention(), nn.LayerNorm(C)
            self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(C, 4 * C), c_proj=nn.Linear(4 * C, C)))

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(a["vocab_size"], C), wpe=nn.Embedding(a["block_size"], C),
                h=nn.ModuleList([Block() for _ in range(a["n_layer"])]), ln_f=nn.LayerNorm(C)))
            self.lm_head = nn.Linear(C, a["vocab_size"], bias=False)
            self.transformer.wte.weight = self.lm_head.weight

        def forward(self, idx):
            t = self.transformer
            x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))
            for block in t.h:
                x = block(x)
            return self.lm_head(t.ln_f(x))

    return GPT()


def test_nanogpt_file_is_what_nanogpt_loads(tmp_path, params):
    torch = pytest.importorskip("torch")
    write_nanogpt(tmp_path / "ckpt.pt", SPEC, params)
    ck = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)  # plain torch, no gptspec
    assert set(ck) == {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}
    assert list(ck["model"]) == _nanogpt_names(SPEC.n_layer)
    C = SPEC.n_embd
    assert tuple(ck["model"]["transformer.h.0.attn.c_attn.weight"].shape) == (3 * C, C)  # nn.Linear: (out, in)
    assert tuple(ck["model"]["transformer.h.1.mlp.c_proj.weight"].shape) == (C, 4 * C)
    assert ck["model"]["lm_head.weight"].data_ptr() == ck["model"]["transformer.wte.weight"].data_ptr()
    # GPTConfig(**model_args) is how train.py and sample.py rebuild the model: exactly its fields
    assert ck["model_args"] == dict(n_layer=2, n_head=4, n_embd=64, block_size=64, bias=True, vocab_size=257,
                                    dropout=0.0)
    assert ck["iter_num"] == 0 and ck["best_val_loss"] == 1e9
    assert all(isinstance(v, (int, float, str, bool)) for v in ck["config"].values())

    model = _nanogpt_like(torch, ck["model_args"])
    model.load_state_dict(ck["model"], strict=True)  # train.py init_from='resume'
    # configure_optimizers' groups: dim >= 2 decayed, the rest not; resume loads the saved state into it
    named = dict(model.named_parameters())
    groups = [{"params": [p for p in named.values() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in named.values() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95))
    opt.load_state_dict(ck["optimizer"])

    tokens = np.random.default_rng(0).integers(0, SPEC.vocab_size, (2, 17))
    with torch.no_grad():
        got = model(torch.from_numpy(tokens)).double().numpy()
    want = reference.forward(SPEC, params, tokens)
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()  # a transposed square matrix is far off

    model(torch.from_numpy(tokens)).logsumexp(-1).mean().backward()
    opt.step()  # the loaded optimizer state works


def test_nanogpt_compiled_prefix_and_mask_buffers_are_read(tmp_path, params):
    torch = pytest.importorskip("torch")
    write_nanogpt(tmp_path / "ckpt.pt", SPEC, params)
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    # what torch.compile'd nanoGPT saves: every key prefixed, plus the non-flash causal mask buffers
    ck["model"] = {"_orig_mod." + k: v for k, v in ck["model"].items()}
    ck["model"]["_orig_mod.transformer.h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    ck["best_val_loss"] = torch.tensor(3.25)  # train.py stores a 0-d tensor here
    torch.save(ck, tmp_path / "compiled.pt")
    got = read_nanogpt(tmp_path / "compiled.pt")
    assert_same_bits(got.params, params)
    assert got.metadata["nanogpt_best_val_loss"] == "3.25"


def test_nanogpt_padded_vocab_is_gpt2_padded_to_64(tmp_path):
    torch = pytest.importorskip("torch")
    # nanoGPT's from-scratch default, 50304 rows, as nanoGPT itself writes it (no gptspec config keys)
    spec = TINY.replace(vocab_size=50304)
    p = synthetic_params(spec, 1)
    write_nanogpt(tmp_path / "ckpt.pt", spec, p)
    raw = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    del raw["config"]["gptspec_vocab_size"], raw["config"]["gptspec_vocab_multiple"]
    torch.save(raw, tmp_path / "nanogpt.pt")
    got = read_nanogpt(tmp_path / "nanogpt.pt")
    assert (got.spec.vocab_size, got.spec.vocab_multiple, got.spec.padded_vocab_size) == (50257, 64, 50304)
    assert_same_bits(got.params, p)  # nothing dropped


def test_nanogpt_padded_vocab_round_trips(tmp_path):
    pytest.importorskip("torch")
    spec = TINY.replace(vocab_multiple=64)  # 61 ids in 64 rows
    p = synthetic_params(spec, 2)
    write_nanogpt(tmp_path / "ckpt.pt", spec, p)
    got = read_nanogpt(tmp_path / "ckpt.pt")
    assert got.spec == spec
    assert_same_bits(got.params, p)


# -- llm.c: the external oracle -----------------------------------------------------------------
def _parse_llmc(path):
    """llm.c's train_gpt2.c gpt2_build_from_checkpoint, in Python: header, then 16 tensors in order."""
    data = open(path, "rb").read()
    header = struct.unpack("<256i", data[:1024])
    magic, version, maxT, V, L, NH, C, Vp = header[:8]
    item = {3: 4, 5: 2}[version]
    sizes = [("wte", (Vp, C)), ("wpe", (maxT, C)), ("ln1w", (L, C)), ("ln1b", (L, C)), ("qkvw", (L, 3 * C, C)),
             ("qkvb", (L, 3 * C)), ("attprojw", (L, C, C)), ("attprojb", (L, C)), ("ln2w", (L, C)),
             ("ln2b", (L, C)), ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)), ("fcprojw", (L, C, 4 * C)),
             ("fcprojb", (L, C)), ("lnfw", (C,)), ("lnfb", (C,))]
    out, offset = {}, 1024
    for name, shape in sizes:
        n = int(np.prod(shape))
        out[name] = np.frombuffer(data, "<f4" if item == 4 else "<u2", n, offset).reshape(shape)
        offset += n * item
    assert offset == len(data), "the file is exactly header + parameters"
    return header, out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llmc_file_has_llmc_layout(tmp_path, params, dtype):
    write_llmc(tmp_path / "gpt2_124M.bin", SPEC, params, dtype)
    header, t = _parse_llmc(tmp_path / "gpt2_124M.bin")
    assert header[:8] == (20240326, 3 if dtype == "float32" else 5, 64, 257, 2, 4, 64, 384)
    assert not any(header[8:])  # real weights: llm.c's header exactly, unused slots zero

    def enc(x):
        return np.asarray(x, "<f4") if dtype == "float32" else to_bfloat16_bits(x)

    V = SPEC.vocab_size
    assert np.array_equal(t["wte"][:V], enc(params["wte.weight"]))
    assert not t["wte"][V:].any()  # padding rows are zeros, as llm.c's pad_vocab writes them
    assert np.array_equal(t["wpe"], enc(params["wpe.weight"]))
    per_layer = {"ln1w": "ln_1.weight", "ln1b": "ln_1.bias", "qkvw": "attn.c_attn.weight",
                 "qkvb": "attn.c_attn.bias", "attprojw": "attn.c_proj.weight", "attprojb": "attn.c_proj.bias",
                 "ln2w": "ln_2.weight", "ln2b": "ln_2.bias", "fcw": "mlp.c_fc.weight", "fcb": "mlp.c_fc.bias",
                 "fcprojw": "mlp.c_proj.weight", "fcprojb": "mlp.c_proj.bias"}
    for llmc_name, name in per_layer.items():
        for i in range(SPEC.n_layer):
            assert np.array_equal(t[llmc_name][i], enc(params[f"h.{i}.{name}"])), (llmc_name, i)
    assert np.array_equal(t["lnfw"], enc(params["ln_f.weight"])) and np.array_equal(t["lnfb"], enc(params["ln_f.bias"]))


def test_llmc_bf16_bits_match_torch(tmp_path, params):
    torch = pytest.importorskip("torch")
    write_llmc(tmp_path / "m.bin", SPEC, params, "bfloat16")
    _, t = _parse_llmc(tmp_path / "m.bin")
    # what llm.c's write_bf16 does: tensor.to(torch.bfloat16).view(torch.int16)
    want = torch.from_numpy(params["h.1.mlp.c_fc.weight"]).to(torch.bfloat16).view(torch.int16).numpy()
    assert np.array_equal(t["fcw"][1], want.view("<u2"))


def test_llmc_synthetic_marker_uses_unused_header_slots(tmp_path, params):
    write_llmc(tmp_path / "m.bin", SPEC, params, synthetic=True)
    header, _ = _parse_llmc(tmp_path / "m.bin")
    assert header[:8] == (20240326, 3, 64, 257, 2, 4, 64, 384) and not any(header[8:254])
    assert read_llmc(tmp_path / "m.bin").synthetic


# -- detection and loading -----------------------------------------------------------------
def test_load_checkpoint_detects_nanogpt_and_llmc(tmp_path, params):
    pytest.importorskip("torch")
    write_llmc(tmp_path / "gpt2_124M.bin", SPEC, params)
    write_nanogpt(tmp_path / "out" / "ckpt.pt", SPEC, params, synthetic=True)
    assert load_checkpoint(str(tmp_path / "gpt2_124M.bin")).metadata["format"] == "llm.c"
    for source in (tmp_path / "out" / "ckpt.pt", tmp_path / "out"):  # the file, or nanoGPT's out_dir
        ckpt = load_checkpoint(str(source))
        assert ckpt.metadata["format"] == "nanoGPT" and ckpt.synthetic
    # a torch file named .bin with no config.json beside it is a nanoGPT checkpoint, not llm.c's
    os.replace(tmp_path / "out" / "ckpt.pt", tmp_path / "renamed.bin")
    assert load_checkpoint(str(tmp_path / "renamed.bin")).metadata["format"] == "nanoGPT"
    with pytest.raises(WeightsError, match="no such file"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_backend_loads_nanogpt_and_llmc_files(tmp_path):
    pytest.importorskip("torch")
    from gptspec.backends import available, load

    if "torch" not in available():
        pytest.skip("the torch backend is not usable here")
    p = synthetic_params(TINY, 2, "conformance")
    write_nanogpt(tmp_path / "ckpt.pt", TINY, p)
    write_llmc(tmp_path / "gpt2_124M.bin", TINY, p)
    tokens = np.array([[1, 5, 9, 2]])
    want = reference.forward(TINY, p, tokens)
    for path in ("ckpt.pt", "gpt2_124M.bin"):
        import torch

        model = load("torch", str(tmp_path / path), dtype="float32", device="cpu")
        with torch.no_grad():
            got = model(torch.from_numpy(tokens)).double().numpy()
        assert np.abs(got - want).max() < 1e-4 * np.abs(want).max(), path


def test_progress_is_reported_per_tensor(tmp_path, params):
    calls = []
    write_llmc(tmp_path / "m.bin", SPEC, params, progress=lambda *a: calls.append(a))
    size = (tmp_path / "m.bin").stat().st_size - 1024
    assert len(calls) >= len(param_table(SPEC)) and calls[-1] == ("writing m.bin", size, size)
    assert all(b[1] >= a[1] for a, b in zip(calls, calls[1:]))
    calls.clear()
    read_llmc(tmp_path / "m.bin", progress=lambda *a: calls.append(a))
    assert calls[-1] == ("reading m.bin", size, size) and len(calls) == 16


# -- bad input -------------------------------------------------------------------------------
def _llmc_file(tmp_path, params):
    return write_llmc(tmp_path / "gpt2_124M.bin", SPEC, params)


def test_llmc_truncated_file_is_a_clear_error(tmp_path, params):
    path = _llmc_file(tmp_path, params)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(WeightsError, match=r"gpt2_124M\.bin: truncated: .* the file has"):
        load_checkpoint(str(path))
    path.write_bytes(data[:500])  # inside the header
    with pytest.raises(WeightsError, match=r"gpt2_124M\.bin: truncated: 500 bytes"):
        read_llmc(path)
    path.write_bytes(data + b"\0" * 8)
    with pytest.raises(WeightsError, match="longer than its header says"):
        read_llmc(path)


def test_llmc_wrong_magic_and_version_are_clear_errors(tmp_path, params):
    path = _llmc_file(tmp_path, params)
    data = bytearray(path.read_bytes())
    bad = bytes(struct.pack("<i", 12345)) + data[4:]
    path.write_bytes(bad)
    with pytest.raises(WeightsError, match=r"gpt2_124M\.bin: magic number 12345, not llm\.c's"):
        load_checkpoint(str(path))
    path.write_bytes(struct.pack("<i", 20240328) + data[4:])
    with pytest.raises(WeightsError, match="tokenizer file"):
        load_checkpoint(str(path))
    path.write_bytes(data[:4] + struct.pack("<i", 1) + data[8:])
    with pytest.raises(WeightsError, match="version 1; gptspec reads versions 3"):
        read_llmc(path)
    path.write_bytes(data[:28] + struct.pack("<i", 100) + data[32:])  # Vp below V
    with pytest.raises(WeightsError, match="padded vocab size 100 is below"):
        read_llmc(path)


class _Canary:
    """Unpickling this runs os.mkdir(path): proof, if the directory appears, that a reader unpickled it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("payload", ["namespace", "canary"])
def test_nanogpt_with_unsafe_objects_is_refused_unopened(tmp_path, params, payload):
    torch = pytest.importorskip("torch")
    write_nanogpt(tmp_path / "ok.pt", SPEC, params)
    ck = torch.load(tmp_path / "ok.pt", weights_only=True)
    canary = tmp_path / "unpickled"
    ck["config"] = argparse.Namespace(lr=1.0) if payload == "namespace" else _Canary(canary)
    torch.save(ck, tmp_path / "ckpt.pt")
    with pytest.raises(WeightsError) as e:
        load_checkpoint(str(tmp_path / "ckpt.pt"))
    msg = str(e.value)
    assert "ckpt.pt" in msg and "weights_only=True" in msg and "never unpickles" in msg
    assert f"it holds {'argparse.Namespace' if payload == 'namespace' else 'posix.mkdir'}" in msg
    assert not canary.exists()


def test_nanogpt_missing_and_wrong_entries_are_clear_errors(tmp_path, params):
    torch = pytest.importorskip("torch")
    write_nanogpt(tmp_path / "ok.pt", SPEC, params)
    ck = torch.load(tmp_path / "ok.pt", weights_only=True)

    def fails(obj, match):
        torch.save(obj, tmp_path / "bad.pt")
        with pytest.raises(WeightsError, match=match):
            read_nanogpt(tmp_path / "bad.pt")

    model = dict(ck["model"])
    del model["transformer.h.1.mlp.c_fc.bias"]
    fails({**ck, "model": model}, r"bad\.pt \(nanoGPT layout\).*missing 1 tensor\(s\): h\.1\.mlp\.c_fc\.bias")
    fails({k: v for k, v in ck.items() if k != "model_args"}, "no 'model_args' entry")
    fails(ck["model"], "bare state dict")
    fails({**ck, "model_args": {k: v for k, v in ck["model_args"].items() if k != "n_head"}}, "lacks n_head")
    # bias=False announces a bias-free model (SPEC.md 15): a state dict with biases contradicts it
    fails({**ck, "model_args": {**ck["model_args"], "bias": False}}, r"unexpected \d+ tensor\(s\)")
    fails({**ck, "model_args": {**ck["model_args"], "bias": "yes"}}, "bias is True or False")
    model = dict(ck["model"])
    model["lm_head.weight"] = model["transformer.wte.weight"] + 1
    fails({**ck, "model": model}, "lm_head.weight differs")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match=r"junk\.pt: not a torch checkpoint"):
        load_checkpoint(str(tmp_path / "junk.pt"))


def test_writers_refuse_what_the_format_cannot_hold(tmp_path, params):
    from gptspec.spec.variants import get_variant

    sinks = get_variant("softmax1").apply(SPEC)
    with pytest.raises(WeightsError, match="llm.c format cannot hold attention='softmax1'"):
        write_llmc(tmp_path / "m.bin", sinks, params)
    eps = SPEC.replace(norm_eps=1e-6)
    with pytest.raises(WeightsError, match="fixes LayerNorm eps at 1e-5"):
        write_llmc(tmp_path / "m.bin", eps, params)
    with pytest.raises(WeightsError, match="float32 .version 3. or bfloat16 .version 5., not float16"):
        write_llmc(tmp_path / "m.bin", SPEC, params, "float16")
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        with pytest.raises(WeightsError, match="nanoGPT format fixes LayerNorm eps"):
            write_nanogpt(tmp_path / "ckpt.pt", eps, params)
    bad = dict(params, **{"h.0.attn.c_proj.weight": np.full((64, 64), np.nan, np.float32)})
    with pytest.raises(WeightsError, match="NaN or Inf"):
        write_llmc(tmp_path / "m.bin", SPEC, bad)
    assert os.listdir(tmp_path) == []  # failed writes leave nothing, not even a .partial file


# -- the command -----------------------------------------------------------------------------
def test_convert_infers_the_format_from_dest(tmp_path):
    from gptspec.weights.resolve import CONVERT_FORMATS, format_of_destination

    dests = ("m.safetensors", "ckpt.pt", "ckpt.pth", "model.ckpt", "gpt2_124M.bin", str(tmp_path), "out/", "out")
    assert [format_of_destination(d) for d in dests] == [
        "canonical", "nanogpt", "nanogpt", "nanogpt", "llmc", "hf", "hf", "hf"]
    (tmp_path / "dir.bin").mkdir()  # an existing directory is Hugging Face whatever its name says
    assert format_of_destination(str(tmp_path / "dir.bin")) == "hf"
    assert set(CONVERT_FORMATS) == {"canonical", "hf", "nanogpt", "llmc"}
    with pytest.raises(WeightsError, match=r"model\.onnx: cannot tell the output format from its name .* "
                                           r"give --to \{canonical,hf,nanogpt,llmc\}"):
        format_of_destination("model.onnx")


def test_convert_command_chain(tmp_path):
    pytest.importorskip("torch")

    def gptspec(*args):
        out = subprocess.run([sys.executable, "-m", "gptspec", *args], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    gptspec("synthetic", "test-mini", str(tmp_path / "hf"), "--seed", "3")
    out = gptspec("convert", str(tmp_path / "hf"), str(tmp_path / "ckpt.pt"))
    assert "(nanogpt, float32)" in out and "SYNTHETIC" in out
    assert "(llmc, bfloat16)" in gptspec("convert", str(tmp_path / "ckpt.pt"), str(tmp_path / "m.bin"),
                                         "--dtype", "bfloat16")
    assert "(canonical, bfloat16)" in gptspec("convert", str(tmp_path / "m.bin"), str(tmp_path / "m.safetensors"))
    gptspec("convert", str(tmp_path / "m.safetensors"), str(tmp_path / "x"), "--to", "llmc")
    out = gptspec("info", str(tmp_path / "x"))
    assert "SYNTHETIC" in out and "bfloat16" in out
    src = read_hf(tmp_path / "hf")
    assert_same_bits(read(tmp_path / "m.safetensors").params, rounded(src.params, "bfloat16"))


def test_hf_and_llmc_refuse_a_padded_vocabulary(tmp_path):
    spec = TINY.replace(vocab_multiple=64)
    p = synthetic_params(spec, 0)
    with pytest.raises(WeightsError, match="cannot record vocab_multiple=64"):
        write_hf(tmp_path / "hf", spec, p)
    with pytest.raises(WeightsError, match="cannot record vocab_multiple=64"):
        write_llmc(tmp_path / "m.bin", spec, p)
