"""adaptinf.quantize on tiny random models of every method: int8 and bf16 stay close to fp32, knobs
still work, the int8 report counts what ran int8, and nothing on disk changes."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from conftest import make_tiny_dense, random_batch
from safetensors.torch import load_file

import adaptinf
from adaptinf.checkpoint import WEIGHTS_FILE, save_model
from adaptinf.data import Batch
from adaptinf.quantize import Int8Linear, QuantizeReport, bf16_supported, quantize, weight_matmul_flops
from adaptinf.registry import get_method, load_model

METHODS = adaptinf.list_methods()
KNOB_METHODS = [m for m in METHODS if get_method(m).knob_name is not None]
VOCAB = 60


@pytest.fixture(scope="module")
def dense():
    """A dropout-free 2-layer model; its classifier scaled up so that random logits have margins."""
    model = make_tiny_dense(0, hidden=32, heads=4, ffn=64, layers=2, vocab_size=VOCAB)
    with torch.no_grad():
        model.classifier.weight.mul_(25)
    return model


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return random_batch(32, seed=1, vocab_size=VOCAB)


def as_batch(b: dict[str, torch.Tensor]) -> Batch:
    n = len(b["input_ids"])
    return Batch(b["input_ids"], b["attention_mask"], torch.zeros(n, dtype=torch.int64), torch.arange(n))


def build(name: str, dense):
    cls = get_method(name)
    return cls.from_dense(dense, cls.Config()).eval()


def ends(model) -> list:
    """The knob's extremes (forced decisions: every sample takes the same path in fp32 and int8)."""
    values = model.knob_values()
    return list(dict.fromkeys([values[0], values[-1]]))


def run(model, b, knob):
    with torch.no_grad():
        return model(**b, knob=knob)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_bad_mode_names_the_valid_ones(dense):
    with pytest.raises(ValueError, match="unknown quantisation mode 'fp8'; valid modes: none, int8, bf16"):
        quantize(build("dense", dense), "fp8")


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_training_is_refused(dense, batch, mode):
    model = build("ee", dense)
    with pytest.raises(ValueError, match="eval"):
        quantize(model.train(), mode)
    quantize(model.eval(), mode)
    model.train()
    with pytest.raises(ValueError, match="inference only"):
        model(**batch)
    with pytest.raises(ValueError, match="already quantised"):
        quantize(model.eval(), "int8")


def test_none_changes_nothing(dense, batch):
    model = build("sharcs", dense)
    before = run(model, batch, 0.0).logits
    report = quantize(model, "none", calibration=as_batch(batch))
    assert report.mode == "none" and report.converted == 0 and report.int8_linear_share == 0.0
    assert torch.equal(run(model, batch, 0.0).logits, before)


def test_dense_report_counts_every_linear(dense, batch):
    model = build("dense", dense)
    linears = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    assert len(linears) == 2 * 6 + 2  # q, k, v, out, up, down per block; pooler; classifier
    fp32_total = sum(weight_matmul_flops(model, as_batch(batch))[1].values())
    report = quantize(model, "int8", calibration=as_batch(batch))
    assert isinstance(report, QuantizeReport) and report.mode == "int8"
    assert report.converted == len(linears) and report.fp32_modules == {}
    assert report.int8_linear_share == 1.0 and report.float_flops == 0
    assert report.int8_flops == fp32_total  # the same Linear work, now int8
    int8, other = weight_matmul_flops(model, as_batch(batch))
    assert sorted(int8) == linears and other == {}
    assert all(isinstance(model.get_submodule(n), Int8Linear) for n in linears)
    assert model.quantization is report


@pytest.mark.parametrize("name", METHODS)
def test_int8_logits_close_to_fp32(name, dense, batch):
    ref = build(name, dense)
    model = copy.deepcopy(ref)  # conversion draws random routers / gates: the same ones
    quantize(model, "int8")
    for knob in ends(ref):
        a, b = run(model, batch, knob), run(ref, batch, knob)
        assert torch.equal(a.flops, b.flops), knob  # the same decisions at a forced knob
        assert rel_err(a.logits, b.logits) < 0.03, knob
        assert (a.logits.argmax(-1) == b.logits.argmax(-1)).float().mean() >= 0.9, knob
    # at the operating point a router / exit near a tie may decide otherwise: the samples that took
    # the same path are close
    a, b = run(model, batch, ref.knob), run(ref, batch, ref.knob)
    same = a.flops == b.flops
    assert same.float().mean() >= 0.75 and rel_err(a.logits[same], b.logits[same]) < 0.03


