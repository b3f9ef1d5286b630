"""Quantisation at load time, for every method: dynamic int8 Linear layers or bf16.

`quantize(model, mode)` changes an already-built (loaded) model in place, for inference only; what
is saved stays fp32 safetensors (the quantised model's `state_dict` is still the fp32 one).

int8: every `nn.Linear` becomes an `Int8Linear` (its class is swapped in place: the module, its
hooks and its fp32 `weight` / `bias` Parameters stay). Calling the module runs torch's dynamic int8
kernel `quantized::linear_dynamic` on a prepacked copy of the weight (int8, one scale per output
channel), the activations quantised to uint8 on each call (one scale over the whole input, so a
sample's result depends slightly on its batch-mates). A leading slice of a Linear taken through
`adaptinf.backbone.linear_slice` (SHARCS's narrow widths, PLANER's half attention / FFN) runs int8
too (`Int8Linear.forward_slice`, each slice packed once). Code that reads raw weights into its own
matmuls (PLANER's grouped experts, ACM's learners, which are not Linear modules at all) keeps
working, in fp32: `calibration=batch` measures how much of the work actually ran int8
(`QuantizeReport.int8_linear_share`, see `weight_matmul_flops`).

bf16: the model's floating parameters and buffers become bfloat16 (ids, masks and FLOPs are
integers / float64 as before); logits and floating extras come back as float32. Native only on CPUs
with avx512_bf16 / amx_bf16 (`bf16_supported`). Its `state_dict` is bf16: save the fp32 model, not this one.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from adaptinf.data import Batch
from adaptinf.model import ClassifierOutput

MODES = ("none", "int8", "bf16")


@dataclass(frozen=True)
class QuantizeReport:
    """What `quantize` did.

    converted: Linear modules converted (int8: `Int8Linear`; bf16: cast to bfloat16).
    fp32_modules (int8): module -> why (some of) its matmul work is not int8: a Linear subclass left
        as it is, or, from the calibration batch, a module whose weight the method reads directly
        (sliced `F.linear`, raw-Parameter matmuls), or a Linear that did not run on it.
    int8_flops, float_flops: from the calibration batch, FLOPs (2 per multiply-add) of the Linear
        calls that ran the int8 kernel, and of every other matmul with a model weight as an operand
        (attention scores and other activation-by-activation products are not counted).
    int8_linear_share: int8_flops / (int8_flops + float_flops); None without a calibration batch.
    """

    mode: str
    converted: int
    fp32_modules: dict[str, str] = field(default_factory=dict)
    int8_flops: int | None = None
    float_flops: int | None = None
    int8_linear_share: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_supported() -> tuple[bool, str]:
    """(native, reason): whether this CPU computes bf16 natively (avx512_bf16 / amx_bf16)."""
    flags = cpu_flags()
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if native:
        return True, f"native bf16 on this CPU ({', '.join(native)})"
    if not flags:
        return False, "CPU flags unknown (no /proc/cpuinfo): bf16 may be emulated and slower than fp32"
    return False, "no avx512_bf16 / amx_bf16 on this CPU: bf16 is emulated and likely slower than fp32"


def _reduce_range() -> bool:
    """7-bit activations where u8 x s8 products are summed in int16 and can saturate (no VNNI)."""
    return not cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}


class Int8Linear(nn.Linear):
    """An `nn.Linear` whose forward runs the dynamic int8 kernel; `weight` / `bias` stay the fp32
    Parameters (for code that slices them). The packed int8 copy is rebuilt when either changes
    (in place, e.g. `load_state_dict`, or replaced). Inference only; CPU only."""

    _packed: dict | None = None  # (rows, cols) -> prepacked int8 weight of that leading slice
    _slice_counter: Any = None
    _packed_key: tuple = ()

    def _pack(self, rows: int | None = None, cols: int | None = None) -> Any:
        w, b = self.weight, self.bias
        key = (w.data_ptr(), w._version) + (() if b is None else (b.data_ptr(), b._version))
        if key != self._packed_key or self._packed is None:
            self._packed, self._packed_key = {}, key
        shape = (rows or w.shape[0], cols or w.shape[1])
        if shape not in self._packed:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch 2.13 marks quantised-tensor creation deprecated
                wd = w.detach()[: shape[0], : shape[1]].float().contiguous()
                scale = (wd.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
                qw = torch.quantize_per_channel(wd, scale, torch.zeros_like(scale, dtype=torch.int64), 0, torch.qint8)
                self._packed[shape] = torch.ops.quantized.linear_prepack(qw, None if b is None else b.detach()[: shape[0]].float())
        return self._packed[shape]

    def _check(self, x: torch.Tensor) -> None:
        if self.training:
            raise ValueError("an int8-quantised model is for inference only: call .eval(), or train the fp32 model")
        if x.device.type != "cpu" or x.dtype != torch.float32:
            raise ValueError(f"int8 Linear layers take float32 inputs on CPU, got {x.dtype} on {x.device.type}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return torch.ops.quantized.linear_dynamic(x, self._pack(), _reduce_range())

    def forward_slice(self, x: torch.Tensor, rows: int | None, cols: int | None) -> torch.Tensor:
        """The first `rows` outputs from the first `cols` inputs (`adaptinf.backbone.linear_slice`,
        SHARCS's widths, PLANER's half blocks), int8 too: each slice is packed once and cached."""
        self._check(x)
        packed = self._pack(rows, cols)
        if self._slice_counter is not None:  # weight_matmul_flops is counting
            self._slice_counter(2 * (x.numel() // x.shape[-1]) * x.shape[-1] * (rows or self.out_features))
        return torch.ops.quantized.linear_dynamic(x, packed, _reduce_range())


# aten matmuls and the positions of their two matrix operands
_MATMULS = {
    torch.ops.aten.mm: (0, 1), torch.ops.aten.bmm: (0, 1), torch.ops.aten._grouped_mm: (0, 1),
    torch.ops.aten.addmm: (1, 2), torch.ops.aten.addmm_: (1, 2), torch.ops.aten.baddbmm: (1, 2),
    torch.ops.aten.baddbmm_: (1, 2),
}


class _WeightMatmuls(TorchDispatchMode):
    """Counts, by owner, the FLOPs of every aten matmul one of whose operands is a view of a model
    Parameter (`owners`: storage pointer -> name). Composite ops (linear, einsum, matmul) are
    decomposed so that their matmuls are seen; int8 kernels are not aten matmuls."""

    def __init__(self, owners: dict[int, str]):
        super().__init__()
        self.owners = owners
        self.flops: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        pos = _MATMULS.get(func.overloadpacket)
        if pos is None:
            with self:  # the decomposition's own ops come back here
                out = func.decompose(*args, **kwargs)
            return func(*args, **kwargs) if out is NotImplemented else out
        out = func(*args, **kwargs)
        a, b = args[pos[0]], args[pos[1]]
        owner = self.owners.get(b.untyped_storage().data_ptr()) or self.owners.get(a.untyped_storage().data_ptr())
        if owner is not None:
            self.flops[owner] += 2 * out.numel() * a.shape[-1]
        return out


def weight_matmul_flops(model: nn.Module, batch: Batch) -> tuple[dict[str, int], dict[str, int]]:
    """One eval forward of `model` on `batch` (at its knob): (int8 FLOPs per `Int8Linear` called,
    FLOPs per module of the other matmuls that read one of its Parameters). FLOPs are 2 per
    multiply-add over every row the matmul ran (padding rows included where the method runs them)."""
    owners = {}
    for mname, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(p.untyped_storage().data_ptr(), mname)
    int8: dict[str, int] = defaultdict(int)

    def count(name: str):
        def hook(module: nn.Linear, args: tuple, out: torch.Tensor) -> None:
            tokens = args[0].numel() // module.in_features
            int8[name] += 2 * tokens * module.in_features * module.out_features
        return hook

    int8_modules = [(n, m) for n, m in model.named_modules() if isinstance(m, Int8Linear)]
    hooks = [m.register_forward_hook(count(n)) for n, m in int8_modules]
    for n, m in int8_modules:  # sliced calls (`forward_slice`) bypass the hooks
        m._slice_counter = lambda f, n=n: int8.__setitem__(n, int8[n] + f)
    mode = _WeightMatmuls(owners)
    try:
        with torch.no_grad(), mode:
            model(batch.input_ids, batch.attention_mask)
    finally:
        for h in hooks:
            h.remove()
        for _, m in int8_modules:
            m._slice_counter = None
    return dict(int8), dict(mode.flops)


def _refuse_training(module: nn.Module, args: tuple) -> None:
    if module.training:
        raise ValueError("a quantised model is for inference only: call .eval(), or train the fp32 model")


def _float32_outputs(module: nn.Module, args: tuple, out: Any) -> Any:
    """bf16 model: logits and floating extras back as float32 (FLOPs stay float64)."""
    if isinstance(out, ClassifierOutput):
        out.logits = out.logits.float()
        out.extras = {k: v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else v
                      for k, v in out.extras.items()}
    return out


def quantize(model: nn.Module, mode: str, calibration: Batch | None = None) -> QuantizeReport:
    """Quantise `model` (eval mode) in place for inference: mode "none", "int8" or "bf16" (see the
    module docstring). `calibration`: a batch run once to measure the share of the Linear work that
    runs int8 (any mode; 0 for "none" / "bf16"). The model records the report as `model.quantization`."""
    if mode not in MODES:
        raise ValueError(f"unknown quantisation mode {mode!r}; valid modes: {', '.join(MODES)}")
    if model.training:
        raise ValueError("quantize is for inference: call model.eval() first (a quantised model cannot be trained)")
    done = getattr(model, "quantization", None)
    if done is not None and done.mode != "none" and mode != "none":
        raise ValueError(f"this model is already quantised ({done.mode}); load it again to quantise it as {mode}")
    params = list(model.parameters())
    converted, fp32, note = 0, {}, ""
    if mode == "int8":
        if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
            raise ValueError("int8 quantisation needs a float32 model on CPU (torch's int8 kernels are CPU-only)")
        for name, m in model.named_modules():
            if type(m) is nn.Linear:
                m.__class__ = Int8Linear
                converted += 1
            elif isinstance(m, nn.Linear) and not isinstance(m, Int8Linear):
                fp32[name] = f"{type(m).__name__} (a Linear subclass): left as it is"
        note = f"dynamic int8, engine {torch.backends.quantized.engine}, reduce_range={_reduce_range()}"
    elif mode == "bf16":
        converted = sum(isinstance(m, nn.Linear) for m in model.modules())
        model.to(torch.bfloat16)
        model.register_forward_hook(_float32_outputs)
        note = bf16_supported()[1]
    if mode != "none":
        model.register_forward_pre_hook(_refuse_training)
    int8_flops = float_flops = share = None
    if calibration is not None:
        int8, other = weight_matmul_flops(model, calibration)
        int8_flops, float_flops = sum(int8.values()), sum(other.values())
        share = int8_flops / max(int8_flops + float_flops, 1)
        if mode == "int8":
            total = {n: int8.get(n, 0) + other.get(n, 0) for n in set(int8) | set(other)}
            for n, f in sorted(other.items()):
                kind = "Linear, weight read directly" if isinstance(model.get_submodule(n), nn.Linear) else "not a Linear"
                fp32[n] = f"{kind}: {f / total[n]:.0%} of its matmul FLOPs ran fp32"
            for n, m in model.named_modules():
                if isinstance(m, Int8Linear) and n not in total:
                    fp32[n] = "did not run on the calibration batch"
    report = QuantizeReport(mode, converted, fp32, int8_flops, float_flops, share, note)
    model.quantization = report
    return report
