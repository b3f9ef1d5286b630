"""The steps of the job, shared by the CLI commands (`adaptinf finetune`, `convert`, `evaluate`)
and by `adaptinf run`, which chains them and caches each.

The steps: load and encode the task, fine-tune the dense baseline, convert and train a method,
evaluate a model at every knob value on each split, time chosen operating points against dense in
one interleaved run. Each takes resolved settings (no argparse namespace); a step that writes,
writes only to the directory it is given.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from adaptinf.settings import DEFAULT_DATA, DEFAULT_MODEL, TaskSettings, is_image_data  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from adaptinf.data import Encoded, TaskData
    from adaptinf.evaluate import OperatingPoint
    from adaptinf.model import AdaptiveClassifier
    from adaptinf.settings import TrainConfig


def load_task(settings: TaskSettings, labels=None, image_size: int | None = None) -> TaskData:
    """The task of `settings`; an image folder's images are resized to `image_size` (the model's) when given."""
    from adaptinf.data import load_task as _load

    data = settings.data
    if isinstance(data, RecordedData) and not os.path.exists(data):
        raise ValueError(f"the model at {data.model_dir} was trained on {data}, which does not exist here; "
                         "pass --data FILE")
    return _load(data, settings.text_column, settings.label_column, settings.group_column, settings.seed,
                 labels=labels, image_size=image_size)


def task_labels(settings: TaskSettings) -> tuple[str, ...]:
    """The task's label names; an image task's without reading its images."""
    if settings.data == "fashion-mnist":
        from adaptinf.images import FASHION_MNIST_LABELS

        return FASHION_MNIST_LABELS
    if is_image_data(settings.data):
        from adaptinf.images import folder_labels

        return folder_labels(settings.data)
    return load_task(settings).labels


def model_image_size(model: AdaptiveClassifier) -> int | None:
    """A vision model's image size (what an image folder is resized to); None for a text model."""
    return getattr(model.spec.encoder, "image_size", 0) or None


def recorded_settings(settings: TaskSettings) -> dict:
    """The task as a saved model records it (extra.task): its settings and the data's content digest."""
    return {**settings.to_dict(), "data_digest": settings.data_digest()}


def encode_split(model: AdaptiveClassifier, task: TaskData, split: str, max_samples: int | None, seed: int) -> Encoded:
    from adaptinf.data import encode, subsample

    if model.tokenizer is None:
        raise ValueError("the model directory has no tokenizer files (tokenizer.json); re-save it with adaptinf")
    # (a vision model's tokenizer is its ImageProcessor: `encode` takes the split's images then)
    texts, labels = subsample(task.split(split), max_samples, seed)
    return encode(texts, labels, model.tokenizer, model.spec.max_length)


class RecordedData(str):
    """A data file named by a saved model's recorded task (not by the user), with the model's folder:
    `load_task` says where the name came from when the file is not there."""

    model_dir: str


def recorded_task(model_dir: str | Path) -> dict | None:
    """The task settings a saved model recorded (extra.task), or None. Warns when the data file's
    content is not what the model was trained on; a data file that is missing is reported (with the
    model it came from) only when that task is loaded, so that --data can still replace it."""
    from adaptinf.checkpoint import read_config
    from adaptinf.data import BUILTIN_TASKS

    task = (read_config(model_dir).get("extra") or {}).get("task")
    if not isinstance(task, dict) or not isinstance(task.get("data"), str) or task.get("data") in ("", *BUILTIN_TASKS):
        return task
    data, digest = task["data"], task.get("data_digest")
    if not os.path.exists(data):
        task = {**task, "data": RecordedData(data)}
        task["data"].model_dir = str(model_dir)
    elif isinstance(digest, str) and digest.startswith("sha256:") and TaskSettings(data=data).data_digest() != digest:
        warnings.warn(f"the data file changed since the model was trained: {data} is not the content the model at "
                      f"{model_dir} was trained on", stacklevel=2)
    return task


def is_model_dir(path: str | Path) -> bool:
    """Whether `path` is an adaptinf model directory (as opposed to a pretrained model name or an HF checkpoint)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == "adaptinf"
    except (ValueError, UnicodeDecodeError, AttributeError):
        return True  # let the checkpoint loader report what is wrong with it


def dense_from_pretrained(model_name: str, labels, max_length: int, classifier_dropout: float, seed: int):
    """A dense classifier with the pretrained encoder of `model_name` (built-in name or HF checkpoint
    directory), a freshly initialised (seeded) head and its tokenizer: (model, checkpoint path).
    A vision encoder's input length is its patch count + 1 (`max_length` is not used)."""
    import torch

    from adaptinf.hf import load_encoder, load_tokenizer
    from adaptinf.methods.dense import DenseClassifier, DenseConfig
    from adaptinf.model import ModelSpec

    if max_length < 2:
        raise ValueError(f"--max-length must be at least 2 ([CLS] and [SEP]), got {max_length}")
    encoder, path = load_encoder(model_name)
    if getattr(encoder.cfg, "image_size", 0):
        max_length = encoder.cfg.max_positions  # 1 + patches: every image is that long
    spec = ModelSpec(encoder.cfg, labels, max_length, base_model=str(model_name))
    torch.manual_seed(seed)
    model = DenseClassifier(spec, DenseConfig(classifier_dropout=classifier_dropout))
    model.encoder.load_state_dict(encoder.state_dict())
    model.tokenizer = load_tokenizer(model_name)
    return model, path


