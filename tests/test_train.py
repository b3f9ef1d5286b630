"""Fine-tuning: schedule, exact resume after interruption, DDP == single process, setting checks."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adaptinf.backbone import EncoderConfig
from adaptinf.data import Encoded
from adaptinf.methods.dense import DenseClassifier, DenseConfig
from adaptinf.model import ModelSpec
from adaptinf.recipes.finetune import finetune, lr_at
from adaptinf.settings import TrainConfig

WORKER = Path(__file__).with_name("ddp_worker.py")


def tiny_model(seed: int = 0, dropout: float = 0.0) -> DenseClassifier:
    torch.manual_seed(seed)
    enc = EncoderConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return DenseClassifier(ModelSpec(enc, ("a", "b"), 16), DenseConfig(classifier_dropout=dropout))


def tiny_data(n: int, seed: int) -> Encoded:
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        x = torch.randint(1, 50, (length,), generator=g).tolist()
        ids.append(x)
        labels.append(int(sum(x) % 2))  # a learnable-ish rule
    return Encoded(ids, torch.tensor(labels))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "last" / "model.safetensors"))


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1.0, warmup_ratio=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.0111, abs=1e-3)


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainConfig(warmup_ratio=1.5)


def test_training_learns_and_keeps_best(tmp_path):
    model = tiny_model(dropout=0.1)
    train, val = tiny_data(64, 1), tiny_data(32, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = finetune(model, train, val, TrainConfig(epochs=2, batch_size=8, lr=1e-3, save_every=3), tmp_path, progress=False)
    assert res.steps == 16 and res.epochs_run == 2
    assert (tmp_path / "best" / "model.safetensors").is_file() and (tmp_path / "metrics.csv").is_file()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step") and sum(",," not in r for r in rows) >= 1


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, save_every=2)
    train, val = tiny_data(60, 1), tiny_data(16, 2)  # 8 steps per epoch, last batch of 4
    # uninterrupted reference (dropout on, so the RNG state must be restored too)
    finetune(tiny_model(dropout=0.1), train, val, cfg, tmp_path / "a", progress=False)
    # interrupted mid-epoch after 5 steps, then resumed by a fresh process-like call
    res1 = finetune(tiny_model(dropout=0.1), train, val, cfg, tmp_path / "b", progress=False, stop_after_steps=5)
    assert res1.steps == 5
    state = json.loads((tmp_path / "b" / "last" / "state.json").read_text())
    assert state["global_step"] == 5 and state["step_in_epoch"] == 5
    res2 = finetune(tiny_model(seed=123, dropout=0.1), train, val, cfg, tmp_path / "b", progress=False)
    assert res2.resumed_from_step == 5 and res2.steps == 16
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)


def test_ctrl_c_mid_step_resumes_to_the_same_weights(tmp_path):
    """SIGINT arriving in the middle of a forward pass (after dropout drew random numbers) stops at
    the end of that step and saves the state an uninterrupted run has there: weights, optimizer and
    RNG. The resumed run ends bit-identical to the uninterrupted one (before, the Ctrl-C path saved
    the RNG advanced by the half-done step)."""
    import signal

    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, save_every=100)
    train, val = tiny_data(60, 1), tiny_data(16, 2)
    finetune(tiny_model(dropout=0.1), train, val, cfg, tmp_path / "a", progress=False)
    model = tiny_model(dropout=0.1)
    calls = {"n": 0}

    def press_ctrl_c(module, args):
        calls["n"] += 1
        if calls["n"] == 6 and module.training:  # mid-forward of the 6th training step
            signal.raise_signal(signal.SIGINT)

    hook = model.encoder.blocks[1].register_forward_pre_hook(press_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        finetune(model, train, val, cfg, tmp_path / "b", progress=False)
    hook.remove()
    state = json.loads((tmp_path / "b" / "last" / "state.json").read_text())
    assert state["global_step"] == 6  # the interrupted step was finished, then saved
    res = finetune(tiny_model(seed=123, dropout=0.1), train, val, cfg, tmp_path / "b", progress=False)
    assert res.resumed_from_step == 6 and res.steps == 16
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=k)


def test_step_budget_scales_with_the_data(tmp_path):
    """min_steps gives a small data set more epochs (the last one partial), max_steps caps a large one."""
    train, val = tiny_data(16, 1), tiny_data(8, 2)  # 2 steps per epoch at batch 8
    res = finetune(tiny_model(), train, val, TrainConfig(epochs=1, batch_size=8, min_steps=7), tmp_path / "a", progress=False)
    assert (res.steps, res.total_steps, res.epochs_run) == (7, 7, 3)  # 3 whole epochs and one step of a 4th
    res = finetune(tiny_model(), train, val, TrainConfig(epochs=5, batch_size=8, max_steps=3), tmp_path / "b", progress=False)
    assert (res.steps, res.total_steps) == (3, 3)
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(min_steps=10, max_steps=5)


def test_early_stopping_on_validation_keeps_the_best_and_resumes_to_nothing(tmp_path):
    """With a learning rate too small to change the score, every validation after the first is no
    better: patience 2 with a validation every step stops after 3 steps; the best is the first."""
    train, val = tiny_data(32, 1), tiny_data(8, 2)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-12, eval_every=1, patience=2)
    res = finetune(tiny_model(), train, val, cfg, tmp_path, progress=False)
    assert res.stopped_early and res.steps == 3 and res.best_step == 1 and res.total_steps == 12
    rows = [r for r in csv.DictReader((tmp_path / "metrics.csv").open()) if r["val_accuracy"]]
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    again = finetune(tiny_model(seed=5), train, val, cfg, tmp_path, progress=False)
    assert again.steps == 3 and again.resumed_from_step == 3 and again.stopped_early


def test_validation_every_n_steps_picks_the_best_step(tmp_path):
    train, val = tiny_data(60, 1), tiny_data(16, 2)  # 8 steps per epoch
    res = finetune(tiny_model(), train, val, TrainConfig(epochs=2, batch_size=8, lr=1e-3, eval_every=3), tmp_path,
                   progress=False)
    rows = [r for r in csv.DictReader((tmp_path / "metrics.csv").open()) if r["val_accuracy"]]
    assert [int(r["step"]) for r in rows] == [3, 6, 9, 12, 15, 16]  # every 3 steps and the last
    best = max(rows, key=lambda r: float(r["val_score"]))  # the first of equal scores is kept
    assert res.best_step == int(best["step"])
    assert json.loads((tmp_path / "best" / "config.json").read_text())["extra"]["step"] == res.best_step


def test_resume_with_other_settings_is_refused(tmp_path):
    train, val = tiny_data(16, 1), tiny_data(8, 2)
    finetune(tiny_model(), train, val, TrainConfig(epochs=1, batch_size=8), tmp_path, progress=False, stop_after_steps=1)
    with pytest.raises(ValueError, match="other settings.*lr"):
        finetune(tiny_model(), train, val, TrainConfig(epochs=1, batch_size=8, lr=1e-3), tmp_path, progress=False)
    # --restart discards it
    res = finetune(tiny_model(), train, val, TrainConfig(epochs=1, batch_size=8, lr=1e-3), tmp_path, progress=False, restart=True)
    assert res.resumed_from_step == 0


def test_resume_on_other_data_is_refused(tmp_path):
    """A finished or interrupted run in the folder, then the same command on other data of the same
    size (a file edited in place): refused with the differing field named, not resumed or reused."""
    cfg = TrainConfig(epochs=1, batch_size=8)
    train, val = tiny_data(16, 1), tiny_data(8, 2)
    finetune(tiny_model(), train, val, cfg, tmp_path, progress=False)
    flipped = Encoded(train.ids, 1 - train.labels)
    with pytest.raises(ValueError, match=r"other settings \(differs in \['data.train'\]\)"):
        finetune(tiny_model(), flipped, val, cfg, tmp_path, progress=False)


def test_corrupt_resume_state_gives_a_clear_error(tmp_path):
    train, val = tiny_data(16, 1), tiny_data(8, 2)
    cfg = TrainConfig(epochs=1, batch_size=8)
    finetune(tiny_model(), train, val, cfg, tmp_path, progress=False, stop_after_steps=1)
    (tmp_path / "last" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot resume"):
        finetune(tiny_model(), train, val, cfg, tmp_path, progress=False)


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    """torchrun with 2 gloo processes and the same global batch gives the single-process weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "single")], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(WORKER), str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ws, wd = weights(tmp_path / "single"), weights(tmp_path / "ddp")
    for k in ws:
        torch.testing.assert_close(wd[k], ws[k], rtol=1e-5, atol=1e-6, msg=k)
    assert json.loads((tmp_path / "ddp" / "train_config.json").read_text())["world_size"] == 2
