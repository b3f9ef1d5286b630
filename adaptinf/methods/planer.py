"""PLANER (the PLANER paper, Latifi et al., 2022, "Efficient Sparsely Activated Transformers"): a
latency-targeted sparse (mixture-of-experts) version of the dense model.

This module is the model: configuration, building blocks, conversion, forward, knob and cost. The
recipe that trains routers, searches the architecture under the latency target and distils it is
`adaptinf.recipes.planer` (`fit`); the latency table it searches with, and its timing, is
`adaptinf.recipes.latency_table`.

Every layer holds two slots, each with a chosen block (the architecture, one "attn/ffn" string per
layer, saved readable in the method config):
- attention: "full" (all heads), "half" / "quarter" (the more important half / quarter of the
  heads), "skip";
- FFN: "dense", "3quarter" / "half" / "quarter" (the more important 3/4, 1/2, 1/4 of the intermediate
  neurons), "skip", or "moe<k>": the FFN split into E experts, each token running the k experts its
  router ranks highest.

Conversion (`from_dense`, MoEfication style): each FFN's intermediate neurons are clustered into E
equal-size experts by balanced k-means on the first projection's (normalised) rows, and reordered
so expert e holds neurons e*m..(e+1)*m-1 (m = d_ff / E), the most important expert first (importance
|up row| * |down column|); "half" width is the first E/2 experts. Attention heads are reordered by
importance the same way. Both reorderings are exact: with every expert on, an MoE layer is the dense
FFN (tests/test_planer.py). Experts are not weighted by the router: their outputs add up as the
dense FFN's neurons do.

Router (one per layer, d -> router_hidden -> E, softplus): trained by the recipe on the dense
model's FFN inputs (forward hooks, training data; the experts' input, `FeedForward.inp`: after the
block's LayerNorm in a pre-LN block) to predict the norm of each expert's output for the token
(`PlanerClassifier.expert_norms`).
Inference, for a "moe<k>" slot: the top-k experts by predicted contribution, and among those only
the ones with prediction >= (1 - tau) * max (dynamic-k). tau is the inference-time knob: 1 (or None)
runs the searched architecture as it is, 0 only each token's top expert. Below 1 the knob also runs
every "dense" FFN slot as MoE over all E experts with the same threshold (a dense FFN is the MoE
with every expert on), so one model traces a curve even when the search kept no MoE slot.

Execution (`grouped_experts`): the (token, expert) pairs are sorted by expert and the token rows
gathered once; for inference one `torch._grouped_mm` per projection runs every expert (no host sync)
where it works here, else (and always under autograd) each active expert runs one matmul pair on its
contiguous slice after one host sync per layer (the per-expert counts). No loop over tokens; padding
tokens run nothing. FFN down weights are stored column-major so an expert's weights are contiguous.

Training (`adaptinf.recipes.planer.fit`): routers; the latency table (every candidate block timed
on this machine at the deployment setting); greedy searches of the architecture under the target
(additive estimate from the table, each result's real latency measured, the aim tightened while it
misses), whose distinct results are each distilled for a few steps and the best on validation kept;
distillation from the dense model (the forward's `aux_loss` while training: distill_weight * T^2 *
KL to the teacher's logits + hidden_weight * the relative squared error of every layer's output
against the teacher's); routers refitted on the student's own FFN inputs; the final model's
measured latency, a missed target recorded.

Cost (adaptinf.flops convention), per sample at real length L: pooler + classifier, and per layer
the attention block (all, half or a quarter of the heads; 0 when skipped), the FFN (its width; 0
when skipped), or for MoE L * router + (executed experts summed over the tokens) * one expert.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptinf import flops
from adaptinf.backbone import Attention, Encoder, EncoderConfig, FeedForward, Layout, attend, linear_slice, packed_run
from adaptinf.methods.dense import DenseClassifier
from adaptinf.model import AT_DEFAULT, AdaptiveClassifier, ClassifierOutput, MethodConfig, ModelSpec

ATTN = ("full", "half", "quarter", "skip")
FFN = ("dense", "3quarter", "half", "quarter", "skip")  # plus "moe<k>"
# the fraction of the heads / intermediate neurons each static block runs (the most important first)
FRACTION = {"full": 1.0, "dense": 1.0, "3quarter": 0.75, "half": 0.5, "quarter": 0.25, "skip": 0.0}
FINE = ("quarter", "3quarter")  # the finer widths, offered to the search when `fine_widths`
KNOB_VALUES = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)


# --- configuration ----------------------------------------------------------------------------------


def _as_architecture(value: Any) -> tuple[str, ...]:
    """An architecture from a tuple/list, or a CLI string such as "full/moe2,half/dense"."""
    if isinstance(value, str):
        value = [p for p in value.strip().strip("[]()").replace(" ", "").split(",") if p]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"PlanerConfig.architecture must be a list of 'attn/ffn' strings, got {value!r}")
    return tuple(value)


def parse_slot(slot: str, num_experts: int) -> tuple[str, str, int]:
    """ "half/moe2" -> ("half", "moe", 2); k is 0 for a non-MoE FFN. ValueError naming the field."""
    parts = slot.split("/")
    bad = ValueError(
        f"PlanerConfig.architecture: {slot!r} is not 'attn/ffn' with attn in {list(ATTN)} and ffn in "
        f"{list(FFN)} or 'moe<k>' with 1 <= k <= num_experts ({num_experts})"
    )
    if len(parts) != 2 or parts[0] not in ATTN:
        raise bad
    attn, ffn = parts
    if ffn in FFN:
        return attn, ffn, 0
    if ffn.startswith("moe") and ffn[3:].isdigit() and 1 <= int(ffn[3:]) <= num_experts:
        return attn, "moe", int(ffn[3:])
    raise bad


@dataclass
class PlanerConfig(MethodConfig):
    """PLANER settings.

    num_experts: E, experts per FFN (must divide the FFN width).
    router_hidden: width of each layer's router MLP (d -> router_hidden -> E).
    kmeans_iters: iterations of the balanced k-means that groups neurons into experts.
    router_epochs, router_lr: router training (Adam) on the dense model's captured FFN inputs.
    architecture: one "attn/ffn" per layer (e.g. "half/moe2"); empty = every layer "full/moe<E>"
        before a search. A non-empty architecture is used as given: the recipe's `fit` does not search.
    latency_batch_size, latency_seq_len: the deployment setting the table is profiled and the final
        model measured at (every token real).
    latency_repeats: timed samples per block (median kept).
    latency_target: target latency as a fraction of the dense model's (table estimate), in (0, 1].
    latency_target_ms: target in milliseconds; when set it replaces latency_target.
    search_margin: the search aims at (1 - search_margin) * target: the additive estimate runs a few
        per cent under the measured latency (it misses interactions between blocks of a layer).
    proxy_samples: validation samples of the search's proxy (KL to the dense logits).
    fine_widths: the search also offers a quarter of the heads and 1/4 and 3/4 of the FFN width.
    candidates: distinct searched architectures (greedy over every block; then, in order, over widths
        only, with every FFN kept, the best uniform one, with every attention kept: those that fit)
        each distilled for `candidate_steps` steps before picking the best on validation (a trained
        proxy); 1 = the greedy result alone, no candidate distillation.
    candidate_steps: optimizer steps (batch size of the training settings) of each candidate's short
        distillation; the picked candidate's final distillation continues from its weights.
    distill_weight, distill_temperature: fine-tuning loss = task loss + weight * T^2 * KL(dense || model) at T.
    hidden_weight: + hidden_weight * the mean over the layers that run a block of the relative squared
        error of the layer's output against the dense model's same layer (real tokens; 0 = logits only).
    router_refit_samples: after the architecture is picked, and again after distillation, every
        router is refitted on the student's own FFN inputs over this many training samples (0 = never).
    finetune: fine-tune (distil) the chosen architecture with the shared trainer after the search.
    """

    # conversion and routers
    num_experts: int = 8
    router_hidden: int = 64
    kmeans_iters: int = 10
    router_epochs: int = 1
    router_lr: float = 5e-3
    # the architecture: given, or searched by the recipe under the latency target
    architecture: tuple[str, ...] = ()
    # the latency table's deployment setting, and the target (a fraction of dense, or milliseconds)
    latency_batch_size: int = 1
    latency_seq_len: int = 32
    latency_repeats: int = 5
    latency_target: float = 0.5
    latency_target_ms: float | None = None
    # search and distillation
    search_margin: float = 0.05
    proxy_samples: int = 256
    fine_widths: bool = True
    candidates: int = 3
    candidate_steps: int = 100
    distill_weight: float = 1.0
    distill_temperature: float = 2.0
    hidden_weight: float = 1.0
    router_refit_samples: int = 2048
    finetune: bool = True

    def __post_init__(self) -> None:
        self.architecture = _as_architecture(self.architecture)
        super().__post_init__()

    def validate(self) -> None:
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.num_experts) or not 2 <= self.num_experts <= 64:
            raise ValueError(f"PlanerConfig.num_experts must be an integer from 2 to 64, got {self.num_experts!r}")
        for name in ("router_hidden", "latency_batch_size", "latency_seq_len", "latency_repeats", "proxy_samples"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"PlanerConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("kmeans_iters", "router_epochs", "candidate_steps", "router_refit_samples"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"PlanerConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not number(self.router_lr) or self.router_lr <= 0:
            raise ValueError(f"PlanerConfig.router_lr must be > 0, got {self.router_lr!r}")
        if not number(self.latency_target) or not 0 < self.latency_target <= 1:
            raise ValueError(f"PlanerConfig.latency_target must be a fraction of the dense latency in (0, 1], "
                             f"got {self.latency_target!r}")
        if self.latency_target_ms is not None and (not number(self.latency_target_ms) or self.latency_target_ms <= 0):
            raise ValueError(f"PlanerConfig.latency_target_ms must be a positive number of milliseconds or null, "
                             f"got {self.latency_target_ms!r}")
        for slot in self.architecture:
            parse_slot(slot, self.num_experts)
        if not number(self.search_margin) or not 0 <= self.search_margin < 0.5:
            raise ValueError(f"PlanerConfig.search_margin must be in [0, 0.5), got {self.search_margin!r}")
        if not is_int(self.candidates) or not 1 <= self.candidates <= 5:
            raise ValueError(f"PlanerConfig.candidates must be an integer from 1 to 5 (the searches that propose "
                             f"them: adaptinf.recipes.planer.VARIANTS), got {self.candidates!r}")
        for name in ("distill_weight", "hidden_weight"):
            if not number(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"PlanerConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not number(self.distill_temperature) or self.distill_temperature <= 0:
            raise ValueError(f"PlanerConfig.distill_temperature must be > 0, got {self.distill_temperature!r}")
        for name in ("finetune", "fine_widths"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PlanerConfig.{name} must be true or false, got {getattr(self, name)!r}")


# --- cost -------------------------------------------------------------------------------------------


def expert_flops(d: int, width: int) -> int:
    """One expert (d -> width -> d) on one token."""
    return flops.linear(1, d, width) + flops.linear(1, width, d)


def router_flops(d: int, hidden: int, experts: int) -> int:
    """One router (d -> hidden -> E) on one token."""
    return flops.linear(1, d, hidden) + flops.linear(1, hidden, experts)


def half_heads(cfg: EncoderConfig) -> int:
    return heads_of(cfg, "half")


def heads_of(cfg: EncoderConfig, attn: str) -> int:
    """Heads an attention block runs ("full", "half", "quarter"; at least one)."""
    return max(1, int(cfg.num_attention_heads * FRACTION[attn]))


def width_of(cfg: EncoderConfig, ffn: str) -> int:
    """Intermediate neurons a static FFN block runs ("dense", "3quarter", "half", "quarter"; at least one)."""
    return max(1, int(cfg.intermediate_size * FRACTION[ffn]))


# --- conversion helpers ------------------------------------------------------------------------------


def balanced_assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Equal-size assignment of rows x [N, d] to centroids [E, d] (N divisible by E): (row, centroid)
    pairs are taken greedily in order of distance, each row once, each centroid up to N / E rows."""
    n, e = x.shape[0], centroids.shape[0]
    cap = n // e
    order = torch.cdist(x, centroids).flatten().argsort().tolist()
    assign, fill, left = [-1] * n, [0] * e, n
    for idx in order:  # N * E pairs, once per iteration at conversion time only
        row, c = divmod(idx, e)
        if assign[row] < 0 and fill[c] < cap:
            assign[row], fill[c], left = c, fill[c] + 1, left - 1
            if not left:
                break
    return torch.tensor(assign)


