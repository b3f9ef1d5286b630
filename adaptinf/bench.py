"""Latency harness: the measurement protocol lives here, so every number is taken the same way.

Protocol (`run_bench`):
- Inputs are fixed batches of real test texts, sampled with a seed and dynamically padded
  (`make_batches`), built and moved to the device before any timing.
- Everything runs under `torch.inference_mode()`; models are in eval mode (`model_case`).
- Per batch size, every case first runs `warmup` passes over all batches, which are discarded.
- Then `repeats` rounds. In round r the cases run in an order rotated by r, so slow drift
  (thermal state, other processes) hits every case alike; comparisons are ratios measured in the
  same run. One sample = wall time (`time.perf_counter`, after a device sync) over all batches of
  that size / number of batches, i.e. milliseconds per batch.
- Reported per (case, batch size): median, quartiles and minimum over rounds, throughput, and the
  speed-up against a reference case: the ratio of medians, and the paired ratio (median over rounds
  of reference time / case time, which cancels drift between rounds).
- Every row is stamped with machine, device, torch threads, torch and Python versions, batch shape
  (real and padded lengths) and a UTC timestamp.
- Before warm-up, one untimed pass per case reads the analytic FLOPs its outputs report (for the
  samples of these very batches), so each row also carries GFLOPs per sample, the FLOPs reduction
  vs the reference and the realisation ratio (measured speed-up / FLOPs reduction).

Measured latency and analytic FLOPs are reported side by side; FLOPs are never presented as speed.
The physical limit is on every row too: the machine's measured matmul rate (`matmul_rate`, fp32 or
int8 by the case's precision, same threads) and the case's achieved GFLOP/s as a fraction of it.

Batches are length-bucketed by default (`make_batches(sort_by_length=True)`: the drawn samples
sorted by length before they are cut into batches), as `predict` and `evaluate` do; a case may run on
batches of its own (`case_batches`, e.g. the padded dense reference on unsorted batches of the same
samples), and a case whose outputs carry no FLOPs (a `transformers` or ONNX Runtime model) may take
another case's (`flops_from`).

The protocol's pieces are public so every other timing in the project takes its numbers the same
way (PLANER's latency table, `adaptinf.recipes.latency_table`, times its block stacks with them):
`warm_up` (discarded calls of every case), `interleaved_rounds` (rounds timing every case once in
an order rotated by the round) and `time_call` (one sample: wall time after a device sync, median
of repeats, optionally the mean of enough calls to last a minimum duration).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from adaptinf.data import Batch, Encoded, collate

Case = Callable[[Batch], object]


@dataclass
class BenchRow:
    """One (case, batch size) measurement with the conditions it was taken under.

    Times are milliseconds per batch over `repeats` rounds; `speedup_vs_reference` is
    reference median / this case's median and `paired_speedup_vs_reference` the median over
    rounds of reference time / case time (both None without a reference). FLOPs fields are None
    for a case whose outputs carry no `flops` (e.g. a `transformers` model).
    """

    case: str
    batch_size: int
    n_batches: int
    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    repeats: int
    warmup: int
    ms_per_sample: float
    samples_per_s: float
    reference: str | None
    speedup_vs_reference: float | None
    paired_speedup_vs_reference: float | None
    mean_length: float  # real tokens per sample
    max_length: int
    mean_padded_length: float  # padded sequence length per batch
    gflops_per_sample: float | None  # analytic, from the case's outputs on these batches (None: not reported)
    flops_reduction_vs_reference: float | None  # reference GFLOPs / this case's
    realisation: float | None  # speedup_vs_reference / flops_reduction_vs_reference
    precision: str  # "fp32", "int8" or "bf16": which matmul rate the case is held to
    achieved_gflops_per_s: float | None  # gflops_per_sample * samples_per_s
    peak_gflops_per_s: float | None  # this machine's measured matmul rate at the case's precision
    peak_fraction: float | None  # achieved / peak
    machine: str
    device: str
    torch_threads: int
    torch_version: str
    python_version: str
    timestamp: str  # UTC, ISO 8601, start of the run
    # filled by `adaptinf.references.against_best`: the fastest dense reference of the row's
    # precision class (fp32, or int8 for an int8 case) at this batch size, and the ratio of medians
    best_reference: str | None = None
    speedup_vs_best: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- inputs ---------------------------------------------------------------------------------------


def _move(batch: Batch, device: torch.device) -> Batch:
    return Batch(*(t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.labels, batch.index)))


def make_batches(
    enc: Encoded, batch_size: int, n_batches: int, seed: int, pad_id: int = 0, device: str | torch.device = "cpu",
    sort_by_length: bool = True,
) -> list[Batch]:
    """`n_batches` batches of `batch_size` samples drawn at random (seeded) from `enc`.

    Each batch is padded to its own longest sample, as in real serving. When `enc` holds fewer
    than `batch_size * n_batches` samples, seeded permutations of it are concatenated, so every
    sample is used about equally often. With `sort_by_length` (the default, as `predict` does) the
    drawn samples are sorted by length before they are cut into batches (length-bucketed): the same
    samples either way, less padding.

    Args:
        enc: tokenised samples (usually the test split).
        batch_size: samples per batch.
        n_batches: number of batches.
        seed: the same seed gives the same batches.
        pad_id: the tokenizer's padding id.
        device: where to put the batches (moved before timing, so copies are not timed).
        sort_by_length: bucket by length (see above); False gives batches in the drawn order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size}")
    if n_batches < 1:
        raise ValueError(f"n_batches must be a positive int, got {n_batches}")
    if len(enc) == 0:
        raise ValueError("no samples to benchmark on: the encoded set is empty")
    rng = random.Random(seed)
    need = batch_size * n_batches
    if len(enc) >= need:
        order = rng.sample(range(len(enc)), need)
    else:
        order = []
        while len(order) < need:
            perm = list(range(len(enc)))
            rng.shuffle(perm)
            order.extend(perm)
        order = order[:need]
    if sort_by_length:
        order = sorted(order, key=lambda i: len(enc.ids[i]))
    dev = torch.device(device)
    return [_move(collate(enc, order[i * batch_size : (i + 1) * batch_size], pad_id), dev) for i in range(n_batches)]


