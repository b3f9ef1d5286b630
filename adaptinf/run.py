"""`adaptinf run`: the whole job in one command, cached stage by stage.

Stages, in order (each writes into its own folder under the run directory):
    dense/              fine-tune the dense baseline once (best/, last/, metrics.csv, summary.json)
    points/dense/       its operating point on validation and test
    methods/<m>/        convert and train each method (model/, train/ = resumable training state)
    points/<m>/         every knob value of it on validation and test
    latency/            each method's chosen point (cheapest within `max_drop` of dense on validation,
                        else its most accurate; only the latter when dense is within SANITY_MARGIN of
                        always predicting the majority class, which the run warns about on stderr)
                        timed at batch 1 and 32 against dense, one interleaved run
    report/             report.md, points.csv/json, tradeoff.png, accuracy_vs_gflops.png,
                        accuracy_vs_latency.png
    resolved.yaml/json  the settings of this run; run.json: what each stage did and how long it took

Caching: each stage folder holds `.stage.json` with the hash of the stage's resolved settings (the
data by content too: a data file edited in place under the same name is other settings) and of the
results of the stages it depends on. A finished stage with the same hash whose outputs are all there
is skipped; a changed setting reruns that stage and every stage that depends on it (its folder is
cleared first). A stage whose outputs went missing, or whose marker is malformed, runs again from the
start, and so do the stages that use its result. An interrupted stage resumes: training restarts
from its last checkpoint. The report is always rewritten.

A method that fails is recorded (its error in methods/<m>/error.txt and in the report) and the run
goes on with the others; the dense baseline failing ends the run.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from adaptinf.preset import RunConfig, settings_hash, write_resolved

STAGE_FILE = ".stage.json"
# the folders of a run that its stages write (and clear); a new folder beside them is left alone
STAGE_DIRS = ("dense", "points", "methods", "latency", "report")
# the latency fields of a timed point
TIMED_FIELDS = ("latency_ms_b1", "latency_ms_b32", "speedup_b1", "speedup_b32", "realisation_b32")


class Stage:
    """One cached step: a folder, the hash of its settings, the files it must leave (relative to the
    folder), and a marker saying started or done. Done means: the marker says done with the same key
    and every output is there."""

    def __init__(self, directory: Path, name: str, key: str, settings: dict, outputs: tuple[str, ...] = ()):
        self.dir, self.name, self.key, self.settings = Path(directory), name, key, settings
        self.outputs = tuple(outputs)
        self._marker = read_marker(self.dir / STAGE_FILE)

    def marker(self) -> dict | None:
        """The stage's marker as read when the stage was made (None: none, or a malformed one)."""
        return self._marker

    def finished_before(self) -> bool:
        """Whether the marker says this stage finished with the same settings (outputs not checked)."""
        m = self._marker
        return m is not None and m.get("key") == self.key and m.get("state") == "done"

    def missing(self) -> list[str]:
        return [o for o in self.outputs if not (self.dir / o).is_file()]

    def is_done(self) -> bool:
        return self.finished_before() and not self.missing()

    def start(self, restart: bool = False) -> bool:
        """Prepare the folder; True when an earlier attempt with the same settings is resumed."""
        m = self._marker
        resume = m is not None and m.get("key") == self.key and not restart
        if not resume and self.dir.exists():
            shutil.rmtree(self.dir)  # other settings (or --restart): start this stage over
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write({"state": "started", "started": _now()})
        return resume

    def finish(self, seconds: float, info: dict | None = None) -> str:
        """Mark the stage done; returns the id of this result, which the stages that use it hash (so a
        stage that ran again reruns what depends on it)."""
        output = uuid.uuid4().hex[:16]
        self._write({"state": "done", "seconds": round(seconds, 1), "finished": _now(), "info": info or {},
                     "output": output})
        return output

    def _write(self, extra: dict) -> None:
        from adaptinf.checkpoint import write_json_atomic

        self._marker = {"stage": self.name, "key": self.key, **extra, "settings": self.settings}
        write_json_atomic(self.dir / STAGE_FILE, self._marker)


