"""ACM: learners and their token-grouped execution, conversion == dense, cost, the gates' gradient,
the knob, phase-2 labels, the module-wise phases (2 processes == 1), and the `convert` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_dense, random_batch, random_encoded
from safetensors.torch import load_file

from adaptinf.checkpoint import save_model
from adaptinf.registry import load_model
from adaptinf.cli import main
from adaptinf.data import Encoded
from adaptinf.methods.acm import AcmClassifier, AcmConfig, Learners, split_linear
from adaptinf.methods.dense import DenseClassifier
from adaptinf.recipes import acm as acm_recipe
from adaptinf.recipes.acm import budget_target, sufficient_k, sufficient_k_absolute
from adaptinf.settings import TrainConfig

VOCAB, D, FF, C, HEADS = 60, 16, 32, 3, 2


def tiny_dense(seed: int = 0, layers: int = 2) -> DenseClassifier:
    return make_tiny_dense(seed, hidden=D, heads=HEADS, ffn=FF, layers=layers, vocab_size=VOCAB)


def convert(dense: DenseClassifier, **config) -> AcmClassifier:
    return AcmClassifier.from_dense(dense, AcmConfig(**config)).eval()


def sharpen(model: AcmClassifier, seed: int = 1) -> AcmClassifier:
    """Random gates with large logits, so that tokens choose different k."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in model.names:
            for lin in model.module(name).gate.net:
                if isinstance(lin, torch.nn.Linear):
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.weight.shape[1] ** 0.5 * 3)
                    lin.bias.zero_()
    return model


def batch_of(n: int, seed: int) -> dict[str, torch.Tensor]:
    return random_batch(n, seed, VOCAB)


def encoded(n: int, seed: int) -> Encoded:
    return random_encoded(n, seed, VOCAB, C)


def random_learners(n: int = 4, seed: int = 0, activation: str = "gelu") -> Learners:
    torch.manual_seed(seed)
    learners = Learners(D, 8, D, n, activation)
    with torch.no_grad():
        for p in learners.parameters():
            p.normal_()
    return learners