# --- cases ----------------------------------------------------------------------------------------


def model_case(model: torch.nn.Module, knob: float | None = None) -> Case:
    """A case that runs `model(batch.input_ids, batch.attention_mask, knob=knob)` in eval mode.

    The knob is an argument of each call, so several cases may share one model with different
    knobs while rounds interleave them. `knob=None` runs the model at full budget / its own decision.
    """
    model.eval()
    has_knob = hasattr(model, "check_knob")
    if has_knob:
        knob = model.check_knob(knob)  # validates now: ValueError for a knob on a method without one
    elif knob is not None:
        raise ValueError(f"{type(model).__name__} has no knob; cannot run it at knob {knob!r}")

    def run(batch: Batch) -> object:
        if has_knob:
            return model(batch.input_ids, batch.attention_mask, knob=knob)
        return model(batch.input_ids, batch.attention_mask)

    run.model, run.knob = model, knob  # what the case runs (e.g. to build its quantised twin)
    return run


def hf_case(hf_model: torch.nn.Module) -> Case:
    """A case that runs a `transformers` sequence classifier (e.g. from `DenseClassifier.to_hf`).
    A ViT (`ViTForImageClassification`) gets `pixel_values` made from the batch's uint8 patch rows
    (un-patchified, / 255, normalised per channel: its image processor's work, timed with it)."""
    hf_model.eval()
    c = hf_model.config
    if getattr(c, "model_type", None) == "vit":
        from adaptinf.backbone import unpatchify

        mean = torch.tensor(hf_model.image_mean).view(1, -1, 1, 1)
        std = torch.tensor(hf_model.image_std).view(1, -1, 1, 1)

        def run_vit(batch: Batch) -> torch.Tensor:
            images = unpatchify(batch.input_ids, c.image_size, c.patch_size, c.num_channels)
            return hf_model(pixel_values=(images.float() / 255 - mean) / std).logits

        return run_vit

    def run(batch: Batch) -> torch.Tensor:
        return hf_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    return run


