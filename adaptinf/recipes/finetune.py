"""The shared training pieces every recipe uses, and the fine-tuning loop itself.

Fine-tuning: AdamW, linear warm-up + decay, clipping, per-epoch validation, best checkpoint,
resumable mid-epoch, and the same code under `torchrun` (DDP, gloo on CPU).

Output directory of `finetune`:
    last/            training state (weights, optimizer moments, RNG, position) - resume point
    best/            the best model on validation (an `adaptinf.load`-able model directory)
    metrics.csv      one row per log step and per evaluation
    train_config.json  the settings this run was started with (a resume must match them)

Distributed: each global batch of `batch_size` samples is split across ranks and the loss is
scaled so that DDP's gradient averaging yields exactly the single-process gradient of the same
global batch (see the comment in `_train_step`).

The pieces the method recipes share (one copy each):
- `lr_schedule` / `lr_at`: the one learning-rate schedule (linear warm-up, linear decay);
- `make_optimizer`, `save_state` / `load_state`: AdamW and the atomic resume point;
- `guard_settings` and `Stage`: the one settings-keyed resume scheme (a step is redone when the
  settings it was made with differ, and a resumable loop refuses to continue under other settings);
- `finetune_then_load_best`: fine-tune at full budget (knob None) and keep the best epoch's weights;
- `capture_tokens`: forward hooks that keep modules' inputs/outputs on the real tokens (teacher
  capture for distillation);
- `dist_info` / `barrier`: torchrun process group helpers.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm.auto import tqdm

from adaptinf.checkpoint import WEIGHTS_FILE, save_model, save_tensors_atomic, write_json_atomic
from adaptinf.data import Encoded, steps_per_epoch, train_batches
from adaptinf.model import AdaptiveClassifier, accuracy
from adaptinf.settings import TrainConfig


@dataclass
class TrainResult:
    best_val_score: float  # the model's selection_score on validation (accuracy for dense)
    best_epoch: int
    epochs_run: int
    steps: int
    resumed_from_step: int
    seconds: float
    out_dir: Path
    best_step: int = -1  # the optimizer step of the best validation
    total_steps: int = 0  # the step budget (`TrainConfig.total_steps`)
    stopped_early: bool = False  # `patience` validations without a better score ended the run


# --- distributed helpers ----------------------------------------------------------------------------


def dist_info() -> tuple[int, int]:
    """(rank, world size); initialises a gloo process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


# --- schedule and state -----------------------------------------------------------------------------


def lr_schedule(start: float, end: float, lr: float, warmup: float) -> float:
    """The learning rate of a step that covers the fraction [start, end) of training: linear warm-up
    to `lr` over the first `warmup` of training, then linear decay to 0."""
    up = end / warmup if warmup > 0 else 1.0
    return lr * max(0.0, min(1.0, up, (1.0 - start) / (1.0 - warmup)))


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """`lr_schedule` for step `step` of `total` equal steps, the warm-up rounded to whole steps."""
    warm = int(cfg.warmup_ratio * total) / max(1, total)
    return lr_schedule(step / max(1, total), (step + 1) / max(1, total), cfg.lr, warm)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # biases and LayerNorm gains/shifts (1-D) get no weight decay
            (no_decay if p.ndim < 2 else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )


def save_state(out: Path, model, opt, position: dict) -> None:
    """Write the resume point as a new folder, then swap it in, so a kill never leaves half a state."""
    new, cur, old = out / "last.new", out / "last", out / "last.old"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    save_tensors_atomic(dict(model.state_dict()), new / "model.safetensors")
    osd = opt.state_dict()
    tensors = {f"{i}.{k}": v for i, st in osd["state"].items() for k, v in st.items()}
    tensors["rng"] = torch.get_rng_state()
    save_tensors_atomic(tensors, new / "optimizer.safetensors")
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    write_json_atomic(new / "state.json", {**position, "param_groups": groups})
    if cur.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(cur, old)
    os.replace(new, cur)
    shutil.rmtree(old, ignore_errors=True)


