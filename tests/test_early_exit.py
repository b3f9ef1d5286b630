"""Early exit family (ee, sweet, multi-model): conversion, exit placement by depth, the exit decision
with batched compaction, cost, SWEET's gradient separation, distillation from the last exit, the
offline sweep, calibration (on held-out training samples), and the `convert` command."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch, make_tiny_dense, make_tiny_spec

import adaptinf
from adaptinf.checkpoint import save_model
from adaptinf.registry import load_model
from adaptinf.cli import main
from adaptinf.data import Encoded, eval_batches
from adaptinf.evaluate import evaluate_model
from adaptinf.methods.dense import DenseClassifier
from adaptinf.methods.early_exit import (
    ENTROPY_NEVER,
    MAX_SOFTMAX_NEVER,
    EarlyExitClassifier,
    EarlyExitConfig,
    MultiExitClassifier,
    fit_temperature,
    paper_exits,
)
from adaptinf.recipes.early_exit import fit as fit_exits
from adaptinf.recipes.early_exit import split_calibration
from adaptinf.registry import get_method, needs_training
from adaptinf.settings import TrainConfig

VARIANTS = ["ee", "sweet", "multi-model"]
POLICIES = ["max-softmax", "entropy", "patience"]
NEVER = {"max-softmax": MAX_SOFTMAX_NEVER, "entropy": ENTROPY_NEVER}
VOCAB, D, FF, C, LAYERS = 60, 16, 32, 3, 3


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_dense(seed: int = 0, layers: int = LAYERS) -> DenseClassifier:
    return make_tiny_dense(seed, hidden=D, heads=2, ffn=FF, layers=layers, vocab_size=VOCAB)


def tiny_spec(layers: int):
    spec = make_tiny_spec()
    return dataclasses.replace(spec, encoder=dataclasses.replace(spec.encoder, num_hidden_layers=layers))


def convert(name: str, dense: DenseClassifier, **config) -> MultiExitClassifier:
    cls = get_method(name)
    return cls.from_dense(dense, EarlyExitConfig(classifier_dropout=0.0, **config)).eval()


def exit_heads(model: MultiExitClassifier) -> list[tuple[torch.nn.Linear, torch.nn.Linear]]:
    """(pooler, classifier) of every exit."""
    if hasattr(model, "heads"):
        return [(h.pooler, h.classifier) for h in model.heads]
    return [(m.encoder.pooler.dense, m.classifier) for m in model.models]


def sharpen(model: MultiExitClassifier, seed: int = 1, std: float = 1.5) -> MultiExitClassifier:
    """Give every exit its own random head with spread-out features and confident logits, so that
    exits disagree and confidence varies from sample to sample."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pooler, classifier in exit_heads(model):
            pooler.weight.copy_(torch.randn(pooler.weight.shape, generator=g) / math.sqrt(D) * 3)
            classifier.weight.copy_(torch.randn(classifier.weight.shape, generator=g) * std)
            classifier.bias.zero_()
    return model


def batch_of(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 25, (n,), generator=g).tolist()
    return make_batch(lengths, VOCAB, seed)


def encoded(n: int, seed: int) -> Encoded:
    b = batch_of(n, seed)
    ids = [row[:m].tolist() for row, m in zip(b["input_ids"], b["attention_mask"].sum(1))]
    labels = torch.randint(0, C, (n,), generator=torch.Generator().manual_seed(seed + 1))
    return Encoded(ids, labels)


def mixed_knobs(model: MultiExitClassifier, batch: dict) -> list[float]:
    """Knob values that split the batch between exits, midway between observed confidences (so no
    sample sits on a threshold)."""
    if model.config.policy == "patience":
        return [1.0, 2.0, float(model.num_exits)]
    with torch.no_grad():
        z = model.all_exit_logits(**batch)[0] / model.temperature[0]  # [b, C]
    p = z.softmax(-1)
    score = p.amax(-1) if model.config.policy == "max-softmax" else -(p * p.log()).sum(-1)
    s = score.sort().values
    mids = (s[1:] + s[:-1]) / 2
    return [float(mids[int(q * (len(mids) - 1))]) for q in (0.2, 0.5, 0.8)]


# --- registry and configuration --------------------------------------------------------------------


