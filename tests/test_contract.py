"""The contract every registered method meets (timm's test_models.py pattern): registering a method
in `adaptinf.registry` subjects it to these tests, with no per-method code here."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY_LENGTHS, make_batch

import adaptinf
from adaptinf.checkpoint import save_model
from adaptinf.registry import load_model
from adaptinf.data import Encoded, collate
from adaptinf.model import AdaptiveClassifier, ClassifierOutput, MethodConfig
from adaptinf.registry import get_method

METHODS = adaptinf.list_methods()


def build(name: str, dense) -> AdaptiveClassifier:
    cls = get_method(name)
    model = cls.from_dense(dense, cls.Config())
    assert isinstance(model, cls)
    return model.eval()


def knob_values(model: AdaptiveClassifier, at_most: int | None = None) -> list:
    """The model's knob sweep, or `at_most` values spread over it (ends included) to keep tests fast."""
    values = model.knob_values()
    assert values, "knob_values() must name at least one value (None for a knobless method)"
    if at_most is None or len(values) <= at_most:
        return values
    return [values[round(i * (len(values) - 1) / (at_most - 1))] for i in range(at_most)]


def test_registry_lists_dense_first_and_rejects_unknown():
    assert METHODS[0] == "dense"
    with pytest.raises(ValueError, match="unknown method 'nope'; available: dense"):
        get_method("nope")


@pytest.mark.parametrize("name", METHODS)
def test_class_declares_itself(name):
    cls = get_method(name)
    assert cls.method == name
    assert issubclass(cls.Config, MethodConfig)
    assert cls.description, f"{cls.__name__} should say in one line what it does (description)"


@pytest.mark.parametrize("name", METHODS)
def test_output_shapes_and_values(name, tiny_dense, tiny_batch):
    model = build(name, tiny_dense)
    b, C = len(TINY_LENGTHS), tiny_dense.spec.num_labels
    for knob in knob_values(model, at_most=5):
        model.set_knob(knob)
        with torch.no_grad():
            out = model(**tiny_batch)
        assert isinstance(out, ClassifierOutput)
        assert out.logits.shape == (b, C), knob
        assert out.flops.shape == (b,), knob
        assert torch.isfinite(out.logits).all(), knob
        assert torch.isfinite(out.flops).all() and (out.flops > 0).all(), (knob, out.flops)
        if out.aux_loss is not None:
            assert out.aux_loss.dim() == 0 and torch.isfinite(out.aux_loss)


