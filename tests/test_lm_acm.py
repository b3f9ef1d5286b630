"""ACM on the decoder (adaptinf/lm_methods/acm.py, adaptinf/recipes/lm_acm.py): the method contract,
full compute == dense, cached == uncached generation, left-padded batches == rows alone, FLOPs as
counted, the three-phase recipe runs and resumes, bad settings are one clear error. Tiny shapes: a
hidden-32 decoder of 2 layers, FFN 64 (4 learners of 16), a 300-token tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adaptinf import flops
from adaptinf.lm import evaluate_perplexity, load_lm
from adaptinf.lm_methods import lm_method
from adaptinf.lm_methods.acm import AcmLM, AcmLMConfig
from adaptinf.methods.acm import gate_flops, learner_flops
from adaptinf.recipes import lm_acm
from adaptinf.recipes.lm import LMTrainConfig, build_lm
from lm_text import tiny_dense_lm, tiny_lm_data

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=48)



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_lm_data(tmp_path_factory.mktemp("corpus"))


def _dense(tok, seed: int = 0):
    return tiny_dense_lm(tok, seed, TINY)


def _varied(model: AcmLM, seed: int = 0) -> AcmLM:
    """Random gates large enough that tokens pick different k (every k 0..4 occurs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ffn in model.ffns():
            for p in ffn.acm.gate.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def _ids(vocab: int, b: int = 3, s: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


# --- the contract ------------------------------------------------------------------------------------


def test_conversion_keeps_the_contract(data):
    tok, _ = data
    dense = _dense(tok)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    model = AcmLM.from_dense(dense)
    assert lm_method("acm") is AcmLM and model.method == "acm"
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())  # the dense model is untouched
    assert dense.decoder.blocks[0].ffn.up is not None and model.decoder.blocks[0].ffn.up is None
    assert model.tokenizer is dense.tokenizer and model.seq_len == 16 and model.name == dense.name
    assert AcmLMConfig.from_dict(json.loads(json.dumps(model.method_config()))) == model.config
    assert model.teacher is not None and not any(k.startswith("_teacher") for k in model.state_dict())
    knobs = model.knob_values()
    assert knobs == sorted(knobs, reverse=True) and 0.0 in knobs  # cheapest (largest bias) first
    nll, cost = model.score(*_pair(_ids(len(tok))))
    assert nll.dtype == cost.dtype == torch.float64 and nll.dim() == cost.dim() == 0


def _pair(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ids[:, :-1], ids[:, 1:]


def test_full_compute_reproduces_the_dense_logits(data):
    tok, _ = data
    dense = _dense(tok)
    model = AcmLM.from_dense(dense).eval()
    ids = _ids(len(tok), b=4, s=20)
    ref = dense(ids).logits
    with torch.no_grad(), model.using_learners(4):
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=0)
    with torch.no_grad():  # an untrained gate picks every learner: the fresh conversion is the dense model
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=0)
        assert (model.learner_counts(ids)[:, 4] == ids.numel()).all()
        with model.using_learners(4):
            assert model.score(*_pair(ids))[1] == dense.score(*_pair(ids))[1]  # no gate ran: dense FLOPs


def test_save_and_load_keep_the_logits(data, tmp_path):
    tok, _ = data
    model = _varied(AcmLM.from_dense(_dense(tok), AcmLMConfig(learners=3, gate_hidden=8)))
    model.set_knob(0.5)
    model.save(tmp_path / "m")
    back = load_lm(tmp_path / "m")
    assert isinstance(back, AcmLM) and back.config == model.config and back.knob == 0.5 and back.teacher is None
    ids = _ids(len(tok))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=0, rtol=0)
        for k in (None, -1.0, 2.0):
            with model.using_knob(k), back.using_knob(k):
                assert torch.equal(back.learner_counts(ids), model.learner_counts(ids))


def test_cached_generation_equals_the_uncached_pass(data):
    tok, _ = data
    model = _varied(AcmLM.from_dense(_dense(tok), AcmLMConfig(min_learners=0)))  # k = 0 (no FFN) allowed too
    prompt = _ids(len(tok), b=2, s=6, seed=1)
    for knob in (None, 1.0):
        with model.using_knob(knob):
            got = model.generate(prompt, 10)
            ids = prompt
            with torch.no_grad():
                for _ in range(10):  # no cache: the whole sequence each step
                    ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(got, ids), knob
    assert ((model.learner_counts(prompt) > 0).sum(1) >= 2).all()  # the gates vary k across the prompt's tokens
    assert (model.learner_counts(_ids(len(tok), b=8, s=16))[:, 0] > 0).all()