def balanced_kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Cluster the rows of x [N, d] into k clusters of exactly N / k rows (cosine geometry)."""
    x = F.normalize(x.double(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(x.shape[0], generator=g)[:k]]
    assign = balanced_assign(x, centroids)
    for _ in range(iters):
        centroids = F.normalize(torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, assign, x), dim=1)
        new = balanced_assign(x, centroids)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


@torch.no_grad()
def split_experts(ffn: FeedForward, num_experts: int, iters: int, seed: int = 0) -> torch.Tensor:
    """Reorder ffn's neurons in place so expert e is the contiguous range e*m..(e+1)*m-1, the most
    important expert first. Returns the permutation applied (new position -> old neuron)."""
    importance = ffn.up.weight.norm(dim=1) * ffn.down.weight.norm(dim=0)  # [d_ff]
    assign = balanced_kmeans(ffn.up.weight, num_experts, iters, seed)  # [d_ff]
    weight = torch.zeros(num_experts, dtype=importance.dtype).index_add_(0, assign, importance)
    rank = torch.empty(num_experts, dtype=torch.int64)
    rank[torch.argsort(weight, descending=True)] = torch.arange(num_experts)
    # sort neurons by (expert rank, importance descending)
    key = rank[assign].double() * 2 - importance.double() / (importance.max().double() * 2 + 1e-30)
    perm = torch.argsort(key)
    ffn.up.weight.copy_(ffn.up.weight[perm])
    ffn.up.bias.copy_(ffn.up.bias[perm])
    ffn.down.weight.copy_(ffn.down.weight[:, perm])
    return perm


@torch.no_grad()
def order_heads(attn: Attention) -> torch.Tensor:
    """Reorder attention heads in place, most important (|v rows| * |out columns|) first."""
    nh, hd = attn.n_heads, attn.head_dim
    out_cols = attn.out.weight.view(-1, nh, hd).transpose(0, 1).reshape(nh, -1)  # [nh, d * hd]
    importance = attn.v.weight.view(nh, -1).norm(dim=1) * out_cols.norm(dim=1)
    heads = torch.argsort(importance, descending=True)
    rows = (heads[:, None] * hd + torch.arange(hd)).reshape(-1)  # [d_attn]
    for lin in (attn.q, attn.k, attn.v):
        lin.weight.copy_(lin.weight[rows])
        lin.bias.copy_(lin.bias[rows])
    attn.out.weight.copy_(attn.out.weight[:, rows])
    return heads


# --- building blocks ---------------------------------------------------------------------------------


class Router(nn.Module):
    """Predicted contribution of every expert for a token: d -> hidden -> E, softplus (>= 0)."""

    def __init__(self, d: int, hidden: int, experts: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, experts))
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.net(x))


def select_experts(scores: torch.Tensor, k: int, tau: float | None) -> torch.Tensor:
    """Experts to run [T, E] (bool) from predicted contributions scores [T, E] (>= 0): the top k,
    and among them those >= (1 - tau) * the token's max (tau None or 1: all top k). The top expert
    always runs."""
    e = scores.shape[1]
    if k >= e:
        sel = torch.ones_like(scores, dtype=torch.bool)
    else:
        sel = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)
    if tau is not None and tau < 1:
        sel &= scores >= (1 - tau) * scores.max(dim=1, keepdim=True).values
    return sel


@functools.lru_cache(maxsize=None)
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs here (device type, dtype) and agrees with plain matmuls:
    probed once on tiny tensors. It has no CPU backward (torch 2.13), so only inference uses it."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(5, 8, generator=g).to(device_type, dtype)
        w = torch.randn(2, 4, 8, generator=g).to(device_type, dtype).transpose(1, 2)  # [2, 8, 4], as up weights are
        offs = torch.tensor([2, 5], dtype=torch.int32, device=device_type)
        got = torch._grouped_mm(x, w, offs=offs)
        want = torch.cat([x[:2] @ w[0], x[2:] @ w[1]])
        return bool(torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


def grouped_experts(x: torch.Tensor, sel: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor,
                    w_down: torch.Tensor, impl: str = "auto", act=F.gelu) -> torch.Tensor:
    """Sum of each token's selected experts (no output bias): x [T, d], sel [T, E] -> [T, d_out];
    `act`: the FFN's activation (`FeedForward.act`; GELU by default).

    Expert e is rows e*m..(e+1)*m-1 of w_up [E*m, d] and b_up, columns of w_down [d_out, E*m].
    The (token, expert) pairs are sorted by expert (`nonzero` of sel transposed is expert-major) and
    the token rows gathered once; then either
    - "grouped_mm": one `torch._grouped_mm` per projection over all experts (offsets on the device:
      no host sync at all), used for inference where it works (`grouped_mm_works`), or
    - "loop": each active expert runs one matmul pair on its contiguous slice, after one host sync
      (the per-expert counts); the portable path, and the one autograd uses.
    "auto" picks grouped_mm when no gradient is needed and it works here, else the loop.
    """
    if impl not in ("auto", "loop", "grouped_mm"):
        raise ValueError(f"grouped_experts: impl must be 'auto', 'loop' or 'grouped_mm', got {impl!r}")
    e = sel.shape[1]
    m = w_up.shape[0] // e
    d_out = w_down.shape[0]
    expert, token = sel.t().nonzero(as_tuple=True)  # [P] each, sorted by expert
    xs = x.index_select(0, token)  # [P, d]
    out = x.new_zeros(x.shape[0], d_out)
    if impl == "auto":
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_up, b_up, w_down))
        aligned = all(n * x.element_size() % 16 == 0 for n in (m, x.shape[1], d_out))  # _grouped_mm's stride rule
        impl = "grouped_mm" if not needs_grad and aligned and grouped_mm_works(x.device.type, x.dtype) else "loop"
    if impl == "grouped_mm":
        offs = torch.bincount(expert, minlength=e).cumsum(0).to(torch.int32)  # [E] group ends
        a = torch._grouped_mm(xs, w_up.view(e, m, -1).transpose(1, 2), offs=offs)  # [P, m]
        a = act(a + b_up.view(e, m).index_select(0, expert))
        ys = torch._grouped_mm(a, w_down.t().reshape(e, m, d_out), offs=offs)  # [P, d_out]
        return out.index_add_(0, token, ys)
    counts = torch.bincount(expert, minlength=e).tolist()  # the one host sync of this layer
    parts, start = [], 0
    for i, n in enumerate(counts):
        if n:
            rows = slice(i * m, (i + 1) * m)
            a = act(torch.addmm(b_up[rows], xs[start : start + n], w_up[rows].t()))  # [n, m]
            parts.append(a @ w_down[:, rows].t())  # [n, d_out]
        start += n
    if parts:
        out.index_add_(0, token, torch.cat(parts) if len(parts) > 1 else parts[0])
    return out


def attention_heads(attn: Attention, h: torch.Tensor, bias, heads: int, dropout_p: float) -> torch.Tensor:
    """The backbone's attention block with only its first `heads` heads (h padded [b, s, d] with a
    bias or Layout, or packed [T, d] with a Layout)."""
    w = heads * attn.head_dim
    x = attn.inp(h)

    def proj(lin: nn.Linear) -> torch.Tensor:
        return linear_slice(lin, x, w)  # [b, s, w] or [T, w]

    a = attend(proj(attn.q), proj(attn.k), proj(attn.v), bias, heads, dropout_p)
    return attn.residual(h, linear_slice(attn.out, a, None, w))


def ffn_width(ffn: FeedForward, h: torch.Tensor, width: int) -> torch.Tensor:
    """The backbone's FFN block with only its first `width` intermediate neurons."""
    a = ffn.act(linear_slice(ffn.up, ffn.inp(h), width))
    return ffn.residual(h, linear_slice(ffn.down, a, None, width))