def naive(learners: Learners, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per token, per learner: the sum of the token's first k learners (the reference semantics)."""
    out = torch.zeros(x.shape[0], learners.w2.shape[1], dtype=torch.float64)
    w = learners.width
    for t in range(x.shape[0]):
        for i in range(int(k[t])):
            h = learners._act(x[t].double() @ learners.w1[i * w : (i + 1) * w].double().T + learners.b1[i * w : (i + 1) * w].double())
            out[t] += h @ learners.w2[i].double().T + learners.b2[i].double()
    return out.float()


# --- learners and token-grouped execution -------------------------------------------------------------


def test_all_learners_is_the_sum_of_every_learner():
    learners, x = random_learners(), torch.randn(10, D)
    every = learners.outputs(x)  # [T, N, D]
    total = sum(naive(learners, x, torch.full((10,), i + 1)) - naive(learners, x, torch.full((10,), i)) for i in range(4))
    torch.testing.assert_close(every.sum(dim=1), total, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(learners.cumulative(x)[:, 4], every.sum(dim=1))
    torch.testing.assert_close(learners.grouped(x, torch.full((10,), 4)), every.sum(dim=1), rtol=1e-5, atol=1e-5)
    assert torch.equal(learners.cumulative(x)[:, 0], torch.zeros(10, D))


@pytest.mark.parametrize("case", ["random", "all-one", "all-zero", "one-at-max", "empty"])
def test_grouped_execution_equals_the_naive_reference(case):
    """Includes the reference code's off-by-one: with every token at k = 1 its loop ran no learner,
    and a token at the batch's highest k lost its last learner."""
    learners = random_learners(n=4, seed=2)
    g = torch.Generator().manual_seed(3)
    t = 0 if case == "empty" else 50
    x = torch.randn(t, D, generator=g)
    k = {"random": torch.randint(0, 5, (t,), generator=g), "all-one": torch.ones(t, dtype=torch.int64),
         "all-zero": torch.zeros(t, dtype=torch.int64), "empty": torch.zeros(0, dtype=torch.int64),
         "one-at-max": torch.where(torch.arange(t) == 7, 4, torch.randint(0, 4, (t,), generator=g))}[case]
    if case == "random":
        assert {0, 4} <= set(k.tolist())
    x_masked = torch.where((k == 0)[:, None], torch.nan, x)  # rows with k = 0 (padding) must never be read
    got = learners.grouped(x_masked, k)
    torch.testing.assert_close(got, naive(learners, x, k), rtol=1e-4, atol=1e-4)
    if case == "all-one":
        assert got.abs().sum() > 0
    if case == "one-at-max":
        torch.testing.assert_close(got[7], learners.outputs(x[7:8]).sum(dim=1)[0], rtol=1e-5, atol=1e-5)


def test_grouped_execution_syncs_once_and_runs_one_matmul_pair_per_learner(monkeypatch):
    learners, x = random_learners(), torch.randn(30, D)
    k = torch.tensor([0, 1, 2, 3, 4] * 6)
    calls = []
    real = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **kw: calls.append(a[1].shape[0]) or real(*a, **kw))
    learners.grouped(x, k)
    # learner i runs on the prefix of tokens with k > i: 24, 18, 12, 6 rows; up then down (learner 0)
    assert calls == [24, 24, 18, 12, 6]


@pytest.mark.parametrize("t", [1, 5, 26, 300])
@pytest.mark.parametrize("case", ["random", "uniform", "zero-or-max"])
def test_run_picks_prefix_or_grouped_and_equals_the_naive_reference(t, case):
    """`run` (inference): prefix execution when it wastes little, token-grouped otherwise; both are
    the naive per-token sum."""
    learners = random_learners(n=4, seed=5)
    g = torch.Generator().manual_seed(t)
    x = torch.randn(t, D, generator=g)
    k = {"random": torch.randint(0, 5, (t,), generator=g), "uniform": torch.full((t,), 3),
         "zero-or-max": torch.randint(0, 2, (t,), generator=g) * 4}[case]
    with torch.no_grad():
        got = learners.run(x, k)
        again = learners.run(x, k)  # the cached down-projection gives the same
    torch.testing.assert_close(got, naive(learners, x, k), rtol=1e-4, atol=1e-4)
    assert torch.equal(got, again)


def test_run_at_batch_1_is_one_matmul_pair_without_sort_or_gather(monkeypatch):
    learners, x = random_learners(), torch.randn(20, D)
    k = torch.tensor([3] * 17 + [0, 1, 2])  # 6 unused token-learner products: prefix
    calls = []
    real_addmm, real_linear = torch.addmm, F.linear
    monkeypatch.setattr(torch, "addmm", lambda *a, **kw: calls.append(("down", tuple(a[2].shape))) or real_addmm(*a, **kw))
    monkeypatch.setattr(F, "linear", lambda *a, **kw: calls.append(("up", tuple(a[1].shape))) or real_linear(*a, **kw))
    monkeypatch.setattr(torch, "argsort", lambda *a, **kw: pytest.fail("argsort at batch 1"))
    with torch.no_grad():
        out = learners.run(x, k)
    assert calls == [("up", (3 * 8, D)), ("down", (3 * 8, D))]  # up to the largest k (3 learners), then down
    torch.testing.assert_close(out, naive(learners, x, k), rtol=1e-4, atol=1e-4)


def test_run_takes_the_grouped_path_when_the_prefix_would_waste_work(monkeypatch):
    learners, x = random_learners(), torch.randn(20, D)
    k = torch.tensor([4] + [1] * 19)  # prefix would run 57 unused learner-token products
    sorted_ = []
    real = torch.argsort
    monkeypatch.setattr(torch, "argsort", lambda *a, **kw: sorted_.append(1) or real(*a, **kw))
    with torch.no_grad():
        out = learners.run(x, k)
    assert sorted_ == [1]
    torch.testing.assert_close(out, naive(learners, x, k), rtol=1e-4, atol=1e-4)


def test_the_cached_down_projection_follows_the_weights():
    learners, x, k = random_learners(), torch.randn(5, D), torch.full((5,), 4)
    with torch.no_grad():
        before = learners.run(x, k)
        learners.w2.mul_(2.0)
        learners.b2.zero_()
        after = learners.run(x, k)
    torch.testing.assert_close(after, naive(learners, x, k), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(before, after)


def test_residual_distillation_trains_learner_k_by_the_error_at_k_only():
    learners, x = random_learners(), torch.randn(6, D)
    res = learners.residual_cumulative(x)
    torch.testing.assert_close(res, learners.cumulative(x)[:, 1:])  # the same values
    res[:, 2].pow(2).sum().backward()  # the error at k = 3 reaches learner 3 only
    w = learners.width
    grads = [learners.w1.grad[i * w : (i + 1) * w].abs().sum().item() for i in range(4)]
    assert grads[2] > 0 and grads[0] == grads[1] == grads[3] == 0
    assert learners.w2.grad[2].abs().sum() > 0 and learners.w2.grad[[0, 1, 3]].abs().sum() == 0


# --- conversion --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4])
def test_all_learners_on_reproduces_the_dense_model(n):
    """The learners are an exact split of the FFN's neurons (d_ff = 32 in 3 groups: padded with zero
    neurons), so with every learner on the converted model is the dense model."""
    dense = tiny_dense()
    model = convert(dense, learners=n)
    batch = batch_of(12, seed=2)
    with torch.no_grad():
        ref, full = dense(**batch), model(**batch, learners=n)
        gated = model(**batch)  # an untrained gate picks every learner
    for bad in (n + 1, -1, 1.0, True):
        with pytest.raises(ValueError, match="learners must be an integer"):
            model(**batch, learners=bad)
    torch.testing.assert_close(full.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gated.logits, ref.logits, rtol=1e-5, atol=1e-5)
    lengths = batch["attention_mask"].sum(1)
    assert (gated.extras["k"].sum(dim=2) == n * lengths).all()
    padded = n * -(-FF // n) - FF  # zero neurons added to the last learner
    torch.testing.assert_close(full.flops, ref.flops + 2 * 2 * D * padded * lengths * 2, rtol=0, atol=0)


def test_svd_split_of_a_linear_is_exact_at_full_rank():
    torch.manual_seed(0)
    lin = torch.nn.Linear(D, D)
    learners = Learners(D, D // 4, D, 4, "identity")
    split_linear(learners, lin)
    x = torch.randn(7, D)
    torch.testing.assert_close(learners.outputs(x).sum(dim=1), lin(x), rtol=1e-4, atol=1e-5)
    # largest singular directions first: the first learner alone is the best rank-4 part
    err = [(learners.cumulative(x)[:, i] - lin(x) + lin.bias).norm() for i in range(1, 5)]
    assert all(a > b for a, b in zip(err, err[1:]))


def test_attention_targets_replace_the_projections():
    model = sharpen(convert(tiny_dense(), targets="ffn,attn"))
    assert model.config.targets == ("ffn", "attn")
    assert model.names == ["0.q", "0.k", "0.v", "0.out", "0.ffn", "1.q", "1.k", "1.v", "1.out", "1.ffn"]
    assert model.encoder.blocks[0].attention.q is None and model.module("0.q").min_k == 1
    with torch.no_grad():
        out = model(**batch_of(6, seed=1))
    k = out.extras["k"]  # [modules, b, s]
    mask = batch_of(6, seed=1)["attention_mask"].bool()
    assert k.shape[0] == 10 and (k[:, ~mask] == 0).all()
    attn_k = k[[0, 1, 2, 3, 5, 6, 7, 8]][:, mask]
    assert (attn_k >= 1).all() and len(set(attn_k.flatten().tolist())) > 1


def reference_forward(model: AcmClassifier, batch: dict, knob: float) -> torch.Tensor:
    """Sample by sample, no padding: each FFN's output is the cumulative output at the gate's k."""
    logits = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        ids = ids[mask.bool()][None]
        enc = model.encoder
        h = enc.embed(ids)
        bias = torch.zeros(1, 1, 1, ids.shape[1])
        for block, mods in zip(enc.blocks, model.acm):
            h = block.attention(h, bias)
            mod, x = mods["ffn"], h[0]
            k = mod.choices[(mod.gate(x) - knob * mod.choices).argmax(-1)]
            y = mod.learners.cumulative(x)[torch.arange(x.shape[0]), k]
            h = block.ffn.norm(h + y[None])
        logits.append(model.classifier(enc.pool(h))[0])
    return torch.stack(logits)


@pytest.mark.parametrize("knob", [-0.5, 0.0, 1.0])
def test_batched_gated_forward_equals_a_per_sample_reference(knob):
    model = sharpen(convert(tiny_dense(), learners=4))
    batch = batch_of(10, seed=4)
    model.set_knob(knob)
    with torch.no_grad():
        out = model(**batch)
        ref = reference_forward(model, batch, knob)
    torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-5)
    assert len(set(out.extras["k"][:, batch["attention_mask"].bool()].flatten().tolist())) >= 3


# --- cost --------------------------------------------------------------------------------------------


def attention_flops(n: int) -> int:
    return 2 * n * D * 3 * D + 2 * 2 * n * n * D + 2 * n * D * D


@pytest.mark.parametrize("targets", ["ffn", "ffn,attn"])
def test_flops_are_the_closed_form_of_the_chosen_ks(targets):
    model = sharpen(convert(tiny_dense(), learners=4, targets=targets, gate_hidden=5))
    batch = batch_of(9, seed=6)
    with torch.no_grad():
        out = model(**batch)
        forced = model(**batch, learners=2)
    k = out.extras["k"].sum(dim=2)  # [modules, b] learners run per module and sample
    lengths = batch["attention_mask"].sum(1)
    w_ffn, w_attn = FF // 4, round((D * D + D) / ((2 * D + 1) * 4))
    gate = lambda choices: 2 * (D * 5 + 5 * 5 + 5 * choices)  # noqa: E731
    head = 2 * D * D + 2 * D * C
    for i, n in enumerate(lengths.tolist()):
        total = head
        for layer in range(2):
            if targets == "ffn":
                total += attention_flops(n) + int(k[layer, i]) * 4 * D * w_ffn + n * gate(5)
                forced_total = None
            else:
                per = k[5 * layer : 5 * layer + 5, i].tolist()
                total += 2 * 2 * n * n * D + sum(per[:4]) * 4 * D * w_attn + 4 * n * gate(4)
                total += per[4] * 4 * D * w_ffn + n * gate(5)
        assert out.flops[i].item() == total
    assert out.flops.dtype == torch.float64
    if targets == "ffn":  # forced: no gate runs, every token runs exactly 2 learners
        expected = head + 2 * (attention_flops(lengths) + lengths * 2 * 4 * D * w_ffn)
        torch.testing.assert_close(forced.flops, expected.double(), rtol=0, atol=0)


def test_knob_is_monotone_in_cost():
    model = sharpen(convert(tiny_dense(), learners=4, targets="ffn,attn"))
    batch = batch_of(16, seed=7)
    costs = []
    for knob in model.knob_values():
        model.set_knob(knob)
        with torch.no_grad():
            costs.append(model(**batch).flops)
    costs = torch.stack(costs)  # [knobs, b], knobs increasing: bias toward fewer learners
    assert model.knob_values() == sorted(model.knob_values())
    assert (costs[1:] <= costs[:-1]).all()
    assert len(set(costs.sum(1).tolist())) >= 5, "the knob should trace a curve"
    for bad in (float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="gate_bias"):
            model.set_knob(bad)


# --- training ----------------------------------------------------------------------------------------


def test_the_task_loss_alone_reaches_every_gate():
    model = sharpen(convert(tiny_dense(), targets="ffn,attn")).train()
    torch.manual_seed(0)
    out = model(**batch_of(8, seed=8))
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
    F.cross_entropy(out.logits, torch.arange(8) % C).backward()  # no auxiliary term
    for name in model.names:
        grads = [p.grad for p in model.module(name).gate.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_aux_losses_reach_the_gates_and_budget_pulls_toward_beta():
    model = sharpen(convert(tiny_dense(), beta=0.1, entropy_weight=0.0, diversity_weight=0.0)).train()
    torch.manual_seed(0)
    out = model(**batch_of(8, seed=9))
    frac = out.extras["executed_fraction"]
    assert frac.shape == (8,) and ((frac >= 0) & (frac <= 1)).all()
    torch.testing.assert_close(out.aux_loss, 0.1 * (frac.mean() - 0.1).abs())
    out.aux_loss.backward()
    assert all(p.grad is not None for p in model.module("0.ffn").gate.parameters())


def test_sufficient_k_labels_by_hand():
    errors = torch.tensor([
        [10.0, 5.0, 4.5, 4.4, 1.0],  # 2x, then 1.11x < 1.2: one learner is enough
        [10.0, 9.0, 1.0, 1.0, 1.0],  # the first learner improves 1.11x: none (the ref code returned N here)
        [16.0, 8.0, 4.0, 2.0, 1.0],  # every learner halves the error: all 4
        [5.0, 0.0, 0.0, 0.0, 0.0],  # exact after one
        [3.0, 2.0, 1.5, 1.2, 1.1],  # 1.5, 1.33, 1.25, 1.09: 3
    ])
    assert sufficient_k(errors, 1.2).tolist() == [1, 0, 4, 1, 3]
    assert sufficient_k(errors, 1.3).tolist() == [1, 0, 4, 1, 2]


def test_absolute_sufficient_k_labels_by_hand():
    errors = torch.tensor([
        [10.0, 5.0, 0.9, 0.5, 0.0],  # within 0.1 * 10 from 2 learners on
        [10.0, 0.5, 0.4, 0.3, 0.2],  # one learner is enough
        [10.0, 9.0, 8.0, 7.0, 2.0],  # never within: all 4
        [0.0, 0.0, 0.0, 0.0, 0.0],  # a zero output: none
    ])
    norms = torch.tensor([10.0, 10.0, 10.0, 0.0])
    assert sufficient_k_absolute(errors, norms, 0.1).tolist() == [2, 1, 4, 0]
    assert sufficient_k_absolute(errors, norms, 0.05).tolist() == [3, 1, 4, 0]


def test_budget_target_anneals_from_1_to_beta():
    assert [budget_target(s, 100, 0.25, 0.5) for s in (0, 25, 50, 99)] == [1.0, 0.625, 0.25, 0.25]
    assert budget_target(0, 100, 0.25, 0.0) == 0.25


def test_annealed_budget_reaches_the_aux_loss():
    model = sharpen(convert(tiny_dense(), beta=0.1, entropy_weight=0.0, diversity_weight=0.0)).train()
    model.budget_target = 0.7
    torch.manual_seed(0)
    out = model(**batch_of(8, seed=9))
    torch.testing.assert_close(out.aux_loss, 0.1 * (out.extras["executed_fraction"].mean() - 0.7).abs())


def test_selection_score_charges_what_is_spent_over_beta():
    model = convert(tiny_dense(), beta=0.5)  # untrained gates: every learner, executed fraction 1
    val = encoded(12, seed=3)
    from adaptinf.model import accuracy
    acc = accuracy(model, val, 8, 0, knob=None)[0]
    assert model.selection_score(val, 8) == pytest.approx(acc - 0.5)
    model.config.beta = 1.0
    assert model.selection_score(val, 8) == pytest.approx(acc)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"learners": 1}, "learners must be an integer from 2 to 16"),
        ({"learners": 17}, "2 to 16"),
        ({"learners": 2.5}, "2 to 16"),
        ({"targets": "ffn,mlp"}, "targets"),
        ({"targets": ()}, "targets"),
        ({"targets": ("ffn", "ffn")}, "without repeats"),
        ({"tau": 1.0}, "tau must be > 1"),
        ({"beta": 0.0}, r"beta must be in \(0, 1\]"),
        ({"beta": 1.5}, "beta"),
        ({"gate_hidden": 0}, "gate_hidden"),
        ({"entropy_weight": -0.1}, "entropy_weight"),
        ({"distill_epochs": -1}, "distill_epochs"),
        ({"gate_lr": 0}, "gate_lr"),
        ({"workers": 0}, "workers"),
        ({"gumbel_temperature": 0}, "gumbel_temperature"),
        ({"distill_mode": "detach"}, "distill_mode must be one of"),
        ({"label_rule": "ratio"}, "label_rule must be one of"),
        ({"eps": 0.0}, r"eps must be in \(0, 1\)"),
        ({"beta_anneal": 1.5}, "beta_anneal"),
    ],
)
def test_config_rejects_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        AcmConfig(**fields)


