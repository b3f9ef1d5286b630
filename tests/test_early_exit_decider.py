"""The learned exit decision of the early exit family (policy "learned"): the knob, the decider saved
with the model, the batched forward against `exit_decisions` (padded and packed), its cost, and its
post-hoc fitting (`adaptinf.recipes.early_exit.fit_decider`, also through the recipe)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch, make_tiny_dense

from adaptinf.checkpoint import save_model
from adaptinf.data import Encoded
from adaptinf.methods.early_exit import DECIDER_FEATURES, MAX_SOFTMAX_NEVER, EarlyExitConfig, MultiExitClassifier
from adaptinf.recipes.early_exit import decider_data, fit
from adaptinf.recipes.early_exit import fit_decider, fit_logistic
from adaptinf.registry import get_method, load_model
from adaptinf.settings import TrainConfig

VARIANTS = ["ee", "sweet", "multi-model"]
VOCAB, D, C, LAYERS = 60, 16, 3, 3
F_ = len(DECIDER_FEATURES)


def convert(name: str, seed: int = 0, **config) -> MultiExitClassifier:
    dense = make_tiny_dense(seed, hidden=D, heads=2, ffn=32, layers=LAYERS, vocab_size=VOCAB)
    cls = get_method(name)
    config = {"exits": (1, 2, 3), **config}
    model = cls.from_dense(dense, EarlyExitConfig(classifier_dropout=0.0, **config)).eval()
    g = torch.Generator().manual_seed(seed + 1)  # every exit its own confident random head: exits disagree
    heads = [(h.pooler, h.classifier) for h in model.heads] if hasattr(model, "heads") else \
        [(m.encoder.pooler.dense, m.classifier) for m in model.models]
    with torch.no_grad():
        for pooler, classifier in heads:
            pooler.weight.copy_(torch.randn(pooler.weight.shape, generator=g) / math.sqrt(D) * 3)
            classifier.weight.copy_(torch.randn(classifier.weight.shape, generator=g) * 1.5)
            classifier.bias.zero_()
    return model


def with_decider(model: MultiExitClassifier, seed: int = 0) -> MultiExitClassifier:
    """A decider that spreads its probabilities: random weights, mostly on max-prob and agreement."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(model.num_exits, F_ + 1, generator=g) * 0.5
    w[:, 0] += 4.0  # max_prob
    w[:, 3] += 1.0  # agrees
    w[:, -1] -= 2.5
    with torch.no_grad():
        model.decider.copy_(w)
    return model


def batch_of(n: int, seed: int) -> dict[str, torch.Tensor]:
    lengths = torch.randint(2, 25, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return make_batch(lengths, VOCAB, seed)


def encoded(n: int, seed: int) -> Encoded:
    b = batch_of(n, seed)
    ids = [row[:m].tolist() for row, m in zip(b["input_ids"], b["attention_mask"].sum(1))]
    return Encoded(ids, torch.randint(0, C, (n,), generator=torch.Generator().manual_seed(seed + 1)))


def decider_probs(model: MultiExitClassifier, z: torch.Tensor) -> torch.Tensor:
    """[n_exits - 1, n] the decider's probabilities at every exit, chained as at inference."""
    x, _ = decider_data(model, z)
    w = model.decider[:-1]
    return torch.sigmoid((x * w[:, None, :-1]).sum(-1) + w[:, None, -1])


def mixed_knobs(model: MultiExitClassifier, batch: dict) -> list[float]:
    """Knobs midway between the probabilities the decider gives at the first exit (no row on a threshold)."""
    with torch.no_grad():
        p = decider_probs(model, model.all_exit_logits(**batch))[0].sort().values
    mids = (p[1:] + p[:-1]) / 2
    return [float(mids[int(q * (len(mids) - 1))]) for q in (0.2, 0.5, 0.8)]


def auc(score: torch.Tensor, target: torch.Tensor) -> float:
    pos, neg = score[target > 0.5], score[target <= 0.5]
    return float((pos[:, None] > neg[None, :]).double().mean() + 0.5 * (pos[:, None] == neg[None, :]).double().mean())


# --- configuration and knob --------------------------------------------------------------------------


def test_config_and_knob():
    cfg = EarlyExitConfig(policy="learned")
    assert EarlyExitConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="policy must be one of"):
        EarlyExitConfig(policy="learnt")
    model = convert("ee", policy="learned")
    assert model.knob_name == "threshold"
    knobs = model.knob_values()
    assert knobs == sorted(knobs) and knobs[0] == 0.0 and 1.0 in knobs and knobs[-1] == MAX_SOFTMAX_NEVER
    assert all(0.0 <= k <= 1.0 for k in knobs[:-1]) and len(knobs) > 20
    for bad in ("0.5", float("nan"), True):
        with pytest.raises(ValueError, match="number"):
            model.set_knob(bad)


