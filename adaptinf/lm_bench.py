"""Latency of language models (issue 19), with `adaptinf.bench`'s protocol and stamps.

Two workloads per batch size (default 1 and 8):
- score: one forward of `model.score(inputs, targets)` over windows of the model's `seq_len` tokens
  (what perplexity evaluation and prompt processing cost);
- generate: `model.generate(prompt, new_tokens)` greedy, no end-of-text stop (every case makes
  exactly `new_tokens` tokens), after a `prompt_tokens`-token prompt, through the KV cache.
Inputs are fixed windows of the test stream at seeded offsets, built before timing. Every case runs at
its knob (`using_knob` inside the call, so cases may share a model). Per (workload, batch size): every
case `warmup` discarded calls (`adaptinf.bench.warm_up`), then `repeats` interleaved rounds
(`interleaved_rounds`: the order rotated each round) of one sample each (`time_call`: wall time after a
device sync; a scoring sample averages enough calls to last `min_sample_ms`); the median is reported,
with quartiles, and speed-ups against the reference case (dense) are ratios measured in the same run
(of medians, and paired: the median over rounds of reference / case). Rows are stamped as
`adaptinf.bench`'s: machine, device, threads, torch and Python versions, UTC time, and the machine's
measured fp32 matmul rate (`matmul_rate`).
"""

from __future__ import annotations

import dataclasses
import functools
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from adaptinf.bench import interleaved_rounds, machine_name, matmul_rate, time_call, warm_up, write_rows

WORKLOADS = ("score", "generate")


@dataclass
class LMBenchRow:
    case: str
    name: str  # the model's entry name in the run (dense, planer-0.7, ...)
    method: str
    knob: float | None
    workload: str  # score | generate
    batch_size: int
    tokens: int  # per sequence: the scored window, or the tokens generated
    prompt_tokens: int  # generate: the prompt's length (score: 0)
    new_tokens: int  # generate: tokens made per sequence (score: 0)
    median_ms: float  # per call (one batch)
    p25_ms: float
    p75_ms: float
    min_ms: float
    repeats: int
    warmup: int
    ms_per_token: float  # median_ms / (batch_size * tokens)
    tokens_per_s: float
    reference: str | None
    speedup_vs_reference: float | None
    paired_speedup_vs_reference: float | None
    flops_per_token: float | None  # score: what the model reported executing on these windows
    peak_gflops_per_s: float | None
    machine: str
    device: str
    torch_threads: int
    torch_version: str
    python_version: str
    timestamp: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class LMCase:
    """One model at one knob (None: its full compute), named `name` in the run."""

    model: torch.nn.Module
    knob: float | None = None
    name: str = "dense"


def _device(model) -> torch.device:
    return model.decoder.embeddings.word.weight.device


def _device_label(dev: torch.device) -> str:
    return f"cuda: {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else dev.type


def _windows(stream: torch.Tensor, batch_size: int, length: int, seed: int) -> torch.Tensor:
    """[batch_size, length + 1] windows of the stream at seeded offsets (with replacement past its end)."""
    if stream.numel() < length + 2:
        raise ValueError(f"the test stream has {stream.numel()} tokens, too few for a window of {length} (+1)")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - length - 1, (batch_size,), generator=g)
    return torch.stack([stream[s : s + length + 1] for s in starts.tolist()]).long()


def _score_call(case: LMCase, inputs: torch.Tensor, targets: torch.Tensor):
    def call():
        with case.model.using_knob(case.knob):
            return case.model.score(inputs, targets)
    return call


def _generate_call(case: LMCase, prompt: torch.Tensor, new_tokens: int):
    def call():
        with case.model.using_knob(case.knob):
            return case.model.generate(prompt, new_tokens, eos_token_id=None)
    return call


def new_token_budget(cases: dict[str, LMCase], prompt_tokens: int, new_tokens: int) -> int:
    """`new_tokens`, cut so the prompt and the new tokens fit every model's context."""
    room = min(c.model.cfg.max_positions for c in cases.values()) - prompt_tokens
    if room < 1:
        raise ValueError(f"a prompt of {prompt_tokens} tokens leaves no room to generate in a context of "
                         f"{room + prompt_tokens} tokens")
    return min(new_tokens, room)


