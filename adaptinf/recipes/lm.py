"""Training a language model from scratch: `adaptinf train-lm`.

`train_lm_from_scratch` is the whole job: read the corpus (`austen` or a text file), train the
byte-level BPE tokenizer on its training split, build the decoder (built-in `gpt-tiny`, or its
config with overrides) seeded, then `train_lm` and score the best model on the test split.

`train_lm` is the loop: AdamW (no weight decay on biases and LayerNorms), linear warm-up then
cosine or linear decay to 0, gradient clipping, validation perplexity every `eval_every` steps (and
at the end), the best model kept in out/best (an `adaptinf.lm.load_lm` directory), `patience`,
resumable mid-epoch. It reuses the fine-tuning loop's pieces (`adaptinf.recipes.finetune`): the
optimizer, the atomic resume point (`save_state` / `load_state`: weights, AdamW moments, torch RNG
and the position, safetensors + JSON), the settings guard and the Ctrl-C-at-a-step-boundary
handler, so a resumed run ends bit-identical to an uninterrupted one.

Output directory:
    last/              the resume point
    best/              the best model on validation (`adaptinf generate OUT/best --prompt ...`)
    metrics.csv        one row per log step and per validation
    train_config.json  the settings the run was started with (a resume must match them)
    summary.json       the result: best validation perplexity and step, test perplexity, time
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adaptinf.checkpoint import write_json_atomic
from adaptinf.corpus import DEFAULT_VOCAB_SIZE, LMData, lm_batches, lm_corpus, lm_steps_per_epoch, train_tokenizer
from adaptinf.decoder import Decoder
from adaptinf.lm import DEFAULT_LM, LanguageModel, LMScore, builtin_lm_config, evaluate_perplexity, load_lm
from adaptinf.recipes.finetune import (_Log, guard_settings, load_state, lr_schedule, make_optimizer,
                                       run_epochs, save_state, set_lr)
from adaptinf.settings import LM_TASKS

SCHEDULES = ("cosine", "linear")


def _flag(default, help: str):
    """A field that is also a flag of `adaptinf train-lm` (its help text beside its default)."""
    return field(default=default, metadata={"help": help})


@dataclass
class LMTrainConfig:
    """How a language model is trained from scratch (the defaults suit gpt-tiny on one CPU core)."""

    epochs: int = _flag(1, "passes over the training split")
    max_steps: int = _flag(0, "at most this many optimizer steps (0: epochs alone)")
    batch_size: int = _flag(8, "sequences per optimizer step")
    seq_len: int = _flag(0, "tokens per training and validation window (0: the model's context)")
    lr: float = _flag(2e-3, "peak AdamW learning rate")
    weight_decay: float = _flag(0.1, "AdamW weight decay (not on biases and LayerNorms)")
    warmup_ratio: float = _flag(0.05, "fraction of steps of linear warm-up")
    schedule: str = _flag("cosine", "decay after the warm-up, to 0: cosine or linear")
    max_grad_norm: float = _flag(1.0, "gradient clipping norm (over all parameters)")
    dropout: float = _flag(0.0, "dropout of the decoder (embeddings, attention, residual)")
    eval_every: int = _flag(100, "steps between validations, the best kept (0: at the end of every epoch)")
    eval_tokens: int = _flag(0, "validate on the first N tokens of the validation split (0: all of it)")
    patience: int = _flag(0, "stop after this many validations without a lower perplexity (0: never stop early)")
    save_every: int = _flag(50, "steps between resume checkpoints")
    eval_batch_size: int = 32
    log_every: int = 10
    seed: int = 0  # weights' initialisation and batch order (`--seed`)

    def __post_init__(self) -> None:
        ints = {"epochs": 1, "max_steps": 0, "batch_size": 1, "seq_len": 0, "eval_every": 0, "eval_tokens": 0,
                "patience": 0, "save_every": 1, "eval_batch_size": 1, "log_every": 1}
        for name, least in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"LMTrainConfig.{name} must be an integer >= {least}, got {v!r}")
        if self.seq_len == 1:
            raise ValueError("LMTrainConfig.seq_len must be 0 (the model's context) or at least 2, got 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"LMTrainConfig.seed must be an integer, got {self.seed!r}")
        checks = {"lr": self.lr > 0, "weight_decay": self.weight_decay >= 0, "warmup_ratio": 0 <= self.warmup_ratio < 1,
                  "max_grad_norm": self.max_grad_norm > 0, "dropout": 0 <= self.dropout < 1}
        for name, ok in checks.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok:
                raise ValueError(f"LMTrainConfig.{name} has an invalid value {v!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"LMTrainConfig.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")

    @classmethod
    def flags(cls) -> dict[str, str]:
        """Field name -> help text of the fields that are command-line flags, in field order."""
        return {f.name: f.metadata["help"] for f in fields(cls) if "help" in f.metadata}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def window(self, model: LanguageModel) -> int:
        """The training / validation window: `seq_len`, or the model's context when 0."""
        if self.seq_len > model.cfg.max_positions:
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's context of {model.cfg.max_positions} tokens")
        return self.seq_len or model.cfg.max_positions

    def total_steps(self, per_epoch: int) -> int:
        steps = self.epochs * per_epoch
        return min(steps, self.max_steps) if self.max_steps else steps