def test_only_a_learned_model_saves_a_decider(tmp_path):
    assert "decider" not in convert("ee").state_dict()  # checkpoints of the other policies are unchanged
    assert convert("ee", policy="learned").state_dict()["decider"].shape == (3, F_ + 1)
    model = with_decider(convert("multi-model", policy="learned"))
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config.policy == "learned" and torch.equal(loaded.decider, model.decider)
    batch = batch_of(24, seed=3)
    for knob in mixed_knobs(model, batch):
        with torch.no_grad():
            a, b = model(**batch, knob=knob), loaded(**batch, knob=knob)
        assert torch.equal(a.extras["exit"], b.extras["exit"]) and torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("name", ["ee", "multi-model"])
def test_extreme_knobs(name):
    model = with_decider(convert(name, policy="learned"))
    batch = batch_of(16, seed=4)
    with torch.no_grad():
        final = model.all_exit_logits(**batch)[-1]
        never = model(**batch, knob=MAX_SOFTMAX_NEVER)
        first = model(**batch, knob=0.0)
    assert (never.extras["exit"] == model.num_exits - 1).all()
    torch.testing.assert_close(never.logits, final, rtol=0, atol=1e-6)
    assert (first.extras["exit"] == 0).all()  # every probability is >= 0


# --- the batched decision ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_equals_exit_decisions_packed_and_padded(name):
    model = with_decider(convert(name, policy="learned"))
    with torch.no_grad():
        model.temperature.copy_(torch.tensor([0.7, 1.4, 1.0]))
    batch = batch_of(32, seed=5)
    with torch.no_grad():
        z = model.all_exit_logits(**batch)
    mixed = False
    for knob in mixed_knobs(model, batch):
        offline = model.exit_decisions(z, knob)
        outs = []
        for packed in (True, False):
            model.set_packed(packed)
            with torch.no_grad():
                outs.append(model(**batch, knob=knob))
            assert torch.equal(outs[-1].extras["exit"], offline), (knob, packed)
        model.set_packed(True)
        torch.testing.assert_close(outs[0].logits, outs[1].logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[0].logits, z[offline, torch.arange(32)], rtol=1e-5, atol=1e-5)
        # a row's decision does not depend on its batch
        lengths = batch["attention_mask"].sum(1).tolist()
        with torch.no_grad():
            alone = torch.cat([model(**{k: v[i:i + 1, :n] for k, v in batch.items()}, knob=knob).extras["exit"]
                               for i, n in enumerate(lengths)])
        assert torch.equal(alone, offline)
        mixed |= len(set(offline.tolist())) > 1
    assert mixed, "the knobs should send samples to different exits"


def test_decision_is_the_decider_on_the_features():
    """exit_decisions = the first exit whose decider probability reaches the knob (by hand)."""
    model = with_decider(convert("ee", policy="learned"))
    batch = batch_of(40, seed=6)
    with torch.no_grad():
        z = model.all_exit_logits(**batch)
    p = decider_probs(model, z)  # [2, n]
    x, _ = decider_data(model, z)
    # the features by hand at exit 1
    q = (z[1] / model.temperature[1]).softmax(-1)
    top = q.topk(2, dim=-1).values
    agrees = (z[1].argmax(-1) == z[0].argmax(-1)).float()
    prev = (z[0] / model.temperature[0]).softmax(-1).amax(-1)
    by_hand = torch.stack([top[:, 0], top[:, 0] - top[:, 1], -(q * q.log()).sum(-1), agrees, 1 + agrees, prev], -1)
    torch.testing.assert_close(x[1], by_hand)
    for knob in (0.3, 0.6, 0.9):
        want = torch.where(p[0] >= knob, 0, torch.where(p[1] >= knob, 1, 2))
        assert torch.equal(model.exit_decisions(z, knob), want)


@pytest.mark.parametrize("name", ["ee", "multi-model"])
def test_cost_counts_the_decider(name):
    learned = with_decider(convert(name, policy="learned"))
    plain = convert(name)
    plain.load_state_dict({k: v for k, v in learned.state_dict().items() if k != "decider"})
    exit_index, lengths = torch.tensor([0, 1, 2, 2]), torch.tensor([5, 9, 3, 20])
    decisions = torch.tensor([1, 2, 2, 2])  # the last exit decides nothing
    torch.testing.assert_close(learned.cost(exit_index, lengths),
                               plain.cost(exit_index, lengths) + (2 * F_ * decisions).double(), rtol=0, atol=0)
    batch = batch_of(16, seed=7)
    with torch.no_grad():
        out = learned(**batch, knob=mixed_knobs(learned, batch)[1])
    torch.testing.assert_close(out.flops, learned.cost(out.extras["exit"], batch["attention_mask"].sum(1)))


