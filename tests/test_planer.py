"""PLANER: experts by balanced clustering (exact reordering), all experts == dense, grouped expert
execution == a per-token reference, the knob, FLOPs against closed forms, the latency table, the
search and fit of the recipe (adaptinf.recipes.planer; fit resumable) and the `convert` command."""

from __future__ import annotations

import json

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch, make_tiny_dense, random_batch, random_encoded

from adaptinf import flops
from adaptinf.recipes import latency_table as latency
from adaptinf.recipes import planer as recipe
from adaptinf.checkpoint import save_model
from adaptinf.registry import load_model
from adaptinf.cli import main
from adaptinf.data import Encoded
from adaptinf.methods.dense import DenseClassifier
from adaptinf.methods.planer import (
    FRACTION,
    PlanerClassifier,
    PlanerConfig,
    attention_heads,
    balanced_kmeans,
    expert_flops,
    ffn_width,
    grouped_experts,
    grouped_mm_works,
    router_flops,
    select_experts,
    split_experts,
)
from adaptinf.settings import TrainConfig

VOCAB, D, FF, C, HEADS, E = 60, 16, 32, 3, 4, 4


def tiny_dense(seed: int = 0, layers: int = 2) -> DenseClassifier:
    return make_tiny_dense(seed, hidden=D, heads=HEADS, ffn=FF, layers=layers, vocab_size=VOCAB)


def convert(dense: DenseClassifier, **config) -> PlanerClassifier:
    return PlanerClassifier.from_dense(dense, PlanerConfig(**{"num_experts": E, **config})).eval()