def lm_lr_at(step: int, total: int, cfg: LMTrainConfig) -> float:
    """The learning rate of step `step` of `total`: linear warm-up over the first `warmup_ratio` of
    the steps (whole steps, as the fine-tuning schedule), then linear or cosine decay to 0."""
    warm = int(cfg.warmup_ratio * total)
    if cfg.schedule == "linear" or step < warm:
        return lr_schedule(step / max(1, total), (step + 1) / max(1, total), cfg.lr, warm / max(1, total))
    progress = (step - warm) / max(1, total - warm)  # 0 at the first step after the warm-up
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class LMTrainResult:
    best_val_loss: float
    best_val_perplexity: float
    best_step: int
    steps: int
    total_steps: int
    resumed_from_step: int
    seconds: float
    out_dir: Path
    stopped_early: bool = False
    epochs_run: int = 0


@dataclass
class _Position:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_loss: float = math.inf
    best_step: int = -1
    since_best: int = 0
    stopped: bool = False

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["best_loss"] = None if math.isinf(self.best_loss) else self.best_loss  # JSON has no inf
        return d

    @classmethod
    def from_dict(cls, d: dict) -> _Position:
        d = dict(d)
        d["best_loss"] = math.inf if d.get("best_loss") is None else d["best_loss"]
        return cls(**d)


class _LMLog(_Log):
    """metrics.csv (and TensorBoard when installed) with the LM's columns."""

    FIELDS = ["epoch", "step", "lr", "train_loss", "val_loss", "val_perplexity", "elapsed_s"]


def _digest(*streams: torch.Tensor) -> str:
    h = hashlib.sha256()
    for s in streams:
        h.update(s.to(torch.int64).numpy().tobytes())
    return "sha256:" + h.hexdigest()


_RUN_FILES = ("last", "last.old", "last.new", "best", "metrics.csv", "train_config.json", "summary.json", "tensorboard")


def _prepare(model: LanguageModel, data: LMData, cfg: LMTrainConfig, out: Path, restart: bool,
             extra_settings: dict | None) -> tuple[torch.optim.Optimizer, _Position]:
    """Clear a restarted run, check its settings against the recorded ones, restore a resume point."""
    out.mkdir(parents=True, exist_ok=True)
    if restart:
        for name in _RUN_FILES:
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    settings = {"train": cfg.to_dict(), "model": {"name": model.name, "decoder": model.cfg.to_dict()},
                "data": {"name": data.name, "tokens": data.token_counts(),
                         "digest": _digest(data.train, data.validation)}, **(extra_settings or {})}
    settings = {**settings, "train": {**settings["train"], "seq_len": cfg.window(model)}}
    cfg_path = out / "train_config.json"
    guard_settings(cfg_path, settings, write=False)  # other settings or data: refused, not resumed
    torch.manual_seed(cfg.seed)  # dropout's draws (restored from the resume point when resuming)
    model.train()
    opt = make_optimizer(model, cfg)
    saved = load_state(out, model, opt)
    if saved is None:
        write_json_atomic(cfg_path, settings)
    return opt, _Position.from_dict(saved) if saved is not None else _Position()


@dataclass
class _Loop:
    """What one call of `train_lm` carries from step to step."""

    model: LanguageModel
    opt: torch.optim.Optimizer
    pos: _Position
    cfg: LMTrainConfig
    data: LMData
    out: Path
    seq_len: int
    per_epoch: int
    total: int
    log: _LMLog
    bar: Any
    save_extra: dict | None
    t0: float
    running: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    running_n: int = 0
    steps_this_call: int = 0


def _train_step(model: LanguageModel, opt: torch.optim.Optimizer, inputs, targets, max_grad_norm: float) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    device = model.decoder.embeddings.word.weight.device
    loss = model.training_loss(inputs.to(device), targets.to(device))  # mean over the batch's tokens (+ a method's terms)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    return loss.detach()


