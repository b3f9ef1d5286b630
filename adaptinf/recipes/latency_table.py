"""The latency table: measured milliseconds of every candidate block on this machine, and the
additive latency model PLANER's search uses (the PLANER paper, Latifi et al., 2022: a latency
lookup table of the candidate blocks; the search itself is `adaptinf.recipes.planer`).

Protocol (`profile`):
- One table holds one deployment setting: batch size, sequence length (every token real), torch
  threads, torch version and the CPU model (`adaptinf.bench.machine_name`); `LatencyTable.mismatches`
  says when a stored table was taken under other conditions, so it is re-profiled, never reused.
- Every candidate block (attention with all heads / half the heads; FFN dense / half width / MoE
  with k experts) is timed as a stack: the model with that block in every layer and the other slot
  skipped, end to end on random tokens under `torch.inference_mode()`, at the model's current knob.
  The timing is the project's one measurement protocol (`adaptinf.bench`; `measure_architectures`):
  `warmup` discarded calls per stack (`bench.warm_up`), then `repeats` rounds timing every stack
  once in an order rotated by the round, so load from other processes hits all alike
  (`bench.interleaved_rounds`); each sample the mean of enough calls to last `MIN_SAMPLE_MS`
  (`bench.time_call`); median kept. The block's time is (stack - overhead) / layers. Absolute
  times still drift with the machine's load between tables; the times within one table are
  comparable, which is what the search needs. Timing a block alone in a loop keeps
  its weights cache-hot and underestimates the real model (measured: half the end-to-end latency at
  batch 1); the stack makes every layer's own weights pass through the caches as they do in use.
  All layers of the backbone have the same shape, so one time per block stands for every layer.
  A skipped block costs 0 by definition.
- The overhead (embeddings, mask, the per-layer loop, pooler, classifier) is the end-to-end time of
  the model with every block skipped.
- Additive model: latency(architecture) = overhead + sum over layers of the chosen blocks' times
  (`LatencyTable.estimate`). `validate` reports its error against the measured end-to-end latency
  of a few architectures.

The model to profile provides `block_choices()` (names such as "attn:half", "ffn:moe2"),
`using_architecture(arch)` (a context manager; arch = one "attn/ffn" string per layer) and
`latency_shape()`; `adaptinf.methods.planer.PlanerClassifier` does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from adaptinf.bench import interleaved_rounds, machine_name, time_call, warm_up

SKIP = 0.0  # a skipped block's latency
MIN_SAMPLE_MS = 2.0  # a timing sample lasts at least this long (sub-millisecond stacks are not timer noise)


def random_inputs(cfg, batch_size: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [b, s] (random ids, first token 101 like [CLS]; a vision encoder: random pixel bytes
    [b, 1 + P, C*p*p], CLS slot zero) and an all-ones mask: every token real. `cfg`: the EncoderConfig."""
    g = torch.Generator().manual_seed(seed)
    if cfg.is_vision:  # every image is 1 + P tokens
        if seq_len != cfg.max_positions:
            raise ValueError(f"a vision encoder's inputs are {cfg.max_positions} tokens long (1 + patches), "
                             f"got seq_len {seq_len}")
        ids = torch.randint(0, 256, (batch_size, seq_len, cfg.patch_dim), generator=g, dtype=torch.uint8)
        ids[:, 0] = 0
        return ids, torch.ones(batch_size, seq_len, dtype=torch.int64)
    ids = torch.randint(1, cfg.vocab_size, (batch_size, seq_len), generator=g)
    ids[:, 0] = min(101, cfg.vocab_size - 1)
    return ids, torch.ones(batch_size, seq_len, dtype=torch.int64)