def sharpen(model: PlanerClassifier, seed: int = 1) -> PlanerClassifier:
    """Random routers with spread-out scores, so that tokens choose different experts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.routers.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def batch_of(n: int, seed: int) -> dict[str, torch.Tensor]:
    return random_batch(n, seed, VOCAB)


def encoded(n: int, seed: int) -> Encoded:
    return random_encoded(n, seed, VOCAB, C)


def fake_table(blocks: dict[str, float], overhead: float = 1.0) -> latency.LatencyTable:
    return latency.LatencyTable(machine="test", torch_threads=1, torch_version="x", batch_size=1, seq_len=8, shape={},
                                overhead_ms=overhead, blocks=blocks, repeats=1, created="t")


TABLE = {"attn:full": 4.0, "attn:half": 2.5, "ffn:dense": 6.0, "ffn:half": 3.5, "ffn:moe1": 1.5, "ffn:moe2": 2.5,
         "ffn:moe4": 5.0}


# --- conversion: clustering and exactness -----------------------------------------------------------------


def test_balanced_kmeans_gives_equal_clusters_of_similar_rows():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g) * 5
    x = (centres[torch.arange(40) % 4] + 0.1 * torch.randn(40, 8, generator=g))[torch.randperm(40, generator=g)]
    assign = balanced_kmeans(x, 4, iters=10)
    assert torch.bincount(assign, minlength=4).tolist() == [10, 10, 10, 10]
    # rows generated around one centre share a cluster
    nearest = torch.cdist(F.normalize(x, dim=1), F.normalize(centres, dim=1)).argmin(1)
    for c in range(4):
        assert len(set(assign[nearest == c].tolist())) == 1


def test_split_experts_is_an_exact_reordering():
    ffn = tiny_dense().encoder.blocks[0].ffn
    x = torch.randn(5, 7, D)
    before = ffn(x)
    perm = split_experts(ffn, E, iters=5)
    assert sorted(perm.tolist()) == list(range(FF))
    torch.testing.assert_close(ffn(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", [None, ["full/dense", "full/dense"], ["full/moe4", "full/dense"]])
def test_every_expert_on_reproduces_the_dense_model(arch):
    dense = tiny_dense()
    model = sharpen(convert(dense, **({"architecture": arch} if arch else {})))
    batch = batch_of(6, seed=1)
    for knob in (None, 1.0):
        model.set_knob(knob)
        with torch.no_grad():
            a, b = dense(**batch), model(**batch)
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
        moe_layers = 2 if arch is None else sum("moe" in slot for slot in arch)  # every expert runs, plus the router
        router = flops.lengths_of(batch["attention_mask"]).double() * router_flops(D, 64, E)
        torch.testing.assert_close(b.flops, a.flops + moe_layers * router, rtol=0, atol=0)


def test_half_blocks_at_full_width_are_the_backbone_blocks():
    block = tiny_dense().encoder.blocks[1]
    h, mask = torch.randn(3, 9, D), torch.ones(3, 9, dtype=torch.int64)
    from adaptinf.backbone import attention_bias

    bias = attention_bias(mask)
    torch.testing.assert_close(attention_heads(block.attention, h, bias, HEADS, 0.0), block.attention(h, bias))
    torch.testing.assert_close(ffn_width(block.ffn, h, FF), block.ffn(h))


# --- grouped execution ---------------------------------------------------------------------------------


def naive(x, sel, w_up, b_up, w_down):
    """Per token, per selected expert, in float64: the reference semantics of grouped_experts."""
    m = w_up.shape[0] // sel.shape[1]
    out = torch.zeros(x.shape[0], w_down.shape[0], dtype=torch.float64)
    for t in range(x.shape[0]):
        for e in range(sel.shape[1]):
            if sel[t, e]:
                r = slice(e * m, (e + 1) * m)
                a = F.gelu(x[t].double() @ w_up[r].double().T + b_up[r].double())
                out[t] += a @ w_down[:, r].double().T
    return out.float()


@pytest.mark.parametrize("case", ["random", "all", "one-expert-unused", "none-for-some-tokens", "empty"])
def test_grouped_execution_equals_the_naive_reference(case):
    g = torch.Generator().manual_seed(3)
    t = 0 if case == "empty" else 40
    x = torch.randn(t, D, generator=g)
    w_up, b_up, w_down = torch.randn(FF, D, generator=g), torch.randn(FF, generator=g), torch.randn(D, FF, generator=g)
    sel = {"random": torch.rand(t, E, generator=g) < 0.5, "all": torch.ones(t, E, dtype=torch.bool),
           "one-expert-unused": (torch.rand(t, E, generator=g) < 0.6) & (torch.arange(E) != 2),
           "none-for-some-tokens": (torch.rand(t, E, generator=g) < 0.5) & (torch.arange(t)[:, None] % 3 != 0),
           "empty": torch.zeros(0, E, dtype=torch.bool)}[case]
    x_masked = torch.where(sel.any(1, keepdim=True), x, torch.nan)  # tokens with no expert are never read
    want = naive(x, sel, w_up, b_up, w_down)
    torch.testing.assert_close(grouped_experts(x_masked, sel, w_up, b_up, w_down, "loop"), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grouped_experts(x_masked, sel, w_up, b_up, w_down), want, rtol=1e-4, atol=1e-4)
    if grouped_mm_works("cpu", torch.float32):
        got = grouped_experts(x_masked, sel, w_up, b_up, w_down.t().contiguous().t(), "grouped_mm")
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_grouped_execution_syncs_once_and_runs_one_matmul_pair_per_active_expert(monkeypatch):
    x = torch.randn(12, D)
    sel = torch.zeros(12, E, dtype=torch.bool)
    sel[:5, 0] = True
    sel[3:, 3] = True  # expert 1 and 2 idle
    calls, syncs = [], []
    real_addmm, real_tolist = torch.addmm, torch.Tensor.tolist
    monkeypatch.setattr(torch, "addmm", lambda *a, **kw: calls.append(a[1].shape[0]) or real_addmm(*a, **kw))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: syncs.append(1) or real_tolist(self))
    grouped_experts(x, sel, torch.randn(FF, D), torch.randn(FF), torch.randn(D, FF), "loop")
    assert calls == [5, 9] and len(syncs) == 1


def test_auto_execution_uses_the_loop_when_gradients_are_needed(monkeypatch):
    x, sel = torch.randn(12, D), torch.rand(12, E) < 0.5
    w_up = torch.randn(FF, D, requires_grad=True)
    used = []
    real = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **kw: used.append(1) or real(*a, **kw))
    grouped_experts(x, sel, w_up, torch.randn(FF), torch.randn(D, FF)).sum().backward()
    assert used and w_up.grad is not None
    used.clear()
    with torch.no_grad():
        grouped_experts(x, sel, w_up, torch.randn(FF), torch.randn(D, FF))
    assert bool(used) != grouped_mm_works("cpu", torch.float32)  # inference: grouped_mm where it works


def test_select_experts_top_k_and_dynamic_k():
    scores = F.softplus(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)) * 3)
    for k in (1, 2, 8):
        assert (select_experts(scores, k, None).sum(1) == k).all()
        assert torch.equal(select_experts(scores, k, 1.0), select_experts(scores, k, None))
        # tau 0: only the token's best expert; more tau never runs fewer experts
        assert torch.equal(select_experts(scores, k, 0.0), scores == scores.max(1, keepdim=True).values)
        prev = torch.zeros_like(scores, dtype=torch.bool)
        for tau in (0.0, 0.2, 0.5, 0.9, 1.0):
            sel = select_experts(scores, k, tau)
            assert (sel >= prev).all() and (sel.sum(1) <= k).all() and (sel.sum(1) >= 1).all()
            prev = sel


# --- cost and knob ---------------------------------------------------------------------------------


def test_flops_are_the_closed_form_of_the_executed_blocks():
    dense = tiny_dense(layers=3)
    model = sharpen(convert(dense, architecture=["half/moe2", "skip/dense", "full/half"]))
    batch = batch_of(5, seed=4)
    L = flops.lengths_of(batch["attention_mask"]).double()
    with torch.no_grad():
        out = model(**batch)
    head = flops.head(dense.spec.encoder, C)
    expected = (head + flops.attention_block(L, D, D // 2) + L * router_flops(D, 64, E) + 2 * L * expert_flops(D, FF // E)
                + flops.ffn_block(L, D, FF) + flops.attention_block(L, D) + flops.ffn_block(L, D, FF // 2))
    torch.testing.assert_close(out.flops, expected, rtol=0, atol=0)
    # dynamic k (the dense slot now runs as MoE over all experts too): the executed experts, read
    # back from the extras, give the cost
    model.set_knob(0.3)
    with torch.no_grad():
        out = model(**batch)
    experts = (out.extras["experts_per_token"] * L * 2).round()  # two MoE layers, summed over the tokens
    assert (experts < (2 + E) * L).all() and (experts >= 2 * L).all()
    dynamic = (head + flops.attention_block(L, D, D // 2) + flops.attention_block(L, D) + flops.ffn_block(L, D, FF // 2)
               + 2 * L * router_flops(D, 64, E) + experts * expert_flops(D, FF // E))
    torch.testing.assert_close(out.flops, dynamic, rtol=0, atol=0)


def test_flops_agree_with_torch_flop_counter():
    """Cross-check with FlopCounterMode on a batch without padding (it counts padded positions too),
    attention skipped (it reports 0 for CPU SDPA) and gradients on (the loop path: it reports 0 for
    torch._grouped_mm)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = sharpen(convert(tiny_dense(layers=3), architecture=["skip/moe2", "skip/dense", "skip/half"]))
    model.requires_grad_(True)
    batch = make_batch([12] * 5, VOCAB, seed=3)
    for knob in (None, 0.4):
        model.set_knob(knob)
        with FlopCounterMode(display=False) as counter:
            out = model(**batch)
        assert counter.get_total_flops() == int(out.flops.sum()), knob


