"""SHARCS: configuration, full-width equivalence, importance reordering, ordinal routing (batched ==
per-sample execution), cost, router gradients, the every-width loss with distillation, ordinal
hardness labels, training and the router fit, the offline sweep and the `convert` command."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch, make_tiny_dense
from safetensors.torch import load_file

import adaptinf
from adaptinf.backbone import EncoderConfig
from adaptinf.checkpoint import save_model
from adaptinf.registry import load_model, needs_training
from adaptinf.cli import main
from adaptinf.data import Encoded, eval_batches
from adaptinf.methods.dense import DenseClassifier
from adaptinf.methods.sharcs import ALL_FULL, ALL_SMALLEST, SharcsClassifier, SharcsConfig
from adaptinf.model import ModelSpec
from adaptinf.recipes import sharcs as recipe
from adaptinf.recipes.sharcs import importance, ordinal_labels, reorder, train_router
from adaptinf.settings import TrainConfig

VOCAB, D, HEADS, FF, C, LAYERS = 60, 32, 4, 64, 3, 3
HD = D // HEADS
SHAPES = {True: [(1, 8, 16), (2, 16, 32), (4, 32, 64)], False: [(1, D, 16), (2, D, 32), (4, D, 64)]}  # heads, d_w, ff_w


def tiny_dense(seed: int = 0) -> DenseClassifier:
    return make_tiny_dense(seed, hidden=D, heads=HEADS, ffn=FF, layers=LAYERS, vocab_size=VOCAB)


def convert(dense: DenseClassifier | None = None, **config) -> SharcsClassifier:
    config.setdefault("classifier_dropout", 0.0)
    return SharcsClassifier.from_dense(dense or tiny_dense(), SharcsConfig(**config)).eval()


def decisive_router(model: SharcsClassifier, seed: int = 1, spread: float = 2.0) -> SharcsClassifier:
    """A random router whose logits are standardised (std `spread` per width over a reference batch),
    so samples go to different widths rather than all to the one a random bias favours."""
    g = torch.Generator().manual_seed(seed)
    first, last = model.router[0], model.router[2]
    with torch.no_grad():
        for lin in (first, last):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.weight.shape[1] ** 0.5)
            lin.bias.zero_()
        was = model.training
        z = model.eval()(**batch_of(48, seed=99)).extras["router_logits"]  # [48, n_w]
        model.train(was)
        scale = spread / z.std(dim=0)
        last.weight.mul_(scale[:, None])
        last.bias.copy_(-z.mean(dim=0) * scale)
    return model


def perturb_private_norms(model: SharcsClassifier, seed: int = 2) -> SharcsClassifier:
    """Private norms that differ from the shared slices, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.width_norms.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def batch_of(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return make_batch(torch.randint(2, 30, (n,), generator=g).tolist(), VOCAB, seed)


def encoded(n: int, seed: int) -> Encoded:
    b = batch_of(n, seed)
    ids = [row[:m].tolist() for row, m in zip(b["input_ids"], b["attention_mask"].sum(1))]
    return Encoded(ids, torch.randint(0, C, (n,), generator=torch.Generator().manual_seed(seed + 1)))


def block_flops(n: int, d: int, heads: int, ff: int) -> int:
    """One block by hand at real length n: q/k/v, scores and weighted sum, output, FFN up and down."""
    da = heads * HD
    return 2 * n * d * 3 * da + 2 * 2 * n * n * da + 2 * n * da * d + 2 * n * d * ff + 2 * n * ff * d


# --- registry and configuration ----------------------------------------------------------------------


def test_registered_with_a_default_config():
    assert "sharcs" in adaptinf.list_methods()
    model = convert()
    assert model.router_layer == 1 and model.knob_name == "threshold" and needs_training(model.method)
    assert [(s.heads, s.hidden, s.ffn) for s in model.shapes] == SHAPES[True]
    six = EncoderConfig(hidden_size=48, num_hidden_layers=6, num_attention_heads=12, intermediate_size=96)
    assert SharcsClassifier(ModelSpec(six, ("a", "b"))).router_layer == 2  # the default: 2 of 6


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"router_layer": 0}, "router_layer"),
        ({"widths": (1.0,), "confidence_intervals": ((0.0, 1.0),)}, "at least two widths"),
        ({"widths": (0.5, 0.25, 1.0)}, "increasing"),
        ({"widths": (0.25, 0.5, 0.75)}, "end at 1.0"),
        ({"widths": (0.0, 0.5, 1.0)}, r"lie in \(0, 1\]"),
        ({"widths": "0.25,x"}, "list of numbers"),
        ({"widths": (0.5, 1.0)}, "one \\[lo, hi\\] per width"),
        ({"confidence_intervals": ((0.8, 1.0), (0.5, 0.4), (0.0, 0.5))}, "0 <= lo < hi <= 1"),
        ({"confidence_intervals": "[[0.8, 1.0], [0.5"}, "pairs"),
        ({"window": 0}, "window"),
        ({"router_hidden": 0}, "router_hidden"),
        ({"router_weight": -1.0}, "router_weight"),
        ({"task_weight": 0.0}, "task_weight must be positive"),
        ({"importance_samples": -1}, "importance_samples"),
        ({"shrink_residual": "yes"}, "true or false"),
        ({"distill_weight": 1.5}, "distill_weight must be in"),
        ({"distill_weight": -0.1}, "distill_weight"),
        ({"router_fit_epochs": -1}, "router_fit_epochs"),
        ({"router_lr": float("nan")}, "router_lr"),
        ({"classifier_dropout": 1.0}, "classifier_dropout"),
    ],
)
def test_config_rejects_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        SharcsConfig(**fields)


