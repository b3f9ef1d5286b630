"""The `adaptinf` command: run | select | predict | finetune | convert | evaluate | bench | report |
train-lm | generate.

Every command takes its inputs from flags or saved model directories and writes its outputs to
`--out`; nothing goes to the network. User errors (bad flags, paths, settings or data: a ValueError,
or a FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError or FileNotFoundError)
end with a one-line `error: ...` message naming what is wrong and how to fix it, and exit status 2;
`adaptinf --debug ...` (or ADAPTINF_DEBUG=1) shows their traceback instead. Any other exception is
an internal error and shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import fields
from pathlib import Path

from adaptinf.settings import (DEFAULT_DATA, DEFAULT_MODEL, DEFAULT_VISION_MODEL, IMAGE_TASKS, LM_TASKS, TaskSettings,
                               TrainConfig, default_model)


# --- shared helpers -----------------------------------------------------------------------------------

# the TrainConfig fields that are flags of finetune and convert (--epochs, --batch-size, ...) and their help;
# their defaults and types are TrainConfig's
_TRAIN_HELP = TrainConfig.flags()


def _train_config(args, seed: int) -> TrainConfig:
    """The TrainConfig of the training flags (see `_add_train_args`) with the task's seed."""
    return TrainConfig(seed=seed, **{name: getattr(args, name) for name in _TRAIN_HELP})


def _add_data_args(p: argparse.ArgumentParser, default_data: str | None = DEFAULT_DATA,
                   recorded_in: str = "the model directory"):
    """--data and its columns and seed; without `default_data` they default to the task recorded in `recorded_in`."""
    task = TaskSettings()
    g = p.add_argument_group("data")
    g.add_argument("--data", "--task", dest="data", default=default_data,
                   help=f"built-in task name ({DEFAULT_DATA}, {', '.join(IMAGE_TASKS)}), a .csv/.tsv/.jsonl file, or a "
                   "folder of images with one sub-folder per class (DIR/<class>/*.png); --task is the same flag"
                   + ("" if default_data else f" (default: the task recorded in {recorded_in})"))
    g.add_argument("--text-column", default=None, help=f"text column of a user file (default: {task.text_column})")
    g.add_argument("--label-column", default=None, help=f"label column of a user file (default: {task.label_column})")
    g.add_argument("--group-column", default=None,
                   help="optional column whose rows must stay on one side of the split (e.g. a document or author id)")
    g.add_argument("--seed", type=int, default=None, help="split and training seed (default: "
                   + (f"{task.seed})" if default_data else f"the one recorded in {recorded_in}, else {task.seed})"))
    return g


def _task_settings(args, recorded: dict | None = None) -> TaskSettings:
    """Task settings from flags, falling back to what a model directory recorded, then TaskSettings' defaults."""
    flags = {f.name: getattr(args, f.name) for f in fields(TaskSettings)}
    given = {k: v for k, v in flags.items() if v is not None and v != ""}
    return TaskSettings.from_dict({**(recorded or {}), **given})


def _recorded_task(model_dir: str) -> dict | None:
    from adaptinf.steps import recorded_task

    return recorded_task(model_dir)


def _load_task(settings: TaskSettings, labels=None, model=None):
    """The task; an image folder's images at `model`'s image size when given."""
    from adaptinf.steps import load_task, model_image_size

    return load_task(settings, labels=labels, image_size=None if model is None else model_image_size(model))


def _encode_split(model, task, split: str, max_samples: int | None, seed: int):
    from adaptinf.steps import encode_split

    return encode_split(model, task, split, max_samples, seed)


def _set_threads(n: int | None) -> None:
    import torch

    if n is not None:
        if n < 1:
            raise ValueError("--threads must be at least 1")
        torch.set_num_threads(n)


def _parse_floats(s: str | None, flag: str) -> list[float | None] | None:
    if s is None:
        return None
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} expects comma-separated numbers, got {s!r}") from None


def _parse_ints(s: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} expects comma-separated integers, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise ValueError(f"{flag} expects positive integers, got {s!r}")
    return vals


# --- checks before any work ---------------------------------------------------------------------------

# the integer flags that count something and the least value each takes (argparse takes any integer)
_LEAST = {"samples": 1, "repeats": 1, "latency_samples": 1, "warmup": 0, "max_samples": 1, "refine": 0,
          "batch_size": 1, "chunk_size": 1, "epochs": 1, "save_every": 1, "max_train_samples": 1,
          "max_eval_samples": 1, "threads": 1, "max_length": 2, "max_new_tokens": 1, "top_k": 1, "vocab_size": 257}


def _check_counts(args) -> None:
    for dest, least in _LEAST.items():
        v = getattr(args, dest, None)
        if v is not None and v < least:
            why = {"max_length": " ([CLS] and [SEP])", "vocab_size": " (256 bytes and <|endoftext|>)"}.get(dest, "")
            raise ValueError(f"--{dest.replace('_', '-')} must be at least {least}{why}, got {v}")


def _check_out(out: str | None) -> None:
    """--out is a folder, or can be made as one in the nearest existing folder above it, and written."""
    if out is None:
        return
    p = Path(out)
    if not out.strip():
        raise ValueError("--out is empty; give a folder")
    if p.exists() and not p.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    base = next(a for a in (p, *p.parents) if a.exists())  # "." or "/" at the latest
    if not base.is_dir():
        raise ValueError(f"--out {out}: {base} is a file, not a folder; give a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} cannot be written: no permission to write in {base}; choose another "
                         "folder or fix its permissions")