def test_registered_with_a_default_config():
    assert {"ee", "sweet", "multi-model"} <= set(adaptinf.list_methods())
    model = get_method("sweet").from_dense(tiny_dense(), get_method("sweet").Config())
    assert model.exit_layers == (1, 2, 3) and model.knob_name == "threshold" and needs_training(model.method)
    assert convert("ee", tiny_dense(), policy="patience").knob_name == "patience"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"exits": (3, 1)}, "increasing"),
        ({"exits": (1, 1, 3)}, "increasing"),
        ({"exits": (0, 3)}, ">= 1"),
        ({"exits": "1,x"}, "layer numbers"),
        ({"exits": (1.5, 3)}, "integers"),
        ({"policy": "confidence"}, "policy must be one of"),
        ({"classifier_dropout": 1.0}, "classifier_dropout"),
        ({"exits": "papers"}, "layer numbers such as .* or one of"),
        ({"distill_weight": -0.5}, "distill_weight must be a number >= 0"),
        ({"distill_temperature": 0.0}, "distill_temperature must be a number > 0"),
        ({"calibration": "test"}, "calibration must be one of"),
        ({"calibration_fraction": 0.0}, "calibration_fraction must be in"),
        ({"calibration_fraction": 0.5}, "calibration_fraction must be in"),
    ],
)
def test_config_rejects_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        EarlyExitConfig(**fields)


def test_config_accepts_cli_spellings_and_round_trips():
    assert EarlyExitConfig(exits="1,3").exits == (1, 3) == EarlyExitConfig(exits=[1, 3]).exits
    assert EarlyExitConfig(exits=3).exits == (3,)
    cfg = EarlyExitConfig(exits=(1, 3), policy="entropy")
    assert EarlyExitConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(("layers", "want"), [(1, (1,)), (2, (1, 2)), (3, (1, 2, 3)), (4, (1, 2, 4)),
                                             (6, (1, 2, 3, 6)), (12, (1, 4, 6, 12)), (24, (2, 8, 12, 24))])
def test_paper_placement_scales_sweets_exits_to_depth(layers, want):
    """SWEET's exits 1, 4, 6, 12 of 12 as fractions of the depth, rounded up, repeats dropped."""
    assert paper_exits(layers) == want
    spec = tiny_spec(layers)
    assert get_method("ee")(spec, EarlyExitConfig(exits="paper")).exit_layers == want
    # "auto" (the default): the paper's placement for sweet, every layer for ee and multi-model
    assert get_method("sweet")(spec, EarlyExitConfig()).exit_layers == want
    every = tuple(range(1, layers + 1))
    assert get_method("ee")(spec, EarlyExitConfig()).exit_layers == every
    assert get_method("multi-model")(spec, EarlyExitConfig(exits="every")).exit_layers == every


def test_placement_words_round_trip_and_old_configs_keep_their_exits():
    assert EarlyExitConfig(exits="every").exits == () == EarlyExitConfig(exits=" Every ").exits
    assert EarlyExitConfig(exits="paper").exits == "paper" and EarlyExitConfig().exits == "auto"
    for cfg in (EarlyExitConfig(exits="paper", distill_weight=1.0), EarlyExitConfig()):
        assert EarlyExitConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # a config saved before placement words, distillation and held-out calibration: exits [] is every
    # layer (for sweet too), the new fields take their defaults
    old = EarlyExitConfig.from_dict({"exits": [], "policy": "max-softmax", "classifier_dropout": 0.1, "pooling": "mean"})
    assert get_method("sweet")(tiny_spec(6), old).exit_layers == (1, 2, 3, 4, 5, 6)
    assert old.distill_weight == 0.0 and old.calibration == "holdout"


def test_exits_are_checked_against_the_model():
    with pytest.raises(ValueError, match=r"must include the last layer \(3\).*\[1, 2, 3\]"):
        convert("ee", tiny_dense(), exits=(1, 2))
    with pytest.raises(ValueError, match="name layer 5, but the model has 3 layers"):
        convert("multi-model", tiny_dense(), exits=(1, 5))
    assert convert("multi-model", tiny_dense(), exits=(1, 3)).exit_layers == (1, 3)


