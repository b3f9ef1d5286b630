"""ACM, Adaptive Computation Modules (the ACM paper, Wójcik et al.).

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

Training (`adaptinf.recipes.acm`, three resumable phases): the learners are distilled module by
module from the frozen dense model (`AcmClassifier.teacher`, the modules it replaces:
`dense_counterpart`), the gates are pre-trained on "sufficient k" labels, then the whole model is
fine-tuned end to end on the task loss plus the auxiliary terms (budget, entropy, diversity) that
the training-mode forward returns as `aux_loss`. In training mode every gate draws a Gumbel-softmax
hard one-hot (straight-through) that multiplies the cumulative learner outputs, so the task loss
reaches the gates.

Inference: argmax of the gate logits minus `knob * k` (the knob: a bias toward fewer learners;
0 or None is the trained gate). Token-grouped execution (`Learners.grouped`): the tokens are sorted
by k once per module, then learner i runs as one dense matmul on the contiguous prefix of tokens
with k >= i; padding tokens run nothing. One host sync per module (the N prefix sizes), none per
learner. `forward(..., learners=k)` (eval mode) runs exactly k learners on every real token and no
gate: the distilled learners evaluated on their own, e.g. all of them on.

Cost (adaptinf.flops convention): per sample at its real length L, the model without the replaced
modules + every executed learner (`learner_flops` per token and learner) + every gate that ran
(`gate_flops` per token and module).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptinf import flops
from adaptinf.backbone import Encoder, EncoderConfig, Layout, attend, packed_run
from adaptinf.methods.dense import DenseClassifier
from adaptinf.model import AT_DEFAULT, AdaptiveClassifier, ClassifierOutput, MethodConfig, ModelSpec, option

TARGETS = ("ffn", "attn")
ATTN_PROJECTIONS = ("q", "k", "v", "out")
KNOB_VALUES = (-8.0, -4.0, -2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


# --- configuration ----------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_targets(value: Any) -> tuple[str, ...]:
    """Targets from a tuple/list, or a CLI string such as "ffn,attn"."""
    words = re.findall(r"[^\s,\[\]()]+", value) if isinstance(value, str) else value  # "[ffn, attn]" -> 2 words
    if not isinstance(words, (list, tuple)) or not all(isinstance(v, str) for v in words):
        raise ValueError(f"AcmConfig.targets must be a list drawn from {list(TARGETS)}, got {value!r}")
    return tuple(words)


@dataclass
class AcmConfig(MethodConfig):
    """ACM settings (the fields not listed here carry their help where they are declared).

    learners: N, learners per module (2..16).
    targets: which modules become ACMs: "ffn" (every FFN) and/or "attn" (every q/k/v/out projection).
    gate_hidden: width of the gate's two hidden layers.
    budget_weight, entropy_weight, diversity_weight: weights of the phase-3 auxiliary terms.
    distill_epochs, distill_lr: phase 1 (Adam), 0 epochs skips it.
    gate_epochs, gate_lr: phase 2 (Adam), 0 epochs skips it.
    Phase 3 takes its epochs, learning rate and batch size from the training config (`convert
    --epochs --lr --batch-size`); phases 1 and 2 take the batch size and seed from it too.
    """

    learners: int = 4
    targets: tuple[str, ...] = ("ffn",)
    gate_hidden: int = 32
    tau: float = option(1.2, "phase-2 label factor: a token's label is the smallest n after which one more "
                             "learner improves its error by less than this factor")
    beta: float = option(0.6, "phase-3 target for the executed fraction of learner cost (over all ACMs)")
    budget_weight: float = 0.1
    entropy_weight: float = 0.05
    diversity_weight: float = 0.05
    gumbel_temperature: float = option(0.8, "temperature of the gates' Gumbel-softmax in phase 3")
    distill_epochs: int = 2
    distill_lr: float = 1e-3
    gate_epochs: int = 1
    gate_lr: float = 1e-2
    workers: int = option(1, "processes for phases 1 and 2 on one machine (under torchrun the ranks are the workers)")

    def __post_init__(self) -> None:
        self.targets = _as_targets(self.targets)
        super().__post_init__()

    def validate(self) -> None:
        if not _is_int(self.learners) or not 2 <= self.learners <= 16:
            raise ValueError(f"AcmConfig.learners must be an integer from 2 to 16, got {self.learners!r}")
        if not self.targets or len(set(self.targets)) != len(self.targets) or not set(self.targets) <= set(TARGETS):
            raise ValueError(
                f"AcmConfig.targets must be a non-empty list without repeats drawn from {list(TARGETS)}, "
                f"got {list(self.targets)}"
            )
        if not _is_int(self.gate_hidden) or self.gate_hidden < 1:
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
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"AcmConfig.{name} must be an integer >= 0 (0 skips the phase), got {getattr(self, name)!r}")
        for name in ("distill_lr", "gate_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"AcmConfig.{name} must be > 0, got {getattr(self, name)}")
        if not _is_int(self.workers) or self.workers < 1:
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
    - `learners=k` (eval mode): every real token runs exactly k learners and no gate runs
      (evaluation of the distilled learners, e.g. "all learners on").
    extras: "k" [modules, b, s] (0 on padding), "executed_fraction" [b] (share of the learners'
    full cost the sample ran).
    """

    method = "acm"
    description = "ACM: per-token number of learners (sums of small MLPs) chosen by a gate, distilled from the dense model"
    knob_name = "gate_bias"
    Config = AcmConfig

    def __init__(self, spec: ModelSpec, config: AcmConfig | None = None):
        super().__init__(spec, config)
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
        self._teacher: list[DenseClassifier] = []  # the frozen dense model (not a submodule: never saved)

    def module(self, name: str) -> AdaptiveModule:
        layer, kind = name.split(".")
        return self.acm[int(layer)][kind]

    @property
    def teacher(self) -> DenseClassifier | None:
        """The frozen dense model this one was converted from (what phases 1 and 2 learn from);
        None for a loaded model (the teacher is never saved)."""
        return self._teacher[0] if self._teacher else None

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
            first, last = dense_counterpart(dense, name)
            if name.endswith(".ffn"):
                split_ffn(model.module(name).learners, first, last)
            else:
                split_linear(model.module(name).learners, first)
        teacher = copy.deepcopy(dense).eval()
        teacher.requires_grad_(False)
        model._teacher = [teacher]
        return model

    def check_learners(self, k: int | None) -> int | None:
        """Validate forward's `learners`: None (the gates decide) or an integer from 0 to N."""
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.config.learners):
            raise ValueError(f"acm: learners must be an integer from 0 to {self.config.learners} or None, got {k!r}")
        if k is not None and self.training:
            raise ValueError("acm: learners= forces k in eval mode only (training runs the Gumbel-softmax gates)")
        return k

    # --- knob -----------------------------------------------------------------------------------
    def knob_values(self) -> list[float]:
        return list(KNOB_VALUES)

    def check_knob(self, value: float | None) -> float | None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise ValueError(f"acm: the gate_bias knob must be a finite number (added as -knob * k to the gate logits), got {value!r}")
        return super().check_knob(None if value is None else float(value))

    # --- forward --------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask, token_type_ids=None, knob=AT_DEFAULT,
                learners: int | None = None) -> ClassifierOutput:
        """`knob`: the gate bias of this call (see `run_knob`); `learners`: None (the gates pick k)
        or k, run by every real token with no gate (attention projections at least one; eval mode)."""
        knob, learners = self.run_knob(knob), self.check_learners(learners)
        b, s = input_ids.shape
        h = self.encoder.embed(input_ids, token_type_ids)  # [b, s, d]
        bias = self.token_mask(attention_mask, h.dtype)  # a Layout at inference: unconverted layers padding-free
        real = attention_mask.reshape(-1).nonzero().squeeze(1)  # [T] (one host sync per forward)
        if isinstance(bias, Layout):
            bias.share_index(real)
        mode = "train" if self.training else ("fixed" if learners is not None else "gate")
        ctx = _Routing(real, torch.div(real, s, rounding_mode="floor"), b, s, mode, knob, learners)
        for block, mods in zip(self.encoder.blocks, self.acm):
            if "q" in mods:
                h = self._attention(block.attention, mods, h, bias, ctx)
            else:
                h = block.attention(h, bias)
            if "ffn" in mods:
                h = block.ffn.norm(h + block.ffn.dropout(self._run(mods["ffn"], h, ctx)))
            else:
                h = packed_run(lambda x, _: block.ffn(x), h, bias)
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
        q, k, v = (self._run(mods[name], h, ctx) for name in ("q", "k", "v"))
        p = attn.attn_dropout if self.training else 0.0
        a = attend(q, k, v, bias, attn.n_heads, p)  # [b, s, d]
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


# --- conversion helpers ------------------------------------------------------------------------------


def dense_counterpart(dense: nn.Module, name: str) -> tuple[nn.Module, nn.Module]:
    """The dense model's modules that ACM `name` replaces, as (the one whose input is the ACM's
    input, the one whose output is its output): (ffn.up, ffn.down) for "L.ffn", the projection twice
    for "L.q", "L.k", "L.v", "L.out"."""
    layer, kind = name.split(".")
    block = dense.encoder.blocks[int(layer)]
    return (block.ffn.up, block.ffn.down) if kind == "ffn" else (getattr(block.attention, kind),) * 2


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

