"""`gptspec generate`: the same tokens as the Python API, streamed text that decodes as tiktoken
does (whole characters even when a token ends inside one), ids for models without GPT-2's
vocabulary, the synthetic-weights warning and the speed report."""
from __future__ import annotations

import numpy as np
import pytest

from gptspec import backends, cli
from gptspec.backends import generation
from gptspec.backends.generation import Step, generate
from gptspec.spec import BackendError, ModelSpec
from gptspec.spec.sampling import Sampling
from gptspec.tokenizer import get_encoding
from gptspec.weights import load_checkpoint, save, synthetic_params


def generating() -> list[str]:
    out = []
    for name in backends.available():
        b = backends.get(name)
        try:
            spec = ModelSpec.preset("test-tiny")
            b.extend(b.build(spec, synthetic_params(spec, 0, "conformance")), np.zeros((1, 1), np.int64), None)
        except BackendError as e:
            if "does not implement generation" not in str(e):
                raise
            continue
        out.append(name)
    return out


GENERATING = generating()
needs_backend = pytest.mark.skipif(not GENERATING, reason="no installed backend implements generation")


@pytest.fixture(scope="module")
def gpt2_vocab_model(tmp_path_factory):
    """test-mini with GPT-2's vocabulary, so that the tokenizer applies: small and quick."""
    spec = ModelSpec.preset("test-mini").replace(vocab_size=50257)
    return save(tmp_path_factory.mktemp("w") / "mini50257.safetensors", spec, synthetic_params(spec, 0, "gpt2"),
                synthetic=True)


def run(capsys, *args):
    code = cli.main(["generate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", GENERATING or [pytest.param("none", marks=needs_backend)])
def test_greedy_ids_are_those_of_the_api(name, capsys):
    code, out, err = run(capsys, "--backend", name, "--model", "synthetic:test-mini", "--ids", "1,2,3",
                         "--max-new-tokens", "12", "--temperature", "0")
    assert code == 0, err
    ckpt = load_checkpoint("synthetic:test-mini")
    b = backends.get(name)
    want = generate(b, b.build(ckpt.spec, ckpt.params), ckpt.spec, [[1, 2, 3]], 12, Sampling(0), stop=None).new[0]
    assert out == "1,2,3 -> " + " ".join(map(str, want)) + "\n"
    assert "SYNTHETIC weights: the text is noise" in err
    assert "prompt: 3 tokens x 1" in err and "decode: 11 tokens" in err and "tokens/s" in err


@needs_backend
def test_text_streams_what_tiktoken_decodes(gpt2_vocab_model, capsys):
    name = GENERATING[0]
    code, out, err = run(capsys, "--backend", name, "--model", str(gpt2_vocab_model), "--max-new-tokens", "20",
                         "--temperature", "0.8", "--seed", "3", "Zürich, 日本")
    assert code == 0, err
    enc = get_encoding("gpt2")
    prompt = enc.encode("Zürich, 日本")
    ckpt = load_checkpoint(gpt2_vocab_model)
    b = backends.get(name)
    new = generate(b, b.build(ckpt.spec, ckpt.params), ckpt.spec, [prompt], 20, Sampling(0.8, 50, None, 3)).new[0]
    new = [t for t in new if t != enc.eot_token]
    assert out == enc.decode(prompt) + enc.decode(new) + "\n"
    assert "SYNTHETIC" in err


@needs_backend
def test_a_character_split_across_tokens_prints_whole(gpt2_vocab_model, capsys, monkeypatch):
    enc = get_encoding("gpt2")
    pieces = [enc.encode_single_token(bytes([x])) for x in "日".encode()]  # 3 tokens, one byte each
    assert len(pieces) == 3

    def steps(backend, model, spec, prompts, max_new_tokens, sampling, stop):
        for k, t in enumerate(pieces + [enc.encode_single_token("!")]):
            yield Step(len(prompts[0]) + k, np.array([t]), np.array([True]), np.array([k == 3]))

    monkeypatch.setattr(generation, "steps", steps)
    code, out, err = run(capsys, "--backend", GENERATING[0], "--model", str(gpt2_vocab_model), "Hi")
    assert code == 0, err
    assert out == "Hi日!\n"


@needs_backend
def test_num_samples_prints_each_sample(capsys):
    code, out, err = run(capsys, "--backend", GENERATING[0], "--model", "synthetic:test-mini", "--ids", "5",
                         "--max-new-tokens", "4", "--num-samples", "3", "--seed", "1")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0::2] == [f"--- sample {i} of 3 ---" for i in (1, 2, 3)]
    assert all(line.startswith("5 -> ") and len(line.split()) == 6 for line in lines[1::2])
    assert "prompt: 1 tokens x 3" in err and "decode: 9 tokens" in err


@needs_backend
def test_text_needs_the_gpt2_vocabulary(capsys):
    code, out, err = run(capsys, "--backend", GENERATING[0], "--model", "synthetic:test-mini", "hello")
    assert code == 2 and "--ids" in out and "257" in out