def test_config_reads_cli_spellings():
    assert AcmConfig(targets="ffn,attn").targets == ("ffn", "attn") == AcmConfig(targets=["ffn", "attn"]).targets
    cfg = AcmConfig(learners=8, targets="attn", beta=0.25)
    assert AcmConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_save_and_reload(tmp_path):
    model = sharpen(convert(tiny_dense(), learners=3, targets="ffn,attn"))
    model.set_knob(0.5)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m", expect_method="acm")
    assert loaded.knob == 0.5 and loaded.config == model.config and not loaded._teacher
    batch = batch_of(7, seed=10)
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.flops, b.flops) and torch.equal(a.extras["k"], b.extras["k"])


def distilled(tmp_path, workers: int) -> AcmClassifier:
    model = convert(tiny_dense(layers=3), learners=3, distill_epochs=2, gate_epochs=1, workers=workers)
    train = encoded(24, seed=11)
    cfg = TrainConfig(batch_size=8, seed=0)
    acm_recipe.run_phase(model, "distill", train, cfg, tmp_path / "distill", progress=False)
    acm_recipe.run_phase(model, "gates", train, cfg, tmp_path / "gates", progress=False)
    return model


@pytest.mark.slow
def test_two_process_distillation_equals_one_process(tmp_path):
    """Phases 1 and 2 trained by 2 processes (each every other module) give the 1-process result."""
    one, two = distilled(tmp_path / "one", workers=1), distilled(tmp_path / "two", workers=2)
    fresh = convert(tiny_dense(layers=3), learners=3)
    s1, s2, s0 = one.state_dict(), two.state_dict(), fresh.state_dict()
    for key in s1:
        torch.testing.assert_close(s2[key], s1[key], rtol=1e-5, atol=1e-6, msg=key)
    changed = [k for k in s1 if k.startswith("acm.") and not torch.equal(s1[k], s0[k])]
    assert {k.split(".")[1] for k in changed if "learners" in k} == {"0", "1", "2"}  # every layer distilled
    assert any("gate" in k for k in changed)
    stats = json.loads((tmp_path / "two" / "gates" / "2.ffn.json").read_text())
    assert sum(stats["sufficient_k_share"].values()) == pytest.approx(1.0)


