"""ACM, Adaptive Computation Modules (Wójcik et al.; spec: ../shared/METHODS.md section 3).

Every replaced module (each FFN by default; optionally each attention projection q/k/v/out) becomes
N learners, small 2-layer MLPs d -> w -> d whose N together cost what the module cost. A token
that runs k learners gets the sum of the first k learners' outputs (k = 0 gives zero, allowed for
the FFN, which sits under a residual; attention projections run at least one). A small gate per
module (MLP d -> g -> g -> choices, ~1 % of the model's cost per token) picks k for every token.

Conversion (`from_dense`): the learners start as an exact split of the dense module. FFN: the
intermediate neurons, ordered by importance (|up row| * |down column|, so the first learners hold
the most important ones), are cut into N groups of ceil(d_ff / N); with all learners on, the
converted model is the dense model. Attention projections: the truncated SVD of the weight,
singular values in decreasing order, w = (d^2 + d) / ((2d + 1) N) components per learner
(identity activation, the reference code's default), so the N learners cost one d x d Linear.

Training (`fit`, one verb, three phases, each resumable under out_dir):
1. `distill/`: module-wise distillation from the frozen dense model. Forward hooks on the dense
   model capture each replaced module's input and output on the training data; each module's
   learners are trained to match the output for every k = 1..N (MSE averaged over k), with their
   own Adam and their own gradient clipping, so modules are independent: each process of
   `torchrun --nproc_per_node=P` (or each of `workers` processes spawned on one machine) trains
   every P-th module, writes it to distill/<module>.safetensors, and every process then reads all.
2. `gates/`: gate pre-training on labels "smallest n after which one more learner improves the
   error by less than a factor tau" (`sufficient_k`), plain cross-entropy, learners frozen; also
   module-wise and parallel the same way. The label histogram per module is the "sufficient k"
   distribution the summary reports.
3. `e2e/`: end-to-end fine-tuning of the whole model with `adaptinf.recipes.finetune.finetune` (resumable
   mid-epoch, DDP under torchrun): task loss + budget + entropy + diversity terms. The gate's
   Gumbel-softmax hard one-hot (straight-through) multiplies the cumulative learner outputs, so the
   task loss reaches the gates.

Inference: argmax of the gate logits minus `knob * k` (the knob: a bias toward fewer learners;
0 or None is the trained gate). Token-grouped execution (`Learners.grouped`): the tokens are sorted
by k once per module, then learner i runs as one dense matmul on the contiguous prefix of tokens
with k >= i; padding tokens run nothing. One host sync per module (the N prefix sizes), none per
learner.

Cost (adaptinf.flops convention): per sample at its real length L, the model without the replaced
modules + every executed learner (`learner_flops` per token and learner) + every gate that ran
(`gate_flops` per token and module).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from adaptinf import flops
from adaptinf.backbone import Encoder, EncoderConfig, attention_bias
from adaptinf.data import Encoded
from adaptinf.methods.dense import DenseClassifier
from adaptinf.model import AT_DEFAULT, AdaptiveClassifier, ClassifierOutput, MethodConfig, ModelSpec

TARGETS = ("ffn", "attn")
ATTN_PROJECTIONS = ("q", "k", "v", "out")
KNOB_VALUES = (-8.0, -4.0, -2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


# --- configuration ----------------------------------------------------------------------------------


def _as_targets(value: Any) -> tuple[str, ...]:
    """Targets from a tuple/list, or a CLI string such as "ffn,attn"."""
    if isinstance(value, str):
        value = [p for p in value.strip().strip("[]()").replace(" ", "").split(",") if p]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"AcmConfig.targets must be a list drawn from {list(TARGETS)}, got {value!r}")
    return tuple(value)


@dataclass
class AcmConfig(MethodConfig):
    """ACM settings.

    learners: N, learners per module (2..16).
    targets: which modules become ACMs: "ffn" (every FFN) and/or "attn" (every q/k/v/out projection).
    gate_hidden: width of the gate's two hidden layers.
    tau: phase-2 label factor: a token's label is the smallest n after which one more learner
        improves its error by less than this factor.
    beta: phase-3 target for the executed fraction of learner cost (over all ACMs).
    budget_weight, entropy_weight, diversity_weight: weights of the phase-3 auxiliary terms.
    gumbel_temperature: temperature of the gates' Gumbel-softmax in phase 3.
    distill_epochs, distill_lr: phase 1 (Adam), 0 epochs skips it.
    gate_epochs, gate_lr: phase 2 (Adam), 0 epochs skips it.
    workers: processes for phases 1 and 2 on one machine (under torchrun the ranks are the workers).
    Phase 3 takes its epochs, learning rate and batch size from the training config (`convert
    --epochs --lr --batch-size`); phases 1 and 2 take the batch size and seed from it too.
    """

    learners: int = 4
    targets: tuple[str, ...] = ("ffn",)
    gate_hidden: int = 32
    tau: float = 1.2
    beta: float = 0.6
    budget_weight: float = 0.1
    entropy_weight: float = 0.05
    diversity_weight: float = 0.05
    gumbel_temperature: float = 0.8
    distill_epochs: int = 2
    distill_lr: float = 1e-3
    gate_epochs: int = 1
    gate_lr: float = 1e-2
    workers: int = 1

    def __post_init__(self) -> None:
        self.targets = _as_targets(self.targets)
        super().__post_init__()

    def validate(self) -> None:
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.learners) or not 2 <= self.learners <= 16:
            raise ValueError(f"AcmConfig.learners must be an integer from 2 to 16, got {self.learners!r}")
        if not self.targets or len(set(self.targets)) != len(self.targets) or not set(self.targets) <= set(TARGETS):
            raise ValueError(
                f"AcmConfig.targets must be a non-empty list without repeats drawn from {list(TARGETS)}, "
                f"got {list(self.targets)}"
            )
        if not is_int(self.gate_hidden) or self.gate_hidden < 1:
            raise ValueError(f"AcmConfig.gate_hidden must be a positive integer, got {self.gate_hidden!r}")
        if not self.tau > 1.0:
            raise ValueError(f"AcmConfig.tau must be > 1 (an improvement factor; the paper uses 1.2), got {self.tau}")
        if not 0.0 < self.beta <= 1.0:
            raise ValueError(f"AcmConfig.beta must be in (0, 1] (a fraction of the learners' cost), got {self.beta}")
        for name in ("budget_weight", "entropy_weight", "diversity_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"AcmConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.gumbel_temperature > 0:
            raise ValueError(f"AcmConfig.gumbel_temperature must be > 0, got {self.gumbel_temperature}")
        for name in ("distill_epochs", "gate_epochs"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"AcmConfig.{name} must be an integer >= 0 (0 skips the phase), got {getattr(self, name)!r}")
        for name in ("distill_lr", "gate_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"AcmConfig.{name} must be > 0, got {getattr(self, name)}")
        if not is_int(self.workers) or self.workers < 1:
            raise ValueError(f"AcmConfig.workers must be a positive integer, got {self.workers!r}")


# --- cost -------------------------------------------------------------------------------------------


def learner_flops(d_in: int, width: int, d_out: int) -> int:
    """One learner (d_in -> width -> d_out) on one token."""
    return flops.linear(1, d_in, width) + flops.linear(1, width, d_out)


def gate_flops(d: int, hidden: int, choices: int) -> int:
    """One gate (d -> hidden -> hidden -> choices) on one token."""
    return flops.linear(1, d, hidden) + flops.linear(1, hidden, hidden) + flops.linear(1, hidden, choices)


def replaced_flops(name: str, cfg: EncoderConfig) -> int:
    """What the dense module `name` ("ffn" or an attention projection) costs per token."""
    d = cfg.hidden_size
    return flops.ffn_block(1, d, cfg.intermediate_size) if name == "ffn" else flops.linear(1, d, d)


def ffn_width(cfg: EncoderConfig, n: int) -> int:
    """FFN learner width: the intermediate neurons split into n groups (padded with zero neurons)."""
    return math.ceil(cfg.intermediate_size / n)


def attn_width(cfg: EncoderConfig, n: int) -> int:
    """Attention-projection learner width: n learners d -> w -> d cost one d x d Linear (with bias)."""
    d = cfg.hidden_size
    return max(1, min(d // n, round((d * d + d) / ((2 * d + 1) * n))))


def module_names(num_layers: int, targets: tuple[str, ...]) -> list[str]:
    """Replaced modules, layer-major: "0.ffn", "0.q", ... (the order work is shared out in)."""
    kinds = (["q", "k", "v", "out"] if "attn" in targets else []) + (["ffn"] if "ffn" in targets else [])
    return [f"{layer}.{kind}" for layer in range(num_layers) for kind in kinds]


# --- building blocks ---------------------------------------------------------------------------------


class Learners(nn.Module):
    """N learners d_in -> width -> d_out, stored stacked so that all of them, or learner i alone,
    is one matmul per layer: w1 [N*width, d_in] (learner i: rows i*width..), w2 [N, d_out, width]."""

    def __init__(self, d_in: int, width: int, d_out: int, n: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ("gelu", "identity"):
            raise ValueError(f"learner activation must be 'gelu' or 'identity', got {activation!r}")
        self.n, self.width, self.activation = n, width, activation
        self.w1 = nn.Parameter(torch.empty(n * width, d_in).normal_(std=0.02))
        self.b1 = nn.Parameter(torch.zeros(n * width))
        self.w2 = nn.Parameter(torch.empty(n, d_out, width).normal_(std=0.02))
        self.b2 = nn.Parameter(torch.zeros(n, d_out))

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x) if self.activation == "gelu" else x

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every learner on every token: x [T, d_in] -> [T, N, d_out]."""
        h = self._act(F.linear(x, self.w1, self.b1)).view(x.shape[0], self.n, self.width)  # [T, N, w]
        return torch.einsum("tnw,now->tno", h, self.w2) + self.b2

    def cumulative(self, x: torch.Tensor) -> torch.Tensor:
        """Output for every k = 0..N: x [T, d_in] -> [T, N+1, d_out], index k = sum of the first k learners."""
        y = self.outputs(x).cumsum(dim=1)  # [T, N, d_out]
        return torch.cat([y.new_zeros(y.shape[0], 1, y.shape[2]), y], dim=1)

    def grouped(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Token-grouped execution: x [T, d_in], k [T] (0..N) -> sum of each token's first k learners [T, d_out].

        Tokens are sorted by k (descending) once, so learner i runs as one dense matmul on the
        contiguous prefix of tokens with k > i. One host sync (the N prefix sizes), none per learner;
        tokens with k = 0 (padding among them) are never gathered.
        """
        out = x.new_zeros(x.shape[0], self.w2.shape[1])
        if x.shape[0] == 0:
            return out
        order = torch.argsort(k, descending=True, stable=True)  # [T]
        at_least = torch.bincount(k, minlength=self.n + 1).flip(0).cumsum(0).flip(0)[1:]  # [N] tokens with k > i
        sizes = at_least.tolist()  # the one host sync of this module
        if sizes[0] == 0:
            return out
        rows = order[: sizes[0]]
        xs = x.index_select(0, rows)  # [m, d_in], k descending
        acc = None
        for i, m in enumerate(sizes):
            if m == 0:
                break
            w = slice(i * self.width, (i + 1) * self.width)
            h = self._act(torch.addmm(self.b1[w], xs[:m], self.w1[w].t()))  # [m, width]
            if acc is None:  # every gathered token runs learner 0
                acc = torch.addmm(self.b2[i], h, self.w2[i].t())  # [m, d_out]
            else:  # in place on the prefix view: no copy of the accumulator
                acc[:m].addmm_(h, self.w2[i].t()).add_(self.b2[i])
        return out.index_copy_(0, rows, acc)


class Gate(nn.Module):
    """The per-module gate: an MLP on the token, d -> hidden -> hidden -> choices (logits)."""

    def __init__(self, d: int, hidden: int, choices: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, choices))
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Untrained, the gate picks the most learners (a fresh conversion is the dense model); the
        # margin (1 / (choices - 1) per learner) dwarfs the tiny random hidden contributions.
        with torch.no_grad():
            self.net[-1].bias.copy_(torch.linspace(0.0, 1.0, choices))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AdaptiveModule(nn.Module):
    """Learners plus their gate. `min_k` is the fewest learners a token may run (0 for the FFN)."""

    def __init__(self, d_in: int, width: int, d_out: int, n: int, activation: str, min_k: int, gate_hidden: int):
        super().__init__()
        self.min_k = min_k
        self.learners = Learners(d_in, width, d_out, n, activation)
        self.gate = Gate(d_in, gate_hidden, n + 1 - min_k)
        self.register_buffer("choices", torch.arange(min_k, n + 1), persistent=False)  # k of each gate output

    @property
    def n(self) -> int:
        return self.learners.n

    def pick(self, logits: torch.Tensor, knob: float | None) -> torch.Tensor:
        """Inference choice: k [T] = argmax of the gate logits [T, choices] minus knob * k."""
        if knob:
            logits = logits - knob * self.choices.to(logits.dtype)
        return self.choices[logits.argmax(dim=-1)]


def sufficient_k(errors: torch.Tensor, tau: float) -> torch.Tensor:
    """Phase-2 labels from errors [T, C] (error with the c-th allowed number of learners, increasing k):
    the smallest c after which one more learner improves the error by less than a factor tau
    (errors[c] / errors[c+1] < tau); C - 1 when every step improves by at least tau. An error
    already 0 counts as not improving."""
    prev, nxt = errors[:, :-1], errors[:, 1:]
    small = (prev < tau * nxt) | (prev == 0)  # [T, C-1]
    last = torch.full_like(errors[:, 0], errors.shape[1] - 1, dtype=torch.int64)
    return torch.where(small.any(dim=1), small.to(torch.int8).argmax(dim=1), last)


@dataclass
class _Routing:
    """What one forward pass shares between its modules (local to the call, never stored)."""

    real: torch.Tensor  # [T] flat positions (b * s) of the real tokens
    sample: torch.Tensor  # [T] the sample each real token belongs to
    batch: int
    width: int
    mode: str  # "train" (Gumbel, all learners), "gate" (argmax, token-grouped), "fixed"
    knob: float | None
    fixed_k: int | None
    k: list[torch.Tensor] = field(default_factory=list)  # per module [T] int64
    onehots: list[torch.Tensor] = field(default_factory=list)  # per module [T, C] (train)


# --- the model -------------------------------------------------------------------------------------


class AcmClassifier(AdaptiveClassifier):
    """The dense classifier with every target module replaced by learners and a gate.

    forward:
    - training mode: Gumbel-softmax hard one-hot per token (straight-through), every learner runs,
      output = the one-hot times the cumulative outputs; aux_loss = the phase-3 terms.
    - eval mode: k = argmax of the gate logits (biased by the knob), token-grouped execution.
    - `force_learners(k)`: every real token runs exactly k learners and no gate runs (evaluation of
      the distilled learners, e.g. "all learners on").
    extras: "k" [modules, b, s] (0 on padding), "executed_fraction" [b] (share of the learners'
    full cost the sample ran).
    """

    method = "acm"
    Config = AcmConfig
    knob_name = "gate_bias"
    description = "ACM: per-token number of learners (sums of small MLPs) chosen by a gate, distilled from the dense model"

    def __init__(self, spec: ModelSpec, config: AcmConfig | None = None):
        super().__init__(spec, config or AcmConfig())
        cfg, n = spec.encoder, self.config.learners
        self.encoder = Encoder(cfg)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(cfg.hidden_size, spec.num_labels)
        d, g = cfg.hidden_size, self.config.gate_hidden
        self.names = module_names(cfg.num_hidden_layers, self.config.targets)
        self.acm = nn.ModuleList(nn.ModuleDict() for _ in range(cfg.num_hidden_layers))
        for name in self.names:
            layer, kind = name.split(".")
            block = self.encoder.blocks[int(layer)]
            if kind == "ffn":
                block.ffn.up = block.ffn.down = None  # replaced by the learners
                mod = AdaptiveModule(d, ffn_width(cfg, n), d, n, "gelu", 0, g)
            else:
                setattr(block.attention, kind, None)
                mod = AdaptiveModule(d, attn_width(cfg, n), d, n, "identity", 1, g)
            self.acm[int(layer)][kind] = mod
        self.forced_k: int | None = None
        self._teacher: list[DenseClassifier] = []  # the frozen dense model (not a submodule: never saved)

    def module(self, name: str) -> AdaptiveModule:
        layer, kind = name.split(".")
        return self.acm[int(layer)][kind]

    # --- conversion -----------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, dense: AdaptiveClassifier, config: AcmConfig | None = None) -> AcmClassifier:
        """Everything but the replaced modules from the dense model; learners = an exact split of the
        FFN (truncated SVD for attention projections); the dense model is kept, frozen, as the
        teacher of phases 1 and 2."""
        if not isinstance(dense, DenseClassifier):
            raise ValueError(f"conversion needs a dense model, got method {dense.method!r}")
        model = cls(dense.spec, config or AcmConfig())
        state = {k: v for k, v in dense.state_dict().items() if k in model.state_dict()}
        missing = model.load_state_dict(state, strict=False).missing_keys
        assert all(k.startswith("acm.") for k in missing), missing
        model.dropout.p = dense.dropout.p
        for name in model.names:
            layer, kind = name.split(".")
            block = dense.encoder.blocks[int(layer)]
            learners = model.module(name).learners
            if kind == "ffn":
                split_ffn(learners, block.ffn.up, block.ffn.down)
            else:
                split_linear(learners, getattr(block.attention, kind))
        teacher = copy.deepcopy(dense).eval()
        teacher.requires_grad_(False)
        model._teacher = [teacher]
        return model

    def force_learners(self, k: int | None) -> None:
        """Evaluation override: every real token runs exactly k learners (attention projections at
        least one), no gate runs. None restores the gates."""
        if k is not None and not (isinstance(k, int) and 0 <= k <= self.config.learners):
            raise ValueError(f"force_learners: k must be an integer from 0 to {self.config.learners} or None, got {k!r}")
        self.forced_k = k

    # --- knob -----------------------------------------------------------------------------------
    def knob_values(self) -> list[float]:
        return list(KNOB_VALUES)

    def check_knob(self, value: float | None) -> float | None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise ValueError(f"acm: the gate_bias knob must be a finite number (added as -knob * k to the gate logits), got {value!r}")
        return super().check_knob(None if value is None else float(value))

    # --- forward --------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask, token_type_ids=None, knob=AT_DEFAULT) -> ClassifierOutput:
        knob = self.run_knob(knob)
        b, s = input_ids.shape
        h = self.encoder.embed(input_ids, token_type_ids)  # [b, s, d]
        bias = attention_bias(attention_mask, h.dtype)
        real = attention_mask.reshape(-1).nonzero().squeeze(1)  # [T] (one host sync per forward)
        mode = "train" if self.training else ("fixed" if self.forced_k is not None else "gate")
        ctx = _Routing(real, torch.div(real, s, rounding_mode="floor"), b, s, mode, knob, self.forced_k)
        for block, mods in zip(self.encoder.blocks, self.acm):
            if "q" in mods:
                h = self._attention(block.attention, mods, h, bias, ctx)
            else:
                h = block.attention(h, bias)
            if "ffn" in mods:
                h = block.ffn.norm(h + block.ffn.dropout(self._run(mods["ffn"], h, ctx)))
            else:
                h = block.ffn(h)
        logits = self.classifier(self.dropout(self.encoder.pool(h)))  # [b, C]
        lengths = flops.lengths_of(attention_mask)
        executed = torch.stack([self._per_sample(k, ctx) for k in ctx.k]) if ctx.k else lengths.new_zeros(0, b)
        if mode == "train":  # every learner ran on every real token
            executed = torch.stack([lengths * self.module(n).n for n in self.names])
        cost = self.cost(lengths, executed, gates_ran=mode != "fixed")
        k_full = torch.zeros(len(ctx.k), b * s, dtype=torch.int64, device=input_ids.device)
        if ctx.k:
            k_full[:, real] = torch.stack(ctx.k)
        extras = {"k": k_full.view(-1, b, s), "executed_fraction": self._fraction(ctx, lengths).detach()}
        aux = self._aux_loss(ctx, lengths) if mode == "train" else None
        return ClassifierOutput(logits=logits, flops=cost, aux_loss=aux, extras=extras)

    def _attention(self, attn, mods, h, bias, ctx) -> torch.Tensor:
        """The backbone's attention with the projections run by their ACMs."""
        b, s, _ = h.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, s, attn.n_heads, attn.head_dim).transpose(1, 2)  # [b, nh, s, hd]

        q, k, v = (self._run(mods[name], h, ctx) for name in ("q", "k", "v"))
        p = attn.attn_dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=bias, dropout_p=p)
        a = a.transpose(1, 2).reshape(b, s, attn.n_heads * attn.head_dim)  # [b, s, d]
        return attn.norm(h + attn.dropout(self._run(mods["out"], a, ctx)))

    def _run(self, mod: AdaptiveModule, x: torch.Tensor, ctx: _Routing) -> torch.Tensor:
        """One ACM on x [b, s, d_in] -> [b, s, d_out]; padding rows get zeros. Records k in ctx."""
        b, s, _ = x.shape
        flat = x.reshape(b * s, -1)
        d_out = mod.learners.w2.shape[1]
        if ctx.mode == "train":
            xr = flat.index_select(0, ctx.real)  # [T, d_in]
            onehot = F.gumbel_softmax(mod.gate(xr), tau=self.config.gumbel_temperature, hard=True)  # [T, C]
            cum = mod.learners.cumulative(xr)[:, mod.min_k :]  # [T, C, d_out]
            yr = torch.einsum("tc,tcd->td", onehot, cum)  # the chosen output, times the one-hot's value (1)
            ctx.onehots.append(onehot)
            ctx.k.append(mod.choices[onehot.detach().argmax(dim=-1)])
            out = flat.new_zeros(b * s, d_out).index_copy(0, ctx.real, yr)
            return out.view(b, s, d_out)
        if ctx.mode == "fixed":
            kr = torch.full_like(ctx.real, max(ctx.fixed_k, mod.min_k))
        else:
            kr = mod.pick(mod.gate(flat.index_select(0, ctx.real)), ctx.knob)  # [T]
        ctx.k.append(kr)
        k = torch.zeros(b * s, dtype=torch.int64, device=x.device).index_copy_(0, ctx.real, kr)  # padding: 0
        return mod.learners.grouped(flat, k).view(b, s, d_out)

    def _per_sample(self, k: torch.Tensor, ctx: _Routing) -> torch.Tensor:
        """Sum over each sample's real tokens of a per-token value [T] -> [b]."""
        return torch.zeros(ctx.batch, dtype=k.dtype, device=k.device).index_add_(0, ctx.sample, k)

    # --- cost -----------------------------------------------------------------------------------
    def cost(self, lengths: torch.Tensor, executed: torch.Tensor, gates_ran: bool = True) -> torch.Tensor:
        """FLOPs [b] (float64) of samples of real lengths [b] that ran executed[m, b] learners (summed
        over their tokens) in module m: the rest of the model + the learners + the gates."""
        cfg = self.spec.encoder
        total = flops.dense_model(lengths, cfg, self.spec.num_labels)
        for i, name in enumerate(self.names):
            mod = self.module(name)
            kind = name.split(".")[1]
            d_in, d_out = mod.learners.w1.shape[1], mod.learners.w2.shape[1]
            total = total - lengths * replaced_flops(kind, cfg) + executed[i] * learner_flops(d_in, mod.learners.width, d_out)
            if gates_ran:
                total = total + lengths * gate_flops(d_in, self.config.gate_hidden, len(mod.choices))
        return total.to(torch.float64)

    def _learner_cost(self) -> list[int]:
        return [learner_flops(m.learners.w1.shape[1], m.learners.width, m.learners.w2.shape[1])
                for m in (self.module(n) for n in self.names)]

    def _fraction(self, ctx: _Routing, lengths: torch.Tensor) -> torch.Tensor:
        """Executed share [b] of the learners' full cost, from the chosen k (differentiable in
        training: k is read from the straight-through one-hots)."""
        p = self._learner_cost()
        used = torch.zeros(ctx.batch, dtype=torch.float32, device=lengths.device)
        for i, name in enumerate(self.names):
            mod = self.module(name)
            kr = ctx.onehots[i] @ mod.choices.to(ctx.onehots[i].dtype) if ctx.onehots else ctx.k[i].float()
            used = used + p[i] * torch.zeros_like(used).index_add(0, ctx.sample, kr.to(used.dtype))
        full = lengths.to(used.dtype) * sum(pi * self.module(n).n for pi, n in zip(p, self.names))
        return used / full.clamp_min(1)

    def _aux_loss(self, ctx: _Routing, lengths: torch.Tensor) -> torch.Tensor:
        """Phase 3: budget |mean executed fraction - beta| + entropy of each sample's histogram of k
        (per module, normalised, maximised) + spread of the executed fraction across samples (maximised)."""
        c = self.config
        frac = self._fraction(ctx, lengths)  # [b]
        budget = (frac.mean() - c.beta).abs()
        ent = []
        for onehot in ctx.onehots:
            hist = torch.zeros(ctx.batch, onehot.shape[1], device=onehot.device).index_add(0, ctx.sample, onehot)
            a = hist / lengths.to(hist.dtype).clamp_min(1)[:, None]  # [b, C] share of tokens per k
            ent.append((a * torch.log(a + 1e-6)).sum(dim=1) / math.log(onehot.shape[1]))  # -normalised entropy
        entropy = torch.stack(ent).mean()
        diversity = -2.0 * (frac[:, None] - frac[None, :]).abs().mean()
        return c.budget_weight * budget + c.entropy_weight * entropy + c.diversity_weight * diversity

    # --- training: the three phases ----------------------------------------------------------------
    def fit(self, train: Encoded, val: Encoded, cfg, out_dir, progress: bool = True, restart: bool = False) -> dict:
        """Phase 1 (distill/), phase 2 (gates/), phase 3 (e2e/, `adaptinf.recipes.finetune.finetune`), each
        resumed from out_dir when rerun with the same settings. Returns a summary."""
        from adaptinf.model import accuracy
        from adaptinf.recipes.finetune import barrier as _barrier, dist_info, finetune

        rank, world = dist_info()
        out = Path(out_dir)
        if restart and rank == 0:
            for phase in ("distill", "gates"):
                shutil.rmtree(out / phase, ignore_errors=True)
        _barrier()
        c = self.config
        summary: dict[str, Any] = {"n_train": len(train)}
        pad = self.spec.encoder.pad_token_id
        t0 = time.time()
        if c.distill_epochs:
            summary["distill"] = self._phase("distill", train, cfg, out / "distill", progress)
            summary["distill_seconds"] = round(time.time() - t0, 1)  # ~0 when resumed from out_dir
            if rank == 0:  # the distilled learners, all on, against the dense model
                self.force_learners(c.learners)
                summary["val_accuracy_all_learners"] = accuracy(self, val, cfg.eval_batch_size, pad)[0]
                self.force_learners(None)
                if self._teacher:
                    summary["val_accuracy_dense"] = accuracy(self._teacher[0], val, cfg.eval_batch_size, pad)[0]
        if c.gate_epochs:
            t0 = time.time()
            summary["gates"] = self._phase("gates", train, cfg, out / "gates", progress)
            summary["gates_seconds"] = round(time.time() - t0, 1)
        knob = self.knob
        self.set_knob(None)
        try:
            result = finetune(self, train, val, cfg, out / "e2e", progress=progress, restart=restart)
        finally:
            self.set_knob(knob)
        best = out / "e2e" / "best" / "model.safetensors"
        if best.is_file():
            self.load_state_dict(load_file(str(best)))
        summary.update(best_val_score=result.best_val_score, best_epoch=result.best_epoch, steps=result.steps,
                       resumed_from_step=result.resumed_from_step)
        return summary

    def _phase(self, phase: str, train: Encoded, cfg, out: Path, progress: bool) -> dict:
        """Run phase "distill" or "gates" module-wise (resumable per module), in parallel across
        torchrun ranks or `workers` processes, and load every module's result. Returns per-module stats."""
        from adaptinf.recipes.finetune import barrier as _barrier, dist_info

        rank, world = dist_info()
        c = self.config
        # what this phase's result depends on (not beta etc.: runs at several budgets can share it)
        fields = ["learners", "targets", "distill_epochs", "distill_lr"]
        if phase == "gates":
            fields += ["gate_hidden", "tau", "gate_epochs", "gate_lr"]
        settings = {"phase": phase, **{f: c.to_dict()[f] for f in fields}, "batch_size": cfg.batch_size, "seed": cfg.seed,
                    "max_grad_norm": cfg.max_grad_norm, "warmup_ratio": cfg.warmup_ratio, "n_train": len(train)}
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            path = out / "settings.json"
            if path.is_file() and json.loads(path.read_text()) != settings:
                raise ValueError(f"{out} holds a {phase} phase with other settings; use a new output directory, "
                                 "or --restart to discard it")
            path.write_text(json.dumps(settings, indent=2) + "\n")
        _barrier()
        todo = [n for n in self.names if not (out / f"{n}.json").is_file()]
        if todo:
            if not self._teacher:
                raise ValueError(f"phase {phase!r} needs the dense model: build this model with AcmClassifier.from_dense")
            procs = world if world > 1 else c.workers
            if world > 1:
                self.train_modules(phase, todo[rank::world], train, cfg, out, progress and rank == 0)
                _barrier()
            elif procs > 1:
                import torch.multiprocessing as mp

                threads = max(1, torch.get_num_threads() // procs)
                mp.spawn(_worker, args=(procs, self, phase, todo, train, cfg, str(out), threads), nprocs=procs, join=True)
            else:
                self.train_modules(phase, todo, train, cfg, out, progress)
        stats = {}
        for name in self.names:
            part = self.module(name).learners if phase == "distill" else self.module(name).gate
            part.load_state_dict(load_file(str(out / f"{name}.safetensors")))
            stats[name] = json.loads((out / f"{name}.json").read_text())
        return stats

    def train_modules(self, phase: str, names: list[str], train: Encoded, cfg, out: Path, progress: bool = False) -> None:
        """Train the learners ("distill") or the gates ("gates") of `names` on the dense model's
        captured inputs and outputs; each module has its own Adam and gradient clipping, so the
        result does not depend on which other modules trained beside it. Writes out/<name>.*."""
        from adaptinf.checkpoint import save_tensors_atomic, write_json_atomic
        from adaptinf.data import steps_per_epoch, train_batches
        from adaptinf.recipes.finetune import lr_at
        from adaptinf.settings import TrainConfig

        c = self.config
        teacher = self._teacher[0]
        epochs, lr = (c.distill_epochs, c.distill_lr) if phase == "distill" else (c.gate_epochs, c.gate_lr)
        sched = TrainConfig(epochs=epochs, lr=lr, warmup_ratio=cfg.warmup_ratio, batch_size=cfg.batch_size)
        total = steps_per_epoch(len(train), cfg.batch_size) * epochs
        mods = {n: self.module(n) for n in names}
        parts = {n: (m.learners if phase == "distill" else m.gate) for n, m in mods.items()}
        opts = {n: torch.optim.Adam(p.parameters(), lr=lr) for n, p in parts.items()}
        captured: dict[str, list] = {n: [None, None] for n in names}
        real = [None]
        hooks = []

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(-1, t.shape[-1]).index_select(0, real[0])  # [T, d] real tokens

        def keep(name: str, slot: int):
            def hook(module, args, output):
                captured[name][slot] = tokens(args[0] if slot == 0 else output)
            return hook

        for n in names:
            layer, kind = n.split(".")
            block = teacher.encoder.blocks[int(layer)]
            first, last = (block.ffn.up, block.ffn.down) if kind == "ffn" else (getattr(block.attention, kind),) * 2
            hooks += [first.register_forward_hook(keep(n, 0)), last.register_forward_hook(keep(n, 1))]
        depth = max(int(n.split(".")[0]) for n in names) + 1
        sums = {n: [0.0, 0.0, 0] for n in names}  # last epoch: loss, output power, tokens
        counts = {n: torch.zeros(len(mods[n].choices), dtype=torch.int64) for n in names}  # labels, first epoch
        step = 0
        bar = tqdm(total=total, desc=f"acm {phase}", disable=not progress, unit="step")
        try:
            for epoch in range(epochs):
                sums = {n: [0.0, 0.0, 0] for n in names}
                for batch, _, _ in train_batches(train, cfg.batch_size, cfg.seed, epoch, pad_id=self.spec.encoder.pad_token_id):
                    real[0] = batch.attention_mask.reshape(-1).nonzero().squeeze(1)
                    with torch.no_grad():
                        h = teacher.encoder.embed(batch.input_ids)
                        teacher.encoder.run_blocks(h, attention_bias(batch.attention_mask, h.dtype), 0, depth)
                    rate = lr_at(step, total, sched)
                    for n in names:
                        x, y = captured[n]
                        mod, opt = mods[n], opts[n]
                        for g in opt.param_groups:
                            g["lr"] = rate
                        if phase == "distill":
                            cum = mod.learners.cumulative(x)[:, 1:]  # [T, N, d] for k = 1..N
                            loss = (cum - y[:, None]).pow(2).mean()  # MSE averaged over k
                        else:
                            with torch.no_grad():
                                err = (mod.learners.cumulative(x)[:, mod.min_k :] - y[:, None]).norm(dim=-1)  # [T, C]
                                labels = sufficient_k(err, c.tau)
                            if epoch == 0:
                                counts[n] += torch.bincount(labels, minlength=len(mod.choices))
                            loss = F.cross_entropy(mod.gate(x), labels)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(parts[n].parameters(), cfg.max_grad_norm)
                        opt.step()
                        sums[n][0] += float(loss.detach()) * x.shape[0]
                        sums[n][1] += float(y.pow(2).mean()) * x.shape[0]
                        sums[n][2] += x.shape[0]
                    step += 1
                    bar.update(1)
        finally:
            bar.close()
            for hk in hooks:
                hk.remove()
        for n in names:
            save_tensors_atomic(dict(parts[n].state_dict()), out / f"{n}.safetensors")
            stats: dict[str, Any] = {"loss": sums[n][0] / max(1, sums[n][2])}
            if phase == "distill":  # MSE over k relative to the output's mean square
                stats["relative_mse"] = sums[n][0] / max(sums[n][1], 1e-30)
            else:
                share = (counts[n].double() / counts[n].sum().clamp_min(1)).tolist()
                stats["sufficient_k_share"] = {str(int(k)): v for k, v in zip(mods[n].choices, share)}
            write_json_atomic(out / f"{n}.json", stats)  # written last: marks the module done


def _worker(rank: int, procs: int, model: AcmClassifier, phase: str, names: list[str], train: Encoded, cfg,
            out: str, threads: int) -> None:
    """One of `workers` processes of a module-wise phase: trains every procs-th module."""
    torch.set_num_threads(threads)
    model.train_modules(phase, names[rank::procs], train, cfg, Path(out), progress=False)


# --- conversion helpers ------------------------------------------------------------------------------


@torch.no_grad()
def split_ffn(learners: Learners, up: nn.Linear, down: nn.Linear) -> None:
    """Learner i := the i-th group of intermediate neurons (most important first); the sum of all
    learners is the FFN exactly (groups padded with zero neurons; the output bias on learner 0)."""
    n, w = learners.n, learners.width
    importance = up.weight.norm(dim=1) * down.weight.norm(dim=0)  # [d_ff]
    order = torch.argsort(importance, descending=True)
    d_ff = order.numel()
    w1 = torch.zeros_like(learners.w1)  # [n*w, d]
    b1 = torch.zeros_like(learners.b1)
    w2 = torch.zeros(learners.w2.shape[1], n * w)  # [d, n*w]
    w1[:d_ff] = up.weight[order]
    b1[:d_ff] = up.bias[order]
    w2[:, :d_ff] = down.weight[:, order]
    learners.w1.copy_(w1)
    learners.b1.copy_(b1)
    learners.w2.copy_(w2.view(-1, n, w).transpose(0, 1))  # [n, d, w]
    learners.b2.zero_()
    learners.b2[0].copy_(down.bias)


@torch.no_grad()
def split_linear(learners: Learners, linear: nn.Linear) -> None:
    """Identity-activation learners := consecutive blocks of the weight's singular components
    (largest first), so the first k learners are the best rank-k*width part; bias on learner 0."""
    n, w = learners.n, learners.width
    u, s, vh = torch.linalg.svd(linear.weight.double(), full_matrices=False)
    r = n * w
    root = s[:r].sqrt()
    learners.w1.copy_((root[:, None] * vh[:r]).float())  # [r, d_in]
    learners.b1.zero_()
    learners.w2.copy_((u[:, :r] * root).float().view(-1, n, w).transpose(0, 1))  # [n, d_out, w]
    learners.b2.zero_()
    learners.b2[0].copy_(linear.bias)