def _check_method(name: str) -> None:
    from adaptinf.preset import did_you_mean
    from adaptinf.registry import get_method, list_methods

    try:
        get_method(name)
    except ValueError as e:
        raise ValueError(f"{e}{did_you_mean([name], list_methods())}") from None


def _check_pretrained(model: str, command: str) -> None:
    """A command that starts from a pretrained model refuses an adaptinf model directory."""
    from adaptinf.steps import is_model_dir

    if is_model_dir(model):
        raise ValueError(f"{model} is an adaptinf model directory; {command} starts from a pretrained model "
                         "(built-in name or Hugging Face checkpoint); to add a method to it use "
                         f"`adaptinf convert {model} --method M`")


def _warn_scratch_recipe(model: str, cfg: TrainConfig) -> None:
    """A model with random weights (vit-tiny) fine-tuned with the text defaults is under-trained: say so."""
    default = TrainConfig()
    if model == DEFAULT_VISION_MODEL and cfg.lr == default.lr and cfg.epochs == default.epochs:
        print(f"warning: {model} starts from random weights; the fine-tuning defaults (lr {default.lr:g}, "
              f"{default.epochs} epochs) are for a pretrained text model and will under-train it. Train it from "
              "scratch with e.g. --lr 1e-3 --epochs 12 --batch-size 64 --weight-decay 0.05 (the vision-quick "
              "preset's dense recipe), or run `adaptinf run --preset vision-quick`", file=sys.stderr)


def _not_lm_task(data: str | None, command: str) -> None:
    """A classification command refuses a language-modelling corpus, naming `adaptinf train-lm`."""
    if data in LM_TASKS:
        raise ValueError(f"{data} is a language-modelling corpus; {command} trains classifiers. Train a language "
                         f"model with `adaptinf train-lm --task {data} --out DIR`, or run the whole language-model job "
                         f"with `adaptinf run --task {data} --out DIR`")
    if data is not None and data.lower().endswith(".txt"):
        raise ValueError(f"{data}: {command} reads a labelled .csv, .tsv or .jsonl file; a plain text file is a "
                         f"language-modelling corpus: `adaptinf train-lm --task {data} --out DIR` or "
                         f"`adaptinf run --task {data} --out DIR`")


# --- finetune -----------------------------------------------------------------------------------------


def cmd_finetune(args) -> int:
    """fine-tune the dense baseline on a task

    Fine-tune a Hugging Face BERT-family checkpoint (or the built-in MiniLM-L6) on a classification
    task, or a vision model (a Hugging Face ViT, or the built-in vit-tiny, trained from scratch) on an
    image task. Resumable: rerun the same command after an interruption. Runs unchanged under
    `torchrun --nproc_per_node=N` (DDP, gloo on CPU).
    """
    from adaptinf.steps import finetune_dense

    settings = _task_settings(args)
    _not_lm_task(settings.data, "finetune")
    model = args.model or default_model(settings.data)
    _check_pretrained(model, "finetune")
    _set_threads(args.threads)
    cfg = _train_config(args, settings.seed)
    _warn_scratch_recipe(model, cfg)
    finetune_dense(model, settings, cfg, args.out, max_length=args.max_length,
                   max_train_samples=args.max_train_samples, classifier_dropout=args.classifier_dropout,
                   progress=not args.no_progress, restart=args.restart)
    return 0


# --- convert ------------------------------------------------------------------------------------------