def test_padding_tokens_run_no_expert():
    model = sharpen(convert(tiny_dense()))
    batch = batch_of(4, seed=8)
    mask = batch["attention_mask"].bool()
    h = torch.randn(*mask.shape, D).masked_fill(~mask[..., None], float("nan"))  # padding rows: NaN
    with torch.no_grad():
        _, _, ctx = model.prepare(batch["input_ids"], batch["attention_mask"])
        out = model._moe(0, model.encoder.blocks[0].ffn, h, ctx, k=2)
    assert torch.isfinite(out[mask]).all() and ctx.experts[0].shape == (int(mask.sum()),)


def test_knob_is_monotone_in_cost_and_rejects_bad_values():
    model = sharpen(convert(tiny_dense()))
    batch = batch_of(8, seed=5)
    costs = []
    for tau in model.knob_values():
        model.set_knob(tau)
        with torch.no_grad():
            costs.append(model(**batch).flops)
    assert all((a <= b).all() for a, b in zip(costs, costs[1:])) and (costs[0] < costs[-1]).any()
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="tau"):
            model.set_knob(bad)


def test_knob_below_one_thins_dense_ffn_slots_too():
    model = sharpen(convert(tiny_dense(), architecture=["half/dense", "full/half"]))
    batch = batch_of(6, seed=6)
    L = flops.lengths_of(batch["attention_mask"]).double()
    with torch.no_grad():
        full = model(**batch)
        model.set_knob(1.0)
        assert torch.equal(model(**batch).logits, full.logits)
        model.set_knob(0.0)  # the dense slot runs each token's top expert only, plus the router
        low = model(**batch)
    assert (low.extras["experts_per_token"] == 1).all()
    saved = flops.ffn_block(L, D, FF) - L * (router_flops(D, 64, E) + expert_flops(D, FF // E))
    torch.testing.assert_close(low.flops, full.flops - saved, rtol=0, atol=0)
    model.set_knob(None)
    model.set_architecture(["half/moe4", "full/half"])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, full.logits, rtol=1e-5, atol=1e-5)  # dense == all experts


# --- config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    ({"num_experts": 1}, "num_experts"),
    ({"latency_target": 0}, "latency_target"),
    ({"latency_target": 1.5}, "latency_target"),
    ({"latency_target_ms": -3}, "latency_target_ms"),
    ({"candidates": 0}, "candidates"),
    ({"candidates": 6}, "candidates"),
    ({"candidate_steps": -1}, "candidate_steps"),
    ({"hidden_weight": -0.5}, "hidden_weight"),
    ({"router_refit_samples": 1.5}, "router_refit_samples"),
    ({"fine_widths": "yes"}, "fine_widths"),
    ({"architecture": ["full/moe9"]}, "architecture"),
    ({"architecture": ["most/dense"]}, "architecture"),
    ({"router_hidden": 0}, "router_hidden"),
    ({"distill_temperature": 0}, "distill_temperature"),
    ({"search_margin": 0.5}, "search_margin"),
    ({"finetune": "yes"}, "finetune"),
])
def test_config_rejects_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        PlanerConfig(**fields)