def test_knob_is_validated():
    model = convert("ee", tiny_dense(), policy="patience")
    for bad in (1.5, 0, "2", float("nan"), float("inf")):
        with pytest.raises(ValueError, match="knob|number"):
            model.set_knob(bad)
    model.set_knob(2.0)
    assert model.knob_values() == [1.0, 2.0, 3.0]
    # refining a jump in the curve: an integer patience between, or none
    assert model.knob_between(1.0, 2.0) is None and model.knob_between(1.0, 3.0) == 2.0
    assert convert("ee", tiny_dense()).knob_between(0.5, 0.7) == pytest.approx(0.6)
    ms = convert("ee", tiny_dense()).knob_values()
    assert ms[0] == pytest.approx(1 / C, abs=1e-6) and ms[-1] == MAX_SOFTMAX_NEVER and len(ms) >= 20
    ent = convert("ee", tiny_dense(), policy="entropy").knob_values()
    assert ent[0] == pytest.approx(math.log(C), abs=1e-6) and ent[-1] == ENTROPY_NEVER


# --- correctness at full budget -------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("policy", POLICIES)
def test_fresh_conversion_reproduces_the_dense_model(name, policy):
    dense = tiny_dense()
    model = convert(name, dense, policy=policy, pooling="cls")  # the dense model's pooling
    batch = batch_of(12, seed=2)
    never = NEVER.get(policy, float(model.num_exits))
    with torch.no_grad():
        ref = dense(**batch)
        full = model(**batch)
        model.set_knob(never)
        late = model(**batch)
    torch.testing.assert_close(full.logits, ref.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(late.logits, ref.logits, rtol=0, atol=1e-6)
    assert (late.extras["exit"] == model.num_exits - 1).all()
    # every exit head starts as the dense head, so the last exit's cost = dense + the other heads
    head = 2 * D * D + 2 * D * C
    extra = (model.num_exits - 1) * head if name != "multi-model" else None
    if extra is not None:
        torch.testing.assert_close(late.flops, ref.flops + extra, rtol=0, atol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_a_threshold_that_never_exits_gives_the_final_exit(name):
    model = sharpen(convert(name, tiny_dense(), exits=(1, 3)))
    batch = batch_of(16, seed=3)
    model.set_knob(MAX_SOFTMAX_NEVER)
    with torch.no_grad():
        out = model(**batch)
        final = model.all_exit_logits(**batch)[-1]
    torch.testing.assert_close(out.logits, final, rtol=0, atol=1e-6)
    assert (out.extras["exit"] == 1).all()
    model.set_knob(1 / C)  # every max-softmax reaches 1/C: everything leaves at the first exit
    with torch.no_grad():
        assert (model(**batch).extras["exit"] == 0).all()


# --- batched compaction == per-sample execution ----------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("policy", POLICIES)
def test_batched_equals_per_sample(name, policy):
    model = sharpen(convert(name, tiny_dense(), policy=policy))
    with torch.no_grad():
        model.temperature.copy_(torch.tensor([0.7, 1.4, 1.0]))
    batch = batch_of(32, seed=4)
    lengths = batch["attention_mask"].sum(1).tolist()
    mixed = False
    for knob in mixed_knobs(model, batch):
        model.set_knob(knob)
        with torch.no_grad():
            together = model(**batch)
            alone = [model(**{k: v[i : i + 1, :n] for k, v in batch.items()}) for i, n in enumerate(lengths)]
        torch.testing.assert_close(together.logits, torch.cat([o.logits for o in alone]), atol=1e-5, rtol=1e-5)
        assert torch.equal(together.extras["exit"], torch.cat([o.extras["exit"] for o in alone])), knob
        assert torch.equal(together.flops, torch.cat([o.flops for o in alone])), knob
        mixed |= len(set(together.extras["exit"].tolist())) > 1
    assert mixed, "the knobs should send samples to different exits"


@pytest.mark.parametrize("name", ["ee", "multi-model"])
def test_only_continuing_rows_run_on_and_padding_is_cut(name):
    """Compaction: after exit 0, the next segment sees only the rows that did not exit, padded to
    the longest of them (padded execution), or only their real tokens (packed, the default)."""
    model = sharpen(convert(name, tiny_dense(), exits=(1, 3)))
    batch = batch_of(32, seed=5)
    model.set_knob(mixed_knobs(model, batch)[1])
    lengths = batch["attention_mask"].sum(1)
    for packed in (False, True):
        model.set_packed(packed)
        seen = []
        target = model.encoder.blocks[1] if name == "ee" else model.models[1].encoder.embeddings
        handle = target.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
        try:
            with torch.no_grad():
                out = model(**batch)
        finally:
            handle.remove()
        on = out.extras["exit"] == 1
        assert 0 < int(on.sum()) < 32
        if packed and name == "ee":  # the block ran on the continuing rows' real tokens [T, d]
            assert seen == [(int(lengths[on].sum()), D)]
        else:  # the padded batch of continuing rows (Multi-Model's embeddings always see ids [m, s])
            assert [x[:2] for x in seen] == [(int(on.sum()), int(lengths[on].max()))]


# --- cost -------------------------------------------------------------------------------------------


def block_flops(n: int) -> int:
    """One block at real length n, by hand: q/k/v, scores and weighted sum, output, FFN up and down."""
    return 2 * n * D * 3 * D + 2 * 2 * n * n * D + 2 * n * D * D + 2 * n * D * FF + 2 * n * FF * D


HEAD_CLS = 2 * D * D + 2 * D * C  # pooler + classifier


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("name", VARIANTS)
def test_flops_are_the_executed_layers_and_heads(name, pooling):
    model = sharpen(convert(name, tiny_dense(), exits=(1, 2, 3), pooling=pooling))
    batch = batch_of(24, seed=6)
    lengths = batch["attention_mask"].sum(1).tolist()
    model.set_knob(mixed_knobs(model, batch)[1])
    with torch.no_grad():
        out = model(**batch)
        model.set_knob(None)
        full = model(**batch)
    assert len(set(out.extras["exit"].tolist())) > 1
    for n, e, got, got_full in zip(lengths, out.extras["exit"].tolist(), out.flops.tolist(), full.flops.tolist()):
        head = HEAD_CLS + (n * D if pooling == "mean" else 0)  # mean pooling: one add per token state element
        if name == "multi-model":  # every model on the way, each from the input: 1, then 2, then 3 layers
            expected = sum((j + 1) * block_flops(n) + head for j in range(e + 1))
            expected_full = sum((j + 1) * block_flops(n) + head for j in range(3))
        else:
            expected = (e + 1) * block_flops(n) + (e + 1) * head
            expected_full = 3 * block_flops(n) + 3 * head
        assert got == expected and got_full == expected_full
    assert out.flops.dtype == torch.float64


# --- training ---------------------------------------------------------------------------------------


def grads_after(model: MultiExitClassifier, exit_index: int) -> dict[str, bool]:
    """Which parameters get a non-zero gradient from the loss of one exit alone."""
    model.train().zero_grad(set_to_none=True)
    out = model(**batch_of(8, seed=7))
    F.cross_entropy(out.extras["exit_logits"][exit_index], torch.arange(8) % C).backward()
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()}


def reached(grads: dict[str, bool], prefix: str) -> bool:
    hits = [v for n, v in grads.items() if n.startswith(prefix)]
    assert hits, prefix
    return any(hits)


def test_sweet_trains_each_block_only_from_the_next_exit():
    model = convert("sweet", tiny_dense(), exits=(1, 3))
    g = grads_after(model, 1)  # exit after layer 3: blocks 1 and 2 (0-based) only
    assert not reached(g, "encoder.embeddings") and not reached(g, "encoder.blocks.0.")
    assert reached(g, "encoder.blocks.1.") and reached(g, "encoder.blocks.2.")
    assert not reached(g, "heads.0.") and reached(g, "heads.1.")
    g = grads_after(model, 0)
    assert reached(g, "encoder.embeddings") and reached(g, "encoder.blocks.0.")
    assert not reached(g, "encoder.blocks.1.") and not reached(g, "heads.1.")


def test_ee_trains_every_block_below_each_exit():
    model = convert("ee", tiny_dense(), exits=(1, 3))
    g = grads_after(model, 1)
    assert all(reached(g, p) for p in ("encoder.embeddings", "encoder.blocks.0.", "encoder.blocks.2.", "heads.1."))
    assert not reached(g, "heads.0.")


def test_multi_model_sub_models_train_independently():
    model = convert("multi-model", tiny_dense(), exits=(1, 3))
    g = grads_after(model, 0)
    assert reached(g, "models.0.") and not reached(g, "models.1.")


@pytest.mark.parametrize("name", VARIANTS)
def test_loss_is_the_sum_of_exit_losses(name):
    model = sharpen(convert(name, tiny_dense()))
    batch, y = batch_of(6, seed=8), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        out = model(**batch)
    expected = sum(F.cross_entropy(z, y) for z in out.extras["exit_logits"])
    torch.testing.assert_close(model.loss(out, y), expected)
    torch.testing.assert_close(model.loss(out, y, reduction="sum"), 6 * expected)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("t", [1.0, 2.0])
def test_distillation_adds_kl_to_the_last_exit_to_every_earlier_exit(name, t):
    model = sharpen(convert(name, tiny_dense(), distill_weight=0.5, distill_temperature=t))
    batch, y = batch_of(6, seed=8), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        out = model(**batch)
    z = out.extras["exit_logits"]
    teacher = (z[-1] / t).softmax(-1)
    kl = [F.kl_div((zi / t).log_softmax(-1), teacher, reduction="batchmean") for zi in z[:-1]]
    expected = sum(F.cross_entropy(zi, y) for zi in z) + 0.5 * t * t * sum(kl)
    torch.testing.assert_close(model.loss(out, y), expected)
    torch.testing.assert_close(model.loss(out, y, reduction="sum"), 6 * expected)
    assert all(float(k) > 1e-3 for k in kl), "the exits disagree, so the term is not empty"


def loss_grads(model: MultiExitClassifier) -> dict[str, torch.Tensor]:
    model.train().zero_grad(set_to_none=True)
    out = model(**batch_of(8, seed=7))
    model.loss(out, torch.arange(8) % C).backward()
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["ee", "sweet"])
def test_distillation_targets_are_detached(name):
    """The last exit is a target only: its head (and, in SWEET, every block after the first segment)
    gets exactly the gradient it gets without distillation; the earlier exits' heads get another."""
    plain = sharpen(convert(name, tiny_dense(), exits=(1, 3)))
    distilled = sharpen(convert(name, tiny_dense(), exits=(1, 3), distill_weight=2.0, distill_temperature=2.0))
    for module in (plain, distilled):
        module.heads[0].dropout.p = module.heads[1].dropout.p = 0.0
    g0, g1 = loss_grads(plain), loss_grads(distilled)
    same = [n for n in g0 if n.startswith("heads.1.")]
    if name == "sweet":
        same += [n for n in g0 if n.startswith(("encoder.blocks.1.", "encoder.blocks.2."))]
    for n in same:
        torch.testing.assert_close(g1[n], g0[n], msg=n)
    assert not torch.allclose(g1["heads.0.classifier.weight"], g0["heads.0.classifier.weight"])
    block0 = "encoder.blocks.0.attention.q.weight"  # below the first exit: distillation reaches it in both
    assert not torch.allclose(g1[block0], g0[block0])


