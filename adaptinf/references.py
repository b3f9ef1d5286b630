"""The dense references every latency table carries, and speed-ups against the best of them.

A user who wants a cheaper model compares against the best dense model they can get, not a padded
one. `dense_references` builds, for one dense model, the cases a latency table times beside the
methods (all on the same samples, in one interleaved run):

- "transformers": the dense model as a `transformers` BertForSequenceClassification (a ViT: ViTForImageClassification), as loaded,
  on the batches in their drawn order (padded to each batch's longest);
- "dense padded": adaptinf's dense model with padded execution, same unsorted batches;
- "dense": adaptinf's dense model at its best, padding-free (`model.packed`) on length-bucketed
  batches: the fp32 reference every method is held to;
- "dense compiled" (with `compile`): the padded path compiled by `torch.compile` (inductor, dynamic
  shapes, weights frozen), on the length-bucketed batches: what fused kernels win at batch 1, where
  eager execution is mostly per-op overhead; compiled before timing (about a minute per shape class);
- "dense int8": the same, dynamic int8 Linear layers (`adaptinf.quantize`);
- "onnxruntime fp32" / "onnxruntime int8": the dense model exported to ONNX and run by ONNX Runtime
  (fp32 and its dynamic-int8 twin) on the length-bucketed batches (`adaptinf.onnx_dense`).

`against_best` then gives every row its speed-up against the fastest fp32 dense reference at its
batch size, and an int8 case its speed-up against the fastest int8 dense reference too: an adaptive
method that loses to a quantised dense model is not worth deploying.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from adaptinf.bench import BenchRow, Case, hf_case, make_batches, model_case
from adaptinf.data import Batch, Encoded

FP32_REFERENCES = ("dense", "dense padded", "dense compiled", "transformers", "onnxruntime fp32")
INT8_REFERENCES = ("dense int8", "onnxruntime int8")


@dataclass
class Cases:
    """What `adaptinf.bench.run_bench` takes beside the shared batches."""

    cases: dict[str, Case] = field(default_factory=dict)
    case_batches: dict[str, dict[int, list[Batch]]] = field(default_factory=dict)
    flops_from: dict[str, str] = field(default_factory=dict)
    precision: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, case: Case, *, batches: dict[int, list[Batch]] | None = None,
            flops_from: str | None = None, precision: str = "fp32") -> None:
        if name in self.cases:
            raise ValueError(f"case {name!r} twice")
        self.cases[name] = case
        if batches is not None:
            self.case_batches[name] = batches
        if flops_from is not None:
            self.flops_from[name] = flops_from
        if precision != "fp32":
            self.precision[name] = precision

    def bench_kwargs(self) -> dict:
        return {"case_batches": self.case_batches, "flops_from": self.flops_from, "precision": self.precision}


def bench_batches(enc: Encoded, sizes, samples: int, seed: int, pad_id: int = 0) -> tuple[dict, dict]:
    """(length-bucketed batches, the same samples in drawn order) per batch size."""
    bucketed = {b: make_batches(enc, b, max(1, samples // b), seed, pad_id, sort_by_length=True) for b in sizes}
    drawn = {b: make_batches(enc, b, max(1, samples // b), seed, pad_id, sort_by_length=False) for b in sizes}
    return bucketed, drawn


def compiled_case(model) -> Case:
    """`model`'s logits through `torch.compile` (inductor, dynamic shapes, frozen weights: its weight
    prepacking and fusions), padded execution (the packed path's data-dependent token count would
    break the graph). Compiles on the first call of each shape class (batch 1 is its own)."""
    import torch
    import torch._inductor.config as inductor_config

    model = copy.deepcopy(model).eval().set_packed(False)
    compiled = torch.compile(lambda ids, mask: model(ids, mask).logits, dynamic=True)

    def run(batch: Batch):
        with inductor_config.patch(freezing=True):
            return compiled(batch.input_ids, batch.attention_mask)

    return run


def dense_references(dense, drawn: dict[int, list[Batch]], *, hf: bool = True, int8: bool = True,
                     onnx: bool = True, workdir: str | Path | None = None, threads: int | None = None,
                     compile: bool = False) -> Cases:
    """The reference cases of the module docstring for a `DenseClassifier` (set to padding-free
    execution, its default; the padded, compiled and int8 forms are copies). `drawn`: the batches in drawn order for the padded cases
    ("transformers", "dense padded"); the others run on the shared (length-bucketed) batches.
    `workdir` holds the ONNX files (required with `onnx`)."""
    if dense.method != "dense":
        raise ValueError(f"dense references need the dense model, got method {dense.method!r}")
    out = Cases()
    out.add("dense", model_case(dense.set_packed(True)))
    out.add("dense padded", model_case(copy.deepcopy(dense).set_packed(False)), batches=drawn)
    if hf:
        from adaptinf.methods.dense import to_hf_sequence_classifier

        try:
            out.add("transformers", hf_case(to_hf_sequence_classifier(dense)), batches=drawn, flops_from="dense")
        except ValueError as e:  # a family `to_hf` cannot write yet: the other references still stand
            warnings.warn(f"transformers left out of the references: {e}")
    if compile:
        case = compiled_case(dense)
        try:  # compiles now, untimed; a machine without inductor's C++ toolchain leaves the case out
            for per_size in drawn.values():
                case(per_size[0])
            out.add("dense compiled", case, flops_from="dense")
        except Exception as e:  # noqa: BLE001  (any compiler failure: the other references still stand)
            warnings.warn(f"dense compiled left out of the references: torch.compile failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})")
    if int8:
        from adaptinf.quantize import quantize

        q = copy.deepcopy(dense).eval()
        quantize(q, "int8")
        out.add("dense int8", model_case(q), precision="int8")
    if onnx:
        if workdir is None:
            raise ValueError("the ONNX Runtime references need a workdir for their .onnx files")
        from adaptinf.onnx_dense import ort_dense_cases

        for name, case in ort_dense_cases(dense, workdir, threads).items():
            out.add(name, case, flops_from="dense", precision="int8" if name.endswith("int8") else "fp32")
    return out


def best_reference(rows: list[BenchRow], names, batch_size: int) -> BenchRow | None:
    """The fastest (lowest median) row among the cases `names` at `batch_size`."""
    found = [r for r in rows if r.case in names and r.batch_size == batch_size]
    return min(found, key=lambda r: r.median_ms) if found else None


def against_best(rows: list[BenchRow]) -> list[BenchRow]:
    """Rows with `best_reference` / `speedup_vs_best` filled: against the fastest fp32 dense
    reference at the row's batch size, for an int8 row against the fastest int8 one. Ratios of
    medians of the same run."""
    out = []
    for r in rows:
        names = INT8_REFERENCES if r.precision == "int8" else FP32_REFERENCES
        best = best_reference(rows, names, r.batch_size)
        if best is None:
            out.append(r)
            continue
        out.append(dataclasses.replace(r, best_reference=best.case, speedup_vs_best=best.median_ms / r.median_ms))
    return out