def test_model_rejects_configs_that_do_not_fit_the_backbone():
    with pytest.raises(ValueError, match="num_experts"):
        convert(tiny_dense(), num_experts=3)  # 32 neurons do not split into 3 experts
    with pytest.raises(ValueError, match="architecture has 1 entries"):
        convert(tiny_dense(), architecture=["full/dense"])


def test_config_reads_cli_spellings():
    cfg = PlanerConfig.from_dict({"architecture": "full/moe2, half/skip", "latency_target_ms": 3})
    assert cfg.architecture == ("full/moe2", "half/skip")


def test_save_and_reload_keep_the_architecture(tmp_path):
    model = sharpen(convert(tiny_dense(), architecture=["half/moe1", "skip/half"]))
    model.set_knob(0.5)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.architecture == ["half/moe1", "skip/half"] and loaded.knob == 0.5
    assert json.loads((tmp_path / "m" / "config.json").read_text())["method_config"]["architecture"] == ["half/moe1", "skip/half"]
    batch = batch_of(4, seed=2)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    assert all(b.ffn.down.weight.t().is_contiguous() for b in loaded.encoder.blocks)  # experts' columns contiguous
    # a skipped block does not train
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert not any(n.startswith("encoder.blocks.1.attention.") for n in trainable)
    assert not any(n.startswith("routers.") for n in trainable)


# --- latency table and search ------------------------------------------------------------------------


def test_latency_table_profiles_saves_and_estimates(tmp_path):
    model = convert(tiny_dense())
    table = latency.profile(model, batch_size=2, seq_len=8, repeats=1, warmup=0)
    assert set(table.blocks) == {n for n in model.block_choices() if not n.endswith(":skip")}
    assert all(v >= 0 for v in table.blocks.values()) and table.overhead_ms > 0  # tiny blocks: noise may read 0
    assert table.torch_threads == torch.get_num_threads() and table.torch_version == torch.__version__
    again = latency.LatencyTable.load(table.save(tmp_path / "t.json"))
    assert again == table
    assert not again.mismatches(2, 8, model.latency_shape())
    assert any(m.startswith("batch_size") for m in again.mismatches(4, 8, model.latency_shape()))
    arch = ["half/moe1", "skip/dense"]
    assert table.estimate(arch) == pytest.approx(table.overhead_ms + table.blocks["attn:half"] + table.blocks["ffn:moe1"]
                                                 + table.blocks["ffn:dense"])
    check = latency.validate(model, table, [arch, ["full/dense"] * 2], repeats=1, warmup=0)
    assert len(check["rows"]) == 2 and check["mean_abs_relative_error"] >= 0
    assert model.architecture == ["full/moe4"] * 2  # validate restores the architecture
    with pytest.raises(ValueError, match="no block"):
        table.estimate(["full/moe3", "full/dense"])