# --- offline sweep and evaluation --------------------------------------------------------------------


def forward_per_knob(model, enc: Encoded, knob, batch_size: int):
    n = len(enc)
    pred, cost, exits = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.int64)
    model.set_knob(knob)
    with torch.no_grad():
        for b in eval_batches(enc, batch_size):
            out = model(b.input_ids, b.attention_mask)
            pred[b.index], cost[b.index], exits[b.index] = out.logits.argmax(-1), out.flops, out.extras["exit"]
    return pred, cost, exits


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("policy", POLICIES)
def test_offline_sweep_equals_the_real_forward(name, policy):
    model = sharpen(convert(name, tiny_dense(), policy=policy))
    with torch.no_grad():
        model.temperature.copy_(torch.tensor([1.3, 0.8, 1.0]))
    enc = encoded(40, seed=9)
    knobs = model.knob_values()
    swept = model.sweep_offline(enc, knobs, batch_size=16)
    assert [p.knob for p in swept] == knobs
    mixed = 0
    for point in swept:
        pred, cost, exits = forward_per_knob(model, enc, point.knob, batch_size=16)
        assert torch.equal(point.predictions, pred), point.knob
        assert torch.equal(point.flops, cost), point.knob
        assert torch.equal(point.extras["exit"], exits), point.knob
        mixed += len(set(exits.tolist())) > 1
    assert mixed >= 1 if policy == "patience" else mixed >= 3