# --- stamps ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def machine_name() -> str:
    """CPU model (from /proc/cpuinfo where present) and architecture, e.g. 'AMD EPYC 7R13 (x86_64)'."""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpu = cpu or platform.processor() or "unknown CPU"
    return f"{cpu} ({platform.machine()})"


def _device_name(batches: list[Batch]) -> str:
    dev = batches[0].input_ids.device
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    return dev.type


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the physical limit ----------------------------------------------------------------------------


PRECISIONS = ("fp32", "int8", "bf16")


@functools.lru_cache(maxsize=None)
def matmul_rate(precision: str = "fp32", threads: int | None = None, sizes: tuple[int, ...] = (512, 1024, 2048),
                repeats: int = 5) -> float:
    """This machine's measured matmul rate in GFLOP/s at `threads` (default: torch's current count):
    the best over square products of `sizes` (2*n^3 FLOPs each) of the fastest of `repeats` samples
    after a warm-up, i.e. what torch's own kernel reaches when nothing else limits it.

    fp32: `torch.mm`; bf16: `torch.mm` in bfloat16; int8: a dynamic int8 Linear
    (`torch.ao.nn.quantized.dynamic.Linear`, the kernel `--quantize int8` runs), its per-call
    activation quantisation included. A case may exceed it (a fraction above 1) where a fused or
    prepacked kernel (torch.compile, ONNX Runtime) beats the plain product. Cached per process.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    return max(_matmul_rate(precision, threads, n, repeats) for n in sizes)


def _matmul_rate(precision: str, threads: int | None, n: int, repeats: int) -> float:
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g)
        b = torch.randn(n, n, generator=g)
        if precision == "int8":
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

            import warnings

            with warnings.catch_warnings():  # torch 2.13 marks quantised-tensor creation deprecated
                warnings.simplefilter("ignore")
                lin = DynamicLinear(n, n, dtype=torch.qint8)
                wq = torch.quantize_per_tensor(b, scale=float(b.abs().max()) / 127, zero_point=0, dtype=torch.qint8)
                lin.set_weight_bias(wq, None)
            fn = functools.partial(lin, a)
        else:
            if precision == "bf16":
                a, b = a.bfloat16(), b.bfloat16()
            fn = functools.partial(torch.mm, a, b)
        with torch.inference_mode():
            fn()
            number = max(1, math.ceil(30.0 / max(_elapsed_ms(fn, 1, None), 1e-3)))
            ms = min(_elapsed_ms(fn, number, None) / number for _ in range(repeats))
        return 2 * n**3 / (ms * 1e-3) / 1e9
    finally:
        torch.set_num_threads(before)


# --- protocol -------------------------------------------------------------------------------------


def time_call(fn: Callable[[], object], repeats: int = 1, min_sample_ms: float = 0.0,
              device: torch.device | None = None, max_calls: int = 1000) -> float:
    """Median milliseconds per call of `fn` over `repeats` samples (wall time, after a device sync).

    With `min_sample_ms` > 0 one untimed call calibrates how many calls a sample takes to last about
    that long (1 to `max_calls`; a sample is then their mean), so sub-millisecond work is not timer
    noise; with 0 a sample is one call. Warm-up is the caller's (`warm_up`).
    """
    if repeats < 1 or max_calls < 1:
        raise ValueError(f"time_call: repeats and max_calls must be >= 1, got {repeats}, {max_calls}")
    number = 1
    if min_sample_ms > 0:
        once = max(_elapsed_ms(fn, 1, device), 1e-3)
        number = max(1, min(max_calls, math.ceil(min_sample_ms / once)))
    return statistics.median([_elapsed_ms(fn, number, device) / number for _ in range(repeats)])


def _elapsed_ms(fn: Callable[[], object], number: int, device: torch.device | None) -> float:
    """Milliseconds of `number` calls of `fn`, the device synchronised before and after."""
    if device is not None:
        _synchronize(device)
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    if device is not None:
        _synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def warm_up(cases: dict[str, Callable[[], object]], passes: int) -> None:
    """`passes` discarded calls of every case (pass by pass, the cases in order within a pass)."""
    if passes < 0:
        raise ValueError(f"warmup must be non-negative, got {passes}")
    for _ in range(passes):
        for fn in cases.values():
            fn()


def interleaved_rounds(timers: dict[str, Callable[[], float]], repeats: int,
                       after_round: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """`repeats` rounds, each calling every timer (one sample, e.g. `time_call`) once, in round r
    in the order rotated by r, so slow drift (thermal state, other processes) hits every case
    alike. Returns name -> its samples, one per round."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    names = list(timers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(timers[name]())
        if after_round is not None:
            after_round()
    return times