def test_config_accepts_cli_spellings_and_round_trips():
    cfg = SharcsConfig(widths="0.5,1", confidence_intervals="[[0.6, 1.0], [0.0, 0.6]]")
    assert cfg.widths == (0.5, 1.0) and cfg.confidence_intervals == ((0.6, 1.0), (0.0, 0.6))
    assert SharcsConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert SharcsConfig.from_dict({"widths": [0.25, 1], "confidence_intervals": [[0.5, 1], [0, 0.5]]}).widths == (0.25, 1.0)
    # a config saved by the earlier one-width-per-batch training still loads (its retired fields dropped)
    old = {"window": 1, "nested_training": True, "oversample": True, "warmup_all_widths": True}
    assert SharcsConfig.from_dict(old) == SharcsConfig(window=1)
    with pytest.raises(ValueError, match="unknown fields"):
        SharcsConfig.from_dict({"windw": 1})


def test_config_is_checked_against_the_model():
    with pytest.raises(ValueError, match=r"router_layer is 3, but the model has 3 layers.*1\.\.2"):
        convert(router_layer=3)
    with pytest.raises(ValueError, match="0.2 and 0.25 both keep 1 of the model's 4"):
        convert(widths=(0.2, 0.25, 1.0))
    assert convert(router_layer=2).router_layer == 2


def test_knob_is_validated_and_sweeps_from_smallest_to_largest():
    model = convert()
    for bad in (float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="finite number"):
            model.set_knob(bad)
    values = model.knob_values()
    assert values == sorted(values) and values[0] == ALL_SMALLEST == 0.0 and values[-1] == ALL_FULL == 1.0
    assert 0.5 in values and len(set(values)) == len(values)


# --- full width == dense; reordering changes nothing at full width -----------------------------------