def test_evaluate_uses_the_offline_sweep(monkeypatch):
    model = sharpen(convert("ee", tiny_dense(), exits=(1, 3)))
    enc = encoded(30, seed=10)
    knobs = [0.4, 0.8, MAX_SOFTMAX_NEVER]
    calls = []
    real = model.all_exit_logits
    monkeypatch.setattr(model, "all_exit_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    points = evaluate_model(model, enc, "validation", batch_size=8, knobs=knobs, progress=False)
    assert len(calls) == math.ceil(30 / 8), "one pass over the split for the whole sweep"
    for p in points:
        pred, cost, _ = forward_per_knob(model, enc, p.knob, batch_size=8)
        assert p.accuracy == pytest.approx((pred == enc.labels).double().mean().item())
        assert p.gflops == pytest.approx(cost.mean().item() / 1e9)
        assert sum(p.extras["shares"]["exit"].values()) == pytest.approx(1.0)
        assert len(p.extras["exit_accuracy"]) == 2 and p.knob_name == "threshold"
    assert points[-1].extras["shares"]["exit"] == {"1": 1.0}
    assert points[0].gflops < points[-1].gflops
    json.dumps([p.to_dict() for p in points])


# --- calibration ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("true_t", [0.4, 0.97, 1.03, 2.5])
def test_temperature_minimises_nll(true_t):
    """Labels drawn from softmax(z / true_t): the fit finds the NLL minimum (near true_t), also when
    it lies just beside T = 1."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3000, C, generator=g) * 3
    y = torch.multinomial((z / true_t).softmax(-1), 1, generator=g).squeeze(1)
    t, before, after = fit_temperature(z, y)
    grid = torch.linspace(math.log(t) - 0.2, math.log(t) + 0.2, 801).exp()
    brute = min(float(F.cross_entropy(z.double() / s, y)) for s in grid)
    assert after <= brute + 1e-9 and after < before
    assert t == pytest.approx(true_t, rel=0.1)
    assert before == pytest.approx(float(F.cross_entropy(z.double(), y)))


def labelled_by(model: MultiExitClassifier, enc: Encoded, agree: float = 0.7) -> Encoded:
    """Labels that agree with the last exit's prediction on about `agree` of the samples."""
    z, _ = model.exit_logits(enc)
    g = torch.Generator().manual_seed(len(enc))
    noise = torch.randint(0, C, (len(enc),), generator=g)
    return Encoded(enc.ids, torch.where(torch.rand(len(enc), generator=g) < agree, z[-1].argmax(-1), noise))


@pytest.mark.parametrize("name", ["sweet", "multi-model"])
def test_calibration_is_fitted_on_the_split_given_and_saved(name, tmp_path):
    model = sharpen(convert(name, tiny_dense(), exits=(1, 3)), std=4.0)  # over-confident exits
    val, other = labelled_by(model, encoded(60, seed=11)), labelled_by(model, encoded(60, seed=12))
    report = model.calibrate(val, batch_size=16)
    assert all(a <= b + 1e-12 for a, b in zip(report["nll_after"], report["nll_before"]))
    assert any(a < b - 1e-3 for a, b in zip(report["nll_after"], report["nll_before"]))
    torch.testing.assert_close(model.temperature, torch.tensor(report["temperature"], dtype=torch.float32))
    z, _ = model.exit_logits(val, batch_size=16)
    for i, t in enumerate(report["temperature"]):  # a minimum of the NLL on *this* split
        nll = [float(F.cross_entropy(z[i].double() / (t * f), val.labels)) for f in (1 / 1.05, 1.0, 1.05)]
        assert nll[1] <= min(nll[0], nll[2]) + 1e-9
    t_val = model.temperature.clone()
    assert not torch.allclose(torch.tensor(model.calibrate(other)["temperature"], dtype=torch.float32), t_val)
    model.calibrate(val)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert torch.equal(loaded.temperature, model.temperature)
    batch = batch_of(16, seed=13)
    for knob in (0.5, 0.8, 0.95):
        model.set_knob(knob)
        loaded.set_knob(knob)
        with torch.no_grad():
            a, b = model(**batch), loaded(**batch)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.extras["exit"], b.extras["exit"])


