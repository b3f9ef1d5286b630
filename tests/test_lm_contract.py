"""The language-model method contract (adaptinf/lm.py), checked the same way for every method in
`adaptinf.lm_methods.LM_METHODS`: the registry name, config round trip, conversion leaving the dense
model untouched, full compute equal to dense, scores as fp64 tensors, save/load keeping the class,
settings, knob and logits, cached generation equal to an uncached greedy loop at a knob, and a bad
knob refused. Each method's own file tests its specifics (tests/test_lm_<method>.py)."""

from __future__ import annotations

import pytest
import torch
from lm_text import tiny_lm_data

from adaptinf.lm import LanguageModel, load_lm
from adaptinf.lm_methods import LM_METHODS, lm_method
from adaptinf.recipes.lm import build_lm

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=48)
METHODS = [m for m in LM_METHODS if m != "dense"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_lm_data(tmp_path_factory.mktemp("corpus"))[0]


@pytest.fixture
def dense(tok) -> LanguageModel:
    model = build_lm(tok, "gpt-tiny", seed=0, overrides=TINY)
    model.seq_len = 16
    with torch.no_grad():  # activations of order 1: a wrong residual or norm shows in the logits
        for blk in model.decoder.blocks:
            blk.attention.out.weight.mul_(10.0)
            blk.ffn.down.weight.mul_(10.0)
    return model.eval()


def ids(n: int = 3, s: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 200, (n, s), generator=torch.Generator().manual_seed(seed))


def test_every_method_is_registered_and_importable():
    assert METHODS == ["planer", "early-exit", "acm"]
    assert lm_method("dense") is LanguageModel
    with pytest.raises(ValueError, match="unknown language-model method 'nope'"):
        lm_method("nope")


@pytest.mark.parametrize("name", METHODS)
def test_conversion_keeps_dense_and_full_compute_equals_it(name, dense):
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    cls = lm_method(name)
    model = cls.from_dense(dense).eval()
    assert isinstance(model, LanguageModel) and type(model).method == name
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())  # the dense model is untouched
    assert model.tokenizer is dense.tokenizer and model.seq_len == dense.seq_len
    x = ids()
    with torch.no_grad():
        want = dense(x).logits
        got = model(x).logits  # knob None on a fresh conversion: the dense model
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        nll, cost = model.score(x[:, :-1], x[:, 1:])
        dense_nll = dense.score(x[:, :-1], x[:, 1:])[0]
    assert nll.dtype == cost.dtype == torch.float64 and nll.dim() == cost.dim() == 0 and float(cost) > 0
    assert float(nll) == pytest.approx(float(dense_nll), rel=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_config_round_trip_save_load_and_knob(name, dense, tmp_path):
    model = lm_method(name).from_dense(dense).eval()
    cfg = model.method_config()
    again = type(model).from_config(dense.decoder.__class__(dense.cfg), cfg, model.name, model.seq_len)
    assert again.method_config() == cfg and set(again.state_dict()) == set(model.state_dict())
    knobs = model.knob_values()
    assert knobs and all(model.check_knob(k) == k for k in knobs)
    with pytest.raises(ValueError):
        model.check_knob("fast")
    knob = next(k for k in knobs if k is not None)
    model.set_knob(knob)
    model.save(tmp_path / "m")
    loaded = load_lm(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.method_config() == cfg and loaded.knob == knob
    x = ids(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_cached_generation_equals_an_uncached_greedy_loop_at_a_knob(name, dense):
    model = lm_method(name).from_dense(dense).eval()
    model.set_knob(next(k for k in model.knob_values() if k is not None))
    prompt = ids(2, 5, seed=2)
    out = model.generate(prompt, 6)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):  # the whole sequence again at every step, no cache
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
