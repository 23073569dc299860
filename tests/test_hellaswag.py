"""HellaSwag-style multiple-choice evaluation (SPEC.md 23): the jsonl reader and its errors, rendering
(the leading space, padding, left truncation), the float64 reference's scores against an oracle written
out here (one unpadded sequence per candidate, -log softmax summed position by position), every
installed backend and dtype against the reference under the near-tie rule, a broken backend caught by
that rule, and `gptspec eval hellaswag`."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gptspec import backends, cli
from gptspec.conformance.multiple_choice import (
    Float64Reference, judge, reference_model, reference_results, run_agreement, tie_threshold,
)
from gptspec.evaluation import Example, evaluate, read_examples, render
from gptspec.evaluation import multiple_choice
from gptspec.evaluation.multiple_choice import Scores
from gptspec.evaluation.run import ExampleResult
from gptspec.spec import DTYPES, InputError, ModelSpec, reference
from gptspec.spec.tolerance import bound
from gptspec.tokenizer import get_encoding
from gptspec.weights import save, synthetic_params

# test-tiny's width with GPT-2's vocabulary, so that the tokenizer applies, and 64 positions, so that
# most contexts fit and one does not
SPEC = ModelSpec.preset("test-tiny").replace(vocab_size=50257, n_positions=64)

LONG_CTX_A = ("The lighthouse keeper climbs the spiral stairs every evening, counting the steps, checking the "
              "lamp, wiping salt from the windows and writing the weather in a worn notebook before the ships "
              "pass the rocks below the cliff in the dark. On stormy nights he stays awake until dawn, listening "
              "to the waves break against the stones and the wind rattle the iron door of the tower.")
RECORDS = [
    {"ind": 11, "activity_label": "Roofing", "ctx_a": "A man kneels on a steep roof holding a hammer.",
     "ctx_b": "he", "label": 3, "split": "val", "split_type": "indomain", "source_id": "synthetic~1",
     "endings": ["juggles three oranges above the chimney.", "reads a newspaper about gardening.",
                 "sings loudly to the pigeons.", "nails a loose shingle back into place."]},
    {"ind": 12, "activity_label": "Cooking", "ctx_a": "A woman chops onions on a wooden board.",
     "ctx_b": "She", "label": 0, "split": "val", "split_type": "zeroshot", "source_id": "synthetic~2",
     "endings": ["slides them into a hot pan with butter.", "paints the board bright blue.",
                 "throws the knife into the garden.", "puts on a pair of skis."]},
    {"ind": 13, "activity_label": "Lighthouse", "ctx_a": LONG_CTX_A, "ctx_b": "Then he", "label": 1,
     "split": "val", "split_type": "indomain", "source_id": "synthetic~3",
     "endings": ["swims to the mainland.", "lights the lamp and watches the sea.", "bakes a cake.", "falls asleep."]},
    {"ind": 14, "activity_label": "Tennis", "ctx_a": "Two players rally on a clay court.", "ctx_b": "",
     "label": 2, "split": "val", "split_type": "indomain", "source_id": "synthetic~4",
     "endings": ["The ball turns into a bird.", "They eat lunch on the net.",
                 "One player smashes the ball past the other.", "A car drives across the court."]},
    {"ind": 15, "activity_label": "Knitting", "ctx_a": "An old man sits by the fire with needles and yarn.",
     "ctx_b": "he", "label": 0, "split": "val", "split_type": "zeroshot", "source_id": "synthetic~5",
     "endings": ["knits another row of the scarf.", "", "knits another row of the scarf.", "jumps."]},
]
for _r in RECORDS:  # HellaSwag's ctx: ctx_a, then a space and ctx_b when ctx_b is not empty
    _r["ctx"] = _r["ctx_a"] + (" " + _r["ctx_b"] if _r["ctx_b"] else "")


def write_jsonl(path, records, blank_line_after: int | None = None) -> str:
    lines = [json.dumps(r) for r in records]
    if blank_line_after is not None:
        lines.insert(blank_line_after, "")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("hs") / "hellaswag_val.jsonl", RECORDS, blank_line_after=2)


@pytest.fixture(scope="module")
def params():
    return synthetic_params(SPEC, 0, "gpt2")


@pytest.fixture(scope="module")
def examples(data_file):
    return read_examples(data_file)


# -- reading -----------------------------------------------------------------------------------------
def test_reader_keeps_the_layout_and_line_numbers(data_file, examples):
    assert len(examples) == len(RECORDS)
    assert [e.line for e in examples] == [1, 2, 4, 5, 6]  # line 3 is blank, skipped
    for e, r in zip(examples, RECORDS):
        assert (e.ctx, e.endings, e.label) == (r["ctx"], tuple(r["endings"]), r["label"])
        assert e.extra["activity_label"] == r["activity_label"] and e.extra["ctx_b"] == r["ctx_b"]
        assert e.where == f"{data_file}:{e.line}"
    assert [e.line for e in read_examples(data_file, limit=2)] == [1, 2]


GOOD = RECORDS[0]
BAD_LINES = {
    "not json": ('{"ctx": "a", ', ["not valid JSON"]),
    "not an object": ("[1, 2]", ["expected a JSON object", "list"]),
    "missing label": (json.dumps({k: v for k, v in GOOD.items() if k != "label"}), ["missing", "'label'", "test split"]),
    "missing ctx": (json.dumps({k: v for k, v in GOOD.items() if k != "ctx"}), ["missing", "'ctx'"]),
    "label out of range": (json.dumps(dict(GOOD, label=4)), ["'label' must be 0..3", "got 4"]),
    "label negative": (json.dumps(dict(GOOD, label=-1)), ["'label' must be 0..3", "got -1"]),
    "label a string": (json.dumps(dict(GOOD, label="3")), ["'label' must be an integer", "str"]),
    "label a bool": (json.dumps(dict(GOOD, label=True)), ["'label' must be an integer", "bool"]),
    "label a float": (json.dumps(dict(GOOD, label=1.0)), ["'label' must be an integer", "float"]),
    "three endings": (json.dumps(dict(GOOD, endings=GOOD["endings"][:3])), ["list of 4 strings", "a list of 3"]),
    "endings a string": (json.dumps(dict(GOOD, endings="abc")), ["list of 4 strings", "a str"]),
    "non-text ending": (json.dumps(dict(GOOD, endings=["a", 7, "c", "d"])), ["endings[1] must be text", "int"]),
    "null ending": (json.dumps(dict(GOOD, endings=["a", "b", None, "d"])), ["endings[2] must be text", "null"]),
    "ctx not text": (json.dumps(dict(GOOD, ctx=["a"])), ["'ctx' must be text", "list"]),
    "empty ctx": (json.dumps(dict(GOOD, ctx="")), ["'ctx' is empty"]),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_malformed_line_is_reported_with_file_and_line(case, tmp_path):
    line, fragments = BAD_LINES[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[1]) + "\n\n" + line + "\n")
    with pytest.raises(InputError) as e:
        read_examples(path)
    assert f"{path}:3:" in str(e.value)
    for fragment in fragments:
        assert fragment in str(e.value)


def test_unreadable_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file.*nothing is downloaded"):
        read_examples(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match="holds no examples"):
        read_examples(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(RECORDS[0]).encode() + b"\n" + b'{"ctx": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"latin1.jsonl:2: not UTF-8"):
        read_examples(tmp_path / "latin1.jsonl")


# -- rendering ---------------------------------------------------------------------------------------
def test_rendering_context_then_space_ending_then_padding(examples):
    enc = get_encoding("gpt2")
    e = examples[0]
    r = render(e, SPEC.n_positions, pad_multiple=32)
    ctx = enc.encode(e.ctx)
    assert r.tokens.shape == (4, 32) and r.ctx_len == len(ctx) and r.truncated == 0
    for i, ending in enumerate(e.endings):
        ids = enc.encode(" " + ending)
        assert ids[0] != enc.encode(ending)[0]  # the leading space is part of the first token
        n = len(ctx) + len(ids)
        assert r.tokens[i, :n].tolist() == ctx + ids
        assert (r.tokens[i, n:] == multiple_choice.PAD_ID).all()
        assert r.ending_lens[i] == len(ids)
    assert render(e, SPEC.n_positions).tokens.shape[1] == len(ctx) + max(r.ending_lens)  # pad_multiple 1


def test_a_long_context_loses_its_left_end(examples):
    enc = get_encoding("gpt2")
    e = examples[2]
    ctx, ends = enc.encode(e.ctx), [enc.encode(" " + x) for x in e.endings]
    room = SPEC.n_positions - max(map(len, ends))
    assert len(ctx) > room  # the data really is too long for 64 positions
    r = render(e, SPEC.n_positions, pad_multiple=32)
    assert r.truncated == len(ctx) - room and r.ctx_len == room
    assert r.tokens.shape == (4, SPEC.n_positions)
    for i, ids in enumerate(ends):
        assert r.tokens[i, : room + len(ids)].tolist() == ctx[-room:] + ids  # the same context on every row


def test_an_ending_that_cannot_fit_is_an_error():
    e = Example("Short.", ("word " * 70, "a", "b", "c"), 0, "data.jsonl", 9)
    with pytest.raises(InputError, match=r"data.jsonl:9: ending 0 has \d+ tokens; a model of 64 positions scores "
                                         r"endings of at most 63 tokens"):
        render(e, SPEC.n_positions)


def test_a_model_without_gpt2_vocabulary_is_refused(examples):
    spec = ModelSpec.preset("test-tiny")
    model = reference_model(spec, synthetic_params(spec, 0, "gpt2"), "float32")
    with pytest.raises(InputError, match="vocabulary of 61 ids.*50257"):
        evaluate(Float64Reference(), model, examples)


# -- the float64 reference against an oracle written out here ---------------------------------------------
def oracle_losses(spec, params64, record) -> list[float]:
    """Each ending's summed -log p(token | everything before it), one unpadded sequence per ending,
    position by position; the context cut from the left so that context + longest ending fits."""
    enc = get_encoding("gpt2")
    ctx = enc.encode(record["ctx"])
    ends = [enc.encode(" " + x) for x in record["endings"]]
    room = spec.n_positions - max(len(x) for x in ends)
    ctx = ctx[len(ctx) - room:] if len(ctx) > room else ctx
    out = []
    for ids in ends:
        logits = reference.forward(spec, params64, np.array([ctx + ids]))[0]
        total = 0.0
        for j, token in enumerate(ids):
            row = logits[len(ctx) - 1 + j, : spec.vocab_size]  # the position just before the token
            total += math.log(np.exp(row - row.max()).sum()) + row.max() - row[token]
        out.append(total)
    return out


def test_reference_scores_match_the_oracle(examples, params):
    ref = reference_model(SPEC, params, "float32")
    result = evaluate(Float64Reference(), ref, examples)  # padded to a multiple of 32
    assert result.n == len(RECORDS) and result.truncated == 1 and result.examples[2].truncated > 0
    right, right_norm = 0, 0
    for got, record in zip(result.examples, RECORDS):
        want = oracle_losses(SPEC, ref.params, record)
        np.testing.assert_allclose(got.scores.losses, want, rtol=1e-11)
        enc = get_encoding("gpt2")
        lengths = [len(enc.encode(" " + x)) for x in record["endings"]]
        assert list(got.scores.n_tokens) == lengths
        pred, pred_norm = int(np.argmin(want)), int(np.argmin(np.array(want) / lengths))
        assert (got.pred, got.pred_norm) == (pred, pred_norm)
        right += pred == record["label"]
        right_norm += pred_norm == record["label"]
    n = len(RECORDS)
    assert result.acc == right / n and result.acc_norm == right_norm / n
    p = right_norm / n
    assert result.acc_norm_stderr == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))


def test_ties_go_to_the_first_candidate(examples, params):
    """Example 5 has endings 0 and 2 identical: their scores are equal, and the answer is 0."""
    result = evaluate(Float64Reference(), reference_model(SPEC, params, "float32"), examples[4:])
    losses = result.examples[0].scores.losses
    assert losses[0] == losses[2]
    assert result.examples[0].pred != 2 and result.examples[0].pred_norm != 2


def test_padding_never_reaches_a_score(examples, params, monkeypatch):
    ref = reference_model(SPEC, params, "float32")
    one = reference_results(SPEC, params, examples, "float32", pad_multiple=1)
    monkeypatch.setattr(multiple_choice, "PAD_ID", 50256)
    other = evaluate(Float64Reference(), ref, examples, pad_multiple=64)
    for a, b in zip(one.examples, other.examples):
        np.testing.assert_allclose(a.scores.losses, b.scores.losses, rtol=1e-12)


# -- the near-tie rule ---------------------------------------------------------------------------------
def _result(losses, n_tokens, scale=10.0, label=0) -> ExampleResult:
    return ExampleResult(Example("c", ("a", "b", "c", "d"), label, "x.jsonl", 7), Scores(losses, n_tokens, scale), 0)


def test_tie_threshold_is_the_logits_bound_carried_to_the_scores():
    delta = bound("float32", "logits", "rel_max") * 10.0
    ref = _result((5.0, 5.0 + 1e-4, 9.0, 9.0), (3, 4, 5, 6))
    assert tie_threshold(ref, 0, 1, "float32", "acc") == pytest.approx(2 * delta * 7)
    assert tie_threshold(ref, 0, 1, "float32", "acc_norm") == pytest.approx(4 * delta)
    # answer 1 where the reference answers 0: gap 1e-4 <= 2 delta 7 = 1.4e-3 (acc), accepted
    got = _result((5.0, 4.9, 9.0, 9.0), (3, 4, 5, 6))
    v = judge(ref, got, ref, "float32", "acc")
    assert v.answers == (1, 0) and v.gap == pytest.approx(1e-4) and v.ok and not v.same
    # a gap of 1e-2 is beyond it: the reference tells the candidates apart
    far = _result((5.0, 5.01, 9.0, 9.0), (3, 4, 5, 6))
    assert not judge(far, got, far, "float32", "acc").ok


# -- every backend and dtype against the reference --------------------------------------------------------
# tinygrad compiles its kernels per dtype (~15 s for bfloat16 on a CPU): the default tier runs it in float32,
# the heavy tier in every dtype; the other backends run every dtype in both
SLOW_COMPILING = {"tinygrad"}


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_backend_gives_the_reference_answers(request, dtype, examples, params):
    from helpers import selected_backends

    if request.config.getoption("--dtype") and dtype not in request.config.getoption("--dtype"):
        pytest.skip(f"--dtype leaves out {dtype}")
    names = selected_backends(request.config)
    if dtype != "float32" and request.config.getoption("--tier") != "heavy":
        names = [n for n in names if n not in SLOW_COMPILING]
    if not names:
        pytest.skip("no backend is installed and usable here" + ("" if dtype == "float32" else " (or in this tier)"))
    agreement = run_agreement([backends.get(n) for n in names], SPEC, params, examples, [dtype])
    own = [r for r in agreement.rows if "~" not in r.subject]
    assert [r.subject for r in own] == names
    assert len(agreement.rows) == len(names) + len(names) * (len(names) - 1) // 2
    for row in agreement.rows:
        assert row.status in ("ran", "unsupported"), f"{row.subject} {dtype}: {row.status}: {row.message}"
        assert row.ok or row.status == "unsupported", \
            f"{row.subject} {dtype}: score ratio {row.score_ratio:.3g}; " + "; ".join(map(str, row.failures))
        assert row.status == "unsupported" or sum(row.same.values()) + sum(row.near_ties.values()) == 2 * row.n
    assert agreement.ok


class ShiftedLogits:
    """A backend whose logits are one position late: the classic off-by-one of completion scoring."""

    def __init__(self, inner):
        self.inner, self.name = inner, f"shifted-{inner.name}"

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, model, tokens):
        return np.roll(self.inner.forward(model, tokens), 1, axis=1)


def test_a_backend_scoring_the_wrong_positions_fails(examples, params):
    name = next(iter(backends.available()), None)
    if name is None:
        pytest.skip("no backend is installed and usable here")
    agreement = run_agreement([ShiftedLogits(backends.get(name))], SPEC, params, examples, ["float32"])
    row = agreement.rows[0]
    assert row.status == "ran" and not row.ok and not agreement.ok
    assert row.score_ratio > 1 and row.failures  # both the scores and the answers give it away


# -- gptspec eval hellaswag ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_file(tmp_path_factory, params):
    return str(save(tmp_path_factory.mktemp("w") / "tiny50257.safetensors", SPEC, params, synthetic=True))


def test_cli_one_backend_writes_per_example_results(data_file, model_file, params, tmp_path, capsys):
    name = next(iter(backends.available()), None)
    if name is None:
        pytest.skip("no backend is installed and usable here")
    out = tmp_path / "results.json"
    code = cli.main(["eval", "hellaswag", "--backend", name, "--model", model_file, "--data", data_file,
                     "--limit", "4", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "SYNTHETIC" in text and "1 context(s) truncated from the left" in text and "acc_norm" in text
    saved = json.loads(out.read_text())
    run = saved["runs"][0]
    assert saved["synthetic"] and run["backend"] == name and run["n"] == 4 and len(run["examples"]) == 4
    b = backends.get(name)
    want = evaluate(b, b.build(SPEC, params), read_examples(data_file, 4))
    assert run["acc"] == want.acc and run["acc_norm"] == want.acc_norm
    assert [x["pred_norm"] for x in run["examples"]] == [e.pred_norm for e in want.examples]
    assert [x["line"] for x in run["examples"]] == [1, 2, 4, 5] and run["examples"][2]["truncated_tokens"] > 0


def test_cli_reports_a_bad_line(model_file, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], dict(RECORDS[1], label=7)])
    code = cli.main(["eval", "hellaswag", "--model", model_file, "--data", bad])
    out = capsys.readouterr().out
    assert code == 2 and "bad.jsonl:2:" in out and "got 7" in out


def test_cli_all_backends_prints_the_agreement_table(data_file, model_file, tmp_path, capsys):
    if not backends.available():
        pytest.skip("no backend is installed and usable here")
    out = tmp_path / "all.json"
    code = cli.main(["eval", "hellaswag", "--backend", "all", "--model", model_file, "--data", data_file,
                     "--limit", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "agreement" in text and "pass" in text and "FAIL" not in text
    saved = json.loads(out.read_text())
    assert {r["backend"] for r in saved["runs"]} == {"reference", *backends.available()}
    assert all(r["verdict"] == "pass" for r in saved["agreement"])
