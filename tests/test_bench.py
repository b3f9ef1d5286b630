"""The latency harness: inputs, protocol, stamps, output files, and the transformers twin."""

from __future__ import annotations

import csv
import json
import random
import time

import pytest
import torch
from conftest import make_tiny_spec

from adaptinf.bench import BenchRow, format_table, hf_case, make_batches, model_case, run_bench, write_bench
from adaptinf.data import Encoded, collate
from adaptinf.methods.dense import to_hf_sequence_classifier
from adaptinf.methods.dense import DenseClassifier

STAMPS = ("machine", "device", "torch_threads", "torch_version", "python_version", "timestamp")


def tiny_dense() -> DenseClassifier:
    torch.manual_seed(0)
    spec = make_tiny_spec(vocab_size=100, labels=("a", "b"))
    return DenseClassifier(spec).eval()


def tiny_encoded(n: int = 20, seed: int = 0) -> Encoded:
    rng = random.Random(seed)
    ids = [[rng.randrange(1, 100) for _ in range(rng.randint(3, 30))] for _ in range(n)]
    return Encoded(ids, torch.tensor([rng.randrange(2) for _ in range(n)]))


@pytest.fixture
def one_thread():
    """One torch thread: tiny models on a busy shared CPU otherwise stall on thread hand-offs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sleeper(seconds: float):
    def run(batch):
        time.sleep(seconds)

    return run


def test_to_hf_sequence_classifier_matches_our_logits(one_thread):
    dense = tiny_dense()
    hf = to_hf_sequence_classifier(dense)
    assert not hf.training
    assert hf.config._attn_implementation == "sdpa"
    batch = collate(tiny_encoded(6), range(6))  # lengths vary, so the batch is padded
    assert (batch.attention_mask == 0).any()
    with torch.inference_mode():
        ours = model_case(dense)(batch).logits
        theirs = hf_case(hf)(batch)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_to_hf_sequence_classifier_rejects_non_dense():
    with pytest.raises(ValueError, match="DenseClassifier"):
        to_hf_sequence_classifier(torch.nn.Linear(2, 2))


def test_make_batches_deterministic_and_sized():
    enc = tiny_encoded(20)
    a = make_batches(enc, batch_size=4, n_batches=3, seed=1)
    b = make_batches(enc, batch_size=4, n_batches=3, seed=1)
    c = make_batches(enc, batch_size=4, n_batches=3, seed=2)
    assert len(a) == 3 and all(x.input_ids.shape[0] == 4 for x in a)
    for x, y in zip(a, b):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.index, y.index)
    assert any(not torch.equal(x.index, y.index) for x, y in zip(a, c))
    # dynamic padding: each batch is as long as its longest sample
    for x in a:
        assert x.input_ids.shape[1] == int(x.attention_mask.sum(1).max())
    # without enough samples, wrap around: every sample is used, none more than twice
    wrapped = make_batches(enc, batch_size=8, n_batches=4, seed=1)
    used = torch.cat([x.index for x in wrapped]).bincount(minlength=20)
    assert len(wrapped) == 4 and all(x.input_ids.shape[0] == 8 for x in wrapped)
    assert used.min() >= 1 and used.max() <= 2
    with pytest.raises(ValueError, match="batch_size"):
        make_batches(enc, batch_size=0, n_batches=1, seed=0)


def test_run_bench_rows_stamps_and_reference(one_thread):
    dense = tiny_dense()
    enc = tiny_encoded(20)
    batches = {bs: make_batches(enc, bs, n_batches=2, seed=0) for bs in (1, 4)}
    cases = {"dense": model_case(dense), "hf": hf_case(to_hf_sequence_classifier(dense))}
    rows = run_bench(cases, batches, repeats=3, warmup=1, progress=False)
    assert [(r.case, r.batch_size) for r in rows] == [("dense", 1), ("hf", 1), ("dense", 4), ("hf", 4)]
    for r in rows:
        assert isinstance(r, BenchRow)
        assert all(getattr(r, s) not in (None, "") for s in STAMPS)
        assert r.torch_threads == 1 and r.torch_version == torch.__version__
        assert r.n_batches == 2 and r.repeats == 3
        assert r.min_ms <= r.p25_ms <= r.median_ms <= r.p75_ms
        assert r.ms_per_sample == pytest.approx(r.median_ms / r.batch_size)
        assert 3 <= r.mean_length <= r.mean_padded_length <= r.max_length <= 30  # dynamic padding
    ref = [r for r in rows if r.case == "dense"]
    assert all(r.speedup_vs_reference == 1.0 and r.paired_speedup_vs_reference == 1.0 for r in ref)
    assert "| dense | 4 |" in format_table(rows)


def test_run_bench_slower_case_has_speedup_below_one():
    batches = {2: make_batches(tiny_encoded(8), 2, n_batches=2, seed=0)}
    # 6x apart: a loaded machine that oversleeps the fast case still keeps the order and the ratio
    cases = {"fast": sleeper(0.005), "slow": sleeper(0.03)}
    rows = run_bench(cases, batches, repeats=5, warmup=1, reference="fast", progress=False)
    by_case = {r.case: r for r in rows}
    assert by_case["fast"].speedup_vs_reference == 1.0
    assert by_case["slow"].speedup_vs_reference < 0.9
    assert by_case["slow"].paired_speedup_vs_reference < 0.9
    assert by_case["slow"].median_ms > by_case["fast"].median_ms


def test_run_bench_rejects_unknown_reference_and_no_reference_gives_none():
    batches = {1: make_batches(tiny_encoded(4), 1, n_batches=1, seed=0)}
    with pytest.raises(ValueError, match="reference=None"):
        run_bench({"a": sleeper(0)}, batches, repeats=1, progress=False)
    rows = run_bench({"a": sleeper(0)}, batches, repeats=1, warmup=0, reference=None, progress=False)
    assert rows[0].speedup_vs_reference is None and rows[0].paired_speedup_vs_reference is None


def test_write_bench_round_trips(tmp_path):
    batches = {1: make_batches(tiny_encoded(4), 1, n_batches=2, seed=0)}
    rows = run_bench({"a": sleeper(0), "b": sleeper(0)}, batches, repeats=2, reference="a", progress=False)
    csv_path, json_path = write_bench(rows, tmp_path / "out", stem="lat")
    assert csv_path.name == "lat.csv" and json_path.name == "lat.json"
    data = json.loads(json_path.read_text())
    assert data == [r.to_dict() for r in rows]
    with csv_path.open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["case"] for t in table] == ["a", "b"]
    assert float(table[1]["median_ms"]) == pytest.approx(rows[1].median_ms)
    assert table[0]["machine"] == rows[0].machine


def test_rows_carry_analytic_flops_reduction_and_realisation(one_thread):
    from adaptinf.methods.early_exit import EarlyExitClassifier, EarlyExitConfig

    dense = tiny_dense()
    ee = EarlyExitClassifier.from_dense(dense, EarlyExitConfig()).eval()
    batches = {4: make_batches(tiny_encoded(20), 4, n_batches=3, seed=0)}
    cases = {"dense": model_case(dense), "ee": model_case(ee, 0.5),  # 2 labels: max-softmax >= 0.5 always
             "hf": hf_case(to_hf_sequence_classifier(dense))}
    rows = {r.case: r for r in run_bench(cases, batches, repeats=2, warmup=0, progress=False)}
    with torch.inference_mode():
        expect = {name: sum(float(m(b.input_ids, b.attention_mask, knob=k).flops.sum()) for b in batches[4]) / 12 / 1e9
                  for name, m, k in (("dense", dense, None), ("ee", ee, 0.5))}
    for name in ("dense", "ee"):
        assert rows[name].gflops_per_sample == pytest.approx(expect[name], rel=1e-12)
    assert rows["dense"].flops_reduction_vs_reference == 1.0
    red = rows["ee"].flops_reduction_vs_reference
    assert red == pytest.approx(expect["dense"] / expect["ee"]) and red > 1.5  # 1 of 2 layers + one head
    assert rows["ee"].realisation == pytest.approx(rows["ee"].speedup_vs_reference / red)
    assert rows["hf"].gflops_per_sample is None and rows["hf"].realisation is None  # reports no FLOPs
    assert "FLOPs reduction" in format_table(list(rows.values()))