# what a marker's fields must be when present
_MARKER_FIELDS = {"key": str, "state": str, "seconds": (int, float), "info": dict, "output": str}


def read_marker(path: Path) -> dict | None:
    """A stage marker, or None when there is none; a malformed one (unreadable, not JSON, not an object,
    a field of the wrong type) is reported in one line and read as none, so the stage runs again."""
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_bytes().decode("utf-8"))
        problem = None if isinstance(m, dict) else f"it holds a JSON {type(m).__name__}, not an object"
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        m, problem = None, f"it cannot be read ({type(e).__name__})"
    if problem is None:
        bad = [k for k, kind in _MARKER_FIELDS.items()
               if k in m and (not isinstance(m[k], kind) or isinstance(m[k], bool))]
        problem = f"its field(s) {bad} have the wrong type" if bad else None
    if problem:
        _say(f"warning: ignoring the stage marker {path}: {problem}; the stage runs again")
        return None
    return m


@dataclass
class StageRecord:
    name: str
    status: str  # ran | resumed | cached | failed
    seconds: float  # of the run that produced the result (cached: the earlier run's)
    error: str | None = None


@dataclass
class RunResult:
    out: Path
    report: Path | None
    stages: list[StageRecord] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # method -> error
    notes: list[str] = field(default_factory=list)  # what the run adapted or decided (structure, budgets)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Job:
    """What the stages of one `run` share: the settings, the run folder, the task, what each stage did."""

    def __init__(self, cfg: RunConfig, out: Path, progress: bool, restart: bool, task):
        self.cfg, self.out, self.progress, self.restart, self.task = cfg, out, progress, restart, task
        self.seed = cfg.task.seed
        self.records: list[StageRecord] = []
        self.total = 2 + 2 * len(cfg.methods) + 1  # dense + its points, each method + its points, latency
        self.count = 0
        self.evals: dict[str, tuple[str, Path]] = {}  # model name -> (eval stage key, points folder)
        self.result = RunResult(out=out, report=None, skipped=dict(cfg.skipped))
        # the settings every model depends on (the dense model's, and a method's trained from pretrained)
        # and the data by content, so a file edited in place under the same name reruns every stage
        self.base = {"model": cfg.model, "max_length": cfg.max_length, "task": cfg.task.to_dict(),
                     "data_digest": cfg.task.data_digest(), "max_train_samples": cfg.max_train_samples}

    def stage(self, name: str, directory: Path, settings: dict, deps: list[str], body,
              outputs: tuple[str, ...] = ()) -> tuple[str, Any]:
        """Run `body(stage)` unless the stage is done with the same settings and its `outputs` (files
        relative to `directory`) are there; returns (the id of its result, info). The ids of the stages
        it uses are its `deps`."""
        self.count += 1
        key = settings_hash(settings, deps)
        st = Stage(directory, name, key, settings, outputs)
        head = f"[{self.count}/{self.total}] {name}"
        m = st.marker()
        if st.is_done() and not self.restart:
            _say(f"{head}: cached (same settings; took {m.get('seconds', 0):.0f} s) -> {directory}")
            self.records.append(StageRecord(name, "cached", m.get("seconds", 0.0)))
            return m.get("output", key), m.get("info", {})
        lost = st.finished_before() and not self.restart and st.missing()
        if lost:
            _say(f"{head}: finished before, but {', '.join(lost)} {'is' if len(lost) == 1 else 'are'} missing from "
                 f"{directory}; running it again")
        resumed = st.start(self.restart or bool(lost))
        _say(f"{head}: {'resuming' if resumed else 'running'} -> {directory}")
        t0 = time.time()
        info = body(st) or {}
        seconds = time.time() - t0
        output = st.finish(seconds, info)
        self.records.append(StageRecord(name, "resumed" if resumed else "ran", round(seconds, 1)))
        _say(f"{head}: done in {seconds:.0f} s")
        return output, info