@pytest.mark.parametrize("name", METHODS)
def test_int8_share_counts_all_weight_work(name, dense, batch):
    """At a forced knob the quantised model's int8 + float weight-matmul FLOPs are the fp32 model's."""
    ref = build(name, dense)
    model = copy.deepcopy(ref)
    knob = ends(ref)[-1]
    ref.set_knob(knob)
    model.set_knob(knob)
    total = sum(weight_matmul_flops(ref, as_batch(batch))[1].values())
    report = quantize(model, "int8", calibration=as_batch(batch))
    assert report.int8_flops + report.float_flops == total
    assert 0 < report.int8_linear_share <= 1
    assert (report.int8_linear_share == 1) == (not report.fp32_modules)
    for module, why in report.fp32_modules.items():
        assert "fp32" in why or "did not run" in why, (module, why)


@pytest.mark.parametrize("name", KNOB_METHODS)
def test_knob_still_works_when_quantised(name, dense, batch):
    model = build(name, dense)
    quantize(model, "int8")
    low, high = (float(run(model, batch, k).flops.sum()) for k in (model.knob_values()[0], model.knob_values()[-1]))
    assert low != high  # the knob moves the cost
    model.set_knob(model.knob_values()[-1])
    with torch.no_grad():
        assert torch.equal(model(**batch).flops, run(model, batch, model.knob_values()[-1]).flops)


@pytest.mark.parametrize("name", METHODS)
def test_bf16_runs_and_stays_close(name, dense, batch):
    ref = build(name, dense)
    model = copy.deepcopy(ref)  # conversion draws random routers / gates: the same ones
    report = quantize(model, "bf16")
    assert report.converted == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for knob in ends(ref):
        a, b = run(model, batch, knob), run(ref, batch, knob)
        assert a.logits.dtype == torch.float32 and a.flops.dtype == torch.float64
        if knob == ref.knob_values()[-1]:  # at PLANER's tau 0, bf16 ties in router scores add experts
            assert torch.equal(a.flops, b.flops), knob
        assert rel_err(a.logits, b.logits) < 0.03, knob
        assert (a.logits.argmax(-1) == b.logits.argmax(-1)).float().mean() >= 0.9, knob


def test_bf16_supported_gives_a_reason():
    native, reason = bf16_supported()
    assert isinstance(native, bool) and reason
    assert ("native" in reason) == native


def test_weights_loaded_after_quantising_are_used(dense, batch):
    """The int8 copy is repacked when the fp32 weights change (here by load_state_dict)."""
    other = make_tiny_dense(1, hidden=32, heads=4, ffn=64, layers=2, vocab_size=VOCAB)
    model = build("dense", dense)
    quantize(model, "int8")
    model.load_state_dict(other.state_dict())
    assert rel_err(run(model, batch, None).logits, run(other, batch, None).logits) < 0.03


@pytest.mark.parametrize("name", ["dense", "sharcs", "planer"])
def test_saved_model_is_not_changed(name, dense, batch, tmp_path):
    save_model(build(name, dense), tmp_path / "m")
    weights = tmp_path / "m" / WEIGHTS_FILE
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    model = load_model(tmp_path / "m", expect_method=name)
    quantize(model, "int8", calibration=as_batch(batch))
    run(model, batch, model.knob)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest
    # and what a quantised model would save is the same fp32 tensors
    save_model(model, tmp_path / "again")
    saved, again = load_file(str(weights)), load_file(str(tmp_path / "again" / WEIGHTS_FILE))
    assert saved.keys() == again.keys()
    assert all(again[k].dtype == saved[k].dtype and torch.equal(again[k], saved[k]) for k in saved)
