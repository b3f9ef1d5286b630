"""ACM, Adaptive Computation Modules (the ACM paper, Wójcik et al.).

Every replaced module (each FFN by default; optionally each attention projection q/k/v/out) becomes
N learners, small 2-layer MLPs d -> w -> d whose N together cost what the module cost. A token
that runs k learners gets the sum of the first k learners' outputs (k = 0 gives zero, allowed for
the FFN, which sits under a residual; attention projections run at least one). A small gate per
module (MLP d -> g -> g -> choices, ~1 % of the model's cost per token) picks k for every token.
Learners and gate read the replaced module's input (in a pre-LN block, ViT, after its LayerNorm:
`Attention.inp` / `FeedForward.inp`); the block's own residual adds their output (`.residual`).

Conversion (`from_dense`): the learners start as an exact split of the dense module. FFN: the
intermediate neurons, ordered by importance (|up row| * |down column|, so the first learners hold
the most important ones), are cut into N groups of ceil(d_ff / N); with all learners on, the
converted model is the dense model. Attention projections: the truncated SVD of the weight,
singular values in decreasing order, w = (d^2 + d) / ((2d + 1) N) components per learner
(identity activation, the reference code's default), so the N learners cost one d x d Linear.

Training (`adaptinf.recipes.acm`, three resumable phases): the learners are distilled module by
module from the frozen dense model (`AcmClassifier.teacher`, the modules it replaces:
`dense_counterpart`; `distill_mode` "residual", the default and what the reference code runs:
learner k is trained only by the error of the first k, fitting what learners 1..k-1 leave, so the
early learners carry the coarse part), the gates are pre-trained on "sufficient k" labels
(`label_rule` "relative", the default: the paper's ratio rule with `tau`, informative once the
distillation is residual; "absolute": the smallest k within `eps` of the dense output, relative
to its norm), then the whole model is fine-tuned end to end on the task
loss plus the auxiliary terms (budget, entropy, diversity) that the training-mode forward returns
as `aux_loss` (the budget target annealed from 1 to beta over the first `beta_anneal` share of the
steps by the recipe, through `budget_target`; `selection_score` charges a checkpoint what it spends
over beta, so the annealing's costlier early checkpoints do not win model selection). In training mode every gate draws a Gumbel-softmax
hard one-hot (straight-through) that multiplies the cumulative learner outputs, so the task loss
reaches the gates.

Inference: argmax of the gate logits minus `knob * k` (the knob: a bias toward fewer learners;
0 or None is the trained gate). The stack runs padding-free (packed once per forward; every module
on the real tokens [T, d]). `Learners.run`, one host sync per module (the histogram of k), none per
learner: when that wastes at most PREFIX_WASTE token-learner products (one k shared by every
token, or few tokens mostly at the largest k, e.g. batch 1), the first kmax learners run as one
matmul pair with the units above each token's k masked (no sort, no gather); otherwise token-grouped (`Learners.grouped`): the tokens are sorted by k, then learner i
runs as one dense matmul on the contiguous prefix of tokens with k > i. `forward(..., learners=k)` (eval mode) runs exactly k learners on every real token and no
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
from adaptinf.backbone import Encoder, EncoderConfig, Layout, attend
from adaptinf.data import eval_batches
from adaptinf.methods.dense import DenseClassifier
from adaptinf.model import AT_DEFAULT, AdaptiveClassifier, ClassifierOutput, MethodConfig, ModelSpec, option

TARGETS = ("ffn", "attn")
ATTN_PROJECTIONS = ("q", "k", "v", "out")
DISTILL_MODES = ("residual", "average")
LABEL_RULES = ("absolute", "relative")
# Learners.run takes the prefix execution when it computes at most this many token-learner products
# that a token does not use (about what the sort, gather and scatter of token-grouped execution cost
# on a CPU core in eager mode; e.g. batch 1 with most tokens at the largest k)
PREFIX_WASTE = 32
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
    distill_mode: str = option("residual", "phase 1: 'residual' (learner k is trained only by the error at k, "
                                           "fitting what learners 1..k-1 leave: coarse to fine, as the reference "
                                           "code runs) or 'average' (every learner by the MSE averaged over k)")
    label_rule: str = option("relative", "phase-2 labels: 'relative' (the paper's: the smallest k after which one "
                                         "more learner improves the error by less than tau) or 'absolute' (the "
                                         "smallest k whose output is within eps * |dense output| of it)")
    eps: float = option(0.4, "phase-2 'absolute' label tolerance, relative to the norm of the dense output (a "
                             "typical token's error with all learners after residual distillation is ~0.3)")
    tau: float = option(1.2, "phase-2 'relative' label factor: a token's label is the smallest n after which one more "
                             "learner improves its error by less than this factor")
    beta: float = option(0.6, "phase-3 target for the executed fraction of learner cost (over all ACMs)")
    budget_weight: float = 0.1
    entropy_weight: float = 0.05
    diversity_weight: float = 0.05
    beta_anneal: float = option(0.0, "share of the phase-3 steps over which the budget target falls linearly "
                                     "from 1 to beta (0: beta from the first step)")
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
        if self.distill_mode not in DISTILL_MODES:
            raise ValueError(f"AcmConfig.distill_mode must be one of {list(DISTILL_MODES)}, got {self.distill_mode!r}")
        if self.label_rule not in LABEL_RULES:
            raise ValueError(f"AcmConfig.label_rule must be one of {list(LABEL_RULES)}, got {self.label_rule!r}")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"AcmConfig.eps must be in (0, 1) (a relative error, e.g. 0.1), got {self.eps}")
        if not 0.0 <= self.beta_anneal <= 1.0:
            raise ValueError(f"AcmConfig.beta_anneal must be in [0, 1] (a share of the phase-3 steps), got {self.beta_anneal}")
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

    def residual_cumulative(self, x: torch.Tensor) -> torch.Tensor:
        """Phase 1's "residual" mode: x [T, d_in] -> [T, N, d_out], index k-1 = the sum of the first
        k learners in value, but learner k's gradient only (the first k-1 enter detached), so a
        loss on index k-1 trains learner k to fit what learners 1..k-1 leave (coarse to fine)."""
        y = self.outputs(x)  # [T, N, d_out]
        before = y.detach().cumsum(dim=1) - y.detach()  # sum of the learners before each, no gradient
        return before + y

    def run(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Inference: x [T, d_in], k [T] (0..N) -> sum of each token's first k learners [T, d_out].

        One host sync (the histogram of k), then the cheaper of two executions:
        - prefix (when it wastes at most PREFIX_WASTE token-learner products: every token at the
          same k, or few tokens mostly at the largest k, e.g. batch 1): the first kmax learners as
          one matmul pair on every token, the learners above a token's k masked out of the hidden
          layer; no sort, no gather;
        - token-grouped (`grouped`): tokens sorted by k, learner i on the prefix with k > i.
        """
        t, d_out = x.shape[0], self.w2.shape[1]
        if t == 0:
            return x.new_zeros(0, d_out)
        counts = torch.bincount(k, minlength=self.n + 1).tolist()  # the one host sync of this module
        used = [i for i, c in enumerate(counts) if c]
        kmin, kmax = used[0], used[-1]
        if kmax == 0:
            return x.new_zeros(t, d_out)
        wasted = kmax * t - sum(i * c for i, c in enumerate(counts))  # learner runs no token needs
        if wasted <= PREFIX_WASTE:
            return self.prefix(x, k, kmax, uniform=kmin == kmax)
        at_least = [sum(counts[i + 1 :]) for i in range(self.n)]  # tokens with k > i
        return self._grouped(x, k, at_least)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inference tables, kept between calls (rebuilt when the weights change; built afresh, not
        kept, under autograd): w2 as one matrix [N*width, d_out] (learner i: rows i*width..), the
        cumulative output biases [N+1, d_out] (row k: the first k learners'), the hidden-unit masks
        [N+1, N*width] (row k: 1 on the first k learners' units)."""
        key = (self.w2.data_ptr(), self.w2._version, self.b2.data_ptr(), self.b2._version)
        grad = torch.is_grad_enabled() and (self.w2.requires_grad or self.b2.requires_grad)
        cached = getattr(self, "_table_cache", None)
        if not grad and cached is not None and cached[0] == key:
            return cached[1]
        n, w = self.n, self.width
        w2 = self.w2.transpose(1, 2).reshape(n * w, -1)  # [N*w, d_out]
        cum_b2 = torch.cat([self.b2.new_zeros(1, self.b2.shape[1]), self.b2.cumsum(0)])  # [N+1, d_out]
        units = torch.arange(n * w, device=self.w1.device) // w  # [N*w] the learner of each hidden unit
        keep = (units[None, :] < torch.arange(n + 1, device=self.w1.device)[:, None]).to(self.w1.dtype)  # [N+1, N*w]
        if not grad:
            self._table_cache = (key, (w2, cum_b2, keep))
        return w2, cum_b2, keep

    def prefix(self, x: torch.Tensor, k: torch.Tensor, kmax: int, uniform: bool = False) -> torch.Tensor:
        """The first kmax learners on every token as one matmul pair, each token's learners above its
        k zeroed in the hidden layer (`uniform`: every token has k = kmax, no mask). x [T, d_in]."""
        w2, cum_b2, keep = self._tables()
        full = kmax == self.n
        kw = kmax * self.width
        h = self._act(F.linear(x, self.w1 if full else self.w1[:kw], self.b1 if full else self.b1[:kw]))  # [T, kw]
        if uniform:
            return torch.addmm(cum_b2[kmax], h, w2 if full else w2[:kw])
        h = h.mul_(keep.index_select(0, k)[:, :kw])  # hidden units of learners above each token's k -> 0
        return torch.addmm(cum_b2.index_select(0, k), h, w2 if full else w2[:kw])

    def grouped(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Token-grouped execution: x [T, d_in], k [T] (0..N) -> sum of each token's first k learners [T, d_out].

        Tokens are sorted by k (descending) once, so learner i runs as one dense matmul on the
        contiguous prefix of tokens with k > i. One host sync (the N prefix sizes), none per learner;
        tokens with k = 0 (padding among them) are never gathered.
        """
        if x.shape[0] == 0:
            return x.new_zeros(0, self.w2.shape[1])
        at_least = torch.bincount(k, minlength=self.n + 1).flip(0).cumsum(0).flip(0)[1:]  # [N] tokens with k > i
        return self._grouped(x, k, at_least.tolist())  # the one host sync of this module

    def _grouped(self, x: torch.Tensor, k: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], self.w2.shape[1])
        if sizes[0] == 0:
            return out
        order = torch.argsort(k, descending=True, stable=True)  # [T]
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
        self.register_buffer("choices_f", torch.arange(min_k, n + 1, dtype=torch.float32), persistent=False)

    @property
    def n(self) -> int:
        return self.learners.n

    def pick(self, logits: torch.Tensor, knob: float | None) -> torch.Tensor:
        """Inference choice: k [T] = argmax of the gate logits [T, choices] minus knob * k."""
        if knob:
            kf = self.choices_f if self.choices_f.dtype == logits.dtype else self.choices_f.to(logits.dtype)
            logits = torch.sub(logits, kf, alpha=knob)
        k = logits.argmax(dim=-1)  # index of the choice; choice c is k = c + min_k
        return k + self.min_k if self.min_k else k


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
        # phase 3's budget target of this step when annealed (set by the recipe); None: config.beta
        self.budget_target: float | None = None

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

    def selection_score(self, val, batch_size: int = 64) -> float:
        """Validation accuracy at the trained gates (knob None), minus the executed fraction of the
        learners' cost above beta: with an annealed budget target the early, costlier checkpoints
        do not win model selection by spending more (one point per 1% over budget)."""
        was_training = self.training
        self.eval()
        correct, frac, n = 0, 0.0, 0
        try:
            with torch.inference_mode():
                for bt in eval_batches(val, batch_size, self.spec.encoder.pad_token_id):
                    out = self(bt.input_ids, bt.attention_mask, knob=None)
                    correct += int((out.logits.argmax(-1) == bt.labels).sum())
                    frac += float(out.extras["executed_fraction"].sum())
                    n += len(bt.labels)
        finally:
            self.train(was_training)
        return correct / max(n, 1) - max(0.0, frac / max(n, 1) - self.config.beta)

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
        b, s = attention_mask.shape  # (input_ids of a vision encoder are [b, s, C*p*p])
        h = self.encoder.embed(input_ids, token_type_ids)  # [b, s, d]
        bias = self.token_mask(attention_mask, h.dtype)  # a Layout at inference: the stack runs padding-free
        real = attention_mask.reshape(-1).nonzero().squeeze(1)  # [T] (one host sync per forward)
        mode = "train" if self.training else ("fixed" if learners is not None else "gate")
        ctx = _Routing(real, torch.div(real, s, rounding_mode="floor"), b, s, mode, knob, learners)
        if isinstance(bias, Layout):  # packed once: every module runs on the real tokens [T, d] as they are
            bias.share_index(real)
            x = bias.pack(h)  # [T, d]
            for block, mods in zip(self.encoder.blocks, self.acm):
                x = self._attention(block.attention, mods, x, bias, ctx, self._run) if "q" in mods else block.attention(x, bias)
                x = block.ffn.residual(x, self._run(mods["ffn"], block.ffn.inp(x), ctx)) if "ffn" in mods else block.ffn(x)
            h = bias.unpack(x)
        else:  # padded [b, s, d] (training, or `set_packed(False)`): each module gathers the real tokens
            for block, mods in zip(self.encoder.blocks, self.acm):
                h = self._attention(block.attention, mods, h, bias, ctx, self._padded) if "q" in mods else block.attention(h, bias)
                ffn = block.ffn
                h = ffn.residual(h, self._padded(mods["ffn"], ffn.inp(h), ctx)) if "ffn" in mods else ffn(h)
        logits = self.classifier(self.dropout(self.encoder.pool(h)))  # [b, C]
        lengths = flops.lengths_of(attention_mask)
        m = len(self.names)
        ks = torch.stack(ctx.k) if ctx.k else real.new_zeros(0, real.numel())  # [M, T]
        if mode == "train":  # every learner ran on every real token
            executed = lengths[None, :] * self._per_module("n", lengths.device)[:, None]  # [M, b]
        else:
            executed = lengths.new_zeros(m, b).index_add_(1, ctx.sample, ks)  # [M, b] learners run per sample
        cost = self.cost(lengths, executed, gates_ran=mode != "fixed")
        k_full = ks.new_zeros(m, b * s).index_copy_(1, real, ks) if ks.shape[1] != b * s else ks
        if mode == "train":
            fraction = self._fraction(ctx, lengths).detach()
        else:  # the same share, from the executed counts
            p = self._per_module("learner_flops", lengths.device)
            fraction = (executed * p[:, None]).sum(0) / (lengths * (p * self._per_module("n", lengths.device)).sum()).clamp_min(1)
        extras = {"k": k_full.view(m, b, s), "executed_fraction": fraction.float()}
        aux = self._aux_loss(ctx, lengths) if mode == "train" else None
        return ClassifierOutput(logits=logits, flops=cost, aux_loss=aux, extras=extras)

    def _attention(self, attn, mods, h, bias, ctx, run) -> torch.Tensor:
        """The backbone's attention with the projections run by their ACMs (`run`: `_run` on packed
        h [T, d], `_padded` on h [b, s, d]); the q/k/v learners and gates read the sub-layer's input
        (`Attention.inp`: normalised in a pre-LN block)."""
        x = attn.inp(h)
        q, k, v = (run(mods[name], x, ctx) for name in ("q", "k", "v"))
        p = attn.attn_dropout if self.training else 0.0
        a = attend(q, k, v, bias, attn.n_heads, p)  # [b, s, d] or [T, d]
        return attn.residual(h, run(mods["out"], a, ctx))

    def _padded(self, mod: AdaptiveModule, x: torch.Tensor, ctx: _Routing) -> torch.Tensor:
        """`_run` on the real tokens of x [b, s, d_in] -> [b, s, d_out]; padding rows get zeros."""
        b, s, _ = x.shape
        yr = self._run(mod, x.reshape(b * s, -1).index_select(0, ctx.real), ctx)  # [T, d_out]
        return yr.new_zeros(b * s, yr.shape[1]).index_copy(0, ctx.real, yr).view(b, s, -1)

    def _run(self, mod: AdaptiveModule, xr: torch.Tensor, ctx: _Routing) -> torch.Tensor:
        """One ACM on the real tokens xr [T, d_in] -> [T, d_out]. Records k in ctx."""
        if ctx.mode == "train":
            onehot = F.gumbel_softmax(mod.gate(xr), tau=self.config.gumbel_temperature, hard=True)  # [T, C]
            cum = mod.learners.cumulative(xr)[:, mod.min_k :]  # [T, C, d_out]
            ctx.onehots.append(onehot)
            ctx.k.append(mod.choices[onehot.detach().argmax(dim=-1)])
            return torch.einsum("tc,tcd->td", onehot, cum)  # the chosen output, times the one-hot's value (1)
        if ctx.mode == "fixed":
            k = max(ctx.fixed_k, mod.min_k)
            ctx.k.append(torch.full_like(ctx.real, k))
            if k == 0:
                return xr.new_zeros(xr.shape[0], mod.learners.w2.shape[1])
            return mod.learners.prefix(xr, ctx.k[-1], k, uniform=True)
        kr = mod.pick(mod.gate(xr), ctx.knob)  # [T]
        ctx.k.append(kr)
        return mod.learners.run(xr, kr)

    # --- cost -----------------------------------------------------------------------------------
    def _per_module(self, what: str, device) -> torch.Tensor:
        """[M] int64 per replaced module: "n" learners, "learner_flops" (one learner, one token);
        kept between calls (the structure never changes)."""
        table = self.__dict__.setdefault("_module_table", {})
        if (what, device) not in table:
            values = [self.module(n).n for n in self.names] if what == "n" else self._learner_cost()
            table[(what, device)] = torch.tensor(values, dtype=torch.int64, device=device)
        return table[(what, device)]

    def cost(self, lengths: torch.Tensor, executed: torch.Tensor, gates_ran: bool = True) -> torch.Tensor:
        """FLOPs [b] (float64) of samples of real lengths [b] that ran executed[m, b] learners (summed
        over their tokens) in module m: the rest of the model + the learners + the gates."""
        cfg = self.spec.encoder
        per_token = 0  # what the replaced modules cost, minus the gates that ran instead (per token)
        for name in self.names:
            mod = self.module(name)
            per_token -= replaced_flops(name.split(".")[1], cfg)
            if gates_ran:
                per_token += gate_flops(mod.learners.w1.shape[1], self.config.gate_hidden, len(mod.choices))
        total = flops.dense_model(lengths, cfg, self.spec.num_labels) + lengths * per_token
        if len(self.names):
            total = total + (executed * self._per_module("learner_flops", executed.device)[:, None]).sum(0)
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
        beta = c.beta if self.budget_target is None else self.budget_target
        budget = (frac.mean() - beta).abs()
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

