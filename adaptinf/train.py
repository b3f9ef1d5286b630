"""Fine-tuning: AdamW, linear warm-up + decay, clipping, per-epoch validation, best checkpoint,
resumable mid-epoch, and the same code under `torchrun` (DDP, gloo on CPU).

Output directory:
    last/            training state (weights, optimizer moments, RNG, position) - resume point
    best/            the best model on validation (an `adaptinf.load`-able model directory)
    metrics.csv      one row per log step and per evaluation
    train_config.json  the settings this run was started with (a resume must match them)

Distributed: each global batch of `batch_size` samples is split across ranks and the loss is
scaled so that DDP's gradient averaging yields exactly the single-process gradient of the same
global batch (see the comment in the loop).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm.auto import tqdm

from adaptinf.checkpoint import save_model, save_tensors_atomic, write_json_atomic
from adaptinf.data import Encoded, eval_batches, steps_per_epoch, train_batches
from adaptinf.model import AdaptiveClassifier


@dataclass
class TrainConfig:
    epochs: int = 2
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_batch_size: int = 64
    save_every: int = 50  # steps between resume checkpoints
    log_every: int = 10

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "max_grad_norm": self.max_grad_norm > 0,
            "eval_batch_size": self.eval_batch_size >= 1,
            "save_every": self.save_every >= 1,
            "log_every": self.log_every >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"TrainConfig.{name} has an invalid value {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainResult:
    best_val_score: float  # the model's selection_score on validation (accuracy for dense)
    best_epoch: int
    epochs_run: int
    steps: int
    resumed_from_step: int
    seconds: float
    out_dir: Path


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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# --- schedule and state -----------------------------------------------------------------------------


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr over warmup_ratio of the steps, then linear decay to 0."""
    warm = int(cfg.warmup_ratio * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * max(0.0, (total - step) / max(1, total - warm))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # biases and LayerNorm gains/shifts (1-D) get no weight decay
            (no_decay if p.ndim < 2 else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )


def _save_state(out: Path, model, opt, position: dict) -> None:
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


def _load_state(out: Path, model, opt) -> dict | None:
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


# --- evaluation -------------------------------------------------------------------------------------


@torch.inference_mode()
def accuracy(model: AdaptiveClassifier, enc: Encoded, batch_size: int = 64, pad_id: int = 0) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the model on an encoded split."""
    was_training = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for b in eval_batches(enc, batch_size, pad_id):
        out = model(b.input_ids, b.attention_mask)
        correct += int((out.logits.argmax(-1) == b.labels).sum())
        loss += float(torch.nn.functional.cross_entropy(out.logits, b.labels, reduction="sum"))
        n += len(b.labels)
    model.train(was_training)
    return correct / n, loss / n


# --- the loop ---------------------------------------------------------------------------------------


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
    """Train `model` on `train`, keep the best on `val` in out_dir/best. Resumes from out_dir/last.

    `stop_after_steps` ends the run after that many optimizer steps of this call, as an
    interruption would (used to test resuming).
    """
    rank, world = dist_info()
    out = Path(out_dir)
    pad_id = model.spec.encoder.pad_token_id
    if len(train) == 0 or len(val) == 0:
        raise ValueError("training and validation sets must not be empty")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if restart:
            for name in ("last", "last.old", "last.new", "best", "metrics.csv", "train_config.json"):
                p = out / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    _barrier()

    settings = {"train": cfg.to_dict(), "n_train": len(train), "n_val": len(val), "world_size": world,
                "method": model.method, "method_config": model.config.to_dict()}
    cfg_path = out / "train_config.json"
    if cfg_path.is_file():
        previous = json.loads(cfg_path.read_text())
        if previous != settings:
            a, b = _flatten(previous), _flatten(settings)
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ValueError(
                f"{out} holds a run with other settings (differs in {diff}); "
                "use a new output directory, or --restart to discard that run"
            )
    torch.manual_seed(cfg.seed)
    model.train()
    opt = make_optimizer(model, cfg)
    position = _load_state(out, model, opt)
    if rank == 0 and position is None:
        write_json_atomic(cfg_path, settings)
    _barrier()

    per_epoch = steps_per_epoch(len(train), cfg.batch_size)
    total = per_epoch * cfg.epochs
    epoch, step_in_epoch, global_step = 0, 0, 0
    best_acc, best_epoch = -1.0, -1
    if position is not None:
        epoch, step_in_epoch = position["epoch"], position["step_in_epoch"]
        global_step, best_acc, best_epoch = position["global_step"], position["best_acc"], position["best_epoch"]
    resumed_from = global_step

    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else None
    forward = ddp if ddp is not None else model
    metrics_path = out / "metrics.csv"
    tb = _tensorboard(out) if rank == 0 else None
    t0, steps_this_call, running, running_n = time.time(), 0, 0.0, 0
    bar = tqdm(total=total, initial=global_step, desc="finetune", disable=not progress or rank != 0, unit="step")

    def log(row: dict) -> None:
        if rank != 0:
            return
        new = not metrics_path.exists()
        with metrics_path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["epoch", "step", "lr", "train_loss", "val_accuracy", "val_loss", "val_score", "elapsed_s"])
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in w.fieldnames})
        if tb is not None:
            for k in ("train_loss", "val_accuracy", "val_loss", "val_score", "lr"):
                if row.get(k, "") != "":
                    tb.add_scalar(k, row[k], row["step"])

    interrupted = False
    try:
        while epoch < cfg.epochs:
            for batch, global_n, filler in train_batches(train, cfg.batch_size, cfg.seed, epoch, step_in_epoch, rank, world, pad_id):
                lr = lr_at(global_step, total, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                out_ = forward(batch.input_ids, batch.attention_mask)
                # Each rank: sum of its samples' losses / global batch size, times world because DDP
                # averages gradients over ranks; the result is the single-process gradient exactly.
                # A filler share (tiny last batch) contributes zero but still joins the all-reduce.
                scale = 0.0 if filler else world / global_n
                loss = model.loss(out_, batch.labels, reduction="sum") * scale
                loss.backward()
                if not filler:
                    running += float(loss.detach()) * global_n / world
                    running_n += global_n / world
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                opt.step()
                global_step += 1
                step_in_epoch += 1
                steps_this_call += 1
                bar.update(1)
                if global_step % cfg.log_every == 0 and running_n:
                    bar.set_postfix(loss=f"{running / running_n:.4f}", epoch=epoch)
                    log({"epoch": epoch, "step": global_step, "lr": lr, "train_loss": running / running_n,
                         "elapsed_s": round(time.time() - t0, 1)})
                    running, running_n = 0.0, 0
                if rank == 0 and global_step % cfg.save_every == 0:
                    _save_state(out, model, opt, _pos(epoch, step_in_epoch, global_step, best_acc, best_epoch))
                if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                    interrupted = True
                    break
            if interrupted:
                break
            # end of epoch: validate, keep the best, move the resume point to the next epoch
            if rank == 0:
                acc, vloss = accuracy(model, val, cfg.eval_batch_size, pad_id)
                score = model.selection_score(val, cfg.eval_batch_size)  # what "best" means for this method
                log({"epoch": epoch, "step": global_step, "val_accuracy": acc, "val_loss": vloss, "val_score": score,
                     "elapsed_s": round(time.time() - t0, 1)})
                bar.write(f"epoch {epoch + 1}/{cfg.epochs}: validation accuracy {acc:.4f}, loss {vloss:.4f}"
                          + (f", selection score {score:.4f}" if score != acc else ""))
                if score > best_acc:
                    best_acc, best_epoch = score, epoch
                    save_model(model, out / "best", extra={**(save_extra or {}), "val_accuracy": acc,
                                                           "val_score": score, "epoch": epoch + 1})
            epoch, step_in_epoch = epoch + 1, 0
            if rank == 0:
                _save_state(out, model, opt, {"epoch": epoch, "step_in_epoch": 0, "global_step": global_step,
                                              "best_acc": best_acc, "best_epoch": best_epoch})
            _barrier()
    except KeyboardInterrupt:
        interrupted = True
        if rank == 0 and world == 1:
            bar.write("interrupted: saving the resume point; rerun the same command to continue")
            _save_state(out, model, opt, _pos(epoch, step_in_epoch, global_step, best_acc, best_epoch))
        raise
    finally:
        bar.close()
        if tb is not None:
            tb.close()
    if interrupted and rank == 0:
        _save_state(out, model, opt, _pos(epoch, step_in_epoch, global_step, best_acc, best_epoch))
    _barrier()
    return TrainResult(best_acc, best_epoch + 1, epoch, global_step, resumed_from, time.time() - t0, out)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _pos(epoch, step_in_epoch, global_step, best_acc, best_epoch) -> dict:
    return {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "best_acc": best_acc, "best_epoch": best_epoch}


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: CSV only
        return None
    return SummaryWriter(str(out / "tensorboard"))