def _validate(loop: _Loop) -> None:
    """Validation perplexity; a better one is saved to out/best; `patience` validations without one stop the run."""
    pos, cfg = loop.pos, loop.cfg
    score = evaluate_perplexity(loop.model, loop.data.validation, cfg.eval_batch_size, loop.seq_len,
                                cfg.eval_tokens or None)
    loop.log({"epoch": pos.epoch, "step": pos.global_step, "val_loss": score.loss, "val_perplexity": score.perplexity,
              "elapsed_s": round(time.time() - loop.t0, 1)})
    loop.bar.write(f"step {pos.global_step}/{loop.total}: validation loss {score.loss:.4f}, "
                   f"perplexity {score.perplexity:.2f}")
    if score.loss < pos.best_loss:
        pos.best_loss, pos.best_step, pos.since_best = score.loss, pos.global_step, 0
        loop.model.save(loop.out / "best", extra={**(loop.save_extra or {}), "val_loss": score.loss,
                                                  "val_perplexity": score.perplexity, "val_tokens": score.tokens,
                                                  "step": pos.global_step, "epoch": pos.epoch + 1})
    else:
        pos.since_best += 1
    if cfg.patience and pos.since_best >= cfg.patience:
        pos.stopped = True
        loop.bar.write(f"early stop: {pos.since_best} validations without a lower perplexity; best at step {pos.best_step}")


def _due(loop: _Loop) -> bool:
    pos, every = loop.pos, loop.cfg.eval_every
    if pos.global_step >= loop.total:
        return True
    return pos.global_step % every == 0 if every else pos.step_in_epoch == loop.per_epoch


def _epoch(loop: _Loop, ctrl_c: dict, stop_after_steps: int | None) -> bool:
    """The rest of the current epoch, up to the budget or an early stop; True when `stop_after_steps` ended it."""
    pos, cfg = loop.pos, loop.cfg
    for batch in lm_batches(loop.data.train, cfg.batch_size, loop.seq_len, cfg.seed, pos.epoch,
                            start_step=pos.step_in_epoch):
        lr = lm_lr_at(pos.global_step, loop.total, cfg)
        set_lr(loop.opt, lr)
        loss = _train_step(loop.model, loop.opt, batch.inputs, batch.targets, cfg.max_grad_norm)
        loop.running = loop.running.to(loss.device) + loss  # summed where the loss is: no sync per step
        loop.running_n += 1
        pos.global_step, pos.step_in_epoch, loop.steps_this_call = pos.global_step + 1, pos.step_in_epoch + 1, loop.steps_this_call + 1
        loop.bar.update(1)
        if ctrl_c["hit"]:  # at a step boundary: the state an uninterrupted run has here
            raise KeyboardInterrupt
        if pos.global_step % cfg.log_every == 0:
            mean = float(loop.running) / loop.running_n  # one host sync per log step
            loop.bar.set_postfix(loss=f"{mean:.4f}", epoch=pos.epoch)
            loop.log({"epoch": pos.epoch, "step": pos.global_step, "lr": lr, "train_loss": mean,
                      "elapsed_s": round(time.time() - loop.t0, 1)})
            loop.running, loop.running_n = torch.zeros((), dtype=torch.float64), 0
        if _due(loop):
            _validate(loop)
        if pos.step_in_epoch == loop.per_epoch:  # the resume point moves to the next epoch
            pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
        if (pos.global_step % cfg.save_every == 0 or pos.step_in_epoch == 0 or pos.stopped
                or pos.global_step >= loop.total):
            save_state(loop.out, loop.model, loop.opt, pos.to_dict())
        if pos.stopped or pos.global_step >= loop.total or pos.step_in_epoch == 0:
            return False
        if stop_after_steps is not None and loop.steps_this_call >= stop_after_steps:
            return True
    return False