def lm_latency(cases: dict[str, LMCase], stream: torch.Tensor, *, batch_sizes=(1, 8), prompt_tokens: int = 16,
               new_tokens: int = 128, repeats: int = 5, warmup: int = 2, seed: int = 0, reference: str | None = "dense",
               min_sample_ms: float = 20.0, progress: bool = True, peak: bool = True) -> list[LMBenchRow]:
    """Time every case on both workloads at every batch size (see the module docstring); one row per
    (case, workload, batch size), workloads then batch sizes in order."""
    if not cases:
        raise ValueError("no cases to time")
    if reference is not None and reference not in cases:
        raise ValueError(f"reference case {reference!r} is not among the cases {list(cases)}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    n_new = new_token_budget(cases, prompt_tokens, new_tokens)
    window = min(c.model.seq_len for c in cases.values())
    for c in cases.values():
        c.model.eval()
        c.model.check_knob(c.knob)
    stamp = dict(machine=machine_name(), torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
                 python_version=platform.python_version(),
                 timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 peak_gflops_per_s=matmul_rate("fp32") if peak else None)
    rows: list[LMBenchRow] = []
    bar = tqdm(total=len(WORKLOADS) * len(batch_sizes) * repeats, desc="lm latency", unit="round", disable=not progress)
    with torch.inference_mode():
        for workload in WORKLOADS:
            for b in batch_sizes:
                rows += _time_one(cases, stream, workload, b, window, prompt_tokens, n_new, repeats, warmup, seed,
                                  reference, min_sample_ms, stamp, bar)
    bar.close()
    return rows


def _time_one(cases, stream, workload, b, window, prompt_tokens, n_new, repeats, warmup, seed, reference,
              min_sample_ms, stamp, bar) -> list[LMBenchRow]:
    w = _windows(stream, b, window, seed + b)
    calls, flops = {}, {}
    for name, c in cases.items():
        dev = _device(c.model)
        if workload == "score":
            calls[name] = _score_call(c, w[:, :-1].to(dev), w[:, 1:].to(dev))
            _, cost = calls[name]()  # untimed: the FLOPs it reports on these windows
            flops[name] = float(cost) / (b * window)
        else:
            calls[name] = _generate_call(c, w[:, :prompt_tokens].to(dev), n_new)
            flops[name] = None
    warm_up(calls, warmup)
    timers = {name: functools.partial(time_call, fn, 1, min_sample_ms if workload == "score" else 0.0,
                                      _device(cases[name].model)) for name, fn in calls.items()}
    times = interleaved_rounds(timers, repeats, after_round=lambda: bar.update(1))
    ref = None if reference is None else np.asarray(times[reference])
    tokens = window if workload == "score" else n_new
    rows = []
    for name, ts in times.items():
        t = np.asarray(ts)
        med = float(np.median(t))
        c = cases[name]
        rows.append(LMBenchRow(
            case=name, name=c.name, method=getattr(c.model, "method", "dense"), knob=c.knob, workload=workload,
            batch_size=b, tokens=tokens, prompt_tokens=prompt_tokens if workload == "generate" else 0,
            new_tokens=n_new if workload == "generate" else 0, median_ms=med,
            p25_ms=float(np.percentile(t, 25)), p75_ms=float(np.percentile(t, 75)), min_ms=float(t.min()),
            repeats=len(ts), warmup=warmup, ms_per_token=med / (b * tokens), tokens_per_s=b * tokens * 1e3 / med,
            reference=reference, speedup_vs_reference=None if ref is None else float(np.median(ref)) / med,
            paired_speedup_vs_reference=None if ref is None else float(np.median(ref / t)),
            flops_per_token=flops[name], device=_device_label(_device(c.model)), **stamp))
    return rows


def write_lm_bench(rows: list[LMBenchRow], out_dir: Path, stem: str = "bench") -> tuple[Path, Path]:
    """`out_dir/<stem>.csv` and `<stem>.json` (a list of row dicts)."""
    return write_rows(rows, LMBenchRow, out_dir, stem)
