"""adaptinf.structure.adapt: every method's structure fitted to the backbone's shape.

On the built-in shape (6 layers, hidden 384, 12 heads, FFN 1536) the presets' settings come back as
written, with no note; on a 4-layer model of another width every method's adapted settings convert
a tiny dense model and run; a change is noted; a shape no structure fits is one line of error.
"""

from __future__ import annotations

import pytest
import torch

from adaptinf.backbone import EncoderConfig
from adaptinf.preset import read_preset
from adaptinf.registry import get_method
from adaptinf.structure import adapt
from conftest import make_batch, make_tiny_dense

METHODS = ("ee", "sweet", "multi-model", "sharcs", "acm", "planer")
BUILTIN = EncoderConfig()  # the 6-layer MiniLM's shape


def _preset_sets(preset: str) -> dict[str, dict]:
    methods = read_preset(preset)["methods"]
    return {m: dict((methods.get(m) or {}).get("set") or {}) for m in METHODS}


def _small(layers: int = 4, hidden: int = 64, heads: int = 4, ffn: int = 96, positions: int = 40) -> EncoderConfig:
    return EncoderConfig(vocab_size=60, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=ffn, max_position_embeddings=positions)


def _converts_and_runs(method: str, sets: dict, *, layers: int, hidden: int, heads: int, ffn: int) -> None:
    dense = make_tiny_dense(hidden=hidden, heads=heads, ffn=ffn, layers=layers)
    cls = get_method(method)
    model = cls.from_dense(dense, cls.Config.from_dict(sets)).eval()
    batch = make_batch((32, 2, 17), vocab_size=60)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (3, 3) and torch.isfinite(out.logits).all()


@pytest.mark.parametrize("preset", ["quick", "full"])
@pytest.mark.parametrize("method", METHODS)
def test_builtin_shape_keeps_the_preset_settings(preset, method):
    sets = _preset_sets(preset)[method]
    assert adapt(method, sets, BUILTIN) == (sets, [])


@pytest.mark.parametrize("method", ["sharcs", "acm", "planer", "ee"])
def test_defaults_fit_the_builtin_shape(method):
    assert adapt(method, {}, BUILTIN) == ({}, [])


def test_other_methods_come_back_as_given():
    assert adapt("dense", {"classifier_dropout": 0.0}, _small()) == ({"classifier_dropout": 0.0}, [])


@pytest.mark.parametrize("method", METHODS)
def test_quick_preset_builds_on_a_4_layer_model_of_another_width(method):
    sets, notes = adapt(method, _preset_sets("quick")[method], _small())
    if method == "multi-model":
        assert sets["exits"] == [1, 4]
        assert notes == ["multi-model: exits [1, 6] -> [1, 4] (the model has 4 layers)"]
    else:
        assert notes == []
    _converts_and_runs(method, sets, layers=4, hidden=64, heads=4, ffn=96)


@pytest.mark.parametrize(("exits", "want"), [([2, 4, 6], [2, 4]), ([1, 2], [1, 2, 4]), ([5, 6], [4]), ("1,3,4", None)])
def test_exits_keep_the_layers_the_model_has_and_end_at_its_last(exits, want):
    sets, notes = adapt("ee", {"exits": exits, "policy": "entropy"}, _small())
    assert sets["policy"] == "entropy"
    if want is None:
        assert sets == {"exits": "1,3,4", "policy": "entropy"} and notes == []
        return
    assert sets["exits"] == want and len(notes) == 1 and notes[0].startswith(f"ee: exits {exits} -> {want} (")
    _converts_and_runs("ee", sets, layers=4, hidden=64, heads=4, ffn=96)


def test_sharcs_router_layer_and_widths_fit_depth_and_heads():
    sets, notes = adapt("sharcs", {"router_layer": 4, "window": 1}, _small(heads=2))
    assert sets == {"router_layer": 3, "window": 1, "widths": [0.5, 1.0],
                    "confidence_intervals": [[0.5, 1.0], [0.0, 0.5]]}
    assert notes[0].startswith("sharcs: router_layer 4 -> 3 (the model has 4 layers")
    assert notes[1] == "sharcs: widths [0.25, 0.5, 1.0] -> [0.5, 1.0] (with 2 attention heads, 0.25 and 0.5 both keep 1 head)"
    assert notes[2].startswith("sharcs: confidence_intervals [[0.8, 1.0], [0.5, 0.8], [0.0, 0.5]] -> [[0.5, 1.0], [0.0, 0.5]]")
    _converts_and_runs("sharcs", sets, layers=4, hidden=64, heads=2, ffn=96)


def test_sharcs_widths_that_all_keep_every_head_fall_back_to_the_default_widths():
    sets, notes = adapt("sharcs", {"widths": [0.9, 1.0], "confidence_intervals": [[0.5, 1.0], [0.0, 0.5]]},
                        _small(heads=2))
    assert sets["widths"] == [0.5, 1.0] and len(sets["confidence_intervals"]) == 2 and len(notes) == 2
    _converts_and_runs("sharcs", sets, layers=4, hidden=64, heads=2, ffn=96)