@pytest.mark.parametrize("name", METHODS)
def test_gradients_reach_every_trainable_parameter(name, tiny_dense, tiny_batch):
    model = build(name, tiny_dense).train()
    torch.manual_seed(0)
    out = model(**tiny_batch)
    labels = torch.tensor([0, 1, 1, 0])
    loss = model.loss(out, labels)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert trainable, "a method with nothing to train"
    assert {id(p) for p in trainable.values()} == {id(p) for p in model.trainable_parameters()}
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    assert not no_grad, f"no gradient reaches: {no_grad}"
    bad = [n for n, p in trainable.items() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients in: {bad}"


@pytest.mark.parametrize("name", METHODS)
def test_sum_loss_is_batch_size_times_mean_loss(name, tiny_dense, tiny_batch):
    model = build(name, tiny_dense)
    labels = torch.tensor([1, 0, 1, 1])
    with torch.no_grad():
        out = model(**tiny_batch)
    torch.testing.assert_close(model.loss(out, labels, reduction="sum"), 4 * model.loss(out, labels))


@pytest.mark.parametrize("name", METHODS)
def test_save_and_load_give_identical_outputs(name, tiny_dense, tiny_batch, tmp_path):
    model = build(name, tiny_dense)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m", expect_method=name)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config == model.config and loaded.spec == model.spec
    for knob in knob_values(model):
        model.set_knob(knob)
        loaded.set_knob(knob)
        with torch.no_grad():
            a, b = model(**tiny_batch), loaded(**tiny_batch)
        assert torch.equal(a.logits, b.logits), knob
        assert torch.equal(a.flops, b.flops), knob


@pytest.mark.parametrize("name", METHODS)
def test_saved_knob_is_restored(name, tiny_dense, tmp_path):
    model = build(name, tiny_dense)
    knob = knob_values(model)[-1]
    model.set_knob(knob)
    save_model(model, tmp_path / "m")
    assert load_model(tmp_path / "m").knob == knob


@pytest.mark.parametrize("name", METHODS)
def test_config_round_trips_through_json(name):
    cls = get_method(name)
    cfg = cls.Config()
    again = cls.Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        cls.Config.from_dict({**cfg.to_dict(), "not_a_field": 1})


@pytest.mark.parametrize("name", METHODS)
def test_knob(name, tiny_dense):
    model = build(name, tiny_dense)
    if model.knob_name is None:
        assert model.knob_values() == [None]
        with pytest.raises(ValueError, match="no inference-time knob"):
            model.set_knob(0.5)
        model.set_knob(None)  # clearing is always allowed
    else:
        values = knob_values(model)
        assert all(v is not None for v in values), "a knob method sweeps real values"
        for v in values:
            model.set_knob(v)
            assert model.knob == v


@pytest.mark.parametrize("name", METHODS)
def test_per_sample_results_do_not_depend_on_the_batch(name, tiny_dense, tiny_batch):
    """Each sample alone (batch 1, no padding) gives what it gets inside the padded batch."""
    model = build(name, tiny_dense)
    for knob in knob_values(model, at_most=5):
        model.set_knob(knob)
        with torch.no_grad():
            batched = model(**tiny_batch)
            for i, n in enumerate(TINY_LENGTHS):
                alone = model(**{k: v[i : i + 1, :n] for k, v in tiny_batch.items()})
                torch.testing.assert_close(alone.logits[0], batched.logits[i], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(alone.flops[0], batched.flops[i], atol=0, rtol=0)


@pytest.mark.parametrize("name", METHODS)
def test_order_of_samples_does_not_matter(name, tiny_dense):
    model = build(name, tiny_dense)
    batch = make_batch([5, 12, 3, 12, 8], tiny_dense.spec.encoder.vocab_size, seed=3)
    perm = torch.tensor([3, 0, 4, 1, 2])
    for knob in knob_values(model, at_most=5):
        model.set_knob(knob)
        with torch.no_grad():
            a = model(**batch)
            b = model(**{k: v[perm] for k, v in batch.items()})
        torch.testing.assert_close(a.logits[perm], b.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.flops[perm], b.flops, atol=0, rtol=0)


@pytest.mark.parametrize("name", METHODS)
def test_conversion_leaves_the_dense_model_untouched(name, tiny_dense, tiny_batch):
    before = copy.deepcopy(tiny_dense.state_dict())
    model = build(name, tiny_dense)
    after = tiny_dense.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"from_dense modified the dense model: {changed}"
    # and the converted model does not share storage with it (training one must not train the other)
    dense_ptrs = {p.data_ptr() for p in tiny_dense.parameters()}
    shared = [n for n, p in model.named_parameters() if p.data_ptr() in dense_ptrs]
    assert not shared, f"parameters shared with the dense model: {shared}"


@pytest.mark.parametrize("name", METHODS)
def test_eval_forward_is_deterministic(name, tiny_dense, tiny_batch):
    model = build(name, tiny_dense)
    with torch.no_grad():
        a, b = model(**tiny_batch), model(**tiny_batch)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.flops, b.flops)


@pytest.mark.parametrize("name", METHODS)
def test_offline_sweep_matches_forward(name, tiny_dense):
    """A method's `sweep_offline` (when it has one) gives exactly what `forward` gives at each knob."""
    model = build(name, tiny_dense)
    lengths = [9, 2, 30, 14, 5, 21, 2, 12, 32, 7]
    batch = make_batch(lengths, tiny_dense.spec.encoder.vocab_size, seed=5)
    enc = Encoded([row[:n].tolist() for row, n in zip(batch["input_ids"], lengths)], torch.tensor([i % 2 for i in range(10)]))
    knobs = knob_values(model)
    swept = model.sweep_offline(enc, knobs, batch_size=3)
    if swept is None:
        return  # evaluate runs forward per knob: nothing to compare
    assert [p.knob for p in swept] == knobs
    b = collate(enc, range(len(enc)))
    for point in swept:
        model.set_knob(point.knob)
        with torch.no_grad():
            out = model(b.input_ids, b.attention_mask)
        assert torch.equal(point.predictions, out.logits.argmax(-1)), point.knob
        assert torch.equal(point.flops, out.flops), point.knob


@pytest.mark.parametrize("name", METHODS)
def test_config_refuses_a_value_of_the_wrong_type_by_name(name):
    """`--set field=abc` on a numeric field: a ValueError naming the field and the type, never a
    TypeError from deep inside the config's range checks."""
    import dataclasses

    cls = get_method(name).Config
    numeric = [f.name for f in dataclasses.fields(cls) if str(f.type) in ("int", "float")]
    assert numeric, f"{cls.__name__} has no numeric field to check"
    for field in numeric:
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field} expects (an integer|a number)|{field}"):
            cls.from_dict({field: "abc"})