@pytest.mark.parametrize("shrink", [True, False])
def test_full_width_is_the_dense_model(shrink):
    dense = tiny_dense()
    model = perturb_private_norms(decisive_router(convert(dense, shrink_residual=shrink)))
    batch = batch_of(12, seed=2)
    model.set_knob(ALL_FULL)
    with torch.no_grad():
        ref = dense(**batch)
        routed = model(**batch)
        fixed = model(**batch, width=2)
    assert (routed.extras["width_pct"] == 100).all()
    torch.testing.assert_close(routed.logits, ref.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(fixed.logits, ref.logits, rtol=0, atol=1e-6)
    n = batch["attention_mask"].sum(1)
    router = n * D + 2 * D * 256 + 2 * 256 * 3  # token mean + router MLP
    torch.testing.assert_close(routed.flops, ref.flops + router, rtol=0, atol=0)


@pytest.mark.parametrize("shrink", [True, False])
def test_reordering_keeps_the_full_width_model_and_sorts_importance(shrink):
    model = convert(shrink_residual=shrink)
    data = encoded(24, seed=3)
    batch = batch_of(10, seed=4)
    model.set_knob(ALL_FULL)
    with torch.no_grad():
        before = model(**batch).logits
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    summary = reorder(model, data, batch_size=8)
    with torch.no_grad():
        after = model(**batch).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
    assert any(".attention.q." in k for k in moved) and any(".ffn.up." in k for k in moved)
    assert any("embeddings.word" in k for k in moved) == shrink  # the residual is reordered only when it shrinks
    # scored again, the leading slice now holds the most important heads, neurons and dimensions
    again = importance(model, data, batch_size=8)
    for key in ("heads", "neurons") + (("hidden",) if shrink else ()):
        s = again[key]
        torch.testing.assert_close(s, s.sort(dim=-1, descending=True).values, rtol=1e-6, atol=1e-9)
    assert summary["kept_importance"]["1.0"]["heads"] == pytest.approx(1.0)
    assert summary["kept_importance"]["0.25"]["neurons"] >= 0.25  # the best quarter holds at least a quarter


# --- routing: batched == per sample, grouping, knob, cost -------------------------------------------


@pytest.mark.parametrize("shrink", [True, False])
def test_batched_equals_per_sample(shrink):
    model = perturb_private_norms(decisive_router(convert(shrink_residual=shrink)))
    batch = batch_of(24, seed=5)
    lengths = batch["attention_mask"].sum(1).tolist()
    used = set()
    for knob in (0.3, 0.5, 0.7):
        model.set_knob(knob)
        with torch.no_grad():
            together = model(**batch)
            alone = [model(**{k: v[i : i + 1, :n] for k, v in batch.items()}) for i, n in enumerate(lengths)]
        torch.testing.assert_close(together.logits, torch.cat([o.logits for o in alone]), atol=1e-5, rtol=1e-5)
        assert torch.equal(together.extras["width_pct"], torch.cat([o.extras["width_pct"] for o in alone])), knob
        assert torch.equal(together.flops, torch.cat([o.flops for o in alone])), knob
        # and each sample's logits are those of its width run on it alone
        for i, n in enumerate(lengths):
            w = [25, 50, 100].index(int(together.extras["width_pct"][i]))
            with torch.no_grad():
                ref = model(**{k: v[i : i + 1, :n] for k, v in batch.items()}, width=w).logits
            torch.testing.assert_close(together.logits[i : i + 1], ref, atol=1e-5, rtol=1e-5)
        used |= set(together.extras["width_pct"].tolist())
        assert len(set(together.extras["width_pct"].tolist())) > 1, knob
    assert used == {25, 50, 100}


def test_each_width_group_runs_once_on_its_rows_cut_to_their_longest_length(monkeypatch):
    model = decisive_router(convert())
    batch = batch_of(24, seed=6)
    seen = []
    real = model._suffix
    monkeypatch.setattr(model, "_suffix", lambda h, bias, i: seen.append((i, tuple(h.shape[:2]))) or real(h, bias, i))
    with torch.no_grad():
        out = model(**batch)
    lengths = batch["attention_mask"].sum(1)
    expected = []
    for i, pct in enumerate((25, 50, 100)):
        on = out.extras["width_pct"] == pct
        if on.any():
            expected.append((i, (int(on.sum()), int(lengths[on].max()))))
    assert seen == expected and len(expected) > 1


def test_ordinal_routing_picks_the_smallest_width_that_clears_the_threshold():
    model = convert()
    z = torch.tensor([[2.0, 3.0, -9.0], [-1.0, 0.5, 4.0], [-3.0, -2.0, 5.0], [40.0, 40.0, 0.0]])  # logits
    p = torch.sigmoid(z.double())  # rows: 0.88/0.95, 0.27/0.62, 0.05/0.12, 1/1
    assert model.route(z, 0.5).tolist() == [0, 1, 2, 0]
    assert model.route(z, 0.9).tolist() == [1, 2, 2, 0]
    assert model.route(z, 0.96).tolist() == [2, 2, 2, 0]  # the largest width takes the rest
    assert model.route(z, 1 - 1e-12).tolist() == [2, 2, 2, 0]  # logit space: no float32 saturation
    assert model.route(z, None).tolist() == model.route(z, 0.5).tolist()  # None: the router's own decision
    assert model.route(z, ALL_SMALLEST).tolist() == [0] * 4 and model.route(z, -3.0).tolist() == [0] * 4
    assert model.route(z, ALL_FULL).tolist() == [2] * 4 and model.route(z, 7.0).tolist() == [2] * 4
    for t in (0.1, 0.5, 0.9):  # the rule itself, by brute force
        expected = [next((i for i in range(2) if p[r, i] >= t), 2) for r in range(4)]
        assert model.route(z, t).tolist() == expected, t


def test_cost_is_monotone_in_the_threshold_and_the_sweep_spans_smallest_to_full():
    model = decisive_router(convert())
    batch = batch_of(32, seed=7)
    with torch.no_grad():
        previous, means, used = None, [], set()
        for knob in model.knob_values():
            model.set_knob(knob)
            out = model(**batch)
            if previous is not None:
                assert (out.flops >= previous).all(), knob  # per sample, not only on average
            previous = out.flops
            means.append(float(out.flops.mean()))
            used |= set(out.extras["width_pct"].tolist())
            if knob == ALL_SMALLEST:
                assert (out.extras["width_pct"] == 25).all()
            if knob == ALL_FULL:
                assert (out.extras["width_pct"] == 100).all()
    assert len(set(means)) >= 4 and used == {25, 50, 100}  # the middle width is reachable


@pytest.mark.parametrize("shrink", [True, False])
def test_flops_are_the_closed_form_of_what_ran(shrink):
    model = decisive_router(convert(shrink_residual=shrink, router_hidden=16))
    batch = batch_of(20, seed=8)
    lengths = batch["attention_mask"].sum(1).tolist()
    with torch.no_grad():
        out = model(**batch)
    assert len(set(out.extras["width_pct"].tolist())) > 1

    def shared(n: int) -> int:  # layer 1 at full width, then the router: token mean, D -> 16 -> 3
        return block_flops(n, D, HEADS, FF) + n * D + 2 * D * 16 + 2 * 16 * 3

    def suffix(n: int, w: int) -> int:  # layers 2 and 3 at width w, pooler (d_w -> D), classifier
        heads, d_w, ff_w = SHAPES[shrink][w]
        return 2 * block_flops(n, d_w, heads, ff_w) + 2 * d_w * D + 2 * D * C

    for i, n in enumerate(lengths):
        w = [25, 50, 100].index(int(out.extras["width_pct"][i]))
        assert float(out.flops[i]) == shared(n) + suffix(n, w), (i, w)
    model.train()
    every = model(**batch)  # training with no width given: every width ran on every sample
    assert every.flops.tolist() == [float(shared(n) + sum(suffix(n, w) for w in range(3))) for n in lengths]


# --- training: gradients, loss, labels, plan, fit ----------------------------------------------------


def test_router_loss_trains_the_router_and_the_layers_below_it_only():
    model = decisive_router(convert()).train()
    batch = batch_of(8, seed=9)
    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]] * 4)
    out = model(**batch, width=0, router_targets=targets)
    torch.testing.assert_close(out.aux_loss, F.binary_cross_entropy_with_logits(out.extras["router_logits"], targets))
    out.aux_loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if n.startswith("router."))
    assert grads["encoder.blocks.0.ffn.up.weight"].abs().sum() > 0  # not detached: layers 1..k learn to route
    assert all(grads[n] is None for n in grads if n.startswith(("encoder.blocks.1.", "encoder.blocks.2.", "classifier")))
    # and the task loss never reaches the router
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(**batch, width=1).logits, torch.zeros(8, dtype=torch.int64)).backward()
    assert all(p.grad is None for p in model.router.parameters())