def _parse_sets(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        k, v = pair.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _latency_target_sets(args) -> dict:
    """--latency-target 0.5x / --latency-target-ms N as PLANER config fields (checked before any work)."""
    out = {}
    if args.latency_target is None and args.latency_target_ms is None:
        return out
    if args.method != "planer":
        raise ValueError(f"--latency-target / --latency-target-ms are PLANER settings; method {args.method!r} has no latency target")
    if args.latency_target is not None and args.latency_target_ms is not None:
        raise ValueError("give --latency-target (a fraction of dense, e.g. 0.5x) or --latency-target-ms, not both")
    if args.latency_target is not None:
        text = args.latency_target.strip().lower()
        try:
            out["latency_target"] = float(text[:-1] if text.endswith("x") else text)
        except ValueError:
            raise ValueError(f"--latency-target expects a fraction of the dense latency such as 0.5x, got {args.latency_target!r}") from None
    else:
        out["latency_target_ms"] = args.latency_target_ms
    return out


def cmd_convert(args) -> int:
    """convert a dense or pretrained model with an adaptive method

    Build a method's model from a dense model directory (from `adaptinf finetune`) or from a pretrained
    model (built-in name or Hugging Face checkpoint). Method settings are passed as --set key=value
    (values parsed as JSON when possible). Methods that train what they add (ee, sweet, multi-model)
    then train on the task recorded in the dense model directory (or --data; the built-in task for a
    pretrained source), select on validation, and save to --out; an interrupted run resumes when the
    same command is rerun.
    """
    from adaptinf.preset import method_config
    from adaptinf.steps import convert_method, load_source

    _set_threads(args.threads)
    _check_method(args.method)
    sets = {**_parse_sets(args.set or []), **_latency_target_sets(args)}
    method_config(args.method, sets, "--set")  # an unknown method, field or value fails here, before any work
    _train_config(args, 0)  # and so does a bad training flag
    # a pretrained source (built-in name or HF checkpoint) takes its task from the flags
    flags = _task_settings(args)
    dense, recorded = load_source(args.source, flags, args.max_length, flags.seed)
    settings = _task_settings(args, recorded) if recorded is not None else flags
    model = convert_method(dense, args.method, sets, args.out, settings, _train_config(args, settings.seed),
                           max_train_samples=args.max_train_samples, source_name=str(args.source),
                           progress=not args.no_progress, restart=args.restart)
    if model is not None:  # None on the ranks other than 0 under torchrun
        print(f"converted {args.source} with method {args.method!r} -> {args.out}")
    return 0


# --- evaluate -----------------------------------------------------------------------------------------


def cmd_evaluate(args) -> int:
    """accuracy, GFLOPs and (optionally) latency of saved models at every knob value

    Evaluate saved models on a split; every knob value becomes an operating point. With --latency, each
    test point is timed at batch 1 and 32 against the dense model in the same run.
    """
    from adaptinf.evaluate import add_reductions, write_points
    from adaptinf.registry import load_model
    from adaptinf.steps import evaluate_splits

    _set_threads(args.threads)
    knobs = _parse_floats(args.knobs, "--knobs")
    models = [(d, load_model(d)) for d in args.models]
    if args.quantize != "none":
        if args.latency:
            raise ValueError("--quantize with --latency: time quantised forms with `adaptinf bench --quantize` "
                             "(against the int8 dense references, --references)")
        from adaptinf.quantize import quantize

        for _, m in models:
            quantize(m.eval(), args.quantize)
    dense_dir = args.dense or next((d for d, m in models if m.method == "dense"), None)
    splits = ["validation", "test"] if args.split == "both" else [args.split]
    first = models[0][1]
    settings = _task_settings(args, _recorded_task(models[0][0]))
    task = _load_task(settings, labels=first.spec.labels, model=first)
    points = []
    for d, model in models:
        if model.spec.labels != first.spec.labels:
            raise ValueError(f"{d} has labels {list(model.spec.labels)}, {models[0][0]} has {list(first.spec.labels)}")
        name = (args.name or f"{model.method} ({Path(d).name})") + ("" if args.quantize == "none" else f" {args.quantize}")
        # --knobs and --refine apply to the models that have a knob; one without (dense) is evaluated once
        has_knob = model.knob_name is not None
        points += evaluate_splits(model, task, splits, name, str(d), settings.seed, batch_size=args.batch_size,
                                  knobs=knobs if has_knob else None, max_samples=args.max_samples,
                                  progress=not args.no_progress, refine_rounds=args.refine if has_knob else 0)
    add_reductions(points)  # against the dense point of each split
    if args.latency:
        _measure_latency(args, points, models, dense_dir, task, settings)
    csv_path, json_path = write_points(points, Path(args.out))
    for p in points:
        lat = "" if p.latency_ms_b1 is None else f", {p.latency_ms_b1:.1f} ms @b1, {p.latency_ms_b32:.1f} ms @b32"
        knob = "" if p.knob is None else f" {p.knob_name}={p.knob:g}"
        print(f"{p.split:10s} {p.model}{knob}: accuracy {p.accuracy:.4f}, {p.gflops:.3f} GFLOPs/sample{lat}")
    print(f"points written to {csv_path} and {json_path}")
    return 0


def _measure_latency(args, points, models, dense_dir, task, settings) -> None:
    """Latency of every test point at batch 1 and 32, interleaved with the dense model in one run."""
    from adaptinf.registry import load_model
    from adaptinf.steps import time_points

    if dense_dir is None:
        raise ValueError("--latency needs the dense model for the speed-up ratios: pass --dense DIR")
    dense = next((m for d, m in models if str(d) == str(dense_dir)), None) or load_model(dense_dir, expect_method="dense")
    enc = _encode_split(dense, task, "test", None, settings.seed)
    time_points([p for p in points if p.split == "test"], {str(d): m for d, m in models}, dense, enc,
                settings.seed, samples=args.latency_samples, repeats=args.repeats, progress=not args.no_progress,
                compare_hf=True, onnx=True, workdir=Path(args.out) / "onnx")


# --- bench --------------------------------------------------------------------------------------------


def _model_at_knob(arg: str) -> tuple[str, float | None]:
    """`DIR` or `DIR@KNOB` (a model timed at one knob value) -> (DIR, knob or None)."""
    if "@" in arg and not Path(arg).exists():
        d, _, k = arg.rpartition("@")
        try:
            return d, float(k)
        except ValueError:
            raise ValueError(f"{arg!r}: expected MODEL_DIR@KNOB with a number after '@'") from None
    return arg, None


def cmd_bench(args) -> int:
    """wall-clock latency of models, interleaved, as ratios against the first

    Latency harness: real test texts at each batch size, warm-up discarded, median and quartiles of
    repeats, cases interleaved in each repeat; every row is stamped with machine, threads, torch
    version, batch size and sequence lengths. The first model is the reference; each row also gives the
    analytic GFLOPs per sample on the same batches, the FLOPs reduction and the realisation ratio
    (measured speed-up / FLOPs reduction).
    """
    from adaptinf.bench import format_table, hf_case, make_batches, model_case, run_bench, write_bench
    from adaptinf.registry import load_model
    from adaptinf.methods.dense import to_hf_sequence_classifier

    _set_threads(args.threads)
    sizes, knobs = _parse_ints(args.batch_sizes, "--batch-sizes"), _parse_floats(args.knob, "--knob")
    specs = [_model_at_knob(m) for m in args.models]  # (directory, knob fixed with DIR@KNOB or None)
    models = [(d, load_model(d)) for d, _ in specs]
    ref_dir, ref = models[0]
    settings = _task_settings(args, _recorded_task(ref_dir))
    task = _load_task(settings, labels=ref.spec.labels, model=ref)
    enc = _encode_split(ref, task, "test", None, settings.seed)
    batches = {b: make_batches(enc, b, max(1, args.samples // b), settings.seed) for b in sizes}
    cases = {}
    for i, ((d, m), (_, fixed)) in enumerate(zip(models, specs)):
        name = "dense" if i == 0 and m.method == "dense" else f"{m.method}:{Path(d).name}"
        if fixed is not None and not m.knob_name:
            raise ValueError(f"{d}@{fixed:g}: method {m.method!r} has no knob")
        for k in ([fixed] if fixed is not None else knobs if knobs and m.knob_name else [None]):
            cases[name if k is None else f"{name}@{k:g}"] = model_case(m, k)
    reference = next(iter(cases))
    if (args.compare_hf or args.references) and ref.method != "dense":
        raise ValueError("--compare-hf and --references need a dense model as the first model")
    from adaptinf.references import Cases, against_best, dense_references

    extra = Cases()
    if args.references:
        drawn = {b: make_batches(enc, b, max(1, args.samples // b), settings.seed, sort_by_length=False) for b in sizes}
        extra = dense_references(ref, drawn, hf=True, workdir=Path(args.out) / "onnx",
                                 threads=None, compile=not args.no_compile)
        extra.cases.pop("dense")  # the first model is the reference already
    elif args.compare_hf:
        cases["transformers"] = hf_case(to_hf_sequence_classifier(ref))
    if args.quantize != "none":
        import copy

        from adaptinf.quantize import quantize

        for name, m, knob in [(n, c.model, c.knob) for n, c in list(cases.items()) if hasattr(c, "model")]:
            if args.references and m is ref:
                continue  # dense int8 is among the references
            q = copy.deepcopy(m).eval()
            quantize(q, args.quantize)
            extra.add(f"{name} {args.quantize}", model_case(q, knob), precision=args.quantize)
    for name, case in extra.cases.items():
        if name in cases:
            raise ValueError(f"two cases named {name!r}")
        cases[name] = case
    rows = run_bench(cases, batches, repeats=args.repeats, warmup=args.warmup, reference=reference,
                     progress=not args.no_progress, **extra.bench_kwargs())
    if args.references:
        rows = against_best(rows)
    csv_path, json_path = write_bench(rows, Path(args.out))
    print(format_table(rows))
    print(f"results written to {csv_path} and {json_path}")
    return 0


# --- report -------------------------------------------------------------------------------------------


def cmd_report(args) -> int:
    """markdown table and trade-off plots from points files

    Merge points.json files (or directories holding one) into report.md, points.csv/json and
    tradeoff.png (accuracy vs GFLOPs and vs latency, all methods on one plot).
    """
    from adaptinf.evaluate import read_points
    from adaptinf.report import write_report

    points = read_points([Path(p) for p in args.points])
    if not 0 <= args.max_drop <= 100:
        raise ValueError(f"--max-drop is in accuracy points (0-100), got {args.max_drop}")
    paths = write_report(points, Path(args.out), title=args.title, split=args.split, max_drop=args.max_drop / 100)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


# --- run / select / predict ---------------------------------------------------------------------------


def cmd_run(args) -> int:
    """the whole job: fine-tune, convert every method, evaluate, time, report

    Fine-tune the dense baseline once, convert and train each method, evaluate every operating point on
    validation and test, time each method's chosen point against dense, and write one report folder
    (OUT/report). Settings come from a preset (YAML, saved resolved as OUT/resolved.yaml); flags
    override them. Every stage is cached in OUT: rerunning with the same settings resumes where it
    stopped, a changed setting reruns that stage and the later ones. On a language-modelling corpus
    (--task austen or a .txt file; presets lm-quick, the default there, and lm-full) the decoder is
    trained from scratch and perplexity replaces accuracy (adaptinf.run_lm).
    """
    from adaptinf.lm_preset import lm_run_requested
    from adaptinf.preset import check_modality, default_preset, read_preset, resolve
    from adaptinf.run import run

    if lm_run_requested(args.preset, args.data):  # a language-modelling corpus or an LM preset (lm-quick, lm-full)
        from adaptinf.run_lm import cli_run

        _set_threads(args.threads)
        return _run_outcome(cli_run(args))
    if args.model is not None:
        _check_pretrained(args.model, "run")
    _set_threads(args.threads)
    # no --preset: vision-quick for an image task (built-in or a folder), else quick
    preset = args.preset if args.preset is not None else default_preset(args.data)
    cfg = resolve(preset, model=args.model, methods=args.methods, data=args.data, text_column=args.text_column,
                  label_column=args.label_column, group_column=args.group_column, seed=args.seed,
                  max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
                  epochs=args.epochs)
    # a text preset on images (or a vision preset on text) is an error naming the preset to use
    note = check_modality(cfg, read_preset(preset).get("model"), model_given=args.model is not None)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return _run_outcome(run(cfg, args.out, progress=not args.no_progress, restart=args.restart))


def _run_outcome(result) -> int:
    """Print where a run's report is; exit status 1 when a method failed (the others' results stand)."""
    print(f"report: {result.report}")
    if result.failed:
        print(f"error: method(s) {', '.join(result.failed)} failed; the others' results are in the report",
              file=sys.stderr)
        return 1
    return 0


def cmd_select(args) -> int:
    """pick the best operating point of a run under a budget and export it

    Across every method of a finished `adaptinf run`, pick the most accurate point on validation within
    --max-gflops or --max-latency-ms (timed points only), or the cheapest within --max-drop accuracy
    points of dense, and save that model with its knob fixed to --out (load it with adaptinf.load, or
    use `adaptinf predict`).
    """
    from adaptinf.selection import Budget, export

    budget = Budget(max_gflops=args.max_gflops, max_latency_ms=args.max_latency_ms, batch_size=args.batch_size,
                    max_drop=args.max_drop)
    out, chosen, twin = export(args.run_dir, budget, args.out, overwrite=args.overwrite,
                               allow_outside=args.allow_outside_run)
    knob = "" if chosen.knob is None else f" at {chosen.knob_name}={chosen.knob:g}"
    test = "" if twin is None else f"; test accuracy {twin.accuracy:.4f}"
    print(f"selected {chosen.model}{knob} ({budget.describe()}): validation accuracy {chosen.accuracy:.4f}, "
          f"{chosen.gflops:.4f} GFLOPs/sample{test}; model saved to {out}")
    return 0


def cmd_predict(args) -> int:
    """predict a file of texts (or images) with a saved model (streaming, JSON lines out)

    Read a .txt (one text per line), .csv/.tsv or .jsonl file in chunks and write one JSON line per row
    to --output (line, label, label_id, confidence, gflops, compute, truncated, error), flushed after
    every chunk. Empty texts, bytes that are not UTF-8 and bad JSON rows get an error record; texts
    longer than the model's max length are truncated and flagged. A vision model predicts images:
    --input is an image file, a folder of images (every image under it, sorted by path) or a file
    listing image paths (.txt one per line, or --image-column of a .csv/.jsonl; relative paths from
    the list's folder); records also carry "image" (the path), and an unreadable image gets an error
    record.
    """
    import warnings

    from adaptinf.registry import load_model
    from adaptinf.predict import predict_file

    _set_threads(args.threads)
    model = load_model(args.model)
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files (tokenizer.json); re-save it with adaptinf")
    from adaptinf.predict import is_vision

    if not is_vision(model) and args.image_column is not None:
        raise ValueError(f"--image-column is for vision models; {args.model} is a text model (use --text-column)")
    if args.quantize != "none":
        from adaptinf.quantize import quantize

        quantize(model.eval(), args.quantize)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = predict_file(model, args.input, args.output, batch_size=args.batch_size, chunk_size=args.chunk_size,
                              text_column=args.text_column, id_column=args.id_column, progress=not args.no_progress,
                              overwrite=args.overwrite, image_column=args.image_column or "image")
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"{counts['written']} records written to {counts['output']}: {counts['predicted']} predictions, "
          f"{counts['errors']} errors, {counts['truncated']} truncated")
    return 0


# --- language models ----------------------------------------------------------------------------------


def cmd_train_lm(args) -> int:
    """train the built-in language model from scratch on a text corpus

    Train a byte-level BPE tokenizer (--vocab-size) on the corpus's training split, then the built-in
    gpt-tiny decoder (hidden 128, 4 layers, 4 heads, FFN 512, context 256; --set FIELD=VALUE changes
    its DecoderConfig, e.g. --set num_hidden_layers=6) from scratch: AdamW, linear warm-up then cosine
    (or linear) decay, gradient clipping, validation perplexity every --eval-every steps, the best
    model kept in OUT/best (use it with `adaptinf generate OUT/best --prompt ...`), its test perplexity
    in OUT/summary.json. Corpora: austen (Jane Austen's novels: four to train on, Persuasion for
    validation, Northanger Abbey for test) or a UTF-8 text file (cut 80/10/10 in reading order at
    paragraph starts). Resumable: rerun the same command after an interruption.
    """
    from adaptinf.lm import builtin_lm_config
    from adaptinf.recipes.lm import LMTrainConfig, train_lm_from_scratch

    cfg = LMTrainConfig(seed=args.seed, **{name: getattr(args, name) for name in LMTrainConfig.flags()})
    overrides = _parse_sets(args.set or [])
    decoder = builtin_lm_config(args.model, args.vocab_size, cfg.dropout, 0, overrides)  # a bad --set fails here
    if cfg.seq_len > decoder.max_positions:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's context of {decoder.max_positions} tokens; lower it "
                         "or raise the context with --set max_position_embeddings=N")
    if args.data not in LM_TASKS and not Path(args.data).is_file():
        raise ValueError(f"--task {args.data!r} is neither a built-in corpus ({', '.join(LM_TASKS)}) nor a text file"
                         + (" (it is a folder)" if Path(args.data).is_dir() else ""))
    _set_threads(args.threads)
    result, summary = train_lm_from_scratch(args.data, cfg, args.out, model_name=args.model, vocab_size=args.vocab_size,
                                            overrides=overrides, progress=not args.no_progress, restart=args.restart)
    test = f", test perplexity {summary['test_perplexity']:.2f}" if "test_perplexity" in summary else ""
    print(f"{summary['parameters']:,} parameters, {summary['tokens']['train']:,} training tokens: best validation "
          f"perplexity {result.best_val_perplexity:.2f} at step {result.best_step} of {result.steps}{test} "
          f"({result.seconds:.0f} s); model saved to {Path(args.out) / 'best'}")
    return 0


def cmd_generate(args) -> int:
    """continue a prompt with a language model

    Load a language model directory (OUT/best of `adaptinf train-lm`) and print the prompt followed by
    its continuation: up to --max-new-tokens tokens, drawn at --temperature from the --top-k most
    likely tokens by a generator seeded with --seed (the same command prints the same text), or the
    most likely token at each step with --greedy. The prompt starts a document (it follows an
    end-of-text token, as every document in training); generation stops at an end-of-text token or at
    the end of the model's context (a note on stderr says so).
    """
    from adaptinf.lm import load_lm

    if not args.prompt:
        raise ValueError("--prompt is empty; give some text to continue")
    if args.greedy and (args.temperature is not None or args.top_k is not None):
        raise ValueError("--greedy takes the most likely token; --temperature and --top-k are for sampling: drop one")
    if args.temperature is not None and not args.temperature > 0:
        raise ValueError(f"--temperature must be a positive number, got {args.temperature}")
    _set_threads(args.threads)
    model = load_lm(args.model)
    if args.knob is not None:
        model.set_knob(args.knob)  # a ValueError naming the method for a knob it does not take
    g = model.generate_text(args.prompt, args.max_new_tokens, greedy=args.greedy,
                            temperature=1.0 if args.temperature is None else args.temperature, top_k=args.top_k,
                            seed=args.seed)
    print(g.text)
    if g.cut_by_context:
        print(f"note: {g.new_tokens} new tokens: the prompt and --max-new-tokens {args.max_new_tokens} exceed the "
              f"model's context of {model.cfg.max_positions} tokens", file=sys.stderr)
    return 0


# --- parser -------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when there is one and the help text does not already state it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


def _add_common_args(p, out: str | None, restart: str | None = None) -> None:
    """--out (required; `out` is its help) and --restart (when `restart` is its help), --threads, --no-progress."""
    if out is not None:
        p.add_argument("--out", required=True, help=out)
    if restart is not None:
        p.add_argument("--restart", action="store_true", help=restart)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_train_args(p, title: str, max_length: str):
    """The `TrainConfig` fields a user sets (defaults are TrainConfig's), --max-train-samples and --max-length."""
    g = p.add_argument_group(title)
    defaults = TrainConfig()
    for name, text in _TRAIN_HELP.items():
        default = getattr(defaults, name)
        g.add_argument("--" + name.replace("_", "-"), type=type(default), default=default, help=text)
    g.add_argument("--max-train-samples", type=int, default=None, help="train on a seeded subset of this size")
    g.add_argument("--max-length", type=int, default=64, help=max_length)
    return g


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"built-in model name or HF checkpoint directory (default: {DEFAULT_MODEL}; "
                   f"{DEFAULT_VISION_MODEL} for an image task)")
    _add_data_args(p)
    g = _add_train_args(p, "training (rerun the same command to resume)",
                        max_length="tokens per text; longer texts are truncated (an image model takes its patch count + 1)")
    g.add_argument("--classifier-dropout", type=float, default=0.1, help="dropout before the classifier")
    _add_common_args(p, out="output directory (best/, last/, metrics.csv, summary.json)",
                     restart="discard a previous run in --out instead of resuming it")


def _convert_args(p: argparse.ArgumentParser) -> None:
    from adaptinf.registry import list_methods

    p.add_argument("source", metavar="SOURCE",
                   help="a dense model directory (from `adaptinf finetune`, e.g. runs/dense/best), or a pretrained "
                        "model (built-in name such as minilm-l6, or a Hugging Face checkpoint directory) to start "
                        "from the pretrained weights with fresh heads, as the early-exit papers do")
    p.add_argument("--method", required=True, help=f"method name, one of: {', '.join(list_methods())}")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a method config field (repeatable), e.g. --set exits=[1,3,6] --set policy=entropy")
    p.add_argument("--latency-target", default=None, metavar="FRACTION",
                   help="planer: target latency as a fraction of the dense model's on this machine, e.g. 0.5x "
                        "(same as --set latency_target=0.5)")
    p.add_argument("--latency-target-ms", type=float, default=None, metavar="MS",
                   help="planer: target latency in milliseconds at the deployment batch size (--set latency_batch_size=B)")
    _add_data_args(p, default_data=None)
    _add_train_args(p, "training (methods that train after conversion, e.g. ee, sweet, multi-model; "
                       "rerun the same command to resume)",
                    max_length="tokens per text when SOURCE is a pretrained model (a dense directory keeps its own)")
    _add_common_args(p, out="output model directory; a method that trains keeps its resumable state in OUT/train",
                     restart="discard a previous training run in OUT/train instead of resuming it")


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", help="model directories")
    _add_data_args(p, default_data=None)
    p.add_argument("--split", choices=["validation", "test", "both"], default="both",
                   help="split(s) to evaluate (validation is for selection, test for reporting)")
    p.add_argument("--knobs", default=None, help="comma-separated knob values for the models that have a knob "
                   "(default: each method's own sweep); a model without one (dense) is evaluated once")
    p.add_argument("--refine", type=int, default=0, metavar="ROUNDS",
                   help="rounds of extra knob values where the cost jumps between neighbouring ones (by more than "
                   "5%% of the costliest point's GFLOPs), decided on the first split by cost alone (adaptinf run: 3)")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate on a seeded subset")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    p.add_argument("--latency", action="store_true",
                   help="also measure latency at batch 1 and 32 against the fastest dense reference (adaptinf dense "
                        "padding-free or padded, transformers, ONNX Runtime fp32), in one interleaved run")
    p.add_argument("--dense", default=None, help="dense model directory for latency ratios (default: the dense one among MODELS)")
    p.add_argument("--latency-samples", type=int, default=128, help="test samples per timing repeat")
    p.add_argument("--repeats", type=int, default=5, help="timing repeats (median reported)")
    p.add_argument("--name", default=None, help="display name of the model(s) in reports")
    _quantize_arg(p, "evaluate the models quantised (int8: dynamic int8 Linear; bf16); names get the suffix")
    _add_common_args(p, out="output directory for points.csv / points.json")


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+",
                   help="model directories, each optionally as DIR@KNOB to time it at that knob value only; "
                        "the first is the reference (normally dense)")
    _add_data_args(p, default_data=None)
    p.add_argument("--knob", default=None, help="comma-separated knob values to time for adaptive models")
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes to time")
    p.add_argument("--samples", type=int, default=128, help="test samples per timing repeat (per batch size)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (median and quartiles reported)")
    p.add_argument("--warmup", type=int, default=2, help="discarded warm-up passes per case")
    p.add_argument("--compare-hf", action="store_true",
                   help="also time transformers' BertForSequenceClassification with the same weights")
    p.add_argument("--references", action="store_true",
                   help="time every dense reference beside the models (dense padded, transformers, dense int8, "
                        "ONNX Runtime fp32/int8, dense compiled) and give each row its speed-up against the fastest "
                        "dense of its precision; the first model must be dense")
    p.add_argument("--no-compile", action="store_true", help="with --references: leave out dense compiled")
    _quantize_arg(p, "also time each model's quantised form (int8: dynamic int8 Linear; bf16)")
    _add_common_args(p, out="output directory for bench.csv / bench.json")


def _quantize_arg(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--quantize", default="none", choices=["none", "int8", "bf16"], help=text)


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("points", nargs="+", help="points.json files or directories")
    p.add_argument("--out", required=True, help="output directory (report.md, points.csv/json, tradeoff.png)")
    p.add_argument("--title", default="adaptinf report", help="report title")
    p.add_argument("--split", default="test", choices=["validation", "test"], help="split shown in the table and plots")
    p.add_argument("--max-drop", type=float, default=1.0,
                   help="accuracy points below dense for the table of each model's cheapest point within that drop "
                        "(chosen on validation, shown on test)")


def _run_args(p: argparse.ArgumentParser) -> None:
    from adaptinf.preset import builtin_presets

    p.add_argument("--preset", default=None,
                   help=f"built-in preset ({', '.join(builtin_presets())}) or a path to a preset .yaml file "
                   "(default: quick; vision-quick for an image task: --task fashion-mnist or a folder of images; "
                   "lm-quick for a language-modelling corpus: --task austen or a .txt file)")
    p.add_argument("--methods", default="all",
                   help="'all' (the preset's methods that are registered) or comma-separated method names, e.g. ee,acm")
    p.add_argument("--model", default=None, help="built-in model name or HF checkpoint directory (default: the preset's)")
    g = _add_data_args(p, default_data=None, recorded_in="the preset")
    g.add_argument("--max-train-samples", type=int, default=None, help="train on a seeded subset of this size (default: the preset's)")
    g.add_argument("--max-eval-samples", type=int, default=None, help="evaluate on seeded subsets of validation and test of this size")
    p.add_argument("--epochs", type=int, default=None, help="epochs for the dense baseline and every method (default: the preset's)")
    _add_common_args(p, out="run folder (stages, resolved.yaml, report/)",
                     restart="recompute every stage instead of reusing finished ones")


def _select_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of `adaptinf run`")
    c = p.add_mutually_exclusive_group(required=True)
    c.add_argument("--max-gflops", type=float, default=None, help="GFLOPs per sample (validation mean)")
    c.add_argument("--max-latency-ms", type=float, default=None, help="milliseconds per batch at --batch-size")
    c.add_argument("--max-drop", type=float, default=None, help="accuracy points below dense on validation")
    p.add_argument("--batch-size", type=int, default=1, choices=[1, 32], help="batch size --max-latency-ms refers to")
    p.add_argument("--out", required=True, help="output model directory (outside the run's stages, e.g. RUN/selected)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--allow-outside-run", action="store_true",
                   help="follow model folders the run's points name outside the run folder")


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_DIR", help="a saved model directory (e.g. from `adaptinf select`)")
    p.add_argument("--input", required=True, help="input file: .txt, .csv, .tsv or .jsonl; for a vision model an "
                   "image file, a folder of images, or such a file listing image paths")
    p.add_argument("--output", required=True, help="output .jsonl file")
    p.add_argument("--text-column", default="text", help="text column (.csv/.tsv) or field (.jsonl)")
    p.add_argument("--image-column", default=None,
                   help="vision models: the image path column (.csv/.tsv) or field (.jsonl) of a list file (default: image)")
    p.add_argument("--id-column", default=None, help="a column/field copied into each record as id")
    p.add_argument("--batch-size", type=int, default=32, help="texts (or images) per forward pass")
    p.add_argument("--chunk-size", type=int, default=1024, help="rows read, predicted and written at a time")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    _quantize_arg(p, "serve the model quantised: int8 (dynamic int8 Linear) or bf16 (where the CPU has it)")
    _add_common_args(p, out=None)


def _train_lm_args(p: argparse.ArgumentParser) -> None:
    from adaptinf.corpus import DEFAULT_VOCAB_SIZE
    from adaptinf.lm import BUILTIN_LMS, DEFAULT_LM
    from adaptinf.recipes.lm import LMTrainConfig

    g = p.add_argument_group("corpus and model")
    g.add_argument("--task", "--data", dest="data", default=LM_TASKS[0],
                   help=f"built-in corpus ({', '.join(LM_TASKS)}) or a UTF-8 text file (split 80/10/10 in reading order)")
    g.add_argument("--model", default=DEFAULT_LM, choices=list(BUILTIN_LMS), help="built-in language model (trained from scratch)")
    g.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help="tokens of the byte-level BPE tokenizer trained on the training split (the model's vocabulary)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a DecoderConfig field of the model (repeatable), e.g. --set hidden_size=256 --set num_hidden_layers=6")
    g.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed")
    t = p.add_argument_group("training (rerun the same command to resume)")
    defaults = LMTrainConfig()
    for name, text in LMTrainConfig.flags().items():
        default = getattr(defaults, name)
        t.add_argument("--" + name.replace("_", "-"), type=type(default), default=default, help=text,
                       **({"choices": ["cosine", "linear"]} if name == "schedule" else {}))
    _add_common_args(p, out="output directory (best/, last/, metrics.csv, summary.json)",
                     restart="discard a previous run in --out instead of resuming it")


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_DIR", help="a language model directory (OUT/best of `adaptinf train-lm`)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--greedy", action="store_true", help="take the most likely token at each step instead of sampling")
    p.add_argument("--knob", type=float, default=None,
                   help="an adaptive model's operating point (default: the one it was saved at; dense has none)")
    _add_common_args(p, out=None)


# sub-command -> (what it runs: its docstring's first line is its summary, the rest its description; its flags)
_COMMANDS = {
    "finetune": (cmd_finetune, _finetune_args),
    "convert": (cmd_convert, _convert_args),
    "evaluate": (cmd_evaluate, _evaluate_args),
    "bench": (cmd_bench, _bench_args),
    "report": (cmd_report, _report_args),
    "run": (cmd_run, _run_args),
    "select": (cmd_select, _select_args),
    "predict": (cmd_predict, _predict_args),
    "train-lm": (cmd_train_lm, _train_lm_args),
    "generate": (cmd_generate, _generate_args),
}


def build_parser() -> argparse.ArgumentParser:
    from adaptinf import __version__

    parser = argparse.ArgumentParser(
        prog="adaptinf",
        description="Make transformer classifiers cheaper at inference: convert a model with an adaptive "
        "method, train what it needs, and measure accuracy against FLOPs and wall-clock latency.",
        epilog="Typical flow: `adaptinf run` (the whole job; or step by step: finetune -> convert -> evaluate --latency -> "
        "report), then `select` a point under a budget and `predict` with it. Run `adaptinf CMD --help` for details.",
    )
    parser.add_argument("--version", action="version", version=f"adaptinf {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of its one-line message (also ADAPTINF_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (func, add_args) in _COMMANDS.items():
        summary, _, description = (func.__doc__ or "").partition("\n")  # (no docstrings under python -OO)
        p = sub.add_parser(name, help=summary, description=description, formatter_class=_HelpFormatter)
        add_args(p)
        p.set_defaults(func=func)
    return parser


# --- the error boundary -------------------------------------------------------------------------------

# flags whose value is a comma-separated list of numbers, which may start with '-' (`--knobs -1,2`)
_NUMBER_LISTS = ("--knobs", "--knob")
_NEGATIVE = re.compile(r"-[0-9.]")

# OSErrors that a path the user gave causes; any other exception is an internal error (a traceback)
_PATH_ERRORS = (FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError, FileNotFoundError)


def _attach_negative_values(argv: list[str]) -> list[str]:
    """`--knobs -1,2` as `--knobs=-1,2`: argparse reads a value starting with '-' as a flag."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            return out + argv[i:]
        if a in _NUMBER_LISTS and i + 1 < len(argv) and _NEGATIVE.match(argv[i + 1]):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
        else:
            out.append(a)
            i += 1
    return out


def _within(path, folder) -> bool:
    p, f = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return p == f or f in p.parents


def _path_error(e: OSError, args) -> str:
    """What is wrong with the path of `e` and how to fix it, naming the --out folder when the path is
    in it or above it."""
    path = None if e.filename is None else os.fsdecode(e.filename) if isinstance(e.filename, bytes) else str(e.filename)
    out = getattr(args, "out", None)
    below, above = (out is not None and path is not None and _within(*pair) for pair in ((path, out), (out, path)))
    flag = f"--out {out}: " if below or above else ""
    if isinstance(e, PermissionError):
        if out is not None and (path is None or flag):
            inside = "" if path is None or above else f" ({path})"
            return f"--out {out} cannot be written{inside}: permission denied; choose another folder or fix its permissions"
        return f"{path or e}: permission denied; fix its permissions or give another path"
    if path is None:
        return e.strerror or str(e)
    if isinstance(e, NotADirectoryError):
        blocker = next((a for a in (Path(path), *Path(path).parents) if a.exists() and not a.is_dir()), None)
        what = f"{blocker} is a file, not a folder" if blocker else "a part of it is not a folder"
        return f"{flag}{path}: {what}; give a path under a folder"
    if isinstance(e, FileExistsError):
        if below and above:
            return f"--out {out} is a file; give a folder"
        if above:
            return f"{flag}{path} is a file, not a folder; give a folder"
        return f"{flag}{path} already exists and is not a folder; remove it or give another path"
    if isinstance(e, IsADirectoryError):
        return f"{flag}{path} is a folder; give a file"
    return f"{flag}{path} does not exist; check the path"  # FileNotFoundError


def _one_line(e: Exception, args) -> str:
    text = _path_error(e, args) if isinstance(e, OSError) else str(e)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__


def _debug(args) -> bool:
    return args.debug or os.environ.get("ADAPTINF_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_attach_negative_values(list(sys.argv[1:] if argv is None else argv)))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        _check_counts(args)  # what the flags alone tell, before any work
        _check_out(getattr(args, "out", None))
        return args.func(args)
    except (ValueError, *_PATH_ERRORS) as e:
        if _debug(args):
            raise
        print(f"error: {_one_line(e, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