def test_acm_learners_leave_no_learner_empty():
    sets, notes = adapt("acm", {"learners": 16, "beta": 0.25}, _small(ffn=24))
    assert sets == {"learners": 12, "beta": 0.25}
    assert notes == ["acm: learners 16 -> 12 (16 learners of ceil(24 / 16) = 2 neurons leave the last one empty: "
                     "intermediate_size is 24)"]
    _converts_and_runs("acm", sets, layers=4, hidden=64, heads=4, ffn=24)
    assert adapt("acm", {"learners": 5}, _small()) == ({"learners": 5}, [])  # padded groups are fine


def test_acm_attention_learners_fit_the_hidden_size():
    sets, notes = adapt("acm", {"learners": 16, "targets": ["ffn", "attn"]}, _small(hidden=8, heads=2, ffn=64))
    assert sets["learners"] == 8 and notes[0].startswith("acm: learners 16 -> 8 (")
    _converts_and_runs("acm", sets, layers=4, hidden=8, heads=2, ffn=64)


def test_planer_experts_divide_the_ffn_and_architecture_follows():
    sets, notes = adapt("planer", {"architecture": ["full/moe8", "half/dense", "skip/moe2", "full/half"],
                                   "latency_target": 0.5, "latency_seq_len": 64}, _small(ffn=100))
    assert sets["num_experts"] == 5 and sets["latency_target"] == 0.5 and sets["latency_seq_len"] == 40
    assert sets["architecture"] == ["full/moe5", "half/dense", "skip/moe2", "full/half"]
    assert notes == ["planer: num_experts 8 -> 5 (experts must divide intermediate_size 100)",
                     "planer: architecture ['full/moe8', 'half/dense', 'skip/moe2', 'full/half'] -> "
                     "['full/moe5', 'half/dense', 'skip/moe2', 'full/half'] (at most 5 experts per token)",
                     "planer: latency_seq_len 64 -> 40 (the model has 40 positions)"]
    _converts_and_runs("planer", sets, layers=4, hidden=64, heads=4, ffn=100)
    sets, notes = adapt("planer", {"num_experts": 8, "architecture": ["full/moe8"] * 4}, _small(ffn=28))
    assert sets == {"num_experts": 7, "architecture": ["full/moe7"] * 4}
    assert notes[1] == ("planer: architecture ['full/moe8', 'full/moe8', 'full/moe8', 'full/moe8'] -> "
                        "['full/moe7', 'full/moe7', 'full/moe7', 'full/moe7'] (at most 7 experts per token)")
    _converts_and_runs("planer", sets, layers=4, hidden=64, heads=4, ffn=28)


def test_planer_experts_hold_a_multiple_of_4_neurons_where_a_divisor_allows():
    sets, notes = adapt("planer", {"num_experts": 16}, _small())  # 96 / 16 = 6 neurons
    assert sets == {"num_experts": 12}
    assert notes == ["planer: num_experts 16 -> 12 (an expert of 6 neurons is no multiple of 4)"]
    _converts_and_runs("planer", sets, layers=4, hidden=64, heads=4, ffn=96)
    sets, notes = adapt("planer", {}, _small(ffn=90))  # no divisor of 90 gives a multiple of 4
    assert sets == {"num_experts": 9} and notes[0].endswith("no divisor gives experts of a multiple of 4 neurons)")
    assert adapt("planer", {"num_experts": 9}, _small(ffn=90)) == ({"num_experts": 9}, [])


def test_planer_architecture_of_another_depth_is_dropped():
    sets, notes = adapt("planer", {"architecture": ["full/moe2"] * 6, "latency_target": 0.4}, _small())
    assert sets == {"latency_target": 0.4}
    assert notes == ["planer: architecture of 6 layers dropped (the model has 4 layers; one is searched under the "
                     "latency target instead)"]


@pytest.mark.parametrize(("method", "encoder", "words"), [
    ("sharcs", _small(layers=1), "sharcs: needs at least 2 layers"),
    ("sharcs", _small(hidden=64, heads=1), "sharcs: needs at least 2 attention heads"),
    ("acm", _small(ffn=1), "acm: no learner count from 2 to 16"),
    ("planer", _small(ffn=97), "planer: intermediate_size 97 has no divisor from 2 to 64"),
])
def test_a_shape_no_structure_fits_is_refused_in_one_line(method, encoder, words):
    with pytest.raises(ValueError) as e:
        adapt(method, {}, encoder)
    assert str(e.value).startswith(words) and "\n" not in str(e.value)


def test_one_layer_early_exit_is_the_last_layer():
    assert adapt("multi-model", {"exits": [2, 4, 6]}, _small(layers=1))[0] == {"exits": [1]}
