"""ONNX Runtime dense reference: the dense classifier as a CPU deployment would run it.

`export_dense` writes a `DenseClassifier` to one self-contained .onnx file (inputs `input_ids`,
`attention_mask` int64 [batch, seq], both axes dynamic; output `logits` float32 [batch, labels]),
`quantize_onnx_int8` makes its dynamic-int8 twin, `OrtDense` / `ort_case` run either as a bench case
(a `Batch` in, logits as a torch tensor out), and `ort_dense_cases` builds both, cached in a folder.

Exporter: torch's `torch.export`-based one (`dynamo=True`, which needs onnxscript), not the legacy
TorchScript tracer (`dynamo=False`, deprecated since torch 2.9). On torch 2.13 both give correct
dynamic batch and sequence axes and, run as below, the same speed (within 5%); the torch.export
graph is the cleaner one (~260 nodes against the tracer's ~670, most of them shape arithmetic
around SDPA), and at opset 20 it has GELU as one `Gelu` op, which ORT fuses with its bias
(the opset-18 graph's erf form is left unfused). Export always takes the padded path: a model's
padding-free execution (`packed`) is switched off while tracing and restored after, so the graph
has no NonZero / scatter of packed tokens.

Session: ORT_ENABLE_ALL, except the SkipLayerNormFusion, which `OrtDense` turns off: ORT 1.32's
CPU SkipLayerNormalization kernel is ~4x slower than the Add + LayerNormalization it replaces, and
turning it off made the fp32 model 8-15% and the int8 one ~25% faster (6-layer d=384, batch 32 of
~26 tokens, 1 thread, an AVX512-VNNI EPYC).

int8: `quantize_dynamic`, QInt8 weights per channel, full range. On that CPU per-channel,
per-tensor and reduce_range ran within noise of each other (per-channel had the smallest logit
error; reduce_range only matters on CPUs without VNNI) and QUInt8 weights were ~1.6x slower.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

try:
    import onnxruntime as ort
except ImportError as e:  # a project dependency; only a broken install gets here
    raise ImportError("adaptinf.onnx_dense needs onnxruntime: pip install onnxruntime onnx onnxscript") from e

from adaptinf.data import Batch

INPUTS = ("input_ids", "attention_mask")
OUTPUT = "logits"
DEFAULT_OPSET = 20  # Gelu is an ONNX op from 20 (the dynamo exporter's lowest opset is 18)
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)  # slower on CPU (module docstring)
_FORMAT = 1  # bump when export or quantisation settings change: part of the cache key

Case = Callable[[Batch], torch.Tensor]


class _Logits(nn.Module):
    """The classifier's forward with logits only (ONNX outputs are tensors, not a ClassifierOutput)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask).logits