@dataclass
class _Tokens:
    """The real tokens of one forward pass (local to the call, never stored)."""

    real: torch.Tensor  # [T] flat positions (b * s) of the real tokens
    sample: torch.Tensor  # [T] the sample each belongs to
    batch: int
    knob: float | None = None  # tau for this call
    experts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [T] experts run per token
    ffn_inputs: dict[int, torch.Tensor] | None = None  # layer -> [T, d] FFN inputs, when capturing (router refit)


# --- the model -------------------------------------------------------------------------------------


class PlanerClassifier(AdaptiveClassifier):
    """The dense classifier with a per-layer choice of attention and FFN blocks (MoE among them).

    extras: "experts_per_token" [b] (float): experts run per real token, averaged over the MoE layers
    (0 without MoE layers).
    """

    Config = PlanerConfig
    method = "planer"
    knob_name = "tau"
    description = "PLANER: per-layer attention/FFN/MoE blocks searched under a latency target from a profiled latency table"

    def __init__(self, spec: ModelSpec, config: PlanerConfig | None = None):
        super().__init__(spec, config)
        cfg, e = spec.encoder, self.config.num_experts
        if cfg.intermediate_size % e or cfg.intermediate_size // e < 1:
            raise ValueError(f"PlanerConfig.num_experts ({e}) must divide the FFN width "
                             f"(intermediate_size {cfg.intermediate_size})")
        if self.config.architecture and len(self.config.architecture) != cfg.num_hidden_layers:
            raise ValueError(f"PlanerConfig.architecture has {len(self.config.architecture)} entries; "
                             f"the model has {cfg.num_hidden_layers} layers (one 'attn/ffn' per layer)")
        self.encoder = Encoder(cfg)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(cfg.hidden_size, spec.num_labels)
        self.routers = nn.ModuleList(Router(cfg.hidden_size, self.config.router_hidden, e)
                                     for _ in range(cfg.num_hidden_layers))
        self.routers.requires_grad_(False)  # trained by their own phase of the recipe, never end to end
        for block in self.encoder.blocks:
            # FFN down weights [d, d_ff] stored column-major, so an expert's columns are one contiguous
            # [m, d] block (its matmul reads no strided weight); loading copies into this layout
            w = block.ffn.down.weight
            block.ffn.down.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)
        self._teacher: list[DenseClassifier] = []  # the frozen dense model (not a submodule: never saved)
        self._arch: list[tuple[str, str, int]] = []
        self.set_architecture(list(self.config.architecture) or self.default_architecture())

    # --- architecture ---------------------------------------------------------------------------
    def default_architecture(self) -> list[str]:
        """Before a search: all heads and every expert in every layer (the dense model's function)."""
        return [f"full/moe{self.config.num_experts}"] * self.spec.encoder.num_hidden_layers

    @property
    def architecture(self) -> list[str]:
        return [f"{a}/{f}{k if f == 'moe' else ''}" for a, f, k in self._arch]

    def set_architecture(self, arch: list[str]) -> None:
        """Use `arch` (one "attn/ffn" per layer); blocks that never run stop being trainable."""
        if len(arch) != self.spec.encoder.num_hidden_layers:
            raise ValueError(f"architecture has {len(arch)} entries, the model has {self.spec.encoder.num_hidden_layers} layers")
        self._arch = [parse_slot(s, self.config.num_experts) for s in arch]
        for block, (a, f, _) in zip(self.encoder.blocks, self._arch):
            block.attention.requires_grad_(a != "skip")
            block.ffn.requires_grad_(f != "skip")

    @contextlib.contextmanager
    def using_architecture(self, arch: list[str]):
        before = self.architecture
        self.set_architecture(arch)
        try:
            yield self
        finally:
            self.set_architecture(before)

    # --- conversion -----------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, dense: AdaptiveClassifier, config: PlanerConfig | None = None) -> PlanerClassifier:
        """Everything from the dense model; heads ordered by importance, FFN neurons grouped into
        experts (an exact reordering); fresh routers; the dense model kept, frozen, as the teacher."""
        if not isinstance(dense, DenseClassifier):
            raise ValueError(f"conversion needs a dense model, got method {dense.method!r}")
        model = cls(dense.spec, config or PlanerConfig())
        missing = model.load_state_dict(dense.state_dict(), strict=False).missing_keys
        assert all(k.startswith("routers.") for k in missing), missing
        model.dropout.p = dense.dropout.p
        for i, block in enumerate(model.encoder.blocks):
            order_heads(block.attention)
            split_experts(block.ffn, model.config.num_experts, model.config.kmeans_iters, seed=i)
        teacher = copy.deepcopy(dense).eval()
        teacher.requires_grad_(False)
        model._teacher = [teacher]
        return model

    # --- knob -----------------------------------------------------------------------------------
    def knob_values(self) -> list[float]:
        return list(KNOB_VALUES)

    def check_knob(self, value: float | None) -> float | None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or not 0 <= value <= 1):
            raise ValueError(f"planer: the tau knob must be a number in [0, 1] (dynamic-k threshold: experts "
                             f">= (1 - tau) * max among the top k), got {value!r}")
        return super().check_knob(None if value is None else float(value))

    # --- forward --------------------------------------------------------------------------------
    def prepare(self, input_ids, attention_mask, token_type_ids=None, knob=AT_DEFAULT) -> tuple[torch.Tensor, torch.Tensor, _Tokens]:
        """Embeddings [b, s, d], the SDPA mask and the real-token context of a batch (with the knob)."""
        b, s = attention_mask.shape  # (input_ids of a vision encoder are [b, s, C*p*p])
        h = self.encoder.embed(input_ids, token_type_ids)
        real = attention_mask.reshape(-1).nonzero().squeeze(1)  # [T] (one host sync per forward)
        mask = self.token_mask(attention_mask, h.dtype)
        if isinstance(mask, Layout):
            mask.share_index(real)  # the same real tokens: no second sync
        return h, mask, _Tokens(real, torch.div(real, s, rounding_mode="floor"), b,
                                                                  knob=self.run_knob(knob))

    def run_layer(self, layer: int, h: torch.Tensor, bias: torch.Tensor, ctx: _Tokens,
                  slot: tuple[str, str, int] | None = None) -> torch.Tensor:
        """Layer `layer` with its chosen blocks (or `slot`) on h [b, s, d]."""
        a, f, k = slot or self._arch[layer]
        block = self.encoder.blocks[layer]
        cfg = self.spec.encoder
        # with a Layout `bias` (inference) every block runs on the real tokens only (`packed_run`)
        if a == "full":
            h = block.attention(h, bias)
        elif a != "skip":
            p = block.attention.attn_dropout if self.training else 0.0
            h = packed_run(lambda x, m: attention_heads(block.attention, x, m, heads_of(cfg, a), p), h, bias)
        if ctx.ffn_inputs is not None and f != "skip":  # router refit: this layer's experts' input, real tokens
            x = h.reshape(-1, h.shape[-1]).index_select(0, ctx.real) if h.dim() == 3 else h
            ctx.ffn_inputs[layer] = block.ffn.inp(x)
        if f == "dense" and ctx.knob is not None and ctx.knob < 1:
            h = self._moe(layer, block.ffn, h, ctx, self.config.num_experts)  # the knob thins dense FFNs too
        elif f == "dense":
            h = packed_run(lambda x, _: block.ffn(x), h, bias)
        elif f == "moe":
            h = self._moe(layer, block.ffn, h, ctx, k)
        elif f != "skip":
            h = packed_run(lambda x, _: ffn_width(block.ffn, x, width_of(cfg, f)), h, bias)
        return h

    def _moe(self, layer: int, ffn: FeedForward, h: torch.Tensor, ctx: _Tokens, k: int) -> torch.Tensor:
        b, s, d = h.shape
        flat = h.reshape(b * s, d)
        x = ffn.inp(flat.index_select(0, ctx.real))  # [T, d] the experts' (and router's) input
        with torch.no_grad():
            sel = select_experts(self.routers[layer](x), k, ctx.knob)  # [T, E]
        y = grouped_experts(x, sel, ffn.up.weight, ffn.up.bias, ffn.down.weight, act=ffn.act) + ffn.down.bias  # [T, d]
        ctx.experts[layer] = sel.sum(dim=1)
        out = flat.new_zeros(b * s, d).index_copy(0, ctx.real, y)  # padding rows: 0
        return ffn.residual(h, out.view(b, s, d))

    def forward(self, input_ids, attention_mask, token_type_ids=None, knob=AT_DEFAULT) -> ClassifierOutput:
        h, bias, ctx = self.prepare(input_ids, attention_mask, token_type_ids, knob)
        distil = self.training and bool(self._teacher) and (self.config.distill_weight > 0 or self.config.hidden_weight > 0)
        states = []  # (layer, output [b, s, d]) of the layers that run a block, for hidden-state distillation
        for layer in range(len(self.encoder.blocks)):
            h = self.run_layer(layer, h, bias, ctx)
            if distil and self._arch[layer][:2] != ("skip", "skip"):
                states.append((layer, h))
        logits = self.classifier(self.dropout(self.encoder.pool(h)))  # [b, C]
        lengths = flops.lengths_of(attention_mask)
        executed = {l: torch.zeros(ctx.batch, dtype=torch.int64, device=h.device).index_add_(0, ctx.sample, n)
                    for l, n in ctx.experts.items()}  # layer -> [b] experts run, summed over tokens
        cost = self.cost(lengths, executed)
        per_token = sum(executed.values(), torch.zeros(ctx.batch, dtype=torch.int64, device=h.device))
        extras = {"experts_per_token": per_token.double() / (lengths.clamp_min(1) * max(1, len(executed)))}
        aux = self.distillation_loss(input_ids, token_type_ids, bias, ctx.real, logits, states) if distil else None
        return ClassifierOutput(logits=logits, flops=cost, aux_loss=aux, extras=extras)

    def distillation_loss(self, input_ids, token_type_ids, bias, real: torch.Tensor, logits: torch.Tensor,
                          states: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """distill_weight * T^2 * KL(dense || model) of the logits at T, plus hidden_weight * the mean
        over `states` (layer, output [b, s, d]) of the relative squared error against the dense
        model's output of the same layer, on the real tokens `real` [T] (flat positions; the teacher
        runs padded with the same mask `bias`, as training does)."""
        teacher, c = self._teacher[0], self.config
        with torch.no_grad():
            t = teacher.encoder.embed(input_ids, token_type_ids)  # [b, s, d]
            t_states = []
            for block in teacher.encoder.blocks:
                t = block(t, bias)
                t_states.append(t)
            t_logits = teacher.classifier(teacher.encoder.pool(t))  # [b, C] (the teacher is in eval mode)
        T = c.distill_temperature
        kl = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True,
                      reduction="batchmean")
        aux = c.distill_weight * T * T * kl
        if c.hidden_weight > 0 and states:
            err = 0.0
            for layer, h in states:
                s_h = h.reshape(-1, h.shape[-1]).index_select(0, real)  # [T, d]
                t_h = t_states[layer].reshape(-1, h.shape[-1]).index_select(0, real)
                err = err + (s_h - t_h).pow(2).sum() / t_h.pow(2).sum().clamp_min(1e-12)
            aux = aux + c.hidden_weight * err / len(states)
        return aux

    # --- cost -----------------------------------------------------------------------------------
    def cost(self, lengths: torch.Tensor, executed: dict[int, torch.Tensor]) -> torch.Tensor:
        """FLOPs [b] (float64) of samples of real lengths [b]; executed[layer] = experts run [b]
        (summed over the sample's tokens) in each layer whose FFN ran as MoE."""
        cfg = self.spec.encoder
        d, dff, e = cfg.hidden_size, cfg.intermediate_size, self.config.num_experts
        total = flops.embeddings(lengths, cfg) + flops.head(cfg, self.spec.num_labels)
        for layer, (a, f, _) in enumerate(self._arch):
            if a != "skip":
                total = total + flops.attention_block(lengths, d, d if a == "full" else heads_of(cfg, a) * cfg.head_dim)
            if layer in executed:  # ran as MoE: "moe<k>", or "dense" at a knob below 1
                total = total + lengths * router_flops(d, self.config.router_hidden, e)
                total = total + executed[layer] * expert_flops(d, dff // e)
            elif f not in ("skip", "moe"):
                total = total + flops.ffn_block(lengths, d, width_of(cfg, f))
        return total.to(torch.float64)

    # --- latency table interface (adaptinf.recipes.latency_table) ---------------------------------
    def block_choices(self) -> list[str]:
        """Every candidate block of a slot: "attn:<full|half|skip>", "ffn:<dense|half|skip|moe<k>>", and
        with `fine_widths` "attn:quarter", "ffn:quarter", "ffn:3quarter"."""
        e = self.config.num_experts
        ks = sorted({k for k in (1, 2, e // 4, e // 2, e) if 1 <= k <= e})
        keep = (lambda n: True) if self.config.fine_widths else (lambda n: n not in FINE)
        return ([f"attn:{a}" for a in ATTN if keep(a)] + [f"ffn:{f}" for f in FFN if keep(f)]
                + [f"ffn:moe{k}" for k in ks])

    def latency_shape(self) -> dict:
        cfg = self.spec.encoder
        return {"hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
                "intermediate_size": cfg.intermediate_size, "num_experts": self.config.num_experts,
                "router_hidden": self.config.router_hidden, "num_labels": self.spec.num_labels}

    # --- the router's target (trained by adaptinf.recipes.planer.train_routers) ------------------
    def expert_norms(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The norm of every expert's output (no bias) for FFN inputs x [T, d] (`FeedForward.inp`:
        after the LayerNorm in a pre-LN block) -> [T, E]: the router's target."""
        ffn, e = self.encoder.blocks[layer].ffn, self.config.num_experts
        a = ffn.act(F.linear(x, ffn.up.weight, ffn.up.bias)).view(x.shape[0], e, -1)  # [T, E, m]
        w = ffn.down.weight.view(ffn.down.weight.shape[0], e, -1)  # [d, E, m]
        return torch.einsum("tem,dem->ted", a, w).norm(dim=-1)