def _pass(case: Case, batches: list[Batch]) -> None:
    for batch in batches:
        case(batch)


def _time_once(case: Case, batches: list[Batch], device: torch.device) -> float:
    """Milliseconds per batch for one pass over `batches`."""
    return time_call(functools.partial(_pass, case, batches), device=device) / len(batches)


def _check_inputs(cases: dict[str, Case], batches: dict[int, list[Batch]], repeats: int, warmup: int, reference: str | None) -> None:
    if not cases:
        raise ValueError("no cases to benchmark: pass a dict name -> callable(batch)")
    if not batches:
        raise ValueError("no batch sizes to benchmark: pass a dict batch size -> list of batches")
    for size, bs in batches.items():
        if not bs:
            raise ValueError(f"batch size {size} has no batches")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be non-negative, got {warmup}")
    if reference is not None and reference not in cases:
        raise ValueError(
            f"reference case {reference!r} is not among the cases {list(cases)}; "
            "name one of them, or pass reference=None to report no speed-up"
        )


def run_bench(
    cases: dict[str, Case],
    batches: dict[int, list[Batch]],
    repeats: int = 7,
    warmup: int = 2,
    reference: str | None = "dense",
    progress: bool = True,
    case_batches: dict[str, dict[int, list[Batch]]] | None = None,
    flops_from: dict[str, str] | None = None,
    precision: dict[str, str] | None = None,
    peak: bool = True,
) -> list[BenchRow]:
    """Time every case on every batch size with the interleaved protocol in the module docstring.

    Args:
        cases: name -> callable taking a `Batch` (see `model_case`, `hf_case`).
        batches: batch size -> the batches to time at that size (see `make_batches`).
        repeats: timed rounds per batch size; statistics are taken over these.
        warmup: discarded passes over the batches per case before timing.
        reference: the case speed-ups are measured against, or None.
        progress: show a tqdm bar over rounds.
        case_batches: name -> batch size -> batches that case runs on instead of `batches` (the same
            samples in another grouping, e.g. unsorted for a padded reference; same counts).
        flops_from: name -> the case whose analytic FLOPs it is credited with (a `transformers`
            or ONNX Runtime model of the dense one reports none itself).
        precision: name -> "fp32" (default), "int8" or "bf16": the matmul rate its row is held to.
        peak: measure the machine's matmul rates (`matmul_rate`) for the rows' peak fields.

    Returns:
        One `BenchRow` per (case, batch size), batch sizes in the order given, cases in the order given.
    """
    _check_inputs(cases, batches, repeats, warmup, reference)
    case_batches, flops_from, precision = case_batches or {}, flops_from or {}, precision or {}
    for label, d in (("case_batches", case_batches), ("flops_from", flops_from), ("precision", precision)):
        if set(d) - set(cases):
            raise ValueError(f"{label} names cases that are not among the cases: {sorted(set(d) - set(cases))}")
    for name, src in flops_from.items():
        if src not in cases:
            raise ValueError(f"flops_from[{name!r}] = {src!r} is not a case")
    for name, p in precision.items():
        if p not in PRECISIONS:
            raise ValueError(f"precision[{name!r}] = {p!r}; one of {', '.join(PRECISIONS)}")
    for name, per_size in case_batches.items():
        for size, bs in batches.items():
            own = per_size.get(size)
            if own is None or sum(b.input_ids.shape[0] for b in own) != sum(b.input_ids.shape[0] for b in bs):
                raise ValueError(f"case_batches[{name!r}] must hold, for batch size {size}, as many samples as the shared batches")
    names = list(cases)
    rates = {p: matmul_rate(p) for p in sorted({precision.get(n, "fp32") for n in names})} if peak else {}
    stamp = dict(
        machine=machine_name(),
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        python_version=platform.python_version(),
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    rows: list[BenchRow] = []
    bar = tqdm(total=len(batches) * repeats, desc="bench", unit="round", disable=not progress)
    with torch.inference_mode():
        for size, bs in batches.items():
            device = bs[0].input_ids.device
            bar.set_postfix(batch_size=size)
            own = {name: case_batches.get(name, {}).get(size, bs) for name in names}
            gflops = {name: _gflops_per_sample(cases[name], own[name]) for name in names}  # untimed
            for name, src in flops_from.items():
                gflops[name] = gflops[name] if gflops[name] is not None else gflops[src]
            warm_up({name: functools.partial(_pass, cases[name], own[name]) for name in names}, warmup)
            timers = {name: functools.partial(_time_once, cases[name], own[name], device) for name in names}
            times = interleaved_rounds(timers, repeats, after_round=lambda: bar.update(1))
            rows.extend(_rows_for_size(size, own, times, gflops, reference, warmup, _device_name(bs), stamp,
                                       {n: precision.get(n, "fp32") for n in names}, rates))
    bar.close()
    return rows


def _gflops_per_sample(case: Case, bs: list[Batch]) -> float | None:
    """Mean analytic GFLOPs per sample a case reports for the batches (None if its output has no `flops`)."""
    total, n = 0.0, 0
    for batch in bs:
        flops = getattr(case(batch), "flops", None)
        if flops is None:
            return None
        total += float(flops.double().sum())
        n += batch.input_ids.shape[0]
    return total / n / 1e9


def _rows_for_size(
    size: int,
    own: dict[str, list[Batch]],
    times: dict[str, list[float]],
    gflops: dict[str, float | None],
    reference: str | None,
    warmup: int,
    device: str,
    stamp: dict,
    precision: dict[str, str],
    rates: dict[str, float],
) -> list[BenchRow]:
    ref_median = float(np.median(times[reference])) if reference is not None else None
    rows = []
    for name, ts in times.items():
        bs = own[name]
        lengths = torch.cat([b.attention_mask.sum(dim=1) for b in bs]).double()  # [n_samples]
        samples_per_batch = lengths.numel() / len(bs)
        padded = float(np.mean([b.input_ids.shape[1] for b in bs]))
        t = np.asarray(ts)
        median = float(np.median(t))
        speedup = paired = None
        if reference is not None:
            speedup = ref_median / median
            paired = float(np.median(np.asarray(times[reference]) / t))
        ms_per_sample = median / samples_per_batch
        ref_gflops = gflops.get(reference) if reference is not None else None
        reduction = realisation = None
        if ref_gflops is not None and gflops[name]:
            reduction = ref_gflops / gflops[name]
            realisation = speedup / reduction
        achieved = None if gflops[name] is None else gflops[name] * 1e3 / ms_per_sample
        rate = rates.get(precision[name])
        rows.append(
            BenchRow(
                case=name,
                batch_size=size,
                n_batches=len(bs),
                median_ms=median,
                p25_ms=float(np.percentile(t, 25)),
                p75_ms=float(np.percentile(t, 75)),
                min_ms=float(t.min()),
                repeats=len(ts),
                warmup=warmup,
                ms_per_sample=ms_per_sample,
                samples_per_s=1e3 / ms_per_sample,
                reference=reference,
                speedup_vs_reference=speedup,
                paired_speedup_vs_reference=paired,
                mean_length=float(lengths.mean()),
                max_length=int(lengths.max()),
                mean_padded_length=padded,
                gflops_per_sample=gflops[name],
                flops_reduction_vs_reference=reduction,
                realisation=realisation,
                precision=precision[name],
                achieved_gflops_per_s=achieved,
                peak_gflops_per_s=rate,
                peak_fraction=None if achieved is None or not rate else achieved / rate,
                device=device,
                **stamp,
            )
        )
    return rows


# --- output ---------------------------------------------------------------------------------------


def write_rows(rows: list, row_type: type, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write dataclass rows (each with `to_dict`) to `out_dir/<stem>.csv` (a header of `row_type`'s
    fields; None as an empty cell) and `<stem>.json` (a list of dicts)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    dicts = [r.to_dict() for r in rows]
    with csv_path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in dataclasses.fields(row_type)])
        writer.writeheader()
        writer.writerows(dicts)
    json_path.write_text(json.dumps(dicts, indent=2) + "\n", encoding="utf-8")
    return csv_path, json_path