def _latency_command():
    """benchmarks/latency_table.py (the command-line entry of the latency table), imported by path."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "latency_table.py"
    spec = importlib.util.spec_from_file_location("latency_table_command", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latency_command_profiles_a_saved_model(tmp_path, capsys):
    save_model(convert(tiny_dense(), latency_seq_len=8), tmp_path / "m")
    assert _latency_command().main([str(tmp_path / "m"), "--repeats", "1", "--out", str(tmp_path / "t.json")]) == 0
    table = latency.LatencyTable.load(tmp_path / "t.json")
    assert table.seq_len == 8 and table.batch_size == 1 and "ffn:moe1" in table.blocks
    assert "mean |error|" in capsys.readouterr().out


def test_search_meets_the_target_estimate_by_downgrading_slots():
    model = sharpen(convert(tiny_dense()))
    table = fake_table(TABLE)
    dense_ms = table.dense_ms(2)
    proxy = encoded(10, seed=7)
    found = recipe.search(model, table, 0.6 * dense_ms, proxy, batch_size=4)
    assert found["meets_target_estimate"] and found["estimated_ms"] <= 0.6 * dense_ms
    assert found["estimated_ms"] == pytest.approx(table.estimate(found["architecture"]))
    down = [p for p in found["path"] if p["step"] == "downgrade"]
    assert [p["estimated_ms"] for p in down] == sorted((p["estimated_ms"] for p in down), reverse=True)
    assert found["path"][-1]["architecture"] == found["architecture"]
    # refinement leaves no one-slot upgrade that fits the target and lowers the proxy: upgrades only
    # lower the proxy, and every step after the descent stays within the target
    ups = found["path"][len(down):]
    assert all(p["step"] == "upgrade" and p["estimated_ms"] <= 0.6 * dense_ms for p in ups)
    assert [p["proxy"] for p in ups] == sorted((p["proxy"] for p in ups), reverse=True)
    assert model.architecture == ["full/moe4"] * 2  # search leaves the model's architecture alone
    # an unreachable target: everything downgraded, reported as missed
    low = recipe.search(model, table, 0.5, proxy, batch_size=4)
    assert not low["meets_target_estimate"] and low["architecture"] == ["skip/skip"] * 2


def test_fit_searches_distils_measures_and_resumes(tmp_path, capsys):
    dense = tiny_dense()
    train, val = encoded(24, seed=12), encoded(12, seed=13)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-3, save_every=2)
    kw = {"latency_target": 0.6, "latency_seq_len": 8, "latency_repeats": 1, "proxy_samples": 8, "candidate_steps": 2,
          "router_refit_samples": 8}
    model = convert(dense, **kw)
    summary = recipe.fit(model, train, val, cfg, tmp_path, progress=False)
    assert summary["architecture"] == model.architecture == list(model.config.architecture)
    assert summary["steps"] == 3 and set(summary["routers"]) == {"0", "1"}
    # the candidates, each distilled 2 steps, the best on validation picked
    cands = summary["search"]["candidates"]
    assert 1 <= len(cands) <= 3 and len({tuple(c["architecture"]) for c in cands}) == len(cands)
    if len(cands) > 1:
        rows, picked = summary["candidates"]["candidates"], summary["candidates"]["picked"]
        assert [r["steps"] for r in rows] == [2] * len(cands)
        assert rows[picked]["val_accuracy"] == max(r["val_accuracy"] for r in rows)
        assert rows[picked]["architecture"] == summary["architecture"]
    for key in ("estimated_ms", "measured_ms", "dense_measured_ms", "latency_target_ms"):
        assert summary[key] > 0
    # a relative target is checked against the dense model measured in the same interleaved run
    assert summary["latency_target_met"] == (summary["measured_ms"] <= 0.6 * summary["dense_measured_ms"])
    assert len(summary["latency_model_error"]["rows"]) == 3
    search = summary["search"]
    assert search["estimated_ms"] <= 0.95 * summary["latency_target_ms"] or not search["meets_target_estimate"]
    arch_file = json.loads((tmp_path / "architecture.json").read_text())
    assert arch_file["architecture"] == model.architecture and arch_file["latency_target_met"] == summary["latency_target_met"]
    assert "planer: architecture" in capsys.readouterr().out
    # a rerun reuses routers, table and search, and resumes the fine-tuning
    again = convert(dense, **kw)
    summary2 = recipe.fit(again, train, val, cfg, tmp_path, progress=False)
    assert summary2["architecture"] == summary["architecture"]
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_fit_with_a_given_architecture_and_a_target_in_ms_skips_the_search(tmp_path):
    model = convert(tiny_dense(), architecture=["half/moe2", "full/skip"], latency_target_ms=1e-6, finetune=False,
                    latency_seq_len=8, latency_repeats=1, router_epochs=0)
    summary = recipe.fit(model, encoded(8, seed=1), encoded(8, seed=2), TrainConfig(batch_size=8), tmp_path, progress=False)
    assert summary["search"].startswith("skipped") and summary["latency_target_ms"] == 1e-6
    assert summary["architecture"] == ["half/moe2", "full/skip"] and "steps" not in summary
    assert summary["latency_target_met"] is False  # said, never hidden
    assert json.loads((tmp_path / "architecture.json").read_text())["latency_target_met"] is False


def test_search_keeps_the_dense_architecture_when_it_meets_the_target():
    model = sharpen(convert(tiny_dense()))
    found = recipe.search(model, fake_table(TABLE), 1e9, encoded(6, seed=7), batch_size=4)
    assert found["architecture"] == ["full/dense"] * 2 and found["path"] == [] and found["proxy"] == 0


def test_a_measured_miss_tightens_the_aim_and_continues_the_search(monkeypatch):
    model = sharpen(convert(tiny_dense(), latency_target=0.6))
    table = fake_table(TABLE)
    # measured / dense: the first architecture misses 0.6, the second meets it with headroom, the
    # upgrade pass's architecture misses (so the second is kept)
    ratios = iter([0.75, 0.5, 0.7])

    def fake_validate(model_, table_, archs, *a, **kw):
        r = next(ratios)
        return {"rows": [{"measured_ms": 10 * r}, {"measured_ms": 10.0}]}

    monkeypatch.setattr(latency, "validate", fake_validate)
    aim = 0.6 * table.dense_ms(2)
    found = recipe._search_measured(model, table, aim, encoded(6, seed=7), TrainConfig(eval_batch_size=4), progress=False)
    first, second, upgrade = found["rounds"]
    assert upgrade["step"] == "upgrade" and upgrade["estimated_ms"] > second["estimated_ms"]
    assert first["miss"] == pytest.approx(0.75 / 0.6) and second["miss"] == pytest.approx(0.5 / 0.6)
    assert second["aim_ms"] == pytest.approx(aim * 0.95 / first["miss"])
    assert found["architecture"] == second["architecture"] and found["estimated_ms"] <= second["aim_ms"]
    assert table.estimate(second["architecture"]) < table.estimate(first["architecture"])


def test_the_upgrade_pass_spends_measured_headroom(monkeypatch):
    model = sharpen(convert(tiny_dense(), latency_target=0.6))
    table = fake_table(TABLE)
    ratios = iter([0.3, 0.55])  # far under the target, then the upgraded architecture still within it
    monkeypatch.setattr(latency, "validate", lambda *a, **kw: {"rows": [{"measured_ms": 10 * next(ratios)},
                                                                        {"measured_ms": 10.0}]})
    aim = 0.6 * table.dense_ms(2)
    found = recipe._search_measured(model, table, aim, encoded(6, seed=7), TrainConfig(eval_batch_size=4), progress=False)
    first, upgrade = found["rounds"]
    assert upgrade["step"] == "upgrade" and upgrade["aim_ms"] == pytest.approx(first["estimated_ms"] / 0.5 * 0.975)
    assert found["architecture"] == upgrade["architecture"] != first["architecture"]
    assert found["estimated_ms"] > first["estimated_ms"]


def test_routers_learn_the_expert_norms():
    dense = tiny_dense()
    model = convert(dense, router_epochs=1, router_lr=1e-2)
    first = recipe.train_routers(model, encoded(64, seed=3), TrainConfig(batch_size=16))
    model = convert(dense, router_epochs=8, router_lr=1e-2)
    last = recipe.train_routers(model, encoded(64, seed=3), TrainConfig(batch_size=16))
    for i in ("0", "1"):
        assert last[i]["unexplained_variance"] < min(0.7, first[i]["unexplained_variance"]), (first, last)
        assert last[i]["top1_agreement"] > 2 / E, last
    assert not any(p.requires_grad for p in model.routers.parameters())


# --- the command line --------------------------------------------------------------------------------


QUIET = ["--no-progress", "--threads", "1"]


def test_convert_command(tiny_hf_dir, user_csv, tmp_path):
    dense_dir = tmp_path / "dense"
    assert main(["finetune", "--model", str(tiny_hf_dir), "--data", str(user_csv), "--text-column", "review",
                 "--label-column", "verdict", "--out", str(dense_dir), "--epochs", "1", "--batch-size", "32",
                 "--max-length", "32", *QUIET]) == 0
    out = tmp_path / "planer"
    assert main(["convert", str(dense_dir / "best"), "--method", "planer", "--latency-target", "0.7x",
                 "--set", "latency_seq_len=16", "--set", "latency_repeats=1", "--set", "proxy_samples=16",
                 "--out", str(out), "--epochs", "1", "--batch-size", "16", "--max-train-samples", "32", *QUIET]) == 0
    cfg = json.loads((out / "config.json").read_text())
    training = cfg["extra"]["training"]
    assert cfg["method_config"]["architecture"] == training["architecture"] and len(training["architecture"]) == 2
    assert cfg["method_config"]["latency_target"] == 0.7 and training["latency_target"] == 0.7
    assert "latency_target_met" in training and training["measured_ms"] > 0
    model = load_model(out)
    assert model.architecture == training["architecture"]
    batch = model.tokenizer(["a gorgeous, moving film", "dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(batch["input_ids"], batch["attention_mask"]).logits.shape == (2, 3)


@pytest.mark.parametrize("flags, message", [
    (["--method", "ee", "--latency-target", "0.5x"], "PLANER settings"),
    (["--method", "planer", "--latency-target", "half"], "expects a fraction"),
    (["--method", "planer", "--latency-target", "0.5x", "--latency-target-ms", "5"], "not both"),
    (["--method", "planer", "--latency-target", "1.5x"], "latency_target must be"),
])
def test_convert_latency_target_flags_are_checked(flags, message, tiny_hf_dir, tmp_path, capsys):
    code = main(["convert", str(tiny_hf_dir), *flags, "--out", str(tmp_path / "o"), *QUIET])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_grouped_experts_falls_back_to_the_loop_on_unaligned_widths():
    """`torch._grouped_mm` needs rows that are multiples of 16 bytes: an expert width of 10 (fp32)
    runs the portable loop under "auto" and gives the same result."""
    g = torch.Generator().manual_seed(0)
    e, m, d = 9, 10, 12
    x, w_up, b_up = torch.randn(7, d, generator=g), torch.randn(e * m, d, generator=g), torch.randn(e * m, generator=g)
    w_down = torch.randn(d, e * m, generator=g)
    sel = torch.zeros(7, e, dtype=torch.bool)
    sel[torch.arange(7), torch.arange(7) % e] = True
    with torch.no_grad():
        got = grouped_experts(x, sel, w_up, b_up, w_down)
        want = grouped_experts(x, sel, w_up, b_up, w_down, impl="loop")
    torch.testing.assert_close(got, want)


# --- finer widths, hidden-state distillation, candidates, router refit -----------------------------------


def test_finer_widths_run_their_share_of_heads_and_neurons_and_cost_it():
    dense = tiny_dense(layers=3)
    model = convert(dense, architecture=["quarter/3quarter", "half/quarter", "full/dense"])
    batch = batch_of(5, seed=4)
    L = flops.lengths_of(batch["attention_mask"]).double()
    with torch.no_grad():
        out = model(**batch)
    hd = D // HEADS
    expected = (flops.head(dense.spec.encoder, C) + flops.attention_block(L, D, 1 * hd) + flops.ffn_block(L, D, FF * 3 // 4)
                + flops.attention_block(L, D, 2 * hd) + flops.ffn_block(L, D, FF // 4)
                + flops.attention_block(L, D) + flops.ffn_block(L, D, FF))
    torch.testing.assert_close(out.flops, expected, rtol=0, atol=0)
    # the blocks are the backbone's on the first heads / neurons: zeroing the rest changes nothing
    ref = convert(dense, architecture=["full/dense"] * 3)
    with torch.no_grad():
        for block in ref.encoder.blocks[:2]:
            block.attention.v.weight[hd * (2 if block is ref.encoder.blocks[1] else 1):] = 0
        for block, w in zip(ref.encoder.blocks[:2], (FF * 3 // 4, FF // 4)):
            block.ffn.down.weight[:, w:] = 0
        torch.testing.assert_close(ref(**batch).logits, out.logits, rtol=1e-5, atol=1e-5)
    # offered to the search only with fine_widths
    assert {"attn:quarter", "ffn:quarter", "ffn:3quarter"} <= set(model.block_choices())
    coarse = convert(dense, fine_widths=False).block_choices()
    assert not any(n.split(":")[1] in ("quarter", "3quarter") for n in coarse) and FRACTION["3quarter"] == 0.75


def test_hidden_state_distillation_is_zero_at_the_dense_function_and_reaches_skipped_layers_inputs():
    dense = tiny_dense(layers=3)
    dense.dropout.p = 0.0
    batch = batch_of(4, seed=2)
    model = convert(dense, architecture=["full/dense"] * 3, hidden_weight=1.0).train()
    model.apply(lambda m: setattr(m, "p", 0.0) if isinstance(m, torch.nn.Dropout) else None)
    for block in model.encoder.blocks:
        block.attention.attn_dropout = 0.0
    assert float(model(**batch).aux_loss.detach()) == pytest.approx(0.0, abs=1e-6)
    reduced = ["full/dense", "skip/skip", "half/quarter"]
    model.set_architecture(reduced)
    logits_only = convert(dense, architecture=reduced, hidden_weight=0.0).train()
    with_hidden = convert(dense, architecture=reduced, hidden_weight=1.0).train()
    for m in (logits_only, with_hidden):
        m.apply(lambda x: setattr(x, "p", 0.0) if isinstance(x, torch.nn.Dropout) else None)
        for block in m.encoder.blocks:
            block.attention.attn_dropout = 0.0
    a, b = logits_only(**batch).aux_loss, with_hidden(**batch).aux_loss
    assert float(b) > float(a) >= 0
    b.backward()
    # layer 0's output is matched to the teacher's layer 0 (it runs the same blocks: no gradient
    # from that term) and to layer 2's through the reduced layer 2: its weights get a gradient
    assert with_hidden.encoder.blocks[0].ffn.up.weight.grad.abs().sum() > 0
    assert not with_hidden.encoder.blocks[1].ffn.up.weight.requires_grad


def test_router_refit_on_the_student_fits_its_own_ffn_inputs():
    dense = tiny_dense(layers=2)
    model = convert(dense, router_epochs=4, router_lr=1e-2, architecture=["skip/skip", "full/moe2"])
    train = encoded(64, seed=3)
    cfg = TrainConfig(batch_size=16)
    recipe.train_routers(model, train, cfg)  # on the teacher's inputs: layer 1 saw layer 0's output
    before = {k: v.clone() for k, v in model.routers.state_dict().items()}
    stats = recipe.train_routers(model, train, cfg, on_student=True)
    assert set(stats) == {"1"}  # layer 0's FFN is skipped: its router is left as it is
    after = model.routers.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("0."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("1."))
    assert not any(p.requires_grad for p in model.routers.parameters()) and not model.training
    # the student's layer-1 FFN input is the embeddings' output (layer 0 skipped)
    from adaptinf.backbone import attention_bias

    b = next(iter(recipe.train_batches(train, 16, 0, 0, pad_id=0)))[0]
    inputs = recipe._student_ffn_inputs(model, b.input_ids, b.attention_mask)
    real = b.attention_mask.reshape(-1).nonzero().squeeze(1)
    with torch.no_grad():
        emb = model.encoder.embed(b.input_ids)
        want = model.encoder.blocks[1].attention(emb, attention_bias(b.attention_mask)).reshape(-1, D)[real]
    torch.testing.assert_close(inputs[1], want, rtol=1e-5, atol=1e-5)
    assert set(inputs) == {1}


def test_search_candidates_are_distinct_and_fit_the_aim(monkeypatch):
    table = fake_table({**TABLE, "attn:quarter": 1.5, "ffn:quarter": 2.0, "ffn:3quarter": 4.5})
    monkeypatch.setattr(latency, "validate", lambda model_, table_, archs, *a, **kw: {
        "rows": [{"measured_ms": table_.estimate(archs[0])}, {"measured_ms": table_.dense_ms(2)}]})
    model = sharpen(convert(tiny_dense(), latency_target=0.6, candidates=5))
    aim = 0.55 * table.dense_ms(2)
    found = recipe.search_candidates(model, table, aim, encoded(8, seed=7), TrainConfig(eval_batch_size=4))
    cands = found["candidates"]
    assert [c["variant"] for c in cands][0] == "greedy" and found["architecture"] == cands[0]["architecture"]
    names = [n for n, _ in recipe.VARIANTS]
    assert [names.index(c["variant"]) for c in cands] == sorted(names.index(c["variant"]) for c in cands)
    assert len({tuple(c["architecture"]) for c in cands}) == len(cands) >= 2
    # measured = estimated here, so the upgrade pass may spend the headroom up to 0.975 * the target
    assert all(c["meets_target_estimate"] and c["estimated_ms"] <= 0.975 * 0.6 * table.dense_ms(2) + 1e-9 for c in cands)
    for c in cands:
        if c["variant"] in ("widths", "uniform"):
            assert not any("skip" in slot for slot in c["architecture"])
        if c["variant"] == "ffn_kept":
            assert not any(slot.endswith("/skip") for slot in c["architecture"])
        if c["variant"] == "uniform":
            assert len(set(c["architecture"])) == 1
    uniform = recipe.search_uniform(model, table, aim)
    fits = [[f"{a}/{f}"] * 2 for a in ("full", "half", "quarter") for f in ("dense", "3quarter", "half", "quarter",
                                                                           "moe1", "moe2", "moe4")]
    best = max((a for a in fits if table.estimate(a) <= aim), key=table.estimate)
    assert table.estimate(uniform["architecture"]) == table.estimate(best)


def test_the_table_never_times_a_narrower_block_above_a_wider_one():
    table = fake_table({"attn:full": 3.0, "attn:half": 3.4, "attn:quarter": 1.0, "ffn:dense": 2.4, "ffn:3quarter": 2.1,
                        "ffn:half": 2.7, "ffn:quarter": 2.0, "ffn:moe1": 4.0})
    fixed = recipe.monotone_table(table)
    assert fixed.blocks["attn:half"] == 3.0 and fixed.blocks["attn:quarter"] == 1.0
    assert fixed.blocks["ffn:half"] == 2.1 and fixed.blocks["ffn:quarter"] == 2.0 and fixed.blocks["ffn:moe1"] == 4.0
    assert fixed.extra["raw_blocks"]["ffn:half"] == 2.7