def test_calibration_slice_is_seeded_disjoint_and_left_out_of_training():
    enc = encoded(100, seed=3)
    fit_part, calib = split_calibration(enc, 0.1, seed=0)
    assert (len(fit_part), len(calib)) == (90, 10)
    again = split_calibration(enc, 0.1, seed=0)
    assert again[1].ids == calib.ids and split_calibration(enc, 0.1, seed=1)[1].ids != calib.ids
    pairs = sorted(zip(map(tuple, fit_part.ids + calib.ids), torch.cat([fit_part.labels, calib.labels]).tolist()))
    assert pairs == sorted(zip(map(tuple, enc.ids), enc.labels.tolist()))
    assert len(split_calibration(encoded(3, seed=3), 0.01, seed=0)[1]) == 1  # at least one, and one left to train
    with pytest.raises(ValueError, match="calibration=validation"):
        split_calibration(encoded(1, seed=3), 0.05, seed=0)


@pytest.mark.parametrize("where", ["holdout", "validation"])
def test_recipe_fits_temperatures_on_the_held_out_slice(where, tmp_path):
    """The default fits the temperatures on training samples left out of training, not on the
    validation split that picks the threshold; "validation" keeps the old behaviour."""
    model = convert("ee", tiny_dense(), exits=(1, 3), calibration=where, calibration_fraction=0.25)
    train, val = encoded(40, seed=20), encoded(30, seed=21)
    cfg = TrainConfig(epochs=1, batch_size=16, save_every=100, log_every=100)
    with pytest.warns(UserWarning, match="held-out training samples") if where == "holdout" else _no_warning():
        summary = fit_exits(model, train, val, cfg, tmp_path / "train", progress=False)
    fit_part, calib = split_calibration(train, 0.25, cfg.seed)
    if where == "holdout":
        assert summary["calibration"] == "train-holdout"
        assert (summary["n_train"], summary["n_calibration"]) == (30, 10) and summary["steps"] == 2
    else:
        assert summary["calibration"] == "validation" and summary["n_calibration"] == 30 and summary["n_train"] == 40
        calib = val
    fitted = torch.tensor(summary["temperature"], dtype=torch.float32)
    torch.testing.assert_close(model.temperature, fitted)
    z, _ = model.exit_logits(calib)
    torch.testing.assert_close(fitted, torch.tensor([fit_temperature(z[i], calib.labels)[0] for i in range(2)],
                                                    dtype=torch.float32))


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- the command line ------------------------------------------------------------------------------------


