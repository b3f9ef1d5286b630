"""Training ACM on the decoder (`adaptinf.lm_methods.acm.AcmLM`): three phases, each cached in out_dir.

1. `distill/`: every layer's learners are distilled from the frozen dense model (`AcmLM.teacher`):
   forward hooks on the teacher's FFN Linears capture each FFN's input (after the block's
   LayerNorm) and output (what the residual adds) on the training windows, and each layer's
   learners fit it for every k (`distill_mode` "residual": learner k fits what learners 1..k-1
   leave), with their own Adam and clipping (`adaptinf.recipes.acm`'s per-module step). One teacher
   pass per step feeds every layer.
2. `gates/`: the gates are trained on "sufficient k" labels (`label_rule`, as the classifier's),
   learners frozen. The labels' histogram (`sufficient_k_share` per layer) is how many learners the
   tokens need after distillation.
3. out_dir itself: end-to-end fine-tuning with `adaptinf.recipes.lm.train_lm` minimising
   `AcmLM.training_loss` (next-token CE, + KL to the dense logits when kd_weight > 0, + the budget,
   entropy and diversity terms), the budget target annealed from 1 to beta over the first
   `beta_anneal` share of the steps (`adaptinf.recipes.acm.budget_target`, set before each training
   forward). Resumable mid-phase (train_lm's last/), the best validation perplexity at the trained
   gate in out_dir/best (`adaptinf.lm.load_lm` gives an `AcmLM`).

Phases 1 and 2 are short (steps, not epochs) and cached whole: <phase>/<layer>.ffn.safetensors and
.json (statistics, written last), with the settings they were made with in <phase>/settings.json
(a rerun with other settings is refused; `restart` discards them). out_dir/acm_summary.json holds
every phase's statistics and the model measured after each: validation perplexity, FLOPs per token
and the share of tokens running k = 0..n learners per layer.

Model selection: train_lm keeps the lowest validation perplexity at the trained gate, so with an
annealed target an early, costlier checkpoint can win; validate after the annealing (`eval_every`)
or read `best_step` in the summary.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from adaptinf.checkpoint import load_weights, write_json_atomic
from adaptinf.corpus import LMData, lm_batches, lm_eval_batches, lm_steps_per_epoch, perplexity_from
from adaptinf.lm import LanguageModel
from adaptinf.lm_methods.acm import AcmLM
from adaptinf.recipes.acm import ModuleRun, budget_target, resume_step
from adaptinf.recipes.finetune import guard_settings
from adaptinf.recipes.lm import LMTrainConfig, LMTrainResult, lm_lr_at, train_lm

PHASES = ("distill", "gates")
SUMMARY_FILE = "acm_summary.json"
MEASURE_TOKENS = 32_768  # validation tokens the phase summaries are measured on (when eval_tokens is 0)


@dataclass
class AcmLMFitResult:
    """Phase 3's `LMTrainResult` and the JSON summary written to out_dir/acm_summary.json."""

    train: LMTrainResult
    summary: dict

    @property
    def best_val_perplexity(self) -> float:
        return self.train.best_val_perplexity


def fit(model: AcmLM, data: LMData, cfg: LMTrainConfig, out_dir, *, progress: bool = True, restart: bool = False,
        stop_after_steps: int | None = None) -> AcmLMFitResult:
    """Phases 1 (distill/), 2 (gates/) and 3 (out_dir, `train_lm`), each resumed from out_dir
    (`restart` discards them); `stop_after_steps` ends phase 3 early as an interruption would. The
    model ends with out_dir/best's weights, in eval mode."""
    if not isinstance(model, AcmLM):
        raise ValueError(f"lm_acm.fit trains an AcmLM (AcmLM.from_dense(dense)), got {type(model).__name__}")
    out = Path(out_dir)
    if restart:
        for phase in PHASES:
            shutil.rmtree(out / phase, ignore_errors=True)
        (out / SUMMARY_FILE).unlink(missing_ok=True)
    c, window = model.config, cfg.window(model)
    measure_tokens = cfg.eval_tokens or MEASURE_TOKENS
    summary: dict[str, Any] = {"config": c.to_dict(), "window": window}
    if model.teacher is not None:
        summary["dense"] = measure(model.teacher, data.validation, cfg.eval_batch_size, window, measure_tokens)
    for phase, steps in (("distill", c.distill_steps), ("gates", c.gate_steps)):
        if steps:
            t0 = time.time()
            summary[phase] = run_phase(model, phase, data, cfg, out / phase, progress)
            summary[f"{phase}_seconds"] = round(time.time() - t0, 1)  # ~0 when read back from out_dir
            summary[f"after_{phase}"] = _measure_phase(model, data, cfg, window, measure_tokens, phase)
    total = cfg.total_steps(lm_steps_per_epoch(data.train.numel(), cfg.batch_size, window))
    handle = _anneal_budget(model, total, 0 if restart else resume_step(out))
    try:
        result = train_lm(model, data, cfg, out, progress=progress, restart=restart, stop_after_steps=stop_after_steps,
                          extra_settings={"acm": c.to_dict(), "phases": _phase_digests(out)})
    finally:
        handle.remove()
        model.budget_target = None
    if (out / "best").is_dir():
        load_weights(model, out / "best", "causal-lm (acm)")
    model.eval()
    summary["train"] = {"best_val_perplexity": result.best_val_perplexity, "best_step": result.best_step,
                        "steps": result.steps, "total_steps": result.total_steps,
                        "resumed_from_step": result.resumed_from_step, "seconds": round(result.seconds, 1)}
    if result.steps >= result.total_steps or result.stopped_early:
        summary["after_training"] = measure(model, data.validation, cfg.eval_batch_size, window, measure_tokens)
    write_json_atomic(out / SUMMARY_FILE, summary)
    return AcmLMFitResult(result, summary)