def test_one_width_per_batch_trains_that_width_only():
    model = convert().train()
    out = model(**batch_of(6, seed=10), width=0)
    model.loss(out, torch.zeros(6, dtype=torch.int64)).backward()
    assert model.width_norms[0].ffn[1].weight.grad is not None and model.width_norms[1].ffn[1].weight.grad is None
    assert (out.extras["width_pct"] == 25).all()


def test_loss_sums_every_width_with_the_narrow_ones_distilled_from_the_full_one():
    labels = torch.tensor([0, 2, 1, 1])
    for alpha in (1.0, 0.3, 0.0):
        model = convert(router_weight=0.5, distill_weight=alpha).train()
        out = model(**batch_of(4, seed=11))
        z = out.extras["width_logits"]  # [3, 4, C]
        teacher = F.softmax(z[-1].detach(), -1)
        kl = [F.kl_div(F.log_softmax(zi, -1), teacher, reduction="batchmean") for zi in z[:-1]]
        narrow = sum(alpha * k + (1 - alpha) * F.cross_entropy(zi, labels) for k, zi in zip(kl, z[:-1]))
        expected = F.cross_entropy(z[-1], labels) + narrow + out.aux_loss
        torch.testing.assert_close(model.loss(out, labels), expected)
        # the full width learns from the labels only: the distillation term does not reach its logits
        g = torch.autograd.grad(model.loss(out, labels), z)[0]
        torch.testing.assert_close(g[-1], torch.autograd.grad(F.cross_entropy(z[-1], labels), z)[0][-1])
    warmup = torch.tensor([[0.0, 0.0, 1.0]]).expand(4, 3)
    torch.testing.assert_close(out.aux_loss, 0.5 * F.binary_cross_entropy_with_logits(out.extras["router_logits"], warmup))


