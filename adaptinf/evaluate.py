"""Accuracy and cost of a model at every knob value: one `OperatingPoint` per (model, knob, split).

`evaluate_model` sweeps a model's knob over an encoded split and records accuracy and mean analytic
GFLOPs per sample. Latency columns are filled by the benchmark harness (`adaptinf.bench`), FLOPs
reductions by `add_reductions` (against the dense point of each split); FLOPs are never presented as speed.

Per-sample integer extras a model returns (e.g. `extras["exit_layer"]`, a [b] int tensor) are
summarised in `OperatingPoint.extras["shares"][key]` as the share of samples per value.

A model whose `sweep_offline` returns results (early exit: every knob from one pass that stores
all exits' logits) is evaluated from those instead of one forward pass per knob.

Each point also records what a model that ignores its input would score on the same labels
(`majority`: the share of the most frequent label; `num_labels`, so chance = 1 / num_labels), which
`split_baselines` turns into one `SplitBaseline` per split and `dense_problems` uses to tell when the
dense reference is no better than always predicting the majority class (then no point may be called
"within N points of dense"). `wilson_interval` gives each accuracy its 95% interval.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adaptinf.data import Encoded, eval_batches
from adaptinf.model import AT_DEFAULT, AdaptiveClassifier

PARETO_AXES = ("gflops", "latency_ms_b1", "latency_ms_b32")
# dense must beat always predicting the majority class by at least this much (a fraction, 0.05 = 5
# accuracy points) on validation and test to serve as the reference other points are compared with
SANITY_MARGIN = 0.05
# columns the points files add from the raw numbers (the 95% Wilson interval of `accuracy`); not read back
DERIVED_FIELDS = ("accuracy_low", "accuracy_high")
Z95 = 1.959963984540054  # the two-sided 95% quantile of the standard normal


def wilson_interval(accuracy: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (default 95%) of a proportion `accuracy` measured on `n` samples."""
    if n < 1 or not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"wilson_interval needs n >= 1 and a proportion in [0, 1], got {accuracy!r}, n={n!r}")
    z2n = z * z / n
    centre = (accuracy + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z2n / (4 * n)) / (1 + z2n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class SplitBaseline:
    """What a model that ignores its input scores on one split: `majority` (always predicting the most
    frequent label: that label's share of the split) and `chance` (1 / number of labels), over n samples."""

    split: str
    n: int
    majority: float
    chance: float

    @classmethod
    def from_labels(cls, split: str, labels, num_labels: int) -> SplitBaseline:
        """From a split's label ids (a list or a 1-d tensor) and the task's number of labels."""
        counts = Counter(int(y) for y in labels)
        if not counts or num_labels < 1:
            raise ValueError(f"split {split!r}: a baseline needs at least one label and one class")
        n = sum(counts.values())
        return cls(split, n, max(counts.values()) / n, 1.0 / num_labels)


@dataclass
class OperatingPoint:
    """One point of a method's accuracy/cost curve on one split.

    gflops: mean analytic GFLOPs per sample (see `adaptinf.flops`).
    latency_ms_b1 / latency_ms_b32: measured latency at batch size 1 / 32 (None until benchmarked).
    speedup_b1 / speedup_b32: dense latency / this latency, measured in the same run.
    flops_reduction: dense GFLOPs / this GFLOPs.
    realisation_b32: speedup_b32 / flops_reduction (how much of the FLOPs saving shows up as speed).
    """

    method: str
    model: str
    knob_name: str | None
    knob: float | None
    split: str
    accuracy: float
    gflops: float
    n: int
    latency_ms_b1: float | None = None
    latency_ms_b32: float | None = None
    speedup_b1: float | None = None
    speedup_b32: float | None = None
    flops_reduction: float | None = None
    realisation_b32: float | None = None
    model_dir: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    majority: float | None = None  # share of the most frequent label among the n evaluated samples
    num_labels: int | None = None  # the model's number of labels (chance = 1 / num_labels)

    def interval(self) -> tuple[float, float] | None:
        """The 95% Wilson interval of `accuracy` over its n samples (None without a usable n)."""
        ok = self.n >= 1 and math.isfinite(self.accuracy) and 0.0 <= self.accuracy <= 1.0
        return wilson_interval(self.accuracy, self.n) if ok else None

    def to_dict(self) -> dict:
        """JSON-ready dict, with the accuracy's 95% interval added (`DERIVED_FIELDS`); non-finite
        floats become None (JSON has no NaN)."""
        d = dataclasses.asdict(self)
        d["accuracy_low"], d["accuracy_high"] = self.interval() or (None, None)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> OperatingPoint:
        if not isinstance(d, dict):
            raise ValueError(f"an operating point must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - set(DERIVED_FIELDS)
        if unknown:
            raise ValueError(f"operating point has unknown fields {sorted(unknown)} (known: {sorted(names)})")
        required = ("method", "model", "split", "accuracy", "gflops", "n")
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ValueError(f"operating point is missing fields {missing}")
        kw: dict[str, Any] = {}
        try:
            for k in ("method", "model", "split"):
                kw[k] = str(d[k])
            for k in ("knob_name", "model_dir"):
                kw[k] = None if d.get(k) is None else str(d[k])
            kw["accuracy"] = float(d["accuracy"])
            kw["gflops"] = float(d["gflops"])
            kw["n"] = int(d["n"])
            kw["num_labels"] = None if d.get("num_labels") is None else int(d["num_labels"])
            for k in (
                "knob",
                "latency_ms_b1",
                "latency_ms_b32",
                "speedup_b1",
                "speedup_b32",
                "flops_reduction",
                "realisation_b32",
                "majority",
            ):
                kw[k] = None if d.get(k) is None else float(d[k])
        except (TypeError, ValueError) as e:
            raise ValueError(f"operating point has a field of the wrong type: {e}") from e
        extras = d.get("extras") or {}
        if not isinstance(extras, dict):
            raise ValueError(f"operating point field 'extras' must be an object, got {type(extras).__name__}")
        kw["extras"] = dict(extras)
        return cls(**kw)


# --- running a model -------------------------------------------------------------------------------


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _run(
    model: AdaptiveClassifier, enc: Encoded, batch_size: int, progress: bool, desc: str, knob=AT_DEFAULT
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Counter]]:
    """Logits [n, C] and flops [n] in the original order of `enc`, plus value counts of per-sample
    integer extras."""
    if len(enc) == 0:
        raise ValueError("nothing to evaluate: the encoded split is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    pad_id = model.spec.encoder.pad_token_id
    n, c = len(enc), model.spec.num_labels
    logits = torch.empty((n, c), dtype=torch.float32)
    cost = torch.empty((n,), dtype=torch.float64)
    counts: dict[str, Counter] = {}
    model.eval()
    total = math.ceil(n / batch_size)
    with torch.inference_mode():
        for batch in tqdm(
            eval_batches(enc, batch_size, pad_id=pad_id, sort_by_length=True),
            total=total,
            desc=desc,
            disable=not progress,
            leave=False,
        ):
            out = model(batch.input_ids.to(device), batch.attention_mask.to(device), knob=knob)
            b = batch.index.shape[0]
            for what, t, shape in (("logits", out.logits, (b, c)), ("flops", out.flops, (b,))):
                if tuple(t.shape) != shape:
                    raise ValueError(
                        f"{type(model).__name__} returned {what} of shape {tuple(t.shape)}, expected {shape}"
                    )
            logits[batch.index] = out.logits.detach().float().cpu()
            cost[batch.index] = out.flops.detach().to(torch.float64).cpu()
            _count_int_extras(out.extras, b, counts)
    return logits, cost, counts


def _count_int_extras(extras: dict[str, Any], b: int, counts: dict[str, Counter]) -> None:
    """Add the value counts of every per-sample integer extra (a [b] int or bool tensor) to `counts`."""
    for key, v in extras.items():
        is_int = isinstance(v, torch.Tensor) and (v.dtype == torch.bool or not v.is_floating_point())
        if is_int and not v.is_complex() and v.shape == (b,):
            values, k = torch.unique(v.detach().cpu().long(), return_counts=True)
            counts.setdefault(key, Counter()).update(dict(zip(values.tolist(), k.tolist())))


def predict_all(
    model: AdaptiveClassifier, enc: Encoded, batch_size: int = 64, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [n, C] (float32, CPU) and per-sample FLOPs [n] (float64) in the original order of `enc`.

    Batches are sorted by length to cut padding (no per-sample result depends on the batch) and
    scattered back by `Batch.index`. Puts the model in eval mode.
    """
    logits, cost, _ = _run(model, enc, batch_size, progress, desc=f"predict {model.method}")
    return logits, cost


def _check_labels(enc: Encoded, num_labels: int) -> torch.Tensor:
    y = enc.labels
    if y.shape != (len(enc),):
        raise ValueError(f"Encoded.labels has shape {tuple(y.shape)}, expected ({len(enc)},) (one label per sample)")
    if (y == -1).any():
        raise ValueError(
            f"{int((y == -1).sum())} of {len(enc)} samples have no label (-1); accuracy needs labelled data"
        )
    if ((y < 0) | (y >= num_labels)).any():
        bad = sorted(set(y[(y < 0) | (y >= num_labels)].tolist()))
        raise ValueError(f"label ids {bad} are outside the model's {num_labels} labels")
    return y


@dataclass
class _Sweep:
    """What every point of one `evaluate_model` call shares: the model, the split and its labels."""

    model: AdaptiveClassifier
    enc: Encoded
    labels: torch.Tensor
    split: str
    name: str
    batch_size: int
    progress: bool
    model_dir: str | None

    def point(self, value, predictions: torch.Tensor, cost: torch.Tensor, counts: dict[str, Counter],
              other: dict) -> OperatingPoint:
        n, model = len(self.enc), self.model
        extras: dict[str, Any] = dict(other)
        if counts:
            extras["shares"] = {key: {str(v): c / n for v, c in sorted(cnt.items())} for key, cnt in counts.items()}
        return OperatingPoint(
            method=model.method,
            model=self.name,
            knob_name=model.knob_name if value is not None else None,
            knob=None if value is None else float(value),
            split=self.split,
            accuracy=(predictions == self.labels).double().mean().item(),
            gflops=cost.mean().item() / 1e9,
            n=n,
            model_dir=self.model_dir,
            extras=extras,
            majority=torch.bincount(self.labels).max().item() / n,
            num_labels=model.spec.num_labels,
        )


def _sweep(s: _Sweep, values: list) -> list[OperatingPoint]:
    """One point per knob value: from the model's offline sweep where it has one, else one
    forward pass per value (the value passed to forward)."""
    # A model may compute the whole sweep from fewer passes (e.g. early exit: one pass storing
    # every exit's logits); it promises the same predictions and FLOPs as `forward` per knob.
    swept = s.model.sweep_offline(s.enc, values, batch_size=s.batch_size, progress=s.progress)
    if swept is not None:
        return _offline_points(s, values, swept)
    points = []
    for value in values:
        s.model.check_knob(value)
        desc = s.name if value is None else f"{s.name} {s.model.knob_name}={value:g}"
        logits, cost, counts = _run(s.model, s.enc, s.batch_size, s.progress, desc, knob=value)
        points.append(s.point(value, logits.argmax(dim=1), cost, counts, {}))
    return points


def _offline_points(s: _Sweep, values: list, swept) -> list[OperatingPoint]:
    """The points of a model's `sweep_offline` results, their knobs and shapes checked."""
    who, n = type(s.model).__name__, len(s.enc)
    if [r.knob for r in swept] != values:
        raise ValueError(f"{who}.sweep_offline returned knobs {[r.knob for r in swept]}, expected {values}")
    points = []
    for value, predictions, cost, extras in swept:
        if predictions.shape != (n,) or cost.shape != (n,):
            raise ValueError(f"{who}.sweep_offline returned predictions {tuple(predictions.shape)} and "
                             f"flops {tuple(cost.shape)}, expected ({n},) each")
        counts: dict[str, Counter] = {}
        _count_int_extras(extras, n, counts)
        other = {k: v for k, v in extras.items() if not isinstance(v, torch.Tensor)}
        points.append(s.point(value, predictions.cpu(), cost.to(torch.float64).cpu(), counts, other))
    return points


def _in_knob_order(points: list[OperatingPoint], values: list) -> list[OperatingPoint]:
    """`points` sorted by knob (None first), in the direction of the method's own grid `values`."""
    numeric = [v for v in values if v is not None]
    descending = len(numeric) > 1 and numeric[0] > numeric[-1]
    return sorted(points, key=lambda p: (p.knob is not None,
                                         0.0 if p.knob is None else (-p.knob if descending else p.knob)))


def evaluate_model(
    model: AdaptiveClassifier,
    enc: Encoded,
    split: str,
    name: str | None = None,
    batch_size: int = 64,
    knobs: list[float | None] | None = None,
    progress: bool = True,
    model_dir: str | None = None,
    refine_rounds: int = 0,
    refine_gap: float = 0.05,
) -> list[OperatingPoint]:
    """Accuracy and mean GFLOPs/sample at every knob value (default `model.knob_values()`).

    Args:
        name: display name of the model (default the method name), e.g. "ee (minilm-l6)".
        knobs: values to sweep (each passed to the forward pass; the model's operating point is not
            touched); its train/eval mode is restored afterwards.
        model_dir: where the model was loaded from, recorded on each point.
        refine_rounds: after the sweep, up to this many rounds of `refine_knobs`: where neighbouring
            knob values differ in mean GFLOPs by more than `refine_gap` of the costliest point, their
            midpoint is evaluated too. Cost only, never labels, decides, so refining on a split does
            not tune on its answers. The points come back in knob order.
    """
    y = _check_labels(enc, model.spec.num_labels)
    values = list(model.knob_values() if knobs is None else knobs)
    if not values:
        raise ValueError("no knob values to evaluate (knobs is empty)")
    if refine_rounds < 0 or not 0 < refine_gap < 1:
        raise ValueError(f"refine_rounds must be >= 0 and refine_gap in (0, 1), got {refine_rounds}, {refine_gap}")
    s = _Sweep(model, enc, y, split, name or model.method, batch_size, progress, model_dir)
    was_training = model.training
    try:
        points = _sweep(s, values)
        for _ in range(refine_rounds):
            seen = {p.knob for p in points}
            new = [v for v in refine_knobs(points, refine_gap, model.knob_between) if v not in seen]
            if not new:
                break
            points += _sweep(s, new)
    finally:
        model.train(was_training)
    return _in_knob_order(points, values) if len(points) > len(values) else points


def refine_knobs(points: list[OperatingPoint], gap: float, between=lambda a, b: (a + b) / 2) -> list[float]:
    """Values between neighbouring knob values (in knob order; `between(a, b)`, default the midpoint,
    None for none) whose mean GFLOPs differ by more than `gap` times the costliest point's: where the
    accuracy/cost curve jumps, one more value traces it (e.g. a SHARCS router that sends almost every
    sample to one width up to a bias and to another just above it)."""
    numeric = sorted((p for p in points if p.knob is not None), key=lambda p: p.knob)
    if len(numeric) < 2:
        return []
    top = max(p.gflops for p in numeric)
    found = []
    for a, b in zip(numeric, numeric[1:]):
        if abs(b.gflops - a.gflops) > gap * top and b.knob - a.knob > 1e-6 * max(1.0, abs(a.knob)):
            mid = between(a.knob, b.knob)
            if mid is not None:
                found.append(float(mid))
    return found


def add_reductions(points: list[OperatingPoint], dense_gflops: float | None = None) -> list[OperatingPoint]:
    """Fill `flops_reduction` (dense GFLOPs / point GFLOPs) in place, and `realisation_b32` where the
    measured `speedup_b32` is known. Returns the same list.

    dense_gflops: the dense model's GFLOPs/sample; None: each point against the first dense point
    (method "dense") of its own split, points of a split without one left as they are."""
    if dense_gflops is None:
        for split in dict.fromkeys(p.split for p in points):
            same = [p for p in points if p.split == split]
            dense = next((p for p in same if p.method == "dense"), None)
            if dense is not None:
                add_reductions(same, dense.gflops)
        return points
    if not (isinstance(dense_gflops, (int, float)) and math.isfinite(dense_gflops) and dense_gflops > 0):
        raise ValueError(f"dense_gflops must be a positive number, got {dense_gflops!r}")
    for p in points:
        p.flops_reduction = dense_gflops / p.gflops if p.gflops > 0 else None
        if p.speedup_b32 is not None and p.flops_reduction:
            p.realisation_b32 = p.speedup_b32 / p.flops_reduction
    return points


# --- files -----------------------------------------------------------------------------------------


def write_points(points: list[OperatingPoint], out_dir: str | Path, stem: str = "points") -> tuple[Path, Path]:
    """Write `<stem>.csv` (extras as a JSON string) and `<stem>.json` (a list of dicts) under out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [p.to_dict() for p in points]
    json_path, csv_path = out / f"{stem}.json", out / f"{stem}.csv"
    json_path.write_text(json.dumps(rows, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    names = [f.name for f in dataclasses.fields(OperatingPoint)] + list(DERIVED_FIELDS)
    with csv_path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        for r in rows:
            w.writerow({**{k: ("" if v is None else v) for k, v in r.items()}, "extras": json.dumps(r["extras"])})
    return csv_path, json_path


def read_points(paths: list[str | Path]) -> list[OperatingPoint]:
    """Points from JSON files (a list of point dicts) or directories holding a `points.json`."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    points: list[OperatingPoint] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            p = p / "points.json"
            if not p.is_file():
                raise ValueError(f"directory {raw} has no points.json (run `adaptinf evaluate` into it first)")
        elif not p.exists():
            raise ValueError(f"points file {p} does not exist")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except ValueError as e:  # invalid JSON or not UTF-8 (both ValueErrors)
            raise ValueError(f"{p} is not a valid points JSON file ({e})") from e
        if not isinstance(data, list):
            raise ValueError(f"{p} must hold a JSON list of operating points, got {type(data).__name__}")
        for i, d in enumerate(data):
            try:
                points.append(OperatingPoint.from_dict(d))
            except ValueError as e:
                raise ValueError(f"{p}: point {i}: {e}") from e
    return points


# --- selection -------------------------------------------------------------------------------------


def pareto_front(points: list[OperatingPoint], x: str = "gflops") -> list[OperatingPoint]:
    """Points no other point beats (accuracy at least as high at no more cost, better in one),
    sorted by cost `x` (one of gflops, latency_ms_b1, latency_ms_b32). Points without `x` are skipped."""
    if x not in PARETO_AXES:
        raise ValueError(f"pareto_front: x must be one of {list(PARETO_AXES)}, got {x!r}")
    usable = [p for p in points if getattr(p, x) is not None]
    usable.sort(key=lambda p: (getattr(p, x), -p.accuracy))
    front: list[OperatingPoint] = []
    best = -math.inf
    for p in usable:
        if p.accuracy > best:
            front.append(p)
            best = p.accuracy
    return front


class DenseNotAboveMajority(ValueError):
    """Dense is no better than always predicting the majority class, so nothing is "within N points of dense"."""


def cheapest_within_drop(
    points: list[OperatingPoint], max_drop: float, select_split: str = "validation", report_split: str = "test",
    margin: float | None = SANITY_MARGIN,
) -> list[tuple[OperatingPoint, OperatingPoint, OperatingPoint]]:
    """Per adaptive model, the cheapest point (mean GFLOPs) whose accuracy on `select_split` is at
    most `max_drop` (a fraction, 0.01 = one point) below the dense model's on that split.

    Thresholds are chosen on validation and reported on test: returns one (selected point on
    `select_split`, the same model and knob on `report_split`, the dense point on `report_split`)
    per model that has a qualifying point, in the order the models first appear. Raises ValueError
    when the points hold no single dense model on both splits (identical dense results from
    several evaluations count as one), and `DenseNotAboveMajority` (a ValueError) when the points
    show dense within `margin` of the majority-class rate on either split (`dense_problems`; None:
    not checked; points without a recorded majority rate are not checked either).
    """
    if not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop) and max_drop >= 0):
        raise ValueError(f"max_drop must be a non-negative number, got {max_drop!r}")
    problems = [] if margin is None else dense_problems(points, margin=margin, splits=(select_split, report_split))
    if problems:
        raise DenseNotAboveMajority(f"no point is chosen within {100 * max_drop:g} point(s) of dense: "
                                    + "; ".join(problems))
    dense = {}
    for s in (select_split, report_split):  # the same dense model evaluated in several runs counts once
        found = {(p.accuracy, p.n, round(p.gflops, 9)): p for p in points if p.method == "dense" and p.split == s}
        dense[s] = list(found.values())
    for s, found in dense.items():
        if len(found) != 1:
            raise ValueError(f"choosing points within a drop needs exactly one dense point on split {s!r}, "
                             f"found {len(found)}")
    floor = dense[select_split][0].accuracy - max_drop
    twins = {(p.method, p.model, p.knob): p for p in points if p.split == report_split}
    chosen: dict[tuple[str, str], OperatingPoint] = {}
    for p in points:
        if p.split != select_split or p.method == "dense" or p.accuracy < floor - 1e-12:
            continue
        key = (p.method, p.model)
        if (p.method, p.model, p.knob) in twins and (key not in chosen or p.gflops < chosen[key].gflops):
            chosen[key] = p
    return [(p, twins[(p.method, p.model, p.knob)], dense[report_split][0]) for p in chosen.values()]


# --- is dense a reference at all? ----------------------------------------------------------------


def split_baselines(points: list[OperatingPoint]) -> dict[str, SplitBaseline]:
    """The majority-class and chance rates per split, from the points that recorded them (a dense
    point's where there is one); splits whose points recorded none (files saved before) are absent."""
    out: dict[str, SplitBaseline] = {}
    for p in sorted(points, key=lambda p: p.method != "dense"):
        if p.split not in out and p.majority is not None and p.num_labels:
            out[p.split] = SplitBaseline(p.split, p.n, p.majority, 1.0 / p.num_labels)
    return out


def dense_problems(
    points: list[OperatingPoint], baselines: dict[str, SplitBaseline] | None = None, margin: float = SANITY_MARGIN,
    splits: tuple[str, ...] = ("validation", "test"),
) -> list[str]:
    """One sentence per split of `splits` whose dense point is not at least `margin` (a fraction) above
    always predicting the majority class there; empty when dense is a usable reference (or when no
    majority rate is known). `baselines` default: `split_baselines(points)`."""
    base = split_baselines(points) if baselines is None else baselines
    found = []
    for split in splits:
        b = base.get(split)
        for d in {p.accuracy: p for p in points if p.method == "dense" and p.split == split}.values():
            if b is not None and d.accuracy - b.majority < margin - 1e-12:
                found.append(f"{split}: dense {100 * d.accuracy:.2f}% vs majority class {100 * b.majority:.2f}%, "
                             f"chance {100 * b.chance:.2f}%, n={b.n}")
    return found


def sanity_warning(problems: list[str], margin: float = SANITY_MARGIN, what: str = "the comparisons below") -> str:
    """The one-line warning for `dense_problems`' findings (empty string when there are none); `what`
    names the comparisons it invalidates."""
    if not problems:
        return ""
    return (f"WARNING: dense is within {100 * margin:g} points of always predicting the majority class "
            f"({'; '.join(problems)}); {what} are not meaningful")