def _folder_image_size(cfg: RunConfig) -> int | None:
    """The size an image folder's images are resized to: the model's image size (None otherwise)."""
    from adaptinf.settings import BUILTIN_TASK_NAMES, is_image_data

    if cfg.task.data in BUILTIN_TASK_NAMES or not is_image_data(cfg.task.data):
        return None
    from adaptinf.hf import image_size_of

    return image_size_of(cfg.model)


def run(cfg: RunConfig, out: str | Path, progress: bool = True, restart: bool = False) -> RunResult:
    """Run (or resume) the whole job for `cfg` into `out`; see the module docstring."""
    from adaptinf.evaluate import add_reductions, read_points
    from adaptinf.steps import load_task

    out = _prepare(cfg, out)
    task = load_task(cfg.task, image_size=_folder_image_size(cfg))  # bad files, columns and labels fail here
    _say(f"{task.summary()}; preset {cfg.preset!r}; methods: {', '.join(m.name for m in cfg.methods) or 'none'}")
    job = _Job(cfg, out, progress, restart, task)
    dense_key = _dense_stage(job)
    _eval_stage(job, "dense", out / "dense" / "best", dense_key, None)
    for ms in cfg.methods:
        _method_stages(job, ms, dense_key)
    points = read_points([folder / "points.json" for _, folder in job.evals.values()])
    add_reductions(points)  # against the dense point of each split
    baselines = _baselines(job, points)
    timed = _latency_stage(job, points, baselines)
    _warn_if_dense_is_weak(points, baselines)
    return _finish(job, points, timed, baselines)


def _baselines(job: _Job, points) -> dict:
    """The majority-class and chance rates per split: what the points recorded, else (points cached by
    an older version) from the task's labels of the same evaluated subset."""
    from adaptinf.data import subsample
    from adaptinf.evaluate import SplitBaseline, split_baselines

    found = split_baselines(points)
    for split in ("validation", "test"):
        if split not in found:
            _, labels = subsample(job.task.split(split), job.cfg.evaluate.max_samples, job.seed)
            found[split] = SplitBaseline.from_labels(split, labels, len(job.task.labels))
    return found


def _warn_if_dense_is_weak(points, baselines: dict) -> None:
    """One line on stderr when dense is within `SANITY_MARGIN` of always predicting the majority class."""
    from adaptinf.evaluate import dense_problems, sanity_warning

    warning = sanity_warning(dense_problems(points, baselines), what="the report's comparisons with dense")
    if warning:
        _say(warning)


def _prepare(cfg: RunConfig, out: str | Path) -> Path:
    """The run folder, created, with the resolved settings written into it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, out)
    for m, why in cfg.skipped.items():
        _say(f"warning: skipping method {m!r}: {why}")
    return out


def _dense_stage(job: _Job) -> str:
    """Fine-tune the dense baseline into dense/; returns the stage's key."""
    from adaptinf.steps import finetune_dense

    cfg, dense_dir = job.cfg, job.out / "dense"
    n_train = len(job.task.train[0]) if cfg.max_train_samples is None else min(cfg.max_train_samples, len(job.task.train[0]))
    train, budgets = cfg.dense_budget(n_train)
    if train is not cfg.dense:
        most = max(budgets, key=budgets.get)
        note = (f"dense: trained for at least {train.min_steps} steps ({budgets[most]:,} samples: the budget of the "
                f"most-trained method, {most}), stopping on validation" + (f" (patience {train.patience})" if train.patience else ""))
        _say(note)
        job.result.notes.append(note)

    def train_dense(st: Stage):
        summary = finetune_dense(cfg.model, cfg.task, train.to_train_config(job.seed), dense_dir,
                                 max_length=cfg.max_length, max_train_samples=cfg.max_train_samples,
                                 progress=job.progress, task=job.task)
        return {"summary": summary, "method_budgets": budgets}

    key, _ = job.stage("dense: fine-tune", dense_dir, {**job.base, "train": vars(train)}, [], train_dense,
                       outputs=("best/config.json", "best/model.safetensors"))
    return key