def test_ordinal_labels_are_monotone_and_follow_each_widths_last_w_scores():
    intervals = ((0.8, 1.0), (0.5, 0.8), (0.0, 0.5))  # lower ends 0.8 / 0.5 / 0
    c = torch.tensor([  # [W=2, n_w=3, n=6]
        [[0.90, 0.90, 0.60, 0.95, 0.30, float("nan")], [0.90, 0.60, 0.70, 0.20, 0.40, 0.9], [0.9, 0.9, 0.9, 0.9, 0.1, 0.9]],
        [[0.85, 0.70, 0.55, 0.95, 0.20, 0.90], [0.95, 0.60, 0.40, 0.30, 0.45, 0.9], [0.9, 0.9, 0.9, 0.9, 0.1, 0.9]],
    ])
    got = ordinal_labels(c, intervals)
    expected = torch.tensor([
        [1, 1, 1],  # width 0.25 sure in both epochs
        [0, 1, 1],  # 0.25 unsure once (0.70 < 0.8); 0.5 right twice
        [0, 0, 1],  # 0.5 wrong in the last epoch
        [1, 1, 1],  # 0.25 sure although 0.5 is not: allowed at 0.25 -> allowed at every larger width
        [0, 0, 1],  # the largest width is always allowed
        [0, 1, 1],  # not scored in an epoch (NaN): not allowed at that width
    ], dtype=torch.bool)
    assert torch.equal(got, expected)
    assert torch.equal(ordinal_labels(c[1:], intervals)[:, 0], torch.tensor([True, False, False, True, False, True]))