@contextlib.contextmanager
def _padded_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode with every `packed` flag (padding-free execution) off; both restored on exit."""
    flags = [(m, m.packed) for m in model.modules() if isinstance(getattr(m, "packed", None), bool)]
    was_training = model.training
    try:
        for m, _ in flags:
            m.packed = False
        model.eval()
        yield
    finally:
        for m, v in flags:
            m.packed = v
        model.train(was_training)


@contextlib.contextmanager
def _quiet(logger: str, drop: str | None = None) -> Iterator[None]:
    """Silence a logger ('': the root one) for the block: all its records, or those containing `drop`."""
    log = logging.getLogger(logger)
    f = logging.Filter()
    f.filter = lambda record: drop is not None and drop not in record.getMessage()  # type: ignore[method-assign]
    log.addFilter(f)
    try:
        yield
    finally:
        log.removeFilter(f)


def export_dense(model: nn.Module, path: str | os.PathLike, opset: int = DEFAULT_OPSET) -> Path:
    """Export a dense classifier (a `DenseClassifier`, fp32) to one .onnx file at `path`; returns it.

    A vision encoder's graph takes uint8 `input_ids` [batch, 1 + P, C*p*p] and an int64 mask
    [batch, 1 + P], batch dynamic. Text: inputs `input_ids`, `attention_mask` int64 [batch, seq] with both axes dynamic (seq 1 up to the
    encoder's position table), output `logits` [batch, num_labels]; the weights are stored in the
    file (no external data). Traced in eval mode on the padded path; the model's mode and `packed`
    flags are left as they were.
    """
    path = Path(path)
    enc = model.spec.encoder
    dev = next(model.parameters()).device
    if enc.is_vision:  # patchified uint8 images [batch, 1 + P, C*p*p]: only the batch axis varies
        s = enc.max_positions
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 256, (2, s, enc.patch_dim), generator=g, dtype=torch.uint8).to(dev)
        ids[:, 0] = 0
        mask = torch.ones(2, s, dtype=torch.int64, device=dev)
        batch = torch.export.Dim("batch")
        shapes = {"input_ids": {0: batch}, "attention_mask": {0: batch}}
    else:
        s = min(8, enc.max_positions)  # example shape: not 0 or 1, which torch.export would specialise
        if s < 2:
            raise ValueError(f"cannot export an encoder of {enc.max_positions} positions: dynamic axes need at least 2")
        ids = torch.arange(1, 1 + 2 * s, device=dev).remainder(enc.vocab_size).view(2, s)
        mask = torch.ones(2, s, dtype=torch.int64, device=dev)
        mask[1, s // 2 :] = 0
        axes = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=enc.max_positions)}
        shapes = {name: axes for name in INPUTS}
    path.parent.mkdir(parents=True, exist_ok=True)
    with _padded_eval(model), torch.no_grad(), warnings.catch_warnings(), \
            _quiet("torch.onnx._internal.exporter._registration"):  # 'torchvision is not installed'
        warnings.simplefilter("ignore")  # exporter chatter: deprecations, axis renames
        program = torch.onnx.export(_Logits(model), (ids, mask), input_names=list(INPUTS), output_names=[OUTPUT],
                                    dynamic_shapes=shapes, opset_version=opset,
                                    dynamo=True, verbose=False)
    program.save(str(path), external_data=False)
    return path


def quantize_onnx_int8(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Dynamic int8 quantisation of an exported model: QInt8 weights per channel, activations
    quantised at run time (options measured: module docstring); returns `dst`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    _check_file(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # ORT's pre-processing (symbolic shape inference) fails on this graph and is not needed; drop its advice
    with _quiet("", drop="pre-processing"):
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True, reduce_range=False)
    return dst


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {path}: export one with adaptinf.onnx_dense.export_dense")


class OrtDense:
    """An ONNX Runtime CPU session of an exported dense model, callable on a `Batch` (logits out).

    Session: `threads` intra-op threads (default `torch.get_num_threads()` at construction), graph
    optimisation ORT_ENABLE_ALL less `disabled_optimizers`, sequential execution (one inter-op
    thread); ORT's other defaults are kept (worker threads spin briefly after a run).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None,
                 disabled_optimizers: Sequence[str] = DISABLED_OPTIMIZERS):
        self.path = Path(path)
        _check_file(self.path)
        self.threads = torch.get_num_threads() if threads is None else int(threads)
        if self.threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"],
                                                disabled_optimizers=list(disabled_optimizers))
        except Exception as e:  # onnxruntime's own types (InvalidProtobuf, Fail, ...), none of them public
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{self.path} is not a loadable ONNX model: {reason}") from None
        names = sorted(i.name for i in self.session.get_inputs())
        outs = [o.name for o in self.session.get_outputs()]
        if names != sorted(INPUTS) or OUTPUT not in outs:
            raise ValueError(f"{self.path} is not an exported dense classifier: inputs {names}, outputs {outs} "
                             f"(expected inputs {list(INPUTS)}, output {OUTPUT!r})")

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [b, num_labels] (float32, on the CPU) for token ids and mask [b, s]."""
        # token ids int64; a vision model's patchified pixels stay uint8 (the graph's input type)
        ids_type = np.uint8 if input_ids.dtype == torch.uint8 else np.int64
        feed = {name: np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dt)
                for name, t, dt in zip(INPUTS, (input_ids, attention_mask), (ids_type, np.int64))}
        return torch.from_numpy(self.session.run([OUTPUT], feed)[0])

    def __call__(self, batch: Batch) -> torch.Tensor:
        return self.run(batch.input_ids, batch.attention_mask)


def ort_case(path: str | os.PathLike, threads: int | None = None) -> Case:
    """A bench case (`adaptinf.bench.run_bench`) running the .onnx model at `path` with ONNX Runtime."""
    return OrtDense(path, threads)


def weights_digest(model: nn.Module, opset: int = DEFAULT_OPSET) -> str:
    """sha256 (16 hex digits) of the model's spec and weights and the export settings: the cache key."""
    key = (_FORMAT, getattr(model, "spec", None), opset, torch.__version__, ort.__version__)
    h = hashlib.sha256(repr(key).encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _build_once(make: Callable[[Path], object], dst: Path) -> Path:
    """`dst` if it exists, else `make(tmp)` beside it renamed into place (no half-written cache file)."""
    if dst.is_file():
        return dst
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=dst.parent)
    os.close(fd)
    try:
        make(Path(tmp))
        os.replace(tmp, dst)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dst


def ort_dense_cases(model: nn.Module, workdir: str | os.PathLike, threads: int | None = None,
                    opset: int = DEFAULT_OPSET) -> dict[str, Case]:
    """{"onnxruntime fp32": ..., "onnxruntime int8": ...} for a dense model.

    The model is exported once to `workdir/dense-<digest>.onnx` (digest: `weights_digest`) and
    quantised beside it (`...-int8.onnx`); later calls with the same weights reuse both files.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stem = f"dense-{weights_digest(model, opset)}"
    fp32 = _build_once(lambda p: export_dense(model, p, opset), workdir / f"{stem}.onnx")
    int8 = _build_once(lambda p: quantize_onnx_int8(fp32, p), workdir / f"{stem}-int8.onnx")
    return {"onnxruntime fp32": ort_case(fp32, threads), "onnxruntime int8": ort_case(int8, threads)}