def _eval_stage(job: _Job, name: str, model_dir: Path, model_key: str, knobs) -> None:
    """Evaluate the model in `model_dir` on validation and test into points/<name>/."""
    from adaptinf.evaluate import write_points
    from adaptinf.registry import load_model
    from adaptinf.steps import evaluate_splits

    ev, folder = job.cfg.evaluate, job.out / "points" / name

    def evaluate(st: Stage):
        model = load_model(model_dir)
        # model directories are recorded relative to the run folder, so the folder can move
        pts = evaluate_splits(model, job.task, ["validation", "test"], name, model_dir.relative_to(job.out).as_posix(),
                              job.seed, batch_size=ev.batch_size, knobs=knobs, max_samples=ev.max_samples,
                              progress=job.progress, refine_rounds=ev.refine_rounds, refine_gap=ev.refine_gap)
        write_points(pts, folder)
        return {"points": len(pts)}

    settings = {"batch_size": ev.batch_size, "max_samples": ev.max_samples, "refine_rounds": ev.refine_rounds,
                "refine_gap": ev.refine_gap, "knobs": knobs}
    key, _ = job.stage(f"{name}: evaluate", folder, settings, [model_key], evaluate, outputs=("points.json",))
    job.evals[name] = (key, folder)


def _method_stages(job: _Job, ms, dense_key: str) -> None:
    """Convert, train and evaluate one method; a failure is recorded and the run goes on."""
    mdir = job.out / "methods" / ms.name
    try:
        key = _train_method_stage(job, ms, mdir, dense_key)
        _eval_stage(job, ms.name, mdir / "model", key, ms.knobs)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # one method failing must not lose the others' results
        msg = f"{type(e).__name__}: {e}"
        job.result.failed[ms.name] = msg
        job.records.append(StageRecord(f"{ms.name}", "failed", 0.0, msg))
        mdir.mkdir(parents=True, exist_ok=True)
        (mdir / "error.txt").write_text(traceback.format_exc())
        _say(f"error: method {ms.name!r} failed ({msg}); details in {mdir / 'error.txt'}; going on with the others")


def _train_method_stage(job: _Job, ms, mdir: Path, dense_key: str) -> str:
    """Convert the method's source (the fine-tuned dense model or the pretrained one) and train it
    into methods/<m>/; returns the stage's key."""
    from adaptinf.registry import load_model
    from adaptinf.steps import convert_method, dense_from_pretrained

    cfg, dense_best = job.cfg, job.out / "dense" / "best"

    def train_method(st: Stage):
        from adaptinf.structure import adapt

        if ms.source == "dense":
            dense, source = load_model(dense_best, expect_method="dense"), str(dense_best)
        else:
            dense, _ = dense_from_pretrained(cfg.model, job.task.labels, cfg.max_length, 0.1, job.seed)
            source = cfg.model
        sets, notes = adapt(ms.name, ms.set, dense.spec.encoder)  # the preset's structure fitted to this model
        for note in notes:
            _say(f"note: {note}")
        convert_method(dense, ms.name, sets, mdir / "model", cfg.task, ms.train.to_train_config(job.seed),
                       train_dir=mdir / "train", max_train_samples=cfg.max_train_samples,
                       source_name=source, progress=job.progress, task=job.task)
        (mdir / "error.txt").unlink(missing_ok=True)
        return {"source": source, "set": sets, "structure_notes": notes}

    settings = {"method": ms.name, "source": ms.source, "set": ms.set, "train": vars(ms.train)}
    deps = [dense_key] if ms.source == "dense" else [settings_hash(job.base)]
    key, info = job.stage(f"{ms.name}: convert and train", mdir, settings, deps, train_method,
                          outputs=("model/config.json", "model/model.safetensors"))
    job.result.notes += info.get("structure_notes", [])
    return key


