"""`adaptinf select`: pick one operating point of a run under a budget and export it as a model.

Chosen on validation, across every method of the run (dense included):
- max_gflops: the most accurate point on validation whose validation GFLOPs/sample are within it;
- max_latency_ms: the most accurate point on validation among the timed points (the run times each
  method's chosen point) whose latency at the given batch size (1 or 32) is within it;
- max_drop: the cheapest point (fewest validation GFLOPs) whose validation accuracy is at most that
  many points below dense's (the most accurate point would just be the full-budget model).
Ties go to the cheaper point. The exported model is the point's model with its knob fixed in
config.json, so `adaptinf.load(DIR).predict(...)` runs at that point.

Export never writes into what a run made: the run folder itself, its stage folders (dense/, points/,
methods/, latency/, report/) and any model folder its points name are refused (a new folder beside
them, RUN/selected, is fine), and so is a folder that already holds a model unless asked to
overwrite it. The model folders a run's points name must lie inside the run unless allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from adaptinf.evaluate import OperatingPoint, read_points


@dataclass
class Budget:
    max_gflops: float | None = None
    max_latency_ms: float | None = None
    batch_size: int = 1
    max_drop: float | None = None  # accuracy points

    def __post_init__(self) -> None:
        given = [k for k in ("max_gflops", "max_latency_ms", "max_drop") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one constraint: --max-gflops X, --max-latency-ms Y or --max-drop Z"
                             + (f" (got {', '.join(given)})" if given else ""))
        v = getattr(self, given[0])
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"--{given[0].replace('_', '-')} must be a non-negative number, got {v!r}")
        if self.batch_size not in (1, 32):
            raise ValueError(f"--batch-size must be 1 or 32 (the batch sizes a run times), got {self.batch_size}")

    def describe(self) -> str:
        if self.max_gflops is not None:
            return f"at most {self.max_gflops:g} GFLOPs/sample on validation"
        if self.max_latency_ms is not None:
            return f"at most {self.max_latency_ms:g} ms per batch of {self.batch_size}"
        return f"at most {self.max_drop:g} accuracy points below dense on validation"


def run_points(run_dir: str | Path) -> list[OperatingPoint]:
    """All points of a finished run (report/points.json: validation and test, latency merged)."""
    d = Path(run_dir)
    if not d.is_dir():
        raise ValueError(f"run directory {d} does not exist" if not d.exists() else f"{d} is not a directory")
    f = d / "report" / "points.json"
    if not f.is_file():
        raise ValueError(f"{d} has no report/points.json: pass the --out folder of a finished `adaptinf run`")
    return read_points([f])


def select_point(points: list[OperatingPoint], budget: Budget) -> tuple[OperatingPoint, OperatingPoint | None]:
    """(the chosen validation point, its test twin or None) under `budget`; ValueError if none fits."""
    val = [p for p in points if p.split == "validation"]
    test = {(p.model, p.knob): p for p in points if p.split == "test"}
    if not val:
        raise ValueError("the run has no validation points")
    if budget.max_gflops is not None:
        fits = [p for p in val if p.gflops <= budget.max_gflops]
        if not fits:
            cheapest = min(val, key=lambda p: p.gflops)
            raise ValueError(f"no operating point has at most {budget.max_gflops:g} GFLOPs/sample on validation; "
                             f"the cheapest is {cheapest.gflops:.4f} ({_name(cheapest)})")
        best = max(fits, key=lambda p: (p.accuracy, -p.gflops))
    elif budget.max_latency_ms is not None:
        field = f"latency_ms_b{budget.batch_size}"
        timed = [p for p in val if getattr(test.get((p.model, p.knob)), field, None) is not None]
        if not timed:
            raise ValueError("the run has no timed points (its latency stage did not run)")
        fits = [p for p in timed if getattr(test[(p.model, p.knob)], field) <= budget.max_latency_ms]
        if not fits:
            fastest = min(timed, key=lambda p: getattr(test[(p.model, p.knob)], field))
            raise ValueError(f"no timed point takes at most {budget.max_latency_ms:g} ms per batch of {budget.batch_size}; "
                             f"the fastest is {getattr(test[(fastest.model, fastest.knob)], field):.2f} ms ({_name(fastest)})")
        best = max(fits, key=lambda p: (p.accuracy, -p.gflops))
    else:
        dense = [p for p in val if p.method == "dense"]
        if len(dense) != 1:
            raise ValueError(f"--max-drop needs exactly one dense point on validation, found {len(dense)}")
        floor = dense[0].accuracy - budget.max_drop / 100
        fits = [p for p in val if p.accuracy >= floor - 1e-12]
        best = min(fits, key=lambda p: (p.gflops, -p.accuracy))
    return best, test.get((best.model, best.knob))


def _name(p: OperatingPoint) -> str:
    return p.model if p.knob is None else f"{p.model} {p.knob_name or 'knob'}={p.knob:g}"


def _run_folder_holding(out: Path, run: Path, points: list[OperatingPoint]) -> str | None:
    """What of a run the (resolved) folder `out` is or lies inside: this run's folder or one of its
    stage folders, a model folder its points name, or those of another run (a folder holding run.json
    or resolved.yaml); None if none. A new folder beside the stages (RUN/selected) is no part of them."""
    from adaptinf.run import STAGE_DIRS

    for d in sorted({(run / p.model_dir).resolve() for p in points if p.model_dir}):
        if out.is_relative_to(d):
            return f"the run's model folder {d}"
    roots = [run] + [d for d in (out, *out.parents) if (d / "run.json").is_file() or (d / "resolved.yaml").is_file()]
    for root in roots:
        if out == root:
            return f"the run folder {root}"
        stage = next((root / s for s in STAGE_DIRS if out.is_relative_to(root / s)), None)
        if stage is not None:
            return f"the run's stage folder {stage}"
    return None


def check_export_dir(out: str | Path, run_dir: str | Path, points: list[OperatingPoint], overwrite: bool = False) -> None:
    """Refuse an export folder that is part of a run (this one or another: the run folder, a stage
    folder, a model folder its points name) and, unless `overwrite`, one that already holds a model:
    ValueError naming the path."""
    o = Path(out).resolve()
    if o.exists() and not o.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory")
    inside = _run_folder_holding(o, Path(run_dir).resolve(), points)
    if inside is not None:
        raise ValueError(f"--out {out} is {inside} or lies inside it: exporting there would overwrite what the run "
                         "made (and a later `adaptinf run` would reuse it as its own); pick a folder outside the run "
                         "(or a new one beside its stages, such as RUN/selected)")
    held = [f for f in ("config.json", "model.safetensors") if (o / f).exists()]
    if held and not overwrite:
        raise ValueError(f"--out {out} already holds a model ({', '.join(held)}); pick another folder, "
                         "or pass --overwrite to replace it")


def export(run_dir: str | Path, budget: Budget, out: str | Path, overwrite: bool = False,
           allow_outside: bool = False) -> tuple[Path, OperatingPoint, OperatingPoint | None]:
    """Select under `budget` and save the chosen model with its knob fixed to `out`, a folder that is
    no part of a run (see `check_export_dir`; `overwrite`: it may hold a model already). The model
    folders the run's points name must lie inside the run unless `allow_outside`."""
    from adaptinf.checkpoint import read_config, save_model
    from adaptinf.registry import load_model
    from adaptinf.run import run_model_dir

    run = Path(run_dir)
    points = run_points(run)
    chosen, twin = select_point(points, budget)
    if chosen.model_dir is None:
        raise ValueError(f"the point {_name(chosen)} does not record its model directory")
    src = run_model_dir(run, chosen.model_dir, allow_outside)
    out = Path(out)
    check_export_dir(out, run, points, overwrite)
    model = load_model(src)
    model.set_knob(chosen.knob)
    extra = dict(read_config(src).get("extra") or {})
    extra["selected"] = {
        "run": str(run), "model_dir": str(src), "method": chosen.method, "knob_name": chosen.knob_name,
        "knob": chosen.knob, "constraint": budget.describe(), "val_accuracy": chosen.accuracy,
        "val_gflops": chosen.gflops, "test_accuracy": twin.accuracy if twin else None,
        "test_gflops": twin.gflops if twin else None,
        "latency_ms_b1": twin.latency_ms_b1 if twin else None, "latency_ms_b32": twin.latency_ms_b32 if twin else None,
    }
    save_model(model, out, extra=extra)
    return out, chosen, twin