def test_fit_trains_every_width_scores_hardness_fits_the_router_and_resumes(tmp_path):
    intervals = ((0.4, 1.0), (0.35, 0.4), (0.0, 0.35))
    model = convert(window=2, importance_samples=16, confidence_intervals=intervals, router_fit_epochs=5)
    train, val = encoded(40, seed=12), encoded(16, seed=13)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-3, warmup_ratio=0.1, eval_batch_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = recipe.fit(model, train, val, cfg, tmp_path / "run", progress=False)
    assert not model.training
    epochs = summary["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and summary["steps"] == 15  # 5 batches of 8 per epoch
    assert all(len(e["train_ce_per_width"]) == 3 for e in epochs)
    # every width trained: each private norm set moved
    for i in range(2):
        assert not torch.equal(before[f"width_norms.{i}.ffn.1.weight"], model.state_dict()[f"width_norms.{i}.ffn.1.weight"])
    # the hardness history: every sample at every width, each epoch, in eval mode
    history = load_file(str(tmp_path / "run" / "history.safetensors"))["history"]  # [epochs, n_w, n]
    assert history.shape == (3, 3, 40) and torch.isfinite(history).all() and ((history > 0) & (history < 1)).all()
    best = summary["best_epoch"]
    if best == 3:  # the kept model's own scores are the last row of the history
        p = model.width_pass(train, 8)["logits"].softmax(-1)
        torch.testing.assert_close(p.gather(2, train.labels[None, :, None].expand(3, -1, 1))[..., 0], history[2])
    # the router: fitted on the last W = 2 scores up to the kept epoch
    router = summary["router"]
    labels = ordinal_labels(history[max(0, best - 2) : best], intervals)
    assert router["window_epochs"] == min(2, best) and router["label_share"] == labels.float().mean(0).tolist()
    assert "held_out_bce" in router and "held_out_prior_bce" in router
    assert json.loads((tmp_path / "run" / "router.json").read_text()) == router
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k.startswith("router."))
    assert summary["best_val_score"] == max(e["val_score"] for e in epochs)
    assert "kept_importance" in summary["reorder"]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    reloaded = load_model(tmp_path / "run" / "best")  # best/ holds the fitted router
    assert all(torch.equal(saved[k], v) for k, v in reloaded.state_dict().items())
    # rerunning the finished run resumes (nothing left to train) and ends with the same model
    again = convert(window=2, importance_samples=16, confidence_intervals=intervals, router_fit_epochs=5)
    s2 = recipe.fit(again, train, val, cfg, tmp_path / "run", progress=False)
    assert s2["resumed_from_step"] == summary["steps"] and s2["reorder"] == summary["reorder"]
    assert all(torch.equal(saved[k], v) for k, v in again.state_dict().items())


def test_fit_router_learns_a_separable_rule_and_leaves_the_rest_alone():
    model = convert(router_hidden=16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, D, generator=g)
    y = torch.stack([x[:, 0] > 0.5, x[:, 0] > -0.5, torch.ones(256, dtype=torch.bool)], dim=1)  # monotone
    others = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("router.")}
    losses = train_router(model, x, y, epochs=30, lr=1e-2, batch_size=32)["fit"]
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        routed = model.route(model.router(x), 0.5)
    truth = 2 - y[:, :2].int().sum(1)  # the smallest allowed width
    assert (routed == truth).double().mean() > 0.9
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in others.items())
    assert train_router(model, x, y, epochs=30, lr=1e-2, batch_size=32)["fit"] == losses  # a seeded fresh start
    # early stopping: noisy held-out labels; the kept router is the epoch with the lowest held-out BCE
    hx = torch.randn(64, D, generator=g)
    hy = torch.stack([torch.rand(64, generator=g) > 0.5, hx[:, 0] > -0.5, torch.ones(64, dtype=torch.bool)], dim=1)
    h = train_router(model, x, y, epochs=12, lr=1e-2, batch_size=32, held_out=(hx, hy))
    assert len(h["held_out"]) == 12 and min(h["held_out"]) < h["held_out"][-1]  # it overfits, then the best is kept
    with torch.no_grad():
        kept = F.binary_cross_entropy_with_logits(model.router(hx)[:, :-1], hy[:, :-1].float())
    assert float(kept) == pytest.approx(min(h["held_out"]), abs=1e-6)


# --- evaluation and checkpoints ---------------------------------------------------------------------