def write_bench(rows: list[BenchRow], out_dir: Path, stem: str = "bench") -> tuple[Path, Path]:
    """Write rows to `out_dir/<stem>.csv` and `<stem>.json` (`write_rows`)."""
    return write_rows(rows, BenchRow, out_dir, stem)


def format_table(rows: list[BenchRow]) -> str:
    """A markdown table (case, batch, median ms, IQR, ms/sample, speed-up) and a line with the stamps."""
    if not rows:
        return "(no benchmark rows)"
    ref = rows[0].reference
    lines = [
        f"| case | batch | median ms | IQR ms (p25–p75) | ms/sample | speed-up vs {ref or '-'} (paired) "
        "| GFLOPs/sample | FLOPs reduction | realisation | GFLOP/s (of peak) | vs best dense |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.speedup_vs_reference is None:
            speed = "-"
        else:
            speed = f"{r.speedup_vs_reference:.2f}x ({r.paired_speedup_vs_reference:.2f}x)"
        gf = "-" if r.gflops_per_sample is None else f"{r.gflops_per_sample:.4f}"
        red = "-" if r.flops_reduction_vs_reference is None else f"{r.flops_reduction_vs_reference:.2f}x"
        real = "-" if r.realisation is None else f"{r.realisation:.2f}"
        rate = "-" if r.achieved_gflops_per_s is None else f"{r.achieved_gflops_per_s:.1f}"
        if r.peak_fraction is not None:
            rate += f" ({100 * r.peak_fraction:.0f}% of {r.precision})"
        lines.append(
            f"| {r.case} | {r.batch_size} | {r.median_ms:.2f} | {r.p25_ms:.2f}–{r.p75_ms:.2f} "
            f"| {r.ms_per_sample:.3f} | {speed} | {gf} | {red} | {real} | {rate} "
            f"| {'-' if r.speedup_vs_best is None else f'{r.speedup_vs_best:.2f}x ({r.best_reference})'} |"
        )
    r = rows[0]
    peaks = {x.precision: x.peak_gflops_per_s for x in rows if x.peak_gflops_per_s}
    lines.append("")
    lines.append(
        f"{r.machine}, {r.device}, {r.torch_threads} threads, torch {r.torch_version}, "
        f"Python {r.python_version}; median of {r.repeats} rounds after {r.warmup} warm-up, {r.timestamp}"
        + ("; measured matmul peak " + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in peaks.items()) if peaks else "")
    )
    return "\n".join(lines)