# --- measuring ---------------------------------------------------------------------------------------


@torch.no_grad()
def measure(model: LanguageModel, stream: torch.Tensor, batch_size: int, window: int, max_tokens: int | None = None,
            knob: float | None = None) -> dict:
    """Perplexity and FLOPs per token of the stream's first max_tokens + 1 tokens at `knob` (dense:
    None), and for an `AcmLM` the share of tokens running k = 0..n learners per layer ("learner_share")
    and the mean number of learners a token runs per layer. One host sync at the end."""
    stream = stream if max_tokens is None else stream[: max_tokens + 1]
    was_training = model.training
    model.eval()
    device = model.decoder.embeddings.word.weight.device
    nll = torch.zeros((), dtype=torch.float64, device=device)
    cost = torch.zeros((), dtype=torch.float64, device=device)
    counts = None
    try:
        with model.using_knob(knob):
            for batch in lm_eval_batches(stream, batch_size, window):
                a, f = model.score(batch.inputs.to(device), batch.targets.to(device))
                nll, cost = nll + a, cost + f
                if isinstance(model, AcmLM):  # the k each layer chose in that call
                    n = model.config.learners + 1
                    got = torch.stack([torch.bincount(k, minlength=n) for k in model.routing.k])  # [L, n+1]
                    counts = got if counts is None else counts + got
    finally:
        model.train(was_training)
    tokens = stream.numel() - 1
    found: dict[str, Any] = {"val_perplexity": perplexity_from(float(nll), tokens),
                             "flops_per_token": float(cost) / tokens, "tokens": tokens, "knob": knob}
    if counts is not None:
        share = counts.double() / counts.sum(dim=1, keepdim=True)
        found["learner_share"] = [[round(v, 4) for v in row] for row in share.tolist()]
        found["mean_learners"] = [round(v, 3) for v in (share * torch.arange(share.shape[1])).sum(1).tolist()]
    return found


def _measure_phase(model: AcmLM, data: LMData, cfg: LMTrainConfig, window: int, tokens: int, phase: str) -> dict:
    """After distillation: perplexity with k = 1..n learners on every token (no gate); after the
    gates: the model at its trained gate."""
    args = (data.validation, cfg.eval_batch_size, window, tokens)
    if phase == "gates":
        return measure(model, *args)
    found = {}
    for k in range(1, model.config.learners + 1):
        with model.using_learners(k):
            r = measure(model, *args)
        found[f"learners_{k}"] = {"val_perplexity": r["val_perplexity"], "flops_per_token": r["flops_per_token"]}
    return found


# --- phases 1 and 2 ----------------------------------------------------------------------------------