def test_left_padded_batch_of_8_generates_as_each_row_alone(data):
    tok, _ = data
    model = _varied(AcmLM.from_dense(_dense(tok)), seed=3)
    rows = [_ids(len(tok), b=1, s=n, seed=n)[0] for n in (3, 5, 9, 4, 7, 9, 2, 6)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(8, width, dtype=torch.long)
    mask = torch.zeros(8, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    with model.using_knob(0.25):
        batched = model.generate(ids, 8, mask)
        for i, r in enumerate(rows):
            alone = model.generate(r[None], 8)
            assert torch.equal(batched[i, width:], alone[0, len(r):]), i


def test_flops_fall_with_the_knob_as_counted(data):
    tok, _ = data
    model = _varied(AcmLM.from_dense(_dense(tok)), seed=1)
    inputs, targets = _pair(_ids(len(tok), b=4, s=17))
    b, s = inputs.shape
    cfg, d = model.cfg, model.cfg.hidden_size
    costs = []
    for knob in model.knob_values():  # cheapest first
        with model.using_knob(knob):
            _, cost = model.score(inputs, targets)
            counts = model.learner_counts(inputs)  # [L, 5]
        assert (counts[:, 0] == 0).all()  # min_learners 1: the gate never skips a token's FFN
        executed = int((counts * torch.arange(5)).sum())
        want = (b * flops.dense_decoder(s, cfg) - 2 * b * s * flops.ffn_block(1, d, 64)
                + executed * learner_flops(d, 16, d) + 2 * b * s * gate_flops(d, 32, 4))  # choices k = 1..4
        assert float(cost) == want, knob
        costs.append(float(cost))
    assert costs == sorted(costs) and costs[0] < costs[-1]
    with model.using_learners(0):
        no_ffn = float(model.score(inputs, targets)[1])
    assert no_ffn == b * flops.dense_decoder(s, cfg) - 2 * b * s * flops.ffn_block(1, d, 64)


def test_training_loss_reaches_learners_and_gates(data):
    tok, _ = data
    model = AcmLM.from_dense(_dense(tok), AcmLMConfig(kd_weight=0.5)).train()
    inputs, targets = _pair(_ids(len(tok), b=2, s=9))
    model.budget_target = 0.5
    loss = model.training_loss(inputs, targets)
    loss.backward()
    for ffn in model.ffns():
        assert ffn.acm.gate.net[0].weight.grad.abs().sum() > 0 and ffn.acm.learners.w1.grad.abs().sum() > 0
    loaded = AcmLM.from_config(_dense(tok).decoder, model.method_config()).train()  # no teacher
    with pytest.raises(ValueError, match="kd_weight > 0 needs the dense teacher"):
        loaded.training_loss(inputs, targets)


# --- the recipe --------------------------------------------------------------------------------------


def _fit_cfg(**kw) -> LMTrainConfig:
    base = dict(max_steps=6, batch_size=4, seq_len=16, lr=1e-3, eval_every=3, save_every=2, eval_batch_size=8,
                log_every=2)
    return LMTrainConfig(**{**base, **kw})


def test_fit_runs_the_three_phases_and_resumes(data, tmp_path):
    tok, d = data
    conf = AcmLMConfig(distill_steps=4, gate_steps=3, beta=0.5, beta_anneal=0.5)
    part = lm_acm.fit(AcmLM.from_dense(_dense(tok), conf), d, _fit_cfg(), tmp_path, progress=False, stop_after_steps=2)
    assert part.train.steps == 2 and "after_training" not in part.summary
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "distill").iterdir()}
    model = AcmLM.from_dense(_dense(tok), conf)
    res = lm_acm.fit(model, d, _fit_cfg(), tmp_path, progress=False)
    assert res.train.resumed_from_step == 2 and res.train.steps == 6
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "distill").iterdir()} == stamps  # phase 1 read back
    s = json.loads((tmp_path / lm_acm.SUMMARY_FILE).read_text())
    assert set(s["gates"]) == {"0.ffn", "1.ffn"}
    assert math.isclose(sum(s["gates"]["0.ffn"]["sufficient_k_share"].values()), 1)
    assert len(s["after_training"]["learner_share"]) == 2 and len(s["after_distill"]) == 4
    best = load_lm(tmp_path / "best")
    assert isinstance(best, AcmLM) and math.isclose(evaluate_perplexity(best, d.validation).perplexity,
                                                    res.best_val_perplexity, rel_tol=1e-6)
    with pytest.raises(ValueError, match="other settings"):
        lm_acm.fit(AcmLM.from_dense(_dense(tok), AcmLMConfig(distill_steps=5, gate_steps=3)), d, _fit_cfg(), tmp_path,
                   progress=False)


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, field", [(dict(learners=1), "learners"), (dict(learners=True), "learners"),
                                       (dict(min_learners=4), "min_learners"),
                                       (dict(beta=0.0), "beta"), (dict(tau=1.0), "tau"),
                                       (dict(distill_mode="x"), "distill_mode"), (dict(kd_weight=-1), "kd_weight"),
                                       (dict(gate_steps=1.5), "gate_steps"),
                                       (dict(beta_anneal=float("nan")), "beta_anneal")])
def test_bad_config_is_one_clear_error(kw, field):
    with pytest.raises(ValueError, match=f"AcmLMConfig.{field} must be"):
        AcmLMConfig(**kw)


def test_bad_knob_learners_and_inputs_are_clear_errors(data):
    tok, _ = data
    model = AcmLM.from_dense(_dense(tok))
    for bad in ("1", float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="the knob is a gate bias"):
            model.set_knob(bad)
    for bad in (5, -1, 2.0):
        with pytest.raises(ValueError, match="learners must be None"):
            with model.using_learners(bad):
                pass
    with pytest.raises(ValueError, match="unknown AcmLMConfig fields"):
        AcmLMConfig.from_dict({"learners": 4, "experts": 2})
    with pytest.raises(ValueError, match="converts a dense language model"):
        AcmLM.from_dense(model)
    with pytest.raises(ValueError, match="exceeds the FFN's"):
        narrow = build_lm(tok, "gpt-tiny", overrides={**TINY, "intermediate_size": 8})
        AcmLM(narrow.decoder, config=AcmLMConfig(learners=16))
    with pytest.raises(ValueError, match="trains an AcmLM"):
        lm_acm.fit(_dense(tok), None, _fit_cfg(), "unused", progress=False)