def has_state(out: Path) -> bool:
    """Whether `out` holds a resume point written by `save_state`."""
    return (out / "last").exists() or (out / "last.old").exists()


def load_state(out: Path, model, opt) -> dict | None:
    """Restore the resume point written by `save_state` (weights, optimizer, RNG); its position, or None."""
    cur = out / "last" if (out / "last").exists() else out / "last.old"
    if not (cur / "state.json").is_file():
        return None
    try:
        position = json.loads((cur / "state.json").read_text())
        model.load_state_dict(load_file(str(cur / "model.safetensors")))
        tensors = load_file(str(cur / "optimizer.safetensors"))
    except Exception as e:
        raise ValueError(f"cannot resume from {cur} ({e}); delete {out} or pass --restart") from e
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key == "rng":
            continue
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    groups = position.pop("param_groups")
    opt.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng"])
    return position


def load_best(model: torch.nn.Module, out: Path) -> bool:
    """Load out/best's weights into `model` when a best epoch was saved there; whether it was."""
    best = Path(out) / "best" / WEIGHTS_FILE
    if best.is_file():
        model.load_state_dict(load_file(str(best)))
    return best.is_file()


# --- the settings-keyed resume scheme ---------------------------------------------------------------


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def guard_settings(path: Path, settings: dict, write: bool = True) -> None:
    """A resumable loop's settings: refuse to continue a run in `path`'s folder that was started with
    other settings (ValueError naming the fields that differ), else record them (when `write`)."""
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != settings:
            a, b = _flatten(previous) if isinstance(previous, dict) else {}, _flatten(settings)
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ValueError(
                f"{path.parent} holds a run with other settings (differs in {diff}); "
                "use a new output directory, or --restart to discard that run"
            )
    elif write:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, settings)


class Stage:
    """One step of a recipe whose result is kept in `out/<name>.json` with the settings it was made
    with: `result()` is that result when the settings match (the step is done), else None; `finish`
    writes it (last, so a killed step is redone)."""

    def __init__(self, out: Path, name: str, settings: dict):
        self.path = Path(out) / f"{name}.json"
        self.settings = json.loads(json.dumps(settings))  # JSON-native, as it will be read back

    def result(self) -> Any | None:
        if not self.path.is_file():
            return None
        try:
            saved = json.loads(self.path.read_text())
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(saved, dict) or saved.get("settings") != self.settings:
            return None
        return saved.get("result")

    def finish(self, result: Any) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"settings": self.settings, "result": result})
        return result


# --- teacher capture --------------------------------------------------------------------------------


class TokenCapture:
    """Inputs or outputs of chosen modules on the real tokens of the current batch ([T, d] each),
    kept by forward hooks; `select(attention_mask)` before each forward names the real tokens."""

    def __init__(self, points: dict[str, tuple[torch.nn.Module, str]]):
        self.values: dict[str, torch.Tensor] = {}
        self._real: torch.Tensor | None = None
        self._hooks = [module.register_forward_hook(self._keeper(name, where)) for name, (module, where) in points.items()]

    def _keeper(self, name: str, where: str):
        if where not in ("input", "output"):
            raise ValueError(f"capture point {name!r}: 'input' or 'output', got {where!r}")

        def hook(module, args, output):
            t = args[0] if where == "input" else output
            # [b, s, d] padded -> its real tokens; [T, d] already packed (padding-free inference) as it is
            self.values[name] = t if t.dim() == 2 else t.reshape(-1, t.shape[-1]).index_select(0, self._real)
        return hook

    def select(self, attention_mask: torch.Tensor) -> None:
        self._real = attention_mask.reshape(-1).nonzero().squeeze(1)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[name]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


@contextmanager
def capture_tokens(points: dict[str, tuple[torch.nn.Module, str]]) -> Iterator[TokenCapture]:
    """`TokenCapture` over `points` (name -> (module, "input" | "output")), hooks removed on exit."""
    cap = TokenCapture(points)
    try:
        yield cap
    finally:
        cap.remove()