def _latency_stage(job: _Job, points, baselines: dict | None = None) -> dict:
    """Time the chosen points into latency/ and copy their latency onto the test points; returns the
    timed points' fields by (model, knob)."""
    from adaptinf.evaluate import dense_problems

    lat_dir = job.out / "latency"

    def time_chosen(st: Stage):
        chosen = choose_latency_points(points, job.cfg.latency.max_drop / 100, baselines)
        return {"timed": measure_latency(chosen, job.task, job.seed, job.cfg, lat_dir, job.progress)}

    job.total = job.count + 1
    settings = {**vars(job.cfg.latency), "evals": sorted(k for k, _ in job.evals.values())}
    if dense_problems(points, baselines):  # other choices (a key only then, so other runs' caches stay valid)
        settings["dense_near_majority"] = True
    _, info = job.stage("latency at chosen points", lat_dir, settings, [], time_chosen, outputs=("bench.json",))
    timed = {(t["model"], t["knob"]): t for t in info.get("timed", [])}
    for p in points:
        t = timed.get((p.model, p.knob))
        if p.split == "test" and t:
            for k in TIMED_FIELDS:
                setattr(p, k, t.get(k))
    return timed


def _finish(job: _Job, points, timed: dict, baselines: dict | None = None) -> RunResult:
    """Write the report and run.json; the run's result."""
    from adaptinf.run_report import write_run_report

    result, out = job.result, job.out
    result.stages = job.records
    result.report = write_run_report(points, job.cfg, out, result, timed, baselines)
    (out / "run.json").write_text(json.dumps({
        "finished": _now(), "report": str(result.report), "failed": result.failed, "skipped": result.skipped,
        "stages": [vars(r) for r in result.stages]}, indent=2) + "\n")
    return result


def run_model_dir(run_dir: str | Path, model_dir: str, allow_outside: bool = False) -> Path:
    """The model folder a run's points file names (relative to the run folder, or absolute); it must
    lie inside the run folder unless `allow_outside` (ValueError naming both)."""
    run = Path(run_dir)
    src = Path(model_dir)
    src = src if src.is_absolute() else run / src
    if not allow_outside and not src.resolve().is_relative_to(run.resolve()):
        raise ValueError(f"the points of {run} name the model folder {model_dir!r} ({src.resolve()}), which lies "
                         f"outside the run folder {run.resolve()}; refusing to follow it (pass --allow-outside-run "
                         "if the run's models really live there)")
    return src


def choose_latency_points(points, max_drop: float, baselines: dict | None = None) -> list[tuple[Any, str]]:
    """The test points to time: per adaptive model, the cheapest point within `max_drop` (a fraction)
    of dense on validation, else its most accurate point on validation; only the latter when dense is
    within `SANITY_MARGIN` of the majority class (`baselines`, default what the points recorded).
    Returns (test point, why)."""
    from adaptinf.evaluate import cheapest_within_drop, dense_problems

    weak = bool(dense_problems(points, baselines))
    picked = {} if weak else {(t.method, t.model): (t, f"cheapest within {100 * max_drop:g} pt of dense (validation)")
                              for _, t, _ in cheapest_within_drop(points, max_drop, margin=None)}
    fallback = "most accurate (dense is near the majority class)" if weak else "most accurate (none within the drop)"
    test = {(p.model, p.knob): p for p in points if p.split == "test"}
    for p in sorted((p for p in points if p.split == "validation" and p.method != "dense"),
                    key=lambda p: (-p.accuracy, p.gflops)):
        if (p.method, p.model) not in picked and (p.model, p.knob) in test:
            picked[(p.method, p.model)] = (test[(p.model, p.knob)], fallback)
    return list(picked.values())