def train_lm(model: LanguageModel, data: LMData, cfg: LMTrainConfig, out_dir: str | os.PathLike, *,
             progress: bool = True, restart: bool = False, stop_after_steps: int | None = None,
             save_extra: dict | None = None, extra_settings: dict | None = None) -> LMTrainResult:
    """Train `model` on `data.train`, keep the lowest validation perplexity in out_dir/best. Resumes
    from out_dir/last (a run with other settings or data is refused); Ctrl-C saves the resume point
    at the next step boundary. `stop_after_steps` ends this call after that many steps, as an
    interruption would (to test resuming)."""
    if data.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the data's vocabulary ({data.vocab_size}) is larger than the model's ({model.cfg.vocab_size})")
    out = Path(out_dir)
    seq_len = cfg.window(model)
    per_epoch = lm_steps_per_epoch(data.train.numel(), cfg.batch_size, seq_len)
    if per_epoch == 0:
        raise ValueError(f"the training split has {data.train.numel()} tokens, too few for one window of "
                         f"seq_len={seq_len} (+1); lower --seq-len or give more text")
    opt, pos = _prepare(model, data, cfg, out, restart, extra_settings)
    total = cfg.total_steps(per_epoch)
    resumed_from = pos.global_step
    bar = tqdm(total=total, initial=pos.global_step, desc="train-lm", disable=not progress, unit="step")
    loop = _Loop(model, opt, pos, cfg, data, out, seq_len, per_epoch, total, _LMLog(out, 0), bar, save_extra,
                 time.time())
    run_epochs(lambda ctrl_c: _epoch(loop, ctrl_c, stop_after_steps), pos, total, model, opt, out, bar, loop.log)
    best = math.exp(pos.best_loss) if math.isfinite(pos.best_loss) else math.inf
    return LMTrainResult(pos.best_loss, best, pos.best_step, pos.global_step, total, resumed_from,
                         time.time() - loop.t0, out, pos.stopped, pos.epoch)


def build_lm(tokenizer, model_name: str = DEFAULT_LM, dropout: float = 0.0, seed: int = 0,
             overrides: dict | None = None) -> LanguageModel:
    """A fresh (seeded) built-in decoder sized to `tokenizer`, with DecoderConfig `overrides`."""
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    dcfg = builtin_lm_config(model_name, len(tokenizer), dropout, eos, overrides)
    torch.manual_seed(seed)
    return LanguageModel(Decoder(dcfg), tokenizer, model_name)


def train_lm_from_scratch(task: str, cfg: LMTrainConfig, out_dir: str | os.PathLike, *, model_name: str = DEFAULT_LM,
                          vocab_size: int = DEFAULT_VOCAB_SIZE, overrides: dict | None = None, progress: bool = True,
                          restart: bool = False, stop_after_steps: int | None = None) -> tuple[LMTrainResult, dict]:
    """`adaptinf train-lm`: corpus `task` (`austen` or a text file), a tokenizer trained on its training
    split (deterministic, so a resume retrains the same one), a fresh decoder, `train_lm`, then the
    best model's test perplexity. Returns the result and the summary written to out/summary.json."""
    t0 = time.time()
    corpus = lm_corpus(task)
    tokenizer = train_tokenizer(corpus.texts("train"), vocab_size)
    data = LMData.from_corpus(corpus, tokenizer)
    model = build_lm(tokenizer, model_name, cfg.dropout, cfg.seed, overrides)
    seq_len = cfg.window(model)
    model.seq_len = seq_len
    task_record = {"data": task if task in LM_TASKS else os.path.abspath(task), "vocab_size": vocab_size}
    result = train_lm(model, data, cfg, out_dir, progress=progress, restart=restart, stop_after_steps=stop_after_steps,
                      save_extra={"task": task_record, "train_tokens": data.train.numel()},
                      extra_settings={"task": task_record, "overrides": dict(overrides or {})})
    summary = {"task": task_record, "model": model_name, "parameters": model.num_parameters(),
               "decoder": model.cfg.to_dict(), "seq_len": seq_len, "tokens": data.token_counts(),
               "flops_per_token": model.flops_per_token(), **_result_dict(result)}
    if result.steps >= result.total_steps or result.stopped_early:  # finished: report the best on test
        best = load_lm(Path(out_dir) / "best")
        test: LMScore = evaluate_perplexity(best, data.test, cfg.eval_batch_size, seq_len)
        summary.update(test_loss=test.loss, test_perplexity=test.perplexity, test_tokens=test.tokens)
    summary["total_seconds"] = round(time.time() - t0, 1)
    write_json_atomic(Path(out_dir) / "summary.json", summary)
    return result, summary


def _result_dict(r: LMTrainResult) -> dict:
    finite = math.isfinite(r.best_val_loss)  # no validation yet (an interrupted first call): null, JSON has no inf
    return {"best_val_loss": r.best_val_loss if finite else None,
            "best_val_perplexity": r.best_val_perplexity if finite else None, "best_step": r.best_step,
            "steps": r.steps, "total_steps": r.total_steps, "resumed_from_step": r.resumed_from_step,
            "train_seconds": round(r.seconds, 1), "stopped_early": r.stopped_early}