QUIET = ["--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def dense_run(tiny_hf_dir, user_csv, tmp_path_factory):
    """`adaptinf finetune` of the tiny checkpoint on the user file (the task is recorded in best/)."""
    run = tmp_path_factory.mktemp("dense")
    assert main(["finetune", "--model", str(tiny_hf_dir), "--data", str(user_csv), "--text-column", "review",
                 "--label-column", "verdict", "--out", str(run), "--epochs", "1", "--batch-size", "32",
                 "--max-length", "32", *QUIET]) == 0
    return run


def test_convert_trains_then_evaluate_sweeps(dense_run, tmp_path):
    run, ee, quiet = dense_run, tmp_path / "ee", QUIET
    convert_cmd = ["convert", str(run / "best"), "--method", "ee", "--set", "exits=[1,2]", "--out", str(ee),
                   "--epochs", "1", "--batch-size", "16", "--max-train-samples", "32", *quiet]
    assert main(convert_cmd) == 0
    cfg = json.loads((ee / "config.json").read_text())
    training = cfg["extra"]["training"]
    assert cfg["method"] == "ee" and cfg["method_config"]["exits"] == [1, 2]
    assert cfg["extra"]["task"]["text_column"] == "review"  # the dense model's task, recorded again
    # 2 of the 32 samples held out to fit the temperatures (calibration_fraction 0.05)
    assert training["steps"] == 2 and training["n_train"] == 30 and training["n_calibration"] == 2
    assert training["calibration"] == "train-holdout" and len(training["temperature"]) == 2
    assert (ee / "train" / "last" / "state.json").is_file()
    before = load_model(ee).state_dict()
    assert any(not torch.equal(before[k], v) for k, v in
               load_model(run / "best").state_dict().items() if k.startswith("encoder.blocks"))
    # rerunning the finished command resumes (nothing left to train) and saves the same model
    assert main(convert_cmd) == 0
    assert json.loads((ee / "config.json").read_text())["extra"]["training"]["resumed_from_step"] == 2
    after = load_model(ee).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    pts = tmp_path / "points"
    assert main(["evaluate", str(ee), "--split", "validation", "--out", str(pts), *quiet]) == 0
    points = json.loads((pts / "points.json").read_text())
    model = load_model(ee)
    assert [p["knob"] for p in points] == model.knob_values()
    assert all(set(p["extras"]["shares"]["exit"]) <= {"0", "1"} for p in points)
    assert points[0]["extras"]["shares"]["exit"] == {"0": 1.0} and points[-1]["extras"]["shares"]["exit"] == {"1": 1.0}
    # --refine: extra thresholds where the cost jumps, decided on validation, the same ones on test
    refined = tmp_path / "refined"
    assert main(["evaluate", str(ee), "--split", "both", "--refine", "2", "--out", str(refined), *quiet]) == 0
    refined_pts = json.loads((refined / "points.json").read_text())
    val_knobs = [p["knob"] for p in refined_pts if p["split"] == "validation"]
    assert val_knobs == [p["knob"] for p in refined_pts if p["split"] == "test"] == sorted(val_knobs)
    assert set(model.knob_values()) <= set(val_knobs)

    batch = model.tokenizer(["a gorgeous, moving film", "dull"], return_tensors="pt", padding=True)
    for knob in (0.2, 0.6, 0.99, 3.0):
        model.set_knob(knob)
        with torch.no_grad():
            out = model(batch["input_ids"], batch["attention_mask"])
        assert out.logits.shape == (2, 3) and out.extras["exit"].shape == (2,)

    # bench times a model at one knob with DIR@KNOB, next to the dense reference, with FLOPs columns
    bench = tmp_path / "bench"
    assert main(["bench", str(run / "best"), f"{ee}@0.2", "--batch-sizes", "2", "--samples", "4", "--repeats", "1",
                 "--warmup", "0", "--out", str(bench), *quiet]) == 0
    rows = json.loads((bench / "bench.json").read_text())
    assert [r["case"] for r in rows] == ["dense", "ee:ee@0.2"]
    assert rows[1]["flops_reduction_vs_reference"] > 1 and rows[1]["realisation"] is not None
    assert main(["bench", str(run / "best"), f"{ee}@high", "--out", str(bench), *quiet]) == 2
    assert main(["bench", str(run / "best"), f"{run / 'best'}@0.5", "--out", str(bench), *quiet]) == 2  # no knob


def test_convert_multi_model_with_patience(dense_run, tmp_path):
    run, mm, quiet = dense_run, tmp_path / "mm", QUIET
    assert main(["convert", str(run / "best"), "--method", "multi-model", "--set", "policy=patience", "--out",
                 str(mm), "--epochs", "1", "--batch-size", "16", "--max-train-samples", "16", *quiet]) == 0
    model = load_model(mm)
    assert model.method == "multi-model" and model.knob_name == "patience" and model.exit_layers == (1, 2)
    assert main(["evaluate", str(mm), "--split", "test", "--out", str(tmp_path / "p"), *quiet]) == 0
    points = json.loads((tmp_path / "p" / "points.json").read_text())
    assert [p["knob"] for p in points] == [1.0, 2.0] and points[0]["knob_name"] == "patience"
    assert points[0]["gflops"] < points[1]["gflops"]


def test_selection_score_is_mean_exit_accuracy():
    """finetune keeps the epoch best for every exit, not only the last one."""
    torch.manual_seed(0)
    dense = DenseClassifier(make_tiny_spec())
    model = EarlyExitClassifier.from_dense(dense, EarlyExitConfig())
    g = torch.Generator().manual_seed(0)
    enc = Encoded([torch.randint(1, 1000, (n,), generator=g).tolist() for n in (3, 9, 17, 5, 30, 2)],
                  torch.tensor([0, 1, 1, 0, 1, 0]))
    logits, _ = model.exit_logits(enc)
    per_exit = (logits.argmax(-1) == enc.labels).double().mean(dim=1)
    assert model.selection_score(enc) == pytest.approx(float(per_exit.mean()))


def test_convert_from_a_pretrained_checkpoint(tiny_hf_dir, user_csv, tmp_path, capsys):
    """The papers' setting: exits trained from the pretrained weights, task from the flags."""
    out = tmp_path / "sweet"
    assert main(["convert", str(tiny_hf_dir), "--method", "sweet", "--data", str(user_csv), "--text-column", "review",
                 "--label-column", "verdict", "--out", str(out), "--epochs", "1", "--batch-size", "16",
                 "--max-train-samples", "16", "--max-length", "24", *QUIET]) == 0
    model = load_model(out)
    cfg = json.loads((out / "config.json").read_text())
    assert model.method == "sweet" and sorted(model.spec.labels) == ["bad", "good", "meh"]
    assert model.spec.max_length == 24 and model.exit_layers == (1, 2)
    assert cfg["extra"]["task"]["label_column"] == "verdict" and cfg["extra"]["converted_from"] == str(tiny_hf_dir)
    # the encoder started from the checkpoint (embeddings are not trained away in one step)
    from adaptinf.hf import load_encoder

    ref, _ = load_encoder(tiny_hf_dir)
    assert torch.allclose(model.encoder.embeddings.position.weight, ref.embeddings.position.weight, atol=1e-3)
    # a source that is neither a model directory nor a pretrained model is a clear error
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "nowhere"), "--method", "ee", "--out", str(tmp_path / "x"), *QUIET]) == 2
    assert "neither a built-in model" in capsys.readouterr().err