# --- the loop ---------------------------------------------------------------------------------------


@contextmanager
def interrupt_at_step_boundary() -> Iterator[dict]:
    """Ctrl-C (SIGINT) during training sets `flag["hit"]` instead of raising mid-step, so the loop can
    stop at the next step boundary and save the same state a kill -9 after that step would have left
    (weights, optimizer and RNG all at the boundary: a resumed run is bit-identical to an
    uninterrupted one). A second Ctrl-C raises at once. Outside the main thread: nothing changes."""
    flag = {"hit": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if flag["hit"]:
            raise KeyboardInterrupt
        flag["hit"] = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class _Log:
    """metrics.csv (and TensorBoard when installed), rank 0 only."""

    FIELDS = ["epoch", "step", "lr", "train_loss", "val_accuracy", "val_loss", "val_score", "elapsed_s"]

    def __init__(self, out: Path, rank: int):
        self.path, self.rank = out / "metrics.csv", rank
        self.tb = _tensorboard(out) if rank == 0 else None

    def __call__(self, row: dict) -> None:
        if self.rank != 0:
            return
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.FIELDS)
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in self.FIELDS})
        if self.tb is not None:
            for k in ("train_loss", "val_accuracy", "val_loss", "val_score", "lr"):
                if row.get(k, "") != "":
                    self.tb.add_scalar(k, row[k], row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@dataclass
class _Position:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_acc: float = -1.0
    best_epoch: int = -1
    best_step: int = -1
    since_best: int = 0  # validations since the best one
    stopped: bool = False  # early-stopped: a resume has nothing left to do

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _prepare(model, train: Encoded, val: Encoded, cfg: TrainConfig, out: Path, restart: bool, rank: int, world: int):
    """Check the inputs, clear a restarted run, check/record its settings, restore a resume point."""
    if len(train) == 0 or len(val) == 0:
        raise ValueError("training and validation sets must not be empty")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if restart:
            for name in ("last", "last.old", "last.new", "best", "metrics.csv", "train_config.json"):
                p = out / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    barrier()
    settings = {"train": cfg.to_dict(), "n_train": len(train), "n_val": len(val), "world_size": world,
                "method": model.method, "method_config": model.config.to_dict(),
                "data": {"train": train.digest(), "validation": val.digest()}}  # other data: refused, not resumed
    cfg_path = out / "train_config.json"
    guard_settings(cfg_path, settings, write=False)
    torch.manual_seed(cfg.seed)
    model.train()
    opt = make_optimizer(model, cfg)
    saved = load_state(out, model, opt)
    if rank == 0 and saved is None:
        write_json_atomic(cfg_path, settings)
    barrier()
    return opt, _Position(**saved) if saved is not None else _Position()


def _train_step(model, forward, opt, batch, global_n: int, filler: bool, world: int, cfg: TrainConfig) -> float:
    """One optimizer step; returns this rank's summed loss times its share of the global batch."""
    opt.zero_grad(set_to_none=True)
    out = forward(batch.input_ids, batch.attention_mask, knob=None)
    # Each rank: sum of its samples' losses / global batch size, times world because DDP
    # averages gradients over ranks; the result is the single-process gradient exactly.
    # A filler share (tiny last batch) contributes zero but still joins the all-reduce.
    scale = 0.0 if filler else world / global_n
    loss = model.loss(out, batch.labels, reduction="sum") * scale
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    opt.step()
    return 0.0 if filler else float(loss.detach()) * global_n / world


def _validate(model, val: Encoded, cfg: TrainConfig, out: Path, pos: _Position, log: _Log, bar, t0: float,
              total: int, save_extra: dict | None) -> None:
    """Rank 0: validate at full budget, keep the best in out/best, count validations since the best
    and stop the run when `patience` of them brought nothing better."""
    acc, vloss = accuracy(model, val, cfg.eval_batch_size, model.spec.encoder.pad_token_id, knob=None)
    score = model.selection_score(val, cfg.eval_batch_size)  # what "best" means for this method
    log({"epoch": pos.epoch, "step": pos.global_step, "val_accuracy": acc, "val_loss": vloss, "val_score": score,
         "elapsed_s": round(time.time() - t0, 1)})
    bar.write(f"step {pos.global_step}/{total} (epoch {pos.epoch + 1}): validation accuracy {acc:.4f}, loss {vloss:.4f}"
              + (f", selection score {score:.4f}" if score != acc else ""))
    if score > pos.best_acc:
        pos.best_acc, pos.best_epoch, pos.best_step, pos.since_best = score, pos.epoch, pos.global_step, 0
        save_model(model, out / "best", extra={**(save_extra or {}), "val_accuracy": acc, "val_score": score,
                                               "epoch": pos.epoch + 1, "step": pos.global_step})
    else:
        pos.since_best += 1
    if cfg.patience and pos.since_best >= cfg.patience:
        pos.stopped = True
        bar.write(f"early stop: {pos.since_best} validations without a better score; best at step {pos.best_step}")


def _agree(flag: bool) -> bool:
    """Rank 0's value of `flag` on every rank (a decision only rank 0 took, e.g. to stop early)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)])
    dist.broadcast(t, src=0)
    return bool(t.item())


@dataclass
class _Loop:
    """What one call of `finetune` carries from step to step."""

    model: AdaptiveClassifier
    forward: torch.nn.Module  # the model, or its DDP wrapper
    opt: torch.optim.Optimizer
    pos: _Position
    cfg: TrainConfig
    out: Path
    rank: int
    world: int
    total: int
    per_epoch: int
    log: _Log
    bar: Any
    stop_after_steps: int | None
    val: Encoded
    save_extra: dict | None
    t0: float = 0.0
    steps_this_call: int = 0
    running: float = 0.0
    running_n: float = 0.0


def _due(loop: _Loop) -> bool:
    """Whether this step ends with a validation: every `eval_every` steps (else at the end of every
    epoch), and always at the last step of the budget."""
    pos, every = loop.pos, loop.cfg.eval_every
    if pos.global_step >= loop.total:
        return True
    return pos.global_step % every == 0 if every else pos.step_in_epoch == loop.per_epoch


def _epoch(loop: _Loop, train: Encoded, ctrl_c: dict) -> bool:
    """The rest of the current epoch, up to the step budget or an early stop; True when stopped by
    `stop_after_steps` (an interruption)."""
    pos, cfg = loop.pos, loop.cfg
    for batch, global_n, filler in train_batches(train, cfg.batch_size, cfg.seed, pos.epoch, pos.step_in_epoch,
                                                 loop.rank, loop.world, loop.model.spec.encoder.pad_token_id):
        lr = lr_at(pos.global_step, loop.total, cfg)
        set_lr(loop.opt, lr)
        loop.running += _train_step(loop.model, loop.forward, loop.opt, batch, global_n, filler, loop.world, cfg)
        loop.running_n += 0 if filler else global_n / loop.world
        pos.global_step, pos.step_in_epoch, loop.steps_this_call = pos.global_step + 1, pos.step_in_epoch + 1, loop.steps_this_call + 1
        loop.bar.update(1)
        if ctrl_c["hit"]:  # at a step boundary: the state an uninterrupted run has here
            raise KeyboardInterrupt
        if pos.global_step % cfg.log_every == 0 and loop.running_n:
            loop.bar.set_postfix(loss=f"{loop.running / loop.running_n:.4f}", epoch=pos.epoch)
            loop.log({"epoch": pos.epoch, "step": pos.global_step, "lr": lr, "train_loss": loop.running / loop.running_n,
                      "elapsed_s": round(time.time() - loop.t0, 1)})
            loop.running, loop.running_n = 0.0, 0.0
        if _due(loop):
            if loop.rank == 0:
                _validate(loop.model, loop.val, cfg, loop.out, pos, loop.log, loop.bar, loop.t0, loop.total, loop.save_extra)
            pos.stopped = _agree(pos.stopped)
        if pos.step_in_epoch == loop.per_epoch:  # the resume point moves to the next epoch
            pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
        if loop.rank == 0 and (pos.global_step % cfg.save_every == 0 or pos.step_in_epoch == 0 or pos.stopped
                               or pos.global_step >= loop.total):
            save_state(loop.out, loop.model, loop.opt, pos.to_dict())
        if pos.stopped or pos.global_step >= loop.total or pos.step_in_epoch == 0:
            return False
        if loop.stop_after_steps is not None and loop.steps_this_call >= loop.stop_after_steps:
            return True
    return False


def run_epochs(epoch, pos, total: int, model, opt, out: Path, bar, log, save_on_ctrl_c: bool = True,
               save_on_stop: bool = True) -> None:
    """Run `epoch(ctrl_c) -> interrupted` until `total` steps, early stopping or an interruption at a
    step boundary, then close the bar and log. A Ctrl-C (`save_on_ctrl_c`) or a stop asked for
    between steps (`save_on_stop`) saves the resume point first; shared by `finetune` and the LM recipe."""
    interrupted = False
    with interrupt_at_step_boundary() as ctrl_c:
        try:
            while pos.global_step < total and not pos.stopped and not interrupted:
                interrupted = epoch(ctrl_c)
        except KeyboardInterrupt:
            if save_on_ctrl_c and ctrl_c["hit"]:
                bar.write("interrupted: saving the resume point; rerun the same command to continue")
                save_state(out, model, opt, pos.to_dict())
            raise
        finally:
            bar.close()
            log.close()
    if interrupted and save_on_stop:
        save_state(out, model, opt, pos.to_dict())


def finetune(
    model: AdaptiveClassifier,
    train: Encoded,
    val: Encoded,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    progress: bool = True,
    restart: bool = False,
    stop_after_steps: int | None = None,
    save_extra: dict | None = None,
) -> TrainResult:
    """Train `model` on `train` (forward at knob None), keep the best on `val` in out_dir/best.
    Resumes from out_dir/last; Ctrl-C saves the resume point at the next step boundary.

    `stop_after_steps` ends the run after that many optimizer steps of this call, as an
    interruption would (used to test resuming).
    """
    rank, world = dist_info()
    out = Path(out_dir)
    opt, pos = _prepare(model, train, val, cfg, out, restart, rank, world)
    total = cfg.total_steps(len(train))
    resumed_from = pos.global_step
    forward = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    bar = tqdm(total=total, initial=pos.global_step, desc="finetune", disable=not progress or rank != 0, unit="step")
    loop = _Loop(model, forward, opt, pos, cfg, out, rank, world, total, steps_per_epoch(len(train), cfg.batch_size),
                 _Log(out, rank), bar, stop_after_steps, val, save_extra, t0=time.time())
    def epoch(ctrl_c) -> bool:
        interrupted = _epoch(loop, train, ctrl_c)
        barrier()
        return interrupted

    run_epochs(epoch, pos, total, model, opt, out, bar, loop.log, save_on_ctrl_c=rank == 0 and world == 1,
               save_on_stop=rank == 0)
    barrier()
    return TrainResult(pos.best_acc, pos.best_epoch + 1, pos.epoch, pos.global_step, resumed_from, time.time() - loop.t0,
                       out, best_step=pos.best_step, total_steps=total, stopped_early=pos.stopped)


def finetune_then_load_best(model: AdaptiveClassifier, train: Encoded, val: Encoded, cfg: TrainConfig,
                            out_dir: str | os.PathLike, progress: bool = True, restart: bool = False) -> TrainResult:
    """`finetune` (at knob None, so validation sees the full model), then the best epoch's weights
    loaded back into `model`."""
    result = finetune(model, train, val, cfg, out_dir, progress=progress, restart=restart)
    load_best(model, Path(out_dir))
    return result


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: CSV only
        return None
    return SummaryWriter(str(out / "tensorboard"))