def load_source(source: str, task: TaskSettings | None, max_length: int, seed: int):
    """The dense model a method starts from: a dense model directory, or a pretrained model (built-in
    name or HF checkpoint) with a fresh head. Returns (dense model, recorded task settings or None)."""
    from adaptinf.registry import load_model
    from adaptinf.methods.dense import DenseClassifier

    if is_model_dir(source):
        dense = load_model(source, expect_method="dense")
        if not isinstance(dense, DenseClassifier):
            raise ValueError(f"{source} is not a dense model")
        return dense, recorded_task(source)
    if task is None:
        raise ValueError(f"{source} is a pretrained model: the task must be given")
    dense, _ = dense_from_pretrained(source, task_labels(task), max_length, 0.1, seed)
    return dense, None


# --- fine-tune ----------------------------------------------------------------------------------------


def finetune_dense(
    model_name: str,
    task_settings: TaskSettings,
    cfg: TrainConfig,
    out: str | Path,
    max_length: int = 64,
    max_train_samples: int | None = None,
    classifier_dropout: float = 0.1,
    progress: bool = True,
    restart: bool = False,
    task: TaskData | None = None,
) -> dict | None:
    """Fine-tune the dense baseline into out/ (best/, last/, metrics.csv, summary.json); resumable.
    Returns the summary (None on ranks other than 0 under torchrun)."""
    from adaptinf.registry import load_model
    from adaptinf.data import encode, subsample
    from adaptinf.model import accuracy
    from adaptinf.recipes.finetune import dist_info, finetune

    rank, _ = dist_info()
    if task is None and not is_image_data(task_settings.data):
        task = load_task(task_settings)
    recorded = recorded_settings(task_settings)  # the digest of the data as read now, before training
    labels = task.labels if task is not None else task_labels(task_settings)
    model, path = dense_from_pretrained(model_name, labels, max_length, classifier_dropout, task_settings.seed)
    task = task or load_task(task_settings, image_size=model_image_size(model))  # images at the model's size
    tokenizer = model.tokenizer
    train = encode(*subsample(task.train, max_train_samples, task_settings.seed), tokenizer, max_length)
    val = encode(*task.validation, tokenizer, max_length)
    if rank == 0:
        print(f"{task.summary()}; training on {len(train)} samples; model {model_name} ({path or 'built-in, initialised from a seed'})")
    # the task is recorded in the saved model so evaluate/bench find the same split
    result = finetune(model, train, val, cfg, out, progress=progress, restart=restart,
                      save_extra={"task": recorded})
    if rank != 0:
        return None
    best_dir = Path(out) / "best"
    best = load_model(best_dir)
    test = encode(*task.test, tokenizer, max_length)
    test_acc, _ = accuracy(best, test)
    summary = {"best_val_accuracy": result.best_val_score, "best_epoch": result.best_epoch,
               "test_accuracy": test_acc, "n_train": len(train), "n_val": len(val), "n_test": len(test),
               "steps": result.steps, "best_step": result.best_step, "total_steps": result.total_steps,
               "stopped_early": result.stopped_early, "resumed_from_step": result.resumed_from_step,
               "seconds_this_run": round(result.seconds, 1), "model_dir": str(best_dir)}
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"best validation accuracy {result.best_val_score:.4f} (epoch {result.best_epoch}); "
          f"test accuracy {test_acc:.4f}; model saved to {best_dir}")
    return summary


# --- convert ------------------------------------------------------------------------------------------


def convert_method(
    dense: AdaptiveClassifier,
    method: str,
    sets: dict,
    out: str | Path,
    task_settings: TaskSettings | None,
    cfg: TrainConfig | None,
    train_dir: str | Path | None = None,
    max_train_samples: int | None = None,
    source_name: str = "",
    progress: bool = True,
    restart: bool = False,
    task: TaskData | None = None,
) -> AdaptiveClassifier | None:
    """Convert `dense` with `method` (config fields `sets`), train what the method adds on the task
    (state in `train_dir`, default out/train; resumable), and save the model to `out`.
    Returns the model (None on ranks other than 0 under torchrun)."""
    from adaptinf.checkpoint import save_model
    from adaptinf.recipes.finetune import dist_info
    from adaptinf.registry import get_method, get_recipe

    cls, recipe = get_method(method), get_recipe(method)
    config = cls.Config.from_dict(dict(sets))
    model = cls.from_dense(dense, config)
    model.tokenizer = dense.tokenizer
    extra: dict = {"converted_from": source_name}
    if task_settings is not None:
        extra["task"] = recorded_settings(task_settings)
    rank = 0
    if recipe is not None:
        if task_settings is None or cfg is None:
            raise ValueError(f"method {method!r} trains after conversion: it needs the task and training settings")
        rank, _ = dist_info()
        task = task or load_task(task_settings, labels=model.spec.labels, image_size=model_image_size(model))
        train = encode_split(model, task, "train", max_train_samples, task_settings.seed)
        val = encode_split(model, task, "validation", None, task_settings.seed)
        state = Path(train_dir) if train_dir is not None else Path(out) / "train"
        if rank == 0:
            print(f"{task.summary()}; training {method} on {len(train)} samples (state in {state})")
        summary = recipe(model, train, val, cfg, state, progress=progress, restart=restart)
        if summary:
            extra["training"] = summary
    if rank != 0:
        return None
    save_model(model, out, extra=extra)
    return model