def forward_per_knob(model, enc: Encoded, knob, batch_size: int):
    model.set_knob(knob)
    pred = torch.empty(len(enc), dtype=torch.int64)
    cost = torch.empty(len(enc), dtype=torch.float64)
    pct = torch.empty(len(enc), dtype=torch.int64)
    with torch.no_grad():
        for b in eval_batches(enc, batch_size):
            out = model(b.input_ids, b.attention_mask)
            pred[b.index], cost[b.index], pct[b.index] = out.logits.argmax(-1), out.flops, out.extras["width_pct"]
    return pred, cost, pct


def test_offline_sweep_equals_the_real_forward():
    model = perturb_private_norms(decisive_router(convert()))
    enc = encoded(40, seed=14)
    knobs = model.knob_values()
    swept = model.sweep_offline(enc, knobs, batch_size=16)
    assert [p.knob for p in swept] == knobs
    mixed = 0
    for point in swept:
        pred, cost, pct = forward_per_knob(model, enc, point.knob, batch_size=16)
        assert torch.equal(point.predictions, pred), point.knob
        assert torch.equal(point.flops, cost), point.knob
        assert torch.equal(point.extras["width_pct"], pct), point.knob
        mixed += len(set(pct.tolist())) > 1
    assert mixed >= 3
    assert len(swept[0].extras["width_accuracy"]) == 3


def test_save_and_reload_at_any_knob(tmp_path):
    model = perturb_private_norms(decisive_router(convert()))
    reorder(model, encoded(16, seed=15), batch_size=8)
    perturb_private_norms(model, seed=3)
    model.set_knob(0.5)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m", expect_method="sharcs")
    assert loaded.knob == 0.5
    batch = batch_of(16, seed=16)
    for knob in (ALL_SMALLEST, 0.3, 0.5, 0.7, ALL_FULL):
        model.set_knob(knob)
        loaded.set_knob(knob)
        with torch.no_grad():
            a, b = model(**batch), loaded(**batch)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.flops, b.flops)
        assert torch.equal(a.extras["width_pct"], b.extras["width_pct"])


# --- the command line -----------------------------------------------------------------------------------


QUIET = ["--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def dense_run(tiny_hf_dir, user_csv, tmp_path_factory):
    """`adaptinf finetune` of the tiny checkpoint (2 heads) on the user file."""
    run = tmp_path_factory.mktemp("dense")
    assert main(["finetune", "--model", str(tiny_hf_dir), "--data", str(user_csv), "--text-column", "review",
                 "--label-column", "verdict", "--out", str(run), "--epochs", "1", "--batch-size", "32",
                 "--max-length", "32", *QUIET]) == 0
    return run


def test_convert_trains_then_evaluate_sweeps(dense_run, tmp_path):
    out = tmp_path / "sharcs"
    assert main(["convert", str(dense_run / "best"), "--method", "sharcs", "--set", "widths=[0.5,1.0]",
                 "--set", "confidence_intervals=[[0.4,1.0],[0.0,0.4]]", "--set", "window=1", "--set", "router_hidden=8",
                 "--set", "importance_samples=16", "--out", str(out), "--epochs", "2", "--batch-size", "8",
                 "--max-train-samples", "32", *QUIET]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "sharcs" and cfg["method_config"]["widths"] == [0.5, 1.0]
    training = cfg["extra"]["training"]
    assert training["n_train"] == 32 and training["best_epoch"] in (1, 2) and len(training["epochs"]) == 2
    assert training["router"]["held_out"] == 3 and len(training["router"]["label_share"]) == 2  # a tenth of 32 held out
    model = load_model(out)
    assert model.method == "sharcs" and model.tokenizer is not None
    pts = tmp_path / "points"
    assert main(["evaluate", str(out), "--split", "validation", "--out", str(pts), *QUIET]) == 0
    points = json.loads((pts / "points.json").read_text())
    assert [p["knob"] for p in points] == model.knob_values()
    gflops = [p["gflops"] for p in points]
    assert gflops == sorted(gflops) and gflops[0] < gflops[-1]
    assert points[0]["extras"]["shares"]["width_pct"] == {"50": 1.0}
    assert points[-1]["extras"]["shares"]["width_pct"] == {"100": 1.0}