def measure_latency(chosen, task, seed: int, cfg: RunConfig, out: Path, progress: bool) -> list[dict]:
    """Time the chosen points against dense in one interleaved run; write bench.csv/json to out and
    return, per timed point, its latency fields."""
    from adaptinf.bench import format_table, write_bench
    from adaptinf.registry import load_model
    from adaptinf.steps import encode_split, time_points

    run_dir = out.parent
    dense = load_model(run_dir / "dense" / "best", expect_method="dense")
    models = {}
    for p, _ in chosen:
        if p.model_dir not in models:
            models[p.model_dir] = load_model(run_model_dir(run_dir, p.model_dir))
    enc = encode_split(dense, task, "test", None, seed)
    pts = [p for p, _ in chosen]
    lat = cfg.latency
    rows, cases, keys = time_points(pts, models, dense, enc, seed, samples=lat.samples, repeats=lat.repeats, warmup=lat.warmup,
                       compare_hf=lat.compare_hf, progress=progress, int8=lat.int8, onnx=lat.onnx,
                       workdir=out / "onnx", compile=lat.compile)
    write_bench(rows, out)
    (out / "bench.md").write_text(format_table(rows) + "\n")
    by = {(r.case, r.batch_size): r for r in rows}
    timed = []
    for p, why in chosen:
        timed.append({"method": p.method, "model": p.model, "knob": p.knob, "why": why,
                      **{k: getattr(p, k) for k in TIMED_FIELDS}})
    timed.append({"method": "dense", "model": "dense", "knob": None, "why": "reference",
                  "latency_ms_b1": by[("dense", 1)].median_ms, "latency_ms_b32": by[("dense", 32)].median_ms,
                  "speedup_b1": by[("dense", 1)].speedup_vs_best, "speedup_b32": by[("dense", 32)].speedup_vs_best,
                  "realisation_b32": 1.0})
    if lat.int8:
        forms = _int8_forms([(p, keys[id(p)]) for p, _ in chosen], cases, dense, enc, by)
        (out / "int8.json").write_text(json.dumps(forms, indent=2) + "\n")
    return timed


def _int8_forms(chosen, cases, dense, enc, by) -> list[dict]:
    """Test accuracy and latency of the int8 forms timed by `time_points` (dense int8, ONNX Runtime's,
    each chosen point's: `chosen` holds (point, its case name))."""
    from adaptinf.model import accuracy

    def row(name, method, knob, acc, case):
        b1, b32 = by.get((case, 1)), by.get((case, 32))
        hf1, hf32 = by.get(("transformers", 1)), by.get(("transformers", 32))
        return {"name": name, "method": method, "knob": knob, "test_accuracy": acc,
                "latency_ms_b1": b1.median_ms, "latency_ms_b32": b32.median_ms,
                "speedup_vs_best_int8_b1": b1.speedup_vs_best, "speedup_vs_best_int8_b32": b32.speedup_vs_best,
                "best_int8_b1": b1.best_reference, "best_int8_b32": b32.best_reference,
                "speedup_vs_transformers_b1": hf1.median_ms / b1.median_ms if hf1 else None,
                "speedup_vs_transformers_b32": hf32.median_ms / b32.median_ms if hf32 else None}

    pad = dense.spec.encoder.pad_token_id
    out = [row("dense int8", "dense", None, accuracy(cases["dense int8"].model, enc, 64, pad)[0], "dense int8")]
    if ("onnxruntime int8", 32) in by:
        out.append(row("onnxruntime int8", "dense", None, None, "onnxruntime int8"))
    for p, key in chosen:
        q = cases[f"{key} int8"].model
        out.append(row(f"{p.model} int8", p.method, p.knob, accuracy(q, enc, 64, pad, knob=p.knob)[0], f"{key} int8"))
    return out
