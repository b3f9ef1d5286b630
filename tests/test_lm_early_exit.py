"""Per-token early exit on the decoder (adaptinf/lm_methods/early_exit.py, recipes/lm_early_exit.py).

Knob None is the dense model; at a threshold the three execution paths (teacher-forced `score`,
token-by-token cached decoding, generation with its prefill) take the same exit for every token and
give the same logits (the copy-state rule); batched left-padded generation equals each row alone;
FLOPs follow the per-token count; save/load, fit and resume work. Tiny shapes: a 3-layer hidden-32
decoder whose tied embeddings are scaled up so its next-token distributions are peaked (a random
GPT-2 init is near uniform, where every confidence ties)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adaptinf import flops
from adaptinf.lm import LanguageModel, load_lm
from adaptinf.lm_methods import lm_method
from adaptinf.lm_methods.early_exit import THRESHOLDS, EarlyExitLM, EarlyExitLMConfig
from adaptinf.recipes.lm import LMTrainConfig, build_lm
from adaptinf.recipes.lm_early_exit import fit
from lm_text import tiny_lm_data

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=48)



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_lm_data(tmp_path_factory.mktemp("corpus"))


def _dense(tok, seed: int = 0) -> LanguageModel:
    model = build_lm(tok, "gpt-tiny", seed=seed, overrides=TINY)
    model.seq_len = 16
    with torch.no_grad():  # blocks that move the state and sharper heads: exits disagree, confidences spread
        for blk in model.decoder.blocks:
            blk.attention.out.weight.mul_(30.0)
            blk.ffn.down.weight.mul_(30.0)
            blk.ffn.up.weight.mul_(3.0)
        model.decoder.final_norm.weight.mul_(6.0)
    return model.eval()


@pytest.fixture(scope="module")
def pair(data):
    tok, _ = data
    dense = _dense(tok)
    return dense, EarlyExitLM.from_dense(dense).eval()


def _ids(b: int, s: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def _mixed_threshold(model: EarlyExitLM, ids: torch.Tensor | None = None) -> float:
    """A threshold at the median of every exit's confidences on `ids` (default: 64 random tokens), in
    the widest gap near it (no token sits within fp error of it)."""
    ids = _ids(4, 16, model.cfg.vocab_size, seed=99) if ids is None else ids
    cs = []
    with torch.no_grad():
        h = model.decoder.embed(ids)
        for e, j in enumerate(model.exit_layers[:-1]):  # the exits that are checked
            h = model.decoder.run_blocks(h, 0 if e == 0 else model.exit_layers[e - 1], j)
            cs.append(model.check_confidence(e, h, model.exit_logits(e, h)).flatten())
    c = torch.cat(cs).sort().values
    lo = max(len(c) // 2 - 10, 0)
    gaps = c[lo : lo + 21].diff()
    k = lo + int(gaps.argmax())
    return float((c[k] + c[k + 1]) / 2)


# --- configuration and contract --------------------------------------------------------------------


def test_the_config_round_trips_and_is_validated():
    cfg = EarlyExitLMConfig(exits="1, 3", confidence="margin", exit_norm=False, distill_weight=0.5)
    assert cfg.exits == (1, 3) and EarlyExitLMConfig.from_dict(cfg.to_dict()) == cfg
    assert EarlyExitLMConfig(exits="every").exits == () and EarlyExitLMConfig(exits=[2, 3]).exits == (2, 3)
    assert EarlyExitLMConfig().resolve(3) == (1, 2, 3)
    bad = [(dict(exits=[2, 1]), "increasing"), (dict(exits=[0, 3]), "1-based"), (dict(exits="x"), "layer numbers"),
           (dict(confidence="entropy"), "confidence"), (dict(loss_weights="x"), "loss_weights"),
           (dict(distill_weight=-1), "distill_weight"), (dict(distill_temperature=0), "distill_temperature"),
           (dict(exit_norm="yes"), "exit_norm")]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            EarlyExitLMConfig(**kw)
    with pytest.raises(ValueError, match="unknown EarlyExitLMConfig fields"):
        EarlyExitLMConfig.from_dict({"exits": [], "thresh": 1})
    with pytest.raises(ValueError, match=r"must include the last layer \(3\).*use \[1, 3\]"):
        EarlyExitLMConfig(exits=[1]).resolve(3)
    with pytest.raises(ValueError, match="decoder has 3 layers"):
        EarlyExitLMConfig(exits=[1, 4]).resolve(3)


def test_the_contract_knobs_and_bad_knobs(pair):
    dense, model = pair
    assert lm_method("early-exit") is EarlyExitLM and model.method == "early-exit"
    assert model.exit_layers == (1, 2, 3) and len(model.exit_norms) == 2
    assert model.method_config() == EarlyExitLMConfig().to_dict()
    knobs = model.knob_values()
    assert knobs[-1] is None and knobs[:-1] == sorted(knobs[:-1]) and knobs[0] == 0.0 and list(THRESHOLDS) == knobs[:-1]
    for bad in (1.5, -0.1, "0.5", True, float("nan")):
        with pytest.raises(ValueError, match="confidence threshold in"):
            model.set_knob(bad)
    with pytest.raises(ValueError, match="dense LanguageModel"):
        EarlyExitLM.from_dense(model)
    with pytest.raises(ValueError, match="EarlyExitLMConfig"):
        EarlyExitLM(dense.decoder, config={"exits": []})
    assert model.decoder is not dense.decoder  # a deep copy
    assert model.tokenizer is dense.tokenizer and model.seq_len == dense.seq_len and model.name == dense.name


def test_the_training_loss_weights_exits_by_layer_and_reaches_every_weight(pair):
    _, model = pair
    ids = _ids(2, 10, model.cfg.vocab_size)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        h, ces = model.decoder.embed(inputs), []
        for e, (a, b) in enumerate(zip((0, 1, 2), (1, 2, 3))):
            h = model.decoder.run_blocks(h, a, b)
            ces.append(F.cross_entropy(model.exit_logits(e, h).flatten(0, 1), targets.flatten()))
        want = sum(w * c for w, c in zip((1 / 6, 2 / 6, 3 / 6), ces))
        assert model.training_loss(inputs, targets).item() == pytest.approx(want.item(), rel=1e-5)
    student = EarlyExitLM.from_dense(_dense(model.tokenizer), EarlyExitLMConfig(distill_weight=1.0)).train()
    loss = student.training_loss(inputs, targets)
    loss.backward()
    missing = [n for n, p in student.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    with torch.no_grad():  # the distillation term adds a positive KL
        assert loss.item() > EarlyExitLM.from_dense(_dense(model.tokenizer)).training_loss(inputs, targets).item()


# --- full compute: the dense model ---------------------------------------------------------------


def test_knob_none_is_the_dense_model(pair):
    dense, model = pair
    ids = _ids(3, 12, model.cfg.vocab_size)
    model.set_knob(None)
    nll, cost = model.score(ids[:, :-1], ids[:, 1:])
    dn, dc = dense.score(ids[:, :-1], ids[:, 1:])
    torch.testing.assert_close(nll, dn, rtol=0, atol=1e-5)
    assert cost.item() == dc.item()
    res = model.score_tokens(ids[:, :-1], ids[:, 1:])
    assert res.flops.sum().item() == pytest.approx(dc.item()) and bool((res.exit_index == 2).all())
    with torch.no_grad():  # the exits' own cached path, never exiting, is the dense model too
        torch.testing.assert_close(model.decode_exits(ids).picked, dense(ids).logits, rtol=0, atol=1e-5)
    prompt = ids[:, :4]
    torch.testing.assert_close(model.generate(prompt, 6), dense.generate(prompt, 6), rtol=0, atol=0)


def test_cached_generation_equals_the_uncached_pass_at_a_threshold(pair):
    _, model = pair
    prompt = _ids(2, 5, model.cfg.vocab_size, seed=3)
    with model.using_knob(_mixed_threshold(model)):
        out, exits = model.generate_with_exits(prompt, 8)
        ids = prompt
        with torch.no_grad():
            for _ in range(8):  # no cache: the whole sequence through the exits again each step
                res = model._exit_pass(model.decoder.embed(ids), model.knob)
                ids = torch.cat([ids, res.picked[:, -1].argmax(-1, keepdim=True)], 1)
    torch.testing.assert_close(out, ids, rtol=0, atol=0)
    assert len(set(exits.flatten().tolist())) > 1  # the exits are mixed: the rule is exercised


# --- exits at a threshold --------------------------------------------------------------------------


def test_threshold_zero_exits_every_token_first_and_flops_drop_as_counted(pair):
    dense, model = pair
    b, s = 2, 9
    ids = _ids(b, s + 1, model.cfg.vocab_size)
    with model.using_knob(0.0):
        res = model.score_tokens(ids[:, :-1], ids[:, 1:])
        nll, cost = model.score(ids[:, :-1], ids[:, 1:])
    assert bool((res.exit_index == 0).all())
    d, f = model.cfg.hidden_size, model.cfg.intermediate_size
    pos = torch.arange(s)
    per_token = (2 * d * 4 * d + 2 * 2 * d * f + 4 * (pos + 1) * d) + 2 * 2 * d * 2 * d + 2 * d * model.cfg.vocab_size
    assert cost.item() == pytest.approx(b * per_token.sum().item())
    assert cost.item() < 0.7 * dense.score(ids[:, :-1], ids[:, 1:])[1].item()
    with torch.no_grad():  # the NLL is the first exit's
        h = model.decoder.run_blocks(model.decoder.embed(ids[:, :-1]), 0, 1)
        want = F.cross_entropy(model.exit_logits(0, h).flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    assert nll.item() == pytest.approx(want.item(), rel=1e-5)
    assert nll.dtype == cost.dtype == torch.float64


def test_token_flops_count_blocks_kv_projections_and_heads(pair):
    _, model = pair
    pos = torch.arange(5)
    cfg = model.cfg
    full = flops.decoder_token(pos, cfg)  # three blocks and one head
    assert torch.equal(model.token_flops(torch.full((5,), 2), pos), (full + 2 * flops.lm_head(1, cfg)).double())
    kv = flops.linear(1, cfg.hidden_size, 2 * cfg.hidden_size)
    for e in (0, 1):  # exit after layer e + 1: e + 1 blocks, K/V of the 2 - e later layers, e + 1 heads checked
        want = flops.decoder_token(pos, cfg, layers=e + 1) + (2 - e) * kv + e * flops.lm_head(1, cfg)
        assert torch.equal(model.token_flops(torch.full((5,), e), pos), want.double())


def test_scoring_and_token_by_token_decoding_take_the_same_exits(pair):
    """The teacher-forced window and the same text fed one token at a time through the KV cache (whose
    steps skip the remaining layers when the token exits) exit at the same layer with the same logits."""
    _, model = pair
    ids = _ids(1, 24, model.cfg.vocab_size, seed=5)
    with model.using_knob(_mixed_threshold(model)):
        res = model.score_tokens(ids[:, :-1], ids[:, 1:])
        dec = model.decode_exits(ids[:, :-1])
        gen, gen_exits = model.generate_with_exits(ids[:, :10], 12)
        seq = model.score_tokens(gen[:, :-1], gen[:, 1:])
    assert torch.equal(dec.exit_index, res.exit_index)
    assert len(set(res.exit_index.flatten().tolist())) == 3  # every exit taken somewhere
    nll = F.cross_entropy(dec.picked.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(res.nll.shape)
    torch.testing.assert_close(nll, res.nll, rtol=1e-4, atol=1e-4)
    assert torch.equal(gen_exits, seq.exit_index[:, 9:])  # generation's exits are the scored text's


def test_a_step_where_every_token_exited_runs_no_later_attention_or_ffn(pair):
    _, model = pair
    calls = []
    hooks = [blk.ffn.register_forward_hook(lambda m, i, o, layer=layer: calls.append(layer))
             for layer, blk in enumerate(model.decoder.blocks)]
    try:
        with model.using_knob(0.0):
            model.generate(_ids(1, 4, model.cfg.vocab_size), 5)
    finally:
        for h in hooks:
            h.remove()
    assert calls and set(calls) == {0}  # layers 1 and 2 only wrote K/V (project_kv)


def test_left_padded_batch_of_8_equals_each_row_alone(pair):
    _, model = pair
    vocab = model.cfg.vocab_size
    lengths = [7, 3, 5, 7, 1, 6, 4, 2]
    rows = [_ids(1, n, vocab, seed=10 + i) for i, n in enumerate(lengths)]
    s = max(lengths)
    ids = torch.zeros(8, s, dtype=torch.long)
    mask = torch.zeros(8, s, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, s - r.shape[1]:], mask[i, s - r.shape[1]:] = r[0], 1
    with model.using_knob(_mixed_threshold(model)):
        out, exits = model.generate_with_exits(ids, 6, mask)
        for i, r in enumerate(rows):
            alone, alone_exits = model.generate_with_exits(r, 6)
            assert torch.equal(out[i, s:], alone[0, r.shape[1]:]), i
            assert torch.equal(exits[i], alone_exits[0]), i
    assert len(set(exits.flatten().tolist())) > 1


def test_margin_confidence_is_top1_minus_top2(pair):
    dense, _ = pair
    model = EarlyExitLM.from_dense(dense, EarlyExitLMConfig(confidence="margin")).eval()
    z = torch.randn(4, 7, model.cfg.vocab_size)
    p = z.softmax(-1).topk(2, -1).values
    torch.testing.assert_close(model.confidence(z), p[..., 0] - p[..., 1])
    ids = _ids(1, 12, model.cfg.vocab_size)
    with model.using_knob(_mixed_threshold(model, ids)):
        assert torch.equal(model.decode_exits(ids).exit_index, model.score_tokens(ids, ids).exit_index)


# --- disk and training ------------------------------------------------------------------------------


def test_save_and_load_round_trip(pair, tmp_path):
    _, model = pair
    cfg = EarlyExitLMConfig(exits=[2, 3], confidence="margin", distill_weight=0.5)
    m = EarlyExitLM.from_dense(_dense(model.tokenizer), cfg).eval()
    with torch.no_grad():
        m.exit_norms[0].weight.mul_(1.5)  # not the final norm's copy any more
    m.set_knob(0.3)
    m.save(tmp_path / "m")
    back = load_lm(tmp_path / "m")
    assert isinstance(back, EarlyExitLM) and back.config == cfg and back.knob == 0.3 and back.exit_layers == (2, 3)
    ids = _ids(2, 12, m.cfg.vocab_size)
    a, b = m.score_tokens(ids[:, :-1], ids[:, 1:]), back.score_tokens(ids[:, :-1], ids[:, 1:])
    torch.testing.assert_close(b.nll, a.nll, rtol=0, atol=0)
    assert torch.equal(a.exit_index, b.exit_index) and torch.equal(a.flops, b.flops)


def test_fit_trains_and_resumes(data, tmp_path):
    tok, d = data
    cfg = LMTrainConfig(batch_size=4, seq_len=16, lr=3e-3, max_steps=6, eval_every=3, save_every=2,
                        eval_batch_size=8, log_every=2)
    model = EarlyExitLM.from_dense(_dense(tok), EarlyExitLMConfig(distill_weight=0.5))
    part = fit(model, d, cfg, tmp_path, progress=False, stop_after_steps=4)
    assert part.steps == 4
    again = fit(EarlyExitLM.from_dense(_dense(tok, seed=3), EarlyExitLMConfig(distill_weight=0.5)), d, cfg, tmp_path,
                progress=False)
    assert again.resumed_from_step == 4 and again.steps == 6 and math.isfinite(again.best_val_perplexity)
    best = load_lm(tmp_path / "best")
    assert isinstance(best, EarlyExitLM) and best.config.distill_weight == 0.5
    with pytest.raises(ValueError, match="other settings"):
        fit(EarlyExitLM.from_dense(_dense(tok)), d, cfg, tmp_path, progress=False)
    with pytest.raises(ValueError, match="trains an EarlyExitLM"):
        fit(_dense(tok), d, cfg, tmp_path / "x", progress=False)


def test_the_learned_classifier_confidence_trains_counts_and_keeps_the_equivalence(pair):
    dense, _ = pair
    model = EarlyExitLM.from_dense(dense, EarlyExitLMConfig(confidence="classifier")).eval()
    assert len(model.exit_classifiers) == 2
    ids = _ids(1, 20, model.cfg.vocab_size, seed=4)
    d, pos = model.cfg.hidden_size, torch.arange(19)
    with model.using_knob(0.5):  # untrained: confidence 0.5 everywhere, every token takes the first exit
        res = model.score_tokens(ids[:, :-1], ids[:, 1:])
    assert bool((res.exit_index == 0).all())
    kv = flops.linear(1, d, 2 * d)
    want = flops.decoder_token(pos, model.cfg, layers=1) + 2 * kv + flops.linear(1, d, 1)  # 1 block, 1 check, 1 head
    assert torch.equal(res.flops[0], want.double())
    with model.using_knob(0.6):  # nothing exits: every block, two cheap checks, the final head
        full = model.score_tokens(ids[:, :-1], ids[:, 1:])
    assert torch.equal(full.flops[0], (flops.decoder_token(pos, model.cfg) + 2 * flops.linear(1, d, 1)).double())
    with torch.no_grad():
        for lin in model.exit_classifiers:
            lin.weight.normal_(0.0, 1.0)
    with model.using_knob(_mixed_threshold(model)):
        res = model.score_tokens(ids[:, :-1], ids[:, 1:])
        dec = model.decode_exits(ids[:, :-1])
    assert torch.equal(dec.exit_index, res.exit_index) and len(set(res.exit_index.flatten().tolist())) > 1
    nll = F.cross_entropy(dec.picked.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(res.nll.shape)
    torch.testing.assert_close(nll, res.nll, rtol=1e-4, atol=1e-4)
    model.train()
    model.training_loss(ids[:, :-1], ids[:, 1:]).backward()
    assert all(lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0 for lin in model.exit_classifiers)