def conditions(batch_size: int, seq_len: int) -> dict:
    """What a latency number depends on besides the model: stamped on every table."""
    return {"machine": machine_name(), "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "batch_size": batch_size, "seq_len": seq_len}


@dataclass
class LatencyTable:
    """Milliseconds per block at one (machine, threads, torch version, batch size, sequence length).

    blocks: "attn:full" / "attn:half" / "ffn:dense" / "ffn:half" / "ffn:moe<k>" -> ms for one block.
    overhead_ms: everything but the blocks (embeddings, pooler, classifier, loop).
    shape: the model shape the blocks were timed at (hidden size, heads, FFN width, experts, layers).
    """

    machine: str
    torch_threads: int
    torch_version: str
    batch_size: int
    seq_len: int
    shape: dict
    overhead_ms: float
    blocks: dict[str, float]
    repeats: int
    created: str = ""
    extra: dict = field(default_factory=dict)

    def block_ms(self, name: str) -> float:
        if name.endswith(":skip"):
            return SKIP
        if name not in self.blocks:
            raise ValueError(f"the latency table has no block {name!r} (it has {sorted(self.blocks)}); re-profile it")
        return self.blocks[name]

    def estimate(self, architecture: Sequence[str]) -> float:
        """Additive model: overhead + the blocks of every layer ("attn/ffn" per layer, e.g. "half/moe2")."""
        total = self.overhead_ms
        for slot in architecture:
            attn, ffn = slot.split("/")
            total += self.block_ms(f"attn:{attn}") + self.block_ms(f"ffn:{ffn}")
        return total

    def dense_ms(self, layers: int) -> float:
        return self.estimate(["full/dense"] * layers)

    def mismatches(self, batch_size: int, seq_len: int, shape: dict) -> list[str]:
        """Conditions under which this table was not taken (empty: it applies here and now)."""
        want = {**conditions(batch_size, seq_len), "shape": shape}
        have = {k: getattr(self, k) for k in want}
        return [f"{k}: table {have[k]!r}, here {want[k]!r}" for k in want if have[k] != want[k]]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LatencyTable:
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - known or {"blocks", "overhead_ms"} - set(d):
            raise ValueError(f"not a latency table (expected the fields {sorted(known)})")
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        from adaptinf.checkpoint import write_json_atomic

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(p, self.to_dict())
        return p

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read the latency table {path}: {e}") from e


@torch.inference_mode()
def measure_model(model, batch_size: int, seq_len: int, repeats: int = 5, warmup: int = 2, seed: int = 0) -> float:
    """End-to-end milliseconds of `model(input_ids, mask)` at (batch_size, seq_len), every token real."""
    return measure_architectures(model, {"model": None}, batch_size, seq_len, repeats, warmup, seed)["model"]


@torch.inference_mode()
def measure_architectures(model, architectures: dict[str, list[str] | None], batch_size: int, seq_len: int,
                          repeats: int = 5, warmup: int = 2, seed: int = 0) -> dict[str, float]:
    """End-to-end milliseconds of the model with each architecture (None: its own), with the bench
    protocol: `warmup` discarded calls each, then `repeats` rounds, each timing every architecture
    once in an order rotated by the round, so drift (another process on the same cores) hits them
    alike; the median per architecture over rounds."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    was_training = model.training
    model.eval()
    ids, mask = random_inputs(model.spec.encoder, batch_size, seq_len, seed)
    archs = {name: list(arch or model.architecture) for name, arch in architectures.items()}

    def run(arch: list[str]) -> None:
        with model.using_architecture(arch):
            model(ids, mask)

    def sample(arch: list[str]) -> float:  # the architecture is set outside the timed calls
        with model.using_architecture(arch):
            return time_call(lambda: model(ids, mask), min_sample_ms=MIN_SAMPLE_MS)

    try:
        warm_up({name: functools.partial(run, arch) for name, arch in archs.items()}, warmup)
        samples = interleaved_rounds({name: functools.partial(sample, arch) for name, arch in archs.items()}, repeats)
    finally:
        model.train(was_training)
    return {name: statistics.median(v) for name, v in samples.items()}


def profile(model, batch_size: int, seq_len: int, repeats: int = 5, warmup: int = 2, seed: int = 0) -> LatencyTable:
    """Time every candidate block of `model` (see the module docstring) and the overhead; returns the table."""
    if batch_size < 1 or not 1 <= seq_len <= model.spec.encoder.max_positions:
        raise ValueError(f"profile: batch_size must be >= 1 and seq_len in [1, the positions the backbone has], "
                         f"got {batch_size}, {seq_len}")
    layers = model.spec.encoder.num_hidden_layers
    # each block in every layer, the other slot skipped: each layer's own weights pass through the
    # caches as they do in the real model (one block timed alone in a loop stays cache-hot)
    stacks = {"overhead": ["skip/skip"] * layers}
    for name in model.block_choices():
        kind, choice = name.split(":")
        if choice != "skip":
            stacks[name] = [f"{choice}/skip" if kind == "attn" else f"skip/{choice}"] * layers
    ms = measure_architectures(model, stacks, batch_size, seq_len, repeats, warmup, seed)
    overhead = ms.pop("overhead")
    blocks = {name: max(t - overhead, 0.0) / layers for name, t in ms.items()}
    return LatencyTable(**conditions(batch_size, seq_len), shape=model.latency_shape(), overhead_ms=overhead,
                        blocks=blocks, repeats=repeats,
                        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def validate(model, table: LatencyTable, architectures: Sequence[Sequence[str]], repeats: int | None = None,
             warmup: int = 2) -> dict:
    """The additive model's error against measured end-to-end latency of `architectures` (at the
    table's batch size and sequence length, measured interleaved). Returns {"rows": [{architecture,
    predicted_ms, measured_ms, relative_error}], "mean_abs_relative_error", "max_abs_relative_error"}."""
    archs = {str(i): list(a) for i, a in enumerate(architectures)}
    measured = measure_architectures(model, archs, table.batch_size, table.seq_len, repeats or table.repeats, warmup)
    rows = []
    for i, arch in archs.items():
        predicted = table.estimate(arch)
        rows.append({"architecture": arch, "predicted_ms": predicted, "measured_ms": measured[i],
                     "relative_error": (predicted - measured[i]) / measured[i]})
    errs = [abs(r["relative_error"]) for r in rows]
    return {"rows": rows, "mean_abs_relative_error": sum(errs) / len(errs) if errs else None,
            "max_abs_relative_error": max(errs) if errs else None}