@pytest.mark.slow
def test_torchrun_ranks_share_the_modules(tmp_path):
    """Under torchrun each rank distils every other module; the gathered model is the 1-process one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    worker = Path(__file__).with_name("acm_ddp_worker.py")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          str(worker), str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    ref = distilled(tmp_path / "one", workers=1).state_dict()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)


def test_fit_runs_the_three_phases_and_resumes(tmp_path):
    dense = tiny_dense()
    train, val = encoded(24, seed=12), encoded(12, seed=13)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-3, save_every=2)
    model = convert(dense, learners=2, distill_epochs=1, gate_epochs=1)
    summary = acm_recipe.fit(model, train, val, cfg, tmp_path, progress=False)
    assert set(summary["distill"]) == {"0.ffn", "1.ffn"} and set(summary["gates"]) == {"0.ffn", "1.ffn"}
    assert 0 <= summary["val_accuracy_all_learners"] <= 1 and summary["steps"] == 3
    assert all(s["relative_mse"] >= 0 for s in summary["distill"].values())
    after = {k: v.clone() for k, v in model.state_dict().items()}
    # a rerun resumes every phase: nothing trains again, the same model comes out
    again = convert(dense, learners=2, distill_epochs=1, gate_epochs=1)
    summary2 = acm_recipe.fit(again, train, val, cfg, tmp_path, progress=False)
    assert summary2["resumed_from_step"] == 3
    assert all(torch.equal(after[k], v) for k, v in again.state_dict().items())
    with pytest.raises(ValueError, match="other settings"):
        acm_recipe.fit(convert(dense, learners=2, distill_epochs=2, gate_epochs=1), train, val, cfg, tmp_path, progress=False)


# --- the command line --------------------------------------------------------------------------------


QUIET = ["--no-progress", "--threads", "1"]


def test_convert_command(tiny_hf_dir, user_csv, tmp_path):
    dense_dir = tmp_path / "dense"
    assert main(["finetune", "--model", str(tiny_hf_dir), "--data", str(user_csv), "--text-column", "review",
                 "--label-column", "verdict", "--out", str(dense_dir), "--epochs", "1", "--batch-size", "32",
                 "--max-length", "32", *QUIET]) == 0
    out = tmp_path / "acm"
    assert main(["convert", str(dense_dir / "best"), "--method", "acm", "--set", "learners=2", "--set", "beta=0.4",
                 "--set", "distill_epochs=1", "--out", str(out), "--epochs", "1", "--batch-size", "16",
                 "--max-train-samples", "32", *QUIET]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "acm" and cfg["method_config"]["beta"] == 0.4
    training = cfg["extra"]["training"]
    assert training["n_train"] == 32 and training["steps"] == 2 and set(training["gates"]) == {"0.ffn", "1.ffn"}
    model = load_model(out)
    batch = model.tokenizer(["a gorgeous, moving film", "dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(batch["input_ids"], batch["attention_mask"]).logits.shape == (2, 3)
    pts = tmp_path / "points"
    assert main(["evaluate", str(out), "--split", "validation", "--out", str(pts), *QUIET]) == 0
    points = json.loads((pts / "points.json").read_text())
    assert [p["knob"] for p in points] == model.knob_values()
    assert points[0]["gflops"] >= points[-1]["gflops"]
