"""The ACM training recipe: three phases, each resumable under out_dir (the model itself, its
forward, knob and cost: `adaptinf.methods.acm`).

1. `distill/`: module-wise distillation from the frozen dense model (`AcmClassifier.teacher`).
   Forward hooks (`capture_tokens`) on the dense model capture each replaced module's input and
   output on the training data's real tokens (those of its Linears: the sub-layer's input, after
   the block's LayerNorm in a pre-LN block, and the delta the residual adds, before a post-LN
   block's norm: what the learners replace in either); each module's learners are trained to match
   the output for every k = 1..N (MSE averaged over k), with their own Adam and their own gradient
   clipping, so modules are independent: each process of `torchrun --nproc_per_node=P` (or each of
   `workers` processes spawned on one machine) trains every P-th module, writes it to
   distill/<module>.safetensors (and its statistics, last, to distill/<module>.json: the module is
   done), and every process then reads all.
2. `gates/`: gate pre-training on labels "smallest n after which one more learner improves the
   error by less than a factor tau" (`sufficient_k`), plain cross-entropy, learners frozen; also
   module-wise and parallel the same way. The label histogram per module is the "sufficient k"
   distribution the summary reports.
3. `e2e/`: end-to-end fine-tuning of the whole model with `finetune_then_load_best` (resumable
   mid-epoch, DDP under torchrun): task loss + the model's budget, entropy and diversity terms.

Each module-wise phase keeps its settings in <phase>/settings.json (`guard_settings`): a rerun with
the same settings resumes (finished modules are read back), one with other settings is refused.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from adaptinf.backbone import attention_bias
from adaptinf.checkpoint import save_tensors_atomic, write_json_atomic
from adaptinf.data import Batch, Encoded, steps_per_epoch, train_batches
from adaptinf.methods.acm import AcmClassifier, AdaptiveModule, dense_counterpart
from adaptinf.methods.dense import DenseClassifier
from adaptinf.model import accuracy
from adaptinf.recipes.finetune import (barrier, capture_tokens, dist_info, finetune_then_load_best, guard_settings,
                                       lr_at, set_lr)
from adaptinf.settings import TrainConfig

PHASES = ("distill", "gates")


def sufficient_k(errors: torch.Tensor, tau: float) -> torch.Tensor:
    """Phase-2 labels from errors [T, C] (error with the c-th allowed number of learners, increasing k):
    the smallest c after which one more learner improves the error by less than a factor tau
    (errors[c] / errors[c+1] < tau); C - 1 when every step improves by at least tau. An error
    already 0 counts as not improving."""
    prev, nxt = errors[:, :-1], errors[:, 1:]
    small = (prev < tau * nxt) | (prev == 0)  # [T, C-1]
    last = torch.full_like(errors[:, 0], errors.shape[1] - 1, dtype=torch.int64)
    return torch.where(small.any(dim=1), small.to(torch.int8).argmax(dim=1), last)


def sufficient_k_absolute(errors: torch.Tensor, norms: torch.Tensor, eps: float) -> torch.Tensor:
    """Phase-2 labels from errors [T, C] (increasing k) and the dense output's norms [T]: the smallest
    c whose error is at most eps * norm (the output is already within eps of the module's); C - 1
    when none is."""
    ok = errors <= eps * norms[:, None]  # [T, C]
    last = torch.full_like(norms, errors.shape[1] - 1, dtype=torch.int64)
    return torch.where(ok.any(dim=1), ok.to(torch.int8).argmax(dim=1), last)


def budget_target(step: int, total: int, beta: float, anneal: float) -> float:
    """Phase 3's budget target at optimizer step `step` of `total`: from 1 down to beta, linearly over
    the first `anneal` share of the steps, then beta."""
    span = anneal * total
    if span <= 0 or step >= span:
        return beta
    return 1.0 + (beta - 1.0) * step / span


def resume_step(out: Path) -> int:
    """The optimizer step an end-to-end phase in `out` resumes from (its last/ resume point; 0 on a fresh start)."""
    for folder in ("last", "last.old"):
        state = out / folder / "state.json"
        if state.is_file():
            return int(json.loads(state.read_text()).get("global_step", 0))
    return 0


def _anneal_budget(model: AcmClassifier, total: int, first_step: int):
    """A forward pre-hook that sets `model.budget_target` before every training forward (one per
    optimizer step) from the step count; returns the hook's handle."""
    c, state = model.config, {"step": first_step}

    def hook(module, args, kwargs):
        if module.training:
            module.budget_target = budget_target(state["step"], total, c.beta, c.beta_anneal)
            state["step"] += 1

    return model.register_forward_pre_hook(hook, with_kwargs=True)


# --- the recipe -------------------------------------------------------------------------------------


def fit(model: AcmClassifier, train: Encoded, val: Encoded, cfg: TrainConfig, out_dir, progress: bool = True,
        restart: bool = False) -> dict:
    """Phase 1 (distill/), phase 2 (gates/), phase 3 (e2e/, `finetune_then_load_best`), each
    resumed from out_dir when rerun with the same settings (`restart` discards them). Returns a
    JSON-ready summary: per-module phase statistics, accuracies after phase 1, the e2e result."""
    rank, _ = dist_info()
    out = Path(out_dir)
    if restart and rank == 0:
        for phase in PHASES:
            shutil.rmtree(out / phase, ignore_errors=True)
    barrier()
    c = model.config
    summary: dict[str, Any] = {"n_train": len(train)}
    t0 = time.time()
    if c.distill_epochs:
        summary["distill"] = run_phase(model, "distill", train, cfg, out / "distill", progress)
        summary["distill_seconds"] = round(time.time() - t0, 1)  # ~0 when resumed from out_dir
        if rank == 0:
            summary.update(_distilled_accuracy(model, val, cfg))
    if c.gate_epochs:
        t0 = time.time()
        summary["gates"] = run_phase(model, "gates", train, cfg, out / "gates", progress)
        summary["gates_seconds"] = round(time.time() - t0, 1)
    handle = None
    if c.beta_anneal > 0:
        first = 0 if restart else resume_step(out / "e2e")
        handle = _anneal_budget(model, cfg.total_steps(len(train)), first)
    try:
        result = finetune_then_load_best(model, train, val, cfg, out / "e2e", progress=progress, restart=restart)
    finally:
        if handle is not None:
            handle.remove()
        model.budget_target = None
    summary.update(best_val_score=result.best_val_score, best_epoch=result.best_epoch, steps=result.steps,
                   best_step=result.best_step, stopped_early=result.stopped_early,
                   resumed_from_step=result.resumed_from_step)
    return summary


class _WithLearners(nn.Module):
    """`model` run with exactly k learners on every real token and no gate (forward's `learners`),
    for `accuracy`; a view that changes nothing in the model (its train/eval mode is the model's)."""

    def __init__(self, model: AcmClassifier, k: int):
        super().__init__()
        self.model, self.k = model, k
        self.training = model.training  # what `accuracy` restores afterwards

    def forward(self, input_ids, attention_mask, token_type_ids=None, knob=None):
        return self.model(input_ids, attention_mask, token_type_ids, knob=knob, learners=self.k)


def _distilled_accuracy(model: AcmClassifier, val: Encoded, cfg: TrainConfig) -> dict:
    """Validation accuracy of the distilled learners, all on, and of the dense model they came from."""
    pad, bs = model.spec.encoder.pad_token_id, cfg.eval_batch_size
    found = {"val_accuracy_all_learners": accuracy(_WithLearners(model, model.config.learners), val, bs, pad, knob=None)[0]}
    if model.teacher is not None:
        found["val_accuracy_dense"] = accuracy(model.teacher, val, bs, pad, knob=None)[0]
    return found


# --- the module-wise phases -------------------------------------------------------------------------


def phase_settings(model: AcmClassifier, phase: str, train: Encoded, cfg: TrainConfig) -> dict:
    """What a module-wise phase's result depends on (not beta etc.: runs at several budgets can share it)."""
    fields = ["learners", "targets", "distill_epochs", "distill_lr", "distill_mode"]
    if phase == "gates":
        fields += ["gate_hidden", "label_rule", "eps" if model.config.label_rule == "absolute" else "tau",
                   "gate_epochs", "gate_lr"]
    c = model.config.to_dict()
    return {"phase": phase, **{f: c[f] for f in fields}, "batch_size": cfg.batch_size, "seed": cfg.seed,
            "max_grad_norm": cfg.max_grad_norm, "warmup_ratio": cfg.warmup_ratio, "n_train": len(train)}


def _part(mod: AdaptiveModule, phase: str) -> nn.Module:
    """What `phase` trains in one ACM: its learners ("distill") or its gate ("gates")."""
    return mod.learners if phase == "distill" else mod.gate


def run_phase(model: AcmClassifier, phase: str, train: Encoded, cfg: TrainConfig, out: Path,
              progress: bool = True) -> dict:
    """Run phase "distill" or "gates" module-wise (resumable per module), in parallel across
    torchrun ranks or `workers` processes, and load every module's result. Returns per-module stats."""
    if phase not in PHASES:
        raise ValueError(f"acm: the module-wise phases are {list(PHASES)}, got {phase!r}")
    rank, world = dist_info()
    out = Path(out)
    guard_settings(out / "settings.json", phase_settings(model, phase, train, cfg), write=rank == 0)
    # every rank lists what is left BEFORE the barrier, while no rank has trained (and written) a module
    # yet: listed after it, a slower rank would miss a module a faster one just finished and split
    # the rest differently, leaving some modules to no rank
    todo = [n for n in model.names if not (out / f"{n}.json").is_file()]
    barrier()
    if todo:
        if model.teacher is None:
            raise ValueError(f"phase {phase!r} needs the dense model: build this model with AcmClassifier.from_dense")
        procs = model.config.workers
        if world > 1:  # the ranks are the workers
            train_modules(model, phase, todo[rank::world], train, cfg, out, progress and rank == 0)
            barrier()
        elif procs > 1:
            threads = max(1, torch.get_num_threads() // procs)
            mp.spawn(_worker, args=(procs, model, phase, todo, train, cfg, str(out), threads), nprocs=procs, join=True)
        else:
            train_modules(model, phase, todo, train, cfg, out, progress)
    stats = {}
    for name in model.names:
        _part(model.module(name), phase).load_state_dict(load_file(str(out / f"{name}.safetensors")))
        stats[name] = json.loads((out / f"{name}.json").read_text())
    return stats


def _worker(rank: int, procs: int, model: AcmClassifier, phase: str, names: list[str], train: Encoded,
            cfg: TrainConfig, out: str, threads: int) -> None:
    """One of `workers` processes of a module-wise phase (mp.spawn): trains every procs-th module."""
    torch.set_num_threads(threads)
    train_modules(model, phase, names[rank::procs], train, cfg, Path(out), progress=False)


@dataclass
class ModuleRun:
    """One module's training in a module-wise phase: its own Adam and gradient clipping, so the
    result does not depend on which other modules train beside it."""

    mod: AdaptiveModule
    phase: str
    opt: torch.optim.Optimizer
    counts: torch.Tensor  # phase 2: labels per choice of k, first epoch
    sums: list = field(default_factory=lambda: [0.0, 0.0, 0])  # this epoch: loss, output power, tokens
    per_k: torch.Tensor | None = None  # phase 1, this epoch: [3, N] squared error, relative error, tokens within 0.1

    @classmethod
    def start(cls, mod: AdaptiveModule, phase: str, lr: float) -> ModuleRun:
        opt = torch.optim.Adam(_part(mod, phase).parameters(), lr=lr)
        return cls(mod, phase, opt, torch.zeros(len(mod.choices), dtype=torch.int64))

    def loss(self, x: torch.Tensor, y: torch.Tensor, c, count: bool) -> torch.Tensor:
        """Phase 1: MSE to the dense output y [T, d] for every k (config `distill_mode`: "residual",
        learner k trained by the error at k alone, or "average"); phase 2: cross-entropy of the gate
        on the labels of `label_rule` (counted when `count`)."""
        if self.phase == "distill":
            learners = self.mod.learners
            cum = learners.residual_cumulative(x) if c.distill_mode == "residual" else learners.cumulative(x)[:, 1:]
            with torch.no_grad():  # [T, N] for k = 1..N
                sq = (cum.detach() - y[:, None]).pow(2).sum(dim=-1)
                rel = sq.sqrt() / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                found = torch.stack([sq.sum(0), rel.sum(0), (rel <= 0.1).sum(0).to(sq.dtype)])
                self.per_k = found if self.per_k is None else self.per_k + found
            return (cum - y[:, None]).pow(2).mean()  # MSE averaged over k
        with torch.no_grad():
            err = (self.mod.learners.cumulative(x)[:, self.mod.min_k :] - y[:, None]).norm(dim=-1)  # [T, C]
            if c.label_rule == "absolute":
                labels = sufficient_k_absolute(err, y.norm(dim=-1), c.eps)
            else:
                labels = sufficient_k(err, c.tau)
        if count:
            self.counts += torch.bincount(labels, minlength=len(self.mod.choices))
        return F.cross_entropy(self.mod.gate(x), labels)

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float, c, count: bool, max_grad_norm: float) -> None:
        """One optimizer step on the captured input x [T, d_in] and dense output y [T, d_out]
        (c: the model's AcmConfig)."""
        set_lr(self.opt, lr)
        loss = self.loss(x, y, c, count)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(_part(self.mod, self.phase).parameters(), max_grad_norm)
        self.opt.step()
        self.sums[0] += float(loss.detach()) * x.shape[0]
        self.sums[1] += float(y.pow(2).mean()) * x.shape[0]
        self.sums[2] += x.shape[0]

    def save(self, out: Path, name: str) -> None:
        """out/<name>.safetensors, then out/<name>.json (its statistics; written last: the module is done)."""
        save_tensors_atomic(dict(_part(self.mod, self.phase).state_dict()), out / f"{name}.safetensors")
        loss, power, tokens = self.sums
        stats: dict[str, Any] = {"loss": loss / max(1, tokens)}
        if self.phase == "distill":  # MSE over k relative to the output's mean square
            stats["relative_mse"] = loss / max(power, 1e-30)
            if self.per_k is not None and tokens:  # per k = 1..N, this (the last) epoch
                d = self.mod.learners.w2.shape[1]
                sq, rel, within = self.per_k.tolist()
                stats["relative_mse_per_k"] = [e / d / max(power, 1e-30) for e in sq]
                stats["mean_relative_error_per_k"] = [r / tokens for r in rel]
                stats["share_within_0.1_per_k"] = [w / tokens for w in within]
        else:
            share = (self.counts.double() / self.counts.sum().clamp_min(1)).tolist()
            stats["sufficient_k_share"] = {str(int(k)): v for k, v in zip(self.mod.choices, share)}
        write_json_atomic(out / f"{name}.json", stats)


@torch.no_grad()
def _teacher_pass(teacher: DenseClassifier, batch: Batch, depth: int) -> None:
    """The dense model's first `depth` blocks on the batch (the capture hooks keep what is needed)."""
    h = teacher.encoder.embed(batch.input_ids)  # [b, s, d]
    teacher.encoder.run_blocks(h, attention_bias(batch.attention_mask, h.dtype), 0, depth)


def train_modules(model: AcmClassifier, phase: str, names: list[str], train: Encoded, cfg: TrainConfig, out: Path,
                  progress: bool = False) -> None:
    """Train the learners ("distill") or the gates ("gates") of the ACMs `names` on the dense
    model's captured inputs and outputs, each module on its own (`ModuleRun`). Writes out/<name>.*."""
    if not names:  # more workers than modules left
        return
    c, teacher = model.config, model.teacher
    epochs, lr = (c.distill_epochs, c.distill_lr) if phase == "distill" else (c.gate_epochs, c.gate_lr)
    sched = TrainConfig(epochs=epochs, lr=lr, warmup_ratio=cfg.warmup_ratio, batch_size=cfg.batch_size)
    total = steps_per_epoch(len(train), cfg.batch_size) * epochs
    runs = {n: ModuleRun.start(model.module(n), phase, lr) for n in names}
    points = {}
    for n in names:
        first, last = dense_counterpart(teacher, n)
        points[f"{n}:in"], points[f"{n}:out"] = (first, "input"), (last, "output")
    depth = max(int(n.split(".")[0]) for n in names) + 1  # the blocks the teacher must run
    step = 0
    with capture_tokens(points) as cap, tqdm(total=total, desc=f"acm {phase}", disable=not progress, unit="step") as bar:
        for epoch in range(epochs):
            for run in runs.values():
                run.sums, run.per_k = [0.0, 0.0, 0], None  # the statistics reported are the last epoch's
            for batch, _, _ in train_batches(train, cfg.batch_size, cfg.seed, epoch, pad_id=model.spec.encoder.pad_token_id):
                cap.select(batch.attention_mask)
                _teacher_pass(teacher, batch, depth)
                rate = lr_at(step, total, sched)
                for n, run in runs.items():
                    run.step(cap[f"{n}:in"], cap[f"{n}:out"], rate, c, epoch == 0, cfg.max_grad_norm)
                step += 1
                bar.update(1)
    for n, run in runs.items():
        run.save(out, n)
