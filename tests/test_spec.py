"""ModelSpec: presets, validation messages, JSON round trips; the canonical parameter table."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gptspec.spec import OPTIONS, PRESETS, ModelSpec, SpecError, param_shapes, param_table
from gptspec.spec.params import gpt2_init

# Parameter counts of the Hugging Face GPT-2 checkpoints (tied head counted once): external facts.
HF_PARAM_COUNTS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


@pytest.mark.parametrize("name", HF_PARAM_COUNTS)
def test_presets_have_gpt2_parameter_counts(name):
    assert ModelSpec.preset(name).n_params == HF_PARAM_COUNTS[name]


def test_defaults_are_gpt2():
    assert ModelSpec() == ModelSpec.preset("gpt2")
    s = ModelSpec()
    assert (s.norm_eps, s.activation, s.head_dim) == (1e-5, "gelu_tanh", 64)


def test_spec_is_immutable():
    with pytest.raises(AttributeError):
        ModelSpec().n_layer = 3


def test_unknown_preset_lists_known_ones():
    with pytest.raises(SpecError, match="unknown preset 'gpt3'.*gpt2-medium"):
        ModelSpec.preset("gpt3")


@pytest.mark.parametrize("changes, message", [
    (dict(n_embd=770), r"n_embd \(770\) must be divisible by n_head \(12\)"),
    (dict(n_layer=0), "n_layer must be >= 1, got 0"),
    (dict(n_head=2.0), "n_head must be an int"),
    (dict(vocab_size=True), "vocab_size must be an int"),
    (dict(norm_eps=0.0), "norm_eps must be a float in"),
    (dict(norm_eps=float("nan")), "norm_eps must be a float in"),
    (dict(activation="gelu"), r"activation must be one of \['gelu_tanh'\], got 'gelu'"),
    (dict(norm="batchnorm"), "norm must be one of"),
])
def test_validation_names_field_and_value(changes, message):
    with pytest.raises(SpecError, match=message):
        ModelSpec(**changes)


def test_validation_reports_every_problem_at_once():
    with pytest.raises(SpecError) as e:
        ModelSpec(n_layer=0, n_embd=10, n_head=3)
    assert "n_layer" in str(e.value) and "divisible" in str(e.value)


specs = st.builds(
    lambda h, d, **kw: ModelSpec(n_head=h, n_embd=h * d, **kw),
    h=st.integers(1, 8), d=st.integers(1, 16),
    vocab_size=st.integers(1, 60000), n_positions=st.integers(1, 4096), n_layer=st.integers(1, 64),
    norm_eps=st.floats(1e-12, 0.5),
    activation=st.sampled_from(OPTIONS["activation"]),
)


@given(specs)
def test_json_round_trip(spec):
    assert ModelSpec.from_json(spec.to_json()) == spec
    assert ModelSpec.from_dict(json.loads(spec.to_json())) == spec


def test_json_rejects_unknown_fields_and_bad_json():
    data = ModelSpec().to_dict() | {"rope_theta": 10000}
    with pytest.raises(SpecError, match=r"unknown ModelSpec field\(s\) \['rope_theta'\]"):
        ModelSpec.from_dict(data)
    with pytest.raises(SpecError, match="does not parse"):
        ModelSpec.from_json("{not json")
    with pytest.raises(SpecError, match="must be a JSON object"):
        ModelSpec.from_json("[1, 2]")


def test_json_missing_fields_take_gpt2_values():
    assert ModelSpec.from_json('{"n_layer": 2}') == ModelSpec(n_layer=2)


@given(specs)
def test_parameter_table_matches_the_spec(spec):
    table = param_table(spec)
    names = [p.name for p in table]
    assert len(names) == len(set(names)) == 2 + 12 * spec.n_layer + 2
    C = spec.n_embd
    shapes = param_shapes(spec)
    assert shapes["wte.weight"] == (spec.vocab_size, C)
    assert shapes["wpe.weight"] == (spec.n_positions, C)
    assert shapes[f"h.{spec.n_layer - 1}.attn.c_attn.weight"] == (3 * C, C)
    assert shapes["h.0.mlp.c_proj.weight"] == (C, 4 * C)
    assert "lm_head.weight" not in shapes  # tied: stored once, as wte
    assert {p.name for p in table if p.hf_transposed} == {
        f"h.{i}.{m}.weight" for i in range(spec.n_layer)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }


def test_gpt2_init_law():
    spec = ModelSpec.preset("gpt2")
    by_name = {p.name: p for p in param_table(spec)}
    assert gpt2_init(spec, by_name["wte.weight"]) == (0.0, 0.02)
    assert gpt2_init(spec, by_name["h.3.attn.c_proj.weight"]) == (0.0, 0.02 / math.sqrt(24))
    assert gpt2_init(spec, by_name["h.3.mlp.c_proj.weight"]) == (0.0, 0.02 / math.sqrt(24))
    assert gpt2_init(spec, by_name["h.3.mlp.c_fc.weight"]) == (0.0, 0.02)
    assert gpt2_init(spec, by_name["h.3.mlp.c_fc.bias"]) == (0.0, 0.0)
    assert gpt2_init(spec, by_name["ln_f.weight"]) == (1.0, 0.0)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_validates(name):
    assert ModelSpec.preset(name).n_embd % ModelSpec.preset(name).n_head == 0
