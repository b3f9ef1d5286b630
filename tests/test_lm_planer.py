"""PLANER on the decoder (adaptinf/lm_methods/planer.py, adaptinf/recipes/lm_planer.py): the method
contract, full-compute equality with the dense model, KV-cached and batched left-padded generation,
FLOPs as the blocks ran, the recipe end to end with a resume, config errors. Tiny shapes: a random-words
text file, a 300-token tokenizer, a decoder of hidden 32 with 2 layers and an FFN of 64 (4 experts of 16)."""

from __future__ import annotations

import json

import pytest
import torch

from adaptinf import flops
from adaptinf.lm import evaluate_perplexity, load_lm
from adaptinf.lm_methods import lm_method
from adaptinf.lm_methods.planer import PlanerLM, PlanerLMConfig
from adaptinf.methods.planer import expert_flops, router_flops
from adaptinf.recipes.lm import LMTrainConfig
from lm_text import tiny_dense_lm, tiny_lm_data

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=48)
SMALL = dict(num_experts=4, router_hidden=8, moe_ks=(1, 2), cache_tokens=8, latency_repeats=1, proxy_windows=2,
             candidates=2, candidate_steps=2, router_steps=3, router_batch=2, refit_steps=2)



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_lm_data(tmp_path_factory.mktemp("corpus"))


def _dense(tok, seed: int = 0):
    return tiny_dense_lm(tok, seed, TINY)


def _planer(tok, arch=None, **kw) -> PlanerLM:
    cfg = PlanerLMConfig(**{**SMALL, **kw, **({"architecture": arch} if arch else {})})
    model = PlanerLM.from_dense(_dense(tok), cfg).eval()
    torch.manual_seed(1)
    for r in model.routers:  # routers that rank experts differently per token (untrained ones are ~uniform)
        for p in r.parameters():
            p.data.normal_(0, 0.5)
    return model


def _ids(d, b=3, s=20):
    return d.test[: b * s].long().view(b, s)


# --- contract --------------------------------------------------------------------------------------------


def test_registry_config_round_trip_and_save_load_keep_logits(data, tmp_path):
    tok, d = data
    assert lm_method("planer") is PlanerLM
    model = _planer(tok, ["skip/moe2", "full/half"])
    assert model.method == "planer" and model.architecture == ["skip/moe2", "full/half"]
    cfg = model.method_config()
    assert PlanerLMConfig.from_dict(json.loads(json.dumps(cfg))) == model.config
    with pytest.raises(ValueError, match="unknown PlanerLMConfig fields"):
        PlanerLMConfig.from_dict({**cfg, "bogus": 1})
    model.set_knob(1)
    model.save(tmp_path / "m")
    back = load_lm(tmp_path / "m")
    assert isinstance(back, PlanerLM) and back.architecture == model.architecture and back.knob == 1
    ids = _ids(d)
    torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert back.knob_values() == [1, 2, None]
    for bad in (0, 5, 1.5, True, "2"):
        with pytest.raises(ValueError, match="experts per token"):
            back.set_knob(bad)


def test_conversion_leaves_the_dense_model_untouched_and_needs_a_dense_model(data):
    tok, _ = data
    dense = _dense(tok)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    model = PlanerLM.from_dense(dense, PlanerLMConfig(**SMALL))
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    assert model._teacher[0] is not dense and not any(k.startswith("_teacher") for k in model.state_dict())
    with pytest.raises(ValueError, match="converts a dense language model"):
        PlanerLM.from_dense(model)


# --- full compute ------------------------------------------------------------------------------------------


def test_full_compute_reproduces_the_dense_logits(data):
    """All "full/dense" (the converted default) and every FFN as an MoE of all E experts (grouped_experts)."""
    tok, d = data
    dense, model, ids = _dense(tok), _planer(tok), _ids(d)
    want = dense(ids).logits
    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-5)
    for blk in model.decoder.blocks:
        blk.ffn.mode, blk.ffn.k = "moe", 4
    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-5)
    model.set_architecture(["full/dense"] * 2)
    model.set_knob(4)  # knob = E: dense FFNs stay dense
    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-5)


def test_fewer_experts_change_the_output_and_skips_cut_layers(data):
    tok, d = data
    dense, model, ids = _dense(tok), _planer(tok), _ids(d)
    want = dense(ids).logits
    model.set_knob(1)
    assert (model(ids).logits - want).abs().max() > 1e-3
    model.set_knob(None)
    model.set_architecture(["skip/skip", "skip/skip"])
    got = model(ids).logits  # no block runs: the head on the embeddings
    torch.testing.assert_close(got, dense.decoder.head(dense.decoder.embed(ids)), rtol=0, atol=1e-6)