# --- fitting -------------------------------------------------------------------------------------------


def test_fit_logistic_lowers_bce_and_folds_the_standardisation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 3, generator=g) * torch.tensor([10.0, 0.1, 1.0]) + torch.tensor([5.0, -3.0, 0.0])
    x = torch.cat([x, torch.ones(2000, 1)], 1)  # a constant feature: ignored
    logit = 0.3 * (x[:, 0] - 5) - 20 * (x[:, 1] + 3) + 0.5
    y = (torch.rand(2000, generator=g) < torch.sigmoid(logit)).float()
    w, bce = fit_logistic(x, y)
    rate = float(y.mean())
    prior = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    assert bce < prior - 0.2
    assert float(F.binary_cross_entropy_with_logits(x.double() @ w[:-1] + w[-1], y.double())) == pytest.approx(bce)
    assert w[3] == 0.0 and w[0] == pytest.approx(0.3, rel=0.3) and w[1] == pytest.approx(-20, rel=0.3)


def synthetic_exit_logits(n: int, seed: int) -> torch.Tensor:
    """[3, n, C] exits that agree with the last more often the more confident they are: an early
    exit mixes the last exit's logits with small noise by a per-sample hardness (a hard sample's
    logits are small and random: unsure, and often another class)."""
    g = torch.Generator().manual_seed(seed)
    last = torch.randn(n, C, generator=g) * 3
    hard = torch.rand(n, 1, generator=g)
    early = [(1 - hard) * last + hard * torch.randn(n, C, generator=g) * s for s in (1.5, 1.0)]
    return torch.stack([*early, last])


def test_fit_decider_predicts_consistency_better_than_chance():
    model = convert("ee")  # a trained max-softmax model: fit_decider switches it to "learned"
    model.set_knob(0.9)
    calib, fresh = synthetic_exit_logits(600, seed=1), synthetic_exit_logits(600, seed=2)
    report = fit_decider(model, encoded(600, seed=8), exit_logits=calib)
    assert model.config.policy == "learned" and model.knob is None
    assert len(report["bce"]) == model.num_exits - 1
    for bce, prior, rate in zip(report["bce"], report["bce_prior"], report["consistent"]):
        assert 0.05 < rate < 0.95 and bce < prior - 0.05
    p = decider_probs(model, fresh)
    _, target = decider_data(model, fresh)
    for i in range(model.num_exits - 1):  # held-out samples: ranks consistent ones first
        assert auc(p[i], target[i]) > 0.65  # chance: 0.5 (measured about 0.75)
    assert torch.equal(model.decider[-1], torch.zeros(F_ + 1))


def test_fit_decider_on_a_model_keeps_its_weights_and_errors(tmp_path):
    model = convert("multi-model", exits=(1, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = encoded(50, seed=9)
    with pytest.raises(ValueError, match="empty"):
        fit_decider(model, Encoded([], torch.zeros(0, dtype=torch.int64)))
    with pytest.raises(ValueError, match="exit_logits must be"):
        fit_decider(model, calib, exit_logits=torch.zeros(3, 50, C))
    assert model.config.policy == "max-softmax"  # a refused fit changes nothing
    fit_decider(model, calib, batch_size=16)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # backbone, heads, temperatures untouched
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config.policy == "learned" and torch.equal(loaded.decider, model.decider)


def test_the_recipe_fits_the_decider_on_the_calibration_split(tmp_path):
    model = convert("ee", policy="learned", exits=(1, 3), calibration="validation")
    train, val = encoded(32, seed=10), encoded(40, seed=11)
    cfg = TrainConfig(epochs=1, batch_size=16, save_every=100, log_every=100)
    summary = fit(model, train, val, cfg, tmp_path / "train", progress=False)
    assert summary["n_calibration"] == 40 and len(summary["decider_bce"]) == 1
    assert summary["decider_bce"][0] <= summary["decider_bce_prior"][0] + 1e-9
    fitted = model.decider.clone()
    fit_decider(model, val)  # the same split, the same temperatures: the same decider
    torch.testing.assert_close(model.decider, fitted)
    assert model.decider[0].abs().sum() > 0