def _sha(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


def phase_settings(model: AcmLM, phase: str, data: LMData, cfg: LMTrainConfig) -> dict:
    """What a phase's result depends on (phase 2 trains on phase 1's learners: their settings too;
    not beta etc.: runs at several budgets can share phases 1 and 2)."""
    c = model.config.to_dict()
    names = ["learners", "distill_steps", "distill_lr", "distill_mode"]
    if phase == "gates":
        names += ["gate_hidden", "label_rule", "eps" if c["label_rule"] == "absolute" else "tau", "gate_steps",
                  "gate_lr"]
    teacher = model.teacher
    return {"phase": phase, **{n: c[n] for n in names}, "batch_size": cfg.batch_size, "window": cfg.window(model),
            "seed": cfg.seed, "warmup_ratio": cfg.warmup_ratio, "max_grad_norm": cfg.max_grad_norm,
            "data": {"name": data.name, "train": _sha([data.train])},
            "dense": None if teacher is None else _sha(teacher.state_dict().values())}


def _layer_names(model: AcmLM) -> list[str]:
    return [f"{i}.ffn" for i in range(model.cfg.num_hidden_layers)]


def _part(model: AcmLM, i: int, phase: str) -> torch.nn.Module:
    acm = model.ffns()[i].acm
    return acm.learners if phase == "distill" else acm.gate


def run_phase(model: AcmLM, phase: str, data: LMData, cfg: LMTrainConfig, out: Path, progress: bool = True) -> dict:
    """Phase "distill" or "gates": trained (needs the teacher) unless out holds it with the same
    settings; its result loaded into the model. Returns the per-layer statistics."""
    if phase not in PHASES:
        raise ValueError(f"acm: the layer-wise phases are {list(PHASES)}, got {phase!r}")
    out = Path(out)
    names = _layer_names(model)
    done = all((out / f"{n}.json").is_file() for n in names)
    if model.teacher is None and not done:
        raise ValueError(f"phase {phase!r} needs the dense model: build this model with AcmLM.from_dense "
                         "(or attach_teacher)")
    if model.teacher is not None:  # without the teacher the settings cannot be checked; the files are read as they are
        guard_settings(out / "settings.json", phase_settings(model, phase, data, cfg))
    if not done:
        train_layers(model, phase, data, cfg, out, progress)
    stats = {}
    for i, name in enumerate(names):
        _part(model, i, phase).load_state_dict(load_file(str(out / f"{name}.safetensors")))
        stats[name] = json.loads((out / f"{name}.json").read_text())
    return stats


@torch.no_grad()
def ffn_io(teacher: LanguageModel, inputs: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every FFN's input (after its LayerNorm) and output (before the residual) [b*s, d], per layer,
    of the dense model on inputs [b, s] (forward hooks on the FFN Linears; the LM head does not run)."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    hooks = []
    for blk in teacher.decoder.blocks:
        hooks.append(blk.ffn.up.register_forward_hook(lambda m, a, o: xs.append(a[0].flatten(0, -2))))
        hooks.append(blk.ffn.down.register_forward_hook(lambda m, a, o: ys.append(o.flatten(0, -2))))
    try:
        teacher.decoder.hidden(inputs)
    finally:
        for h in hooks:
            h.remove()
    return xs, ys


def train_layers(model: AcmLM, phase: str, data: LMData, cfg: LMTrainConfig, out: Path, progress: bool) -> None:
    """`phase`'s steps on every layer at once (one teacher pass per step feeds all), each layer with
    its own Adam and clipping (`ModuleRun`); writes out/<layer>.ffn.safetensors and .json."""
    c = model.config
    steps, lr = (c.distill_steps, c.distill_lr) if phase == "distill" else (c.gate_steps, c.gate_lr)
    sched = LMTrainConfig(lr=lr, warmup_ratio=cfg.warmup_ratio, schedule="linear")
    window, device = cfg.window(model), model.decoder.embeddings.word.weight.device
    runs = [ModuleRun.start(ffn.acm, phase, lr) for ffn in model.ffns()]
    step, epoch = 0, 0
    with tqdm(total=steps, desc=f"acm {phase}", disable=not progress, unit="step") as bar:
        while step < steps:
            for batch in lm_batches(data.train, cfg.batch_size, window, cfg.seed, epoch):
                xs, ys = ffn_io(model.teacher, batch.inputs.to(device))
                rate = lm_lr_at(step, steps, sched)
                for run, x, y in zip(runs, xs, ys):
                    run.step(x, y, rate, c, True, cfg.max_grad_norm)
                step += 1
                bar.update(1)
                if step >= steps:
                    break
            epoch += 1
    out.mkdir(parents=True, exist_ok=True)
    for run, name in zip(runs, _layer_names(model)):
        run.save(out, name)


# --- phase 3 -----------------------------------------------------------------------------------------


def _phase_digests(out: Path) -> dict:
    """The settings phases 1 and 2 were made with (phase 3 resumes only on the same)."""
    return {p: json.loads((out / p / "settings.json").read_text()) if (out / p / "settings.json").is_file() else None
            for p in PHASES}


def _anneal_budget(model: AcmLM, total: int, first_step: int):
    """A forward pre-hook on the decoder that sets `model.budget_target` before every training
    forward (one per optimizer step: `AcmLM.training_loss` runs the decoder once) from the step count."""
    c, state = model.config, {"step": first_step}

    def hook(module, args):
        if module.training:
            model.budget_target = budget_target(state["step"], total, c.beta, c.beta_anneal)
            state["step"] += 1

    return model.decoder.register_forward_pre_hook(hook)