# --- generation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [["skip/moe2", "full/quarter"], ["full/moe1", "full/skip"]])
def test_kv_cached_generation_equals_the_uncached_greedy_pass(data, arch):
    tok, d = data
    model = _planer(tok, arch)
    prompt = _ids(d, 2, 6)
    out = model.generate(prompt, 10)
    ids = prompt
    for _ in range(10):  # no cache: the whole sequence each step
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_batched_left_padded_generation_equals_each_row_alone(data):
    tok, d = data
    model = _planer(tok, ["skip/moe2", "full/half"])
    model.set_knob(1)
    lengths = [3, 7, 5, 2, 8, 6, 4, 8]
    rows = [d.test[i * 9 : i * 9 + n].long() for i, n in enumerate(lengths)]
    s = max(lengths)
    ids = torch.zeros(8, s, dtype=torch.long)
    mask = torch.zeros(8, s, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, s - len(r):], mask[i, s - len(r):] = r, 1
    out = model.generate(ids, 6, mask)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], 6)
        assert torch.equal(out[i, s:], alone[0, len(r):]), i


# --- FLOPs -----------------------------------------------------------------------------------------------------


def test_flops_count_the_blocks_as_they_ran(data):
    tok, d = data
    model = _planer(tok)
    cfg, L = model.cfg, 16
    dense = flops.dense_decoder(L, cfg)
    assert model.sequence_flops(L) == dense
    attn = flops.linear(L, 32, 96) + flops.causal_attention_core(L, 32) + flops.linear(L, 32, 32)
    ffn = flops.ffn_block(L, 32, 64)
    moe2 = L * (router_flops(32, 8, 4) + 2 * expert_flops(32, 16))
    model.set_architecture(["skip/moe2", "full/skip"])
    assert model.sequence_flops(L) == dense - 2 * attn - 2 * ffn + attn + moe2
    model.set_architecture(["full/half", "skip/dense"])
    model.set_knob(1)  # the dense slot runs its top expert; a static width is unchanged
    want = dense - attn - ffn + flops.ffn_block(L, 32, 32) - ffn + L * (router_flops(32, 8, 4) + expert_flops(32, 16))
    assert model.sequence_flops(L) == want
    ids = d.test[: 2 * L + 1].long()
    nll, cost = model.score(ids[:-1].view(2, L), ids[1:].view(2, L))
    assert nll.dtype == cost.dtype == torch.float64 and float(cost) == 2 * want
    score = evaluate_perplexity(model, d.validation, seq_len=L)
    assert score.flops_per_token == pytest.approx(want / L, rel=2e-3)  # the last window may be shorter


# --- the recipe ---------------------------------------------------------------------------------------------------


def test_fit_runs_end_to_end_and_resumes(data, tmp_path):
    from adaptinf.recipes.lm_planer import fit

    tok, d = data
    cfg = LMTrainConfig(batch_size=2, seq_len=16, max_steps=3, eval_every=0, eval_tokens=64, eval_batch_size=4,
                        save_every=1, log_every=1)
    model = _planer(tok, latency_target=0.6)
    part = fit(model, d, cfg, tmp_path, progress=False, stop_after_steps=1)  # inside the first distillation
    assert not part.finished and part.best_val_perplexity is None
    routers_written = (tmp_path / "routers.safetensors").stat().st_mtime_ns
    search = json.loads((tmp_path / "search.json").read_text())["result"]
    assert 1 <= len(search["candidates"]) <= 2
    for c in search["candidates"]:
        assert len(c["architecture"]) == 2 and c["measured_ms"] > 0
    again = fit(_planer(tok, latency_target=0.6), d, cfg, tmp_path, progress=False)
    assert again.finished and again.best_val_perplexity > 1 and again.dense_val_perplexity > 1
    assert (tmp_path / "routers.safetensors").stat().st_mtime_ns == routers_written  # not redone
    best = load_lm(tmp_path / "best")
    assert isinstance(best, PlanerLM) and best.architecture == again.architecture
    table = json.loads((tmp_path / "latency_generate.json").read_text())
    assert {"attn:full", "ffn:dense", "ffn:moe1", "ffn:half"} <= set(table["blocks"])
    result = again.summary["result"]
    assert result["latency"]["generate"]["estimated_vs_dense"] <= 0.6 or not result["latency_target_met_estimate"]


# --- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,match", [
    ("num_experts", 1, "num_experts"), ("architecture", ["full/moe4"], "architecture"),
    ("architecture", ["half/dense"], "architecture"), ("moe_ks", (0,), "moe_ks"), ("latency_target", 0.0, "latency_target"),
    ("latency_target", 1.5, "latency_target"), ("candidates", 0, "candidates"), ("distill_temperature", 0, "distill_temperature"),
    ("hidden_weight", -1.0, "hidden_weight"), ("router_steps", -1, "router_steps"), ("ffn_widths", "yes", "ffn_widths"),
])
def test_bad_config_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=f"PlanerLMConfig.{match}"):
        PlanerLMConfig(**{**SMALL, field: value})


def test_structure_errors(data):
    tok, _ = data
    with pytest.raises(ValueError, match="must divide the FFN width"):
        PlanerLM.from_dense(_dense(tok), PlanerLMConfig(num_experts=3, moe_ks=(1, 2)))
    with pytest.raises(ValueError, match="2 layers"):
        PlanerLM.from_dense(_dense(tok), PlanerLMConfig(**{**SMALL, "architecture": ["full/dense"]}))
    model = _planer(tok)
    with pytest.raises(ValueError, match="architecture"):
        model.set_architecture(["full/dense", "full/moe9"])