# --- evaluate -----------------------------------------------------------------------------------------


def evaluate_splits(
    model: AdaptiveClassifier,
    task: TaskData,
    splits: list[str],
    name: str,
    model_dir: str | None,
    seed: int,
    batch_size: int = 64,
    knobs: list[float | None] | None = None,
    max_samples: int | None = None,
    progress: bool = True,
    refine_rounds: int = 0,
    refine_gap: float = 0.05,
) -> list[OperatingPoint]:
    """Operating points of one model at every knob value (default the method's sweep) on each split.
    With `refine_rounds`, the first split's sweep adds midpoints where the cost jumps
    (`evaluate.refine_knobs`) and the other splits are evaluated at the same knob values."""
    from adaptinf.evaluate import evaluate_model

    points = []
    for i, split in enumerate(splits):
        enc = encode_split(model, task, split, max_samples, seed)
        pts = evaluate_model(model, enc, split, name=name, batch_size=batch_size, knobs=knobs, progress=progress,
                             refine_rounds=refine_rounds if i == 0 else 0, refine_gap=refine_gap)
        if i == 0 and refine_rounds:
            knobs = [p.knob for p in pts]
        for p in pts:
            p.model_dir = None if model_dir is None else str(model_dir)
        points += pts
    return points


# --- latency ------------------------------------------------------------------------------------------


def time_points(
    points: list[OperatingPoint],
    models: dict[str, AdaptiveClassifier],
    dense: AdaptiveClassifier,
    enc: Encoded,
    seed: int,
    samples: int = 128,
    repeats: int = 5,
    warmup: int = 2,
    compare_hf: bool = False,
    progress: bool = True,
    int8: bool = False,
    onnx: bool = False,
    workdir: str | Path | None = None,
    compile: bool = False,
):
    """Time each point (its model, from `models` by model_dir, at its knob) at batch 1 and 32 beside
    the dense references (`adaptinf.references`: dense at its best, padded, and with `compare_hf`
    `transformers`, with `int8` dense int8, with `onnx` ONNX Runtime fp32/int8 in `workdir`, with
    `compile` dense compiled),
    interleaved in one run on length-bucketed batches, and fill the points' latency fields in place:
    speed-ups against the fastest fp32 dense reference at each batch size. With `int8` each point's
    int8 form (`adaptinf.quantize`) is timed too, case "<point> int8", its speed-up against the
    fastest int8 dense reference in the row. Returns (bench rows, the cases by name, each point's case
    name by `id(point)`): a case of `adaptinf.bench.model_case` carries its model (`case.model`), so
    the int8 forms timed here can be evaluated without quantising them again."""
    import copy

    from adaptinf.bench import model_case, run_bench
    from adaptinf.quantize import quantize
    from adaptinf.references import against_best, bench_batches, dense_references

    pad = dense.spec.encoder.pad_token_id
    batches, drawn = bench_batches(enc, (1, 32), samples, seed, pad)
    refs = dense_references(dense, drawn, hf=compare_hf, int8=int8, onnx=onnx, workdir=workdir, compile=compile)
    keys = {}
    for i, p in enumerate(points):
        if p.method == "dense" and p.knob is None:
            keys[id(p)] = "dense"
            continue
        key = p.model if p.knob is None else f"{p.model}@{p.knob:g}"
        if key in refs.cases:
            key = f"{key}#{i}"
        model = models[str(p.model_dir)]
        refs.add(key, model_case(model, p.knob))
        if int8:
            q = copy.deepcopy(model).eval()
            quantize(q, "int8")
            refs.add(f"{key} int8", model_case(q, p.knob), precision="int8")
        keys[id(p)] = key
    rows = run_bench(refs.cases, batches, repeats=repeats, warmup=warmup, reference="dense", progress=progress,
                     **refs.bench_kwargs())
    rows = against_best(rows)
    by = {(r.case, r.batch_size): r for r in rows}
    for p in points:
        k = keys[id(p)]
        p.latency_ms_b1, p.latency_ms_b32 = by[(k, 1)].median_ms, by[(k, 32)].median_ms
        p.speedup_b1, p.speedup_b32 = by[(k, 1)].speedup_vs_best, by[(k, 32)].speedup_vs_best
        if p.flops_reduction:
            p.realisation_b32 = p.speedup_b32 / p.flops_reduction
    return rows, refs.cases, keys
