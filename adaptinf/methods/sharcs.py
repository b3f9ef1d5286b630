"""SHARCS: per-sample routing to dynamic-width sub-networks (the SHARCS paper, Salehi et al.).

Layers 1..k run at full width; after layer k a router (an MLP on the mask-aware mean of the token
states) picks a width w for the rest of the network. Every width shares the weights: the width-w
sub-network is the leading slice of every weight, so heads, FFN neurons and (with a shrinking
residual) residual dimensions are first sorted by importance (`reorder`, DynaBERT-style
gradient x activation on training data). Width w keeps round(w * heads) heads and round(w * d_ff)
FFN neurons; in the paper's version (`shrink_residual`, the default) the residual stream shrinks
too, to the kept heads' size: the router step slices the hidden state and normalises it with a
LayerNorm private to w, and every later LayerNorm has a private copy per width (a pre-LN encoder, ViT:
no norm at the router step, and the final LayerNorm before pooling gets a private copy per width too).
Width 1.0 uses the dense model's own weights and norms, so it is exactly the dense model.

Where things happen:
- the routing decision: `SharcsClassifier.route` (router logits + the knob -> width per sample);
- batched inference: `SharcsClassifier._routed` (samples grouped by width, each group cut to its
  longest real length and run as dense matmuls on the sliced weights; one host sync per forward);
- a width's layers: `sliced_block`;
- cost: `SharcsClassifier.cost`;
- importance reordering (model surgery): `SharcsClassifier.permute`, scored and applied by the
  recipe (`adaptinf.recipes.sharcs.reorder`);
- the training loss (every width on the batch, narrow widths distilled from the full one):
  `SharcsClassifier.loss`; the router fit on cached features: `adaptinf.recipes.sharcs.train_router`;
- training (the loop, the per-epoch hardness scores, ordinal labels, resume): `adaptinf/recipes/sharcs.py`.

Knob ("threshold" t, inference-time; ordinal routing): the router gives, per sample, a logit z_i
per width, trained against monotone labels (a sample allowed at width w is allowed at every larger
width), so sigmoid(z_i) estimates "width i is enough for this sample". A sample goes to the
smallest width whose probability is >= t, the largest width when none is. t <= 0 sends every
sample to the smallest width, t >= 1 every sample to the largest (the dense model); None is the
router's own decision (t = 0.5). Raising t can only move a sample to a larger width (the set of
widths that clear t shrinks), so cost is monotone in the knob.

Cost (adaptinf.flops convention): k full blocks, the router (one add per token state element for
the mean, plus its two Linears), the L - k blocks at the routed width, the pooler (d_w -> d) and
the classifier, each at the sample's real length.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adaptinf import flops
from adaptinf.backbone import Attention, Encoder, FeedForward, PatchEmbeddings, attend, linear_slice, packed_run
from adaptinf.data import Encoded, eval_batches
from adaptinf.methods.dense import DenseClassifier
from adaptinf.model import AT_DEFAULT, AdaptiveClassifier, ClassifierOutput, MethodConfig, ModelSpec, SweepPoint

ALL_SMALLEST, ALL_FULL = 0.0, 1.0  # knob values that send every sample to the smallest / largest width
DEFAULT_THRESHOLD = 0.5  # knob None: the router's own decision
# fields of the earlier one-width-per-batch training, dropped when an old saved config is read
_RETIRED_FIELDS = ("oversample", "warmup_all_widths", "nested_training")


# --- configuration ----------------------------------------------------------------------------------


def _as_floats(value: Any, name: str) -> tuple[float, ...]:
    """A tuple of floats from a tuple/list or a string such as "0.25,0.5,1" or "[0.25, 0.5, 1]"."""
    if isinstance(value, str):
        value = [p for p in value.strip().strip("[]()").replace(" ", "").split(",") if p]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    try:
        if any(isinstance(v, bool) for v in value):
            raise TypeError
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"SharcsConfig.{name} must be a list of numbers such as [0.25, 0.5, 1.0], got {value!r}") from None


def _as_intervals(value: Any) -> tuple[tuple[float, float], ...]:
    """Confidence intervals from [[lo, hi], ...] (a JSON string is accepted, as `--set` may pass one)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(
                f"SharcsConfig.confidence_intervals must be a list of [lo, hi] pairs such as "
                f"[[0.8, 1.0], [0.5, 0.8], [0.0, 0.5]], got {value!r}"
            ) from None
    try:
        out = tuple((float(lo), float(hi)) for lo, hi in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"SharcsConfig.confidence_intervals must be a list of [lo, hi] pairs, one per width, got {value!r}"
        ) from None
    return out


@dataclass
class SharcsConfig(MethodConfig):
    """SHARCS settings.

    router_layer: k, the 1-based layer after which the router sits (layers 1..k run at full width);
        None = a third of the layers (2 of 6), at least 1.
    widths: the width fractions, increasing, ending at 1.0 (the fallback for hard samples).
    shrink_residual: True (the paper): the residual stream shrinks with the heads, with private
        LayerNorms per width; False: only heads and FFN neurons shrink (DynaBERT-style).
    router_hidden: hidden size of the router MLP (d -> router_hidden -> len(widths)).
    window: W, how many of the last epochs' hardness scores a router label looks at (fewer when
        fewer epochs ran). At the end of every epoch each training sample is scored at every width
        in eval mode (its true-class probability); the router is fitted after training on labels
        from the last W scores up to the kept epoch.
    confidence_intervals: one [lo, hi] per width; the router label of width i is "allowed" when
        width i's own true-class probability is >= lo_i in each of the W scores (ordinal labels use
        the lower end only), then made monotone: allowed at a width -> allowed at every larger one.
        The largest width is always allowed.
    distill_weight: every training step runs every width on the batch and sums their losses (the
        sandwich rule); the full width learns from the labels, each narrower width from
        distill_weight * KL(full width's detached prediction || its own) + (1 - distill_weight) * CE.
    task_weight, router_weight: training loss = task_weight * (the widths' summed loss), and the
        router's BCE (weight router_weight) when router targets are given to `forward`.
    router_fit_epochs, router_lr: the router fit after training (AdamW, batch 64, on the cached
        mask-aware means of layer k's output; 0 epochs = no router fit; passes over those cached
        features, not over the data: `adaptinf run`'s training budget does not count them).
    importance_samples: training samples used to score heads/neurons/dimensions for `reorder`
        (0 = keep the dense model's order).
    classifier_dropout: dropout before the classifier in training (the dense model's 0.1).
    """

    router_layer: int | None = None
    widths: tuple[float, ...] = (0.25, 0.5, 1.0)
    shrink_residual: bool = True
    router_hidden: int = 256
    window: int = 3
    confidence_intervals: tuple[tuple[float, float], ...] = ((0.8, 1.0), (0.5, 0.8), (0.0, 0.5))
    distill_weight: float = 1.0
    task_weight: float = 1.0
    router_weight: float = 1.0
    router_fit_epochs: int = 20
    router_lr: float = 1e-3
    importance_samples: int = 1024
    classifier_dropout: float = 0.1

    def __post_init__(self) -> None:
        self.widths = _as_floats(self.widths, "widths")
        self.confidence_intervals = _as_intervals(self.confidence_intervals)
        super().__post_init__()

    @classmethod
    def from_dict(cls, d: dict) -> SharcsConfig:
        """As `MethodConfig.from_dict`; the fields of the earlier one-width-per-batch training
        (oversample, warmup_all_widths, nested_training), which configs saved before may carry, are
        dropped (training now runs every width on every batch)."""
        return super().from_dict({k: v for k, v in d.items() if k not in _RETIRED_FIELDS})

    def validate(self) -> None:
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.router_layer is not None and (not is_int(self.router_layer) or self.router_layer < 1):
            raise ValueError(f"SharcsConfig.router_layer must be a layer number >= 1 (or null), got {self.router_layer!r}")
        w = self.widths
        if len(w) < 2:
            raise ValueError(f"SharcsConfig.widths needs at least two widths, such as [0.25, 1.0], got {list(w)}")
        if list(w) != sorted(set(w)):
            raise ValueError(f"SharcsConfig.widths must be increasing without repeats, got {list(w)}; use {sorted(set(w))}")
        if not (0.0 < w[0] and w[-1] == 1.0):
            raise ValueError(f"SharcsConfig.widths must lie in (0, 1] and end at 1.0 (the full model), got {list(w)}")
        if not isinstance(self.shrink_residual, bool):
            raise ValueError(f"SharcsConfig.shrink_residual must be true or false, got {self.shrink_residual!r}")
        if not is_int(self.router_hidden) or self.router_hidden < 1:
            raise ValueError(f"SharcsConfig.router_hidden must be a positive int, got {self.router_hidden!r}")
        if not is_int(self.window) or self.window < 1:
            raise ValueError(f"SharcsConfig.window must be a positive number of epochs, got {self.window!r}")
        if len(self.confidence_intervals) != len(w):
            raise ValueError(
                f"SharcsConfig.confidence_intervals needs one [lo, hi] per width: {len(w)} widths {list(w)}, "
                f"{len(self.confidence_intervals)} intervals"
            )
        for width, (lo, hi) in zip(w, self.confidence_intervals):
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(
                    f"SharcsConfig.confidence_intervals: width {width} has [{lo}, {hi}]; need 0 <= lo < hi <= 1"
                )
        for name in ("task_weight", "router_weight", "distill_weight", "router_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"SharcsConfig.{name} must be a non-negative number, got {v!r}")
        if self.task_weight == 0:
            raise ValueError("SharcsConfig.task_weight must be positive: the sub-networks train on the task loss")
        if self.distill_weight > 1:
            raise ValueError(f"SharcsConfig.distill_weight must be in [0, 1] (1 = narrow widths learn from the full "
                             f"width only), got {self.distill_weight}")
        if not is_int(self.router_fit_epochs) or self.router_fit_epochs < 0:
            raise ValueError(f"SharcsConfig.router_fit_epochs must be a non-negative int, got {self.router_fit_epochs!r}")
        if not is_int(self.importance_samples) or self.importance_samples < 0:
            raise ValueError(
                f"SharcsConfig.importance_samples must be a non-negative int (0 = no reordering), got {self.importance_samples!r}"
            )
        if not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(f"SharcsConfig.classifier_dropout must be in [0, 1), got {self.classifier_dropout}")


@dataclass(frozen=True)
class WidthShape:
    """What width w keeps of every adaptive layer: heads, residual size, attention size, FFN neurons."""

    width: float
    heads: int
    hidden: int  # residual stream size after the router (d_w; d when the residual does not shrink)
    attn: int  # heads * head_dim
    ffn: int


def width_shapes(cfg, widths: tuple[float, ...], shrink_residual: bool) -> list[WidthShape]:
    """The shape of each width on encoder `cfg` (whole heads, at least one head and one neuron)."""
    shapes = []
    for w in widths:
        heads = max(1, math.floor(w * cfg.num_attention_heads + 0.5))
        attn = heads * cfg.head_dim
        ffn = max(1, math.floor(w * cfg.intermediate_size + 0.5))
        shapes.append(WidthShape(w, heads, attn if shrink_residual else cfg.hidden_size, attn, ffn))
    for a, b in zip(shapes, shapes[1:]):
        if a.heads == b.heads:
            raise ValueError(
                f"SharcsConfig.widths {a.width} and {b.width} both keep {a.heads} of the model's "
                f"{cfg.num_attention_heads} attention heads; choose widths that differ by at least one head"
            )
    return shapes


# --- building blocks ---------------------------------------------------------------------------------


def masked_mean(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over each row's real tokens: h [b, s, d], mask [b, s] -> [b, d]."""
    keep = attention_mask[:, : h.shape[1]].to(h.dtype)  # [b, s]
    return (h * keep[..., None]).sum(dim=1) / keep.sum(dim=1, keepdim=True)


def sliced_attention(att: Attention, h: torch.Tensor, bias: torch.Tensor, heads: int, norm: nn.LayerNorm) -> torch.Tensor:
    """`Attention.forward` on the leading `heads` heads and the first h.shape[-1] residual dims
    (h padded [b, s, w] with a bias or a Layout, or packed [T, w] with a Layout), with `norm` in
    place of the block's LayerNorm (where the block has it: `Attention.inp` / `.residual`).

    Weight slices are views (no copy), run as ordinary dense matmuls; with every head and the full
    residual this is the same computation as the module's own forward.
    """
    d = h.shape[-1]
    da = heads * att.head_dim
    x = att.inp(h, norm)

    def project(lin: nn.Linear) -> torch.Tensor:
        return linear_slice(lin, x, da, d)  # [b, s, da] or packed [T, da]

    p = att.attn_dropout if att.training else 0.0
    a = attend(project(att.q), project(att.k), project(att.v), bias, heads, p)
    return att.residual(h, linear_slice(att.out, a, d, da), norm)


def sliced_ffn(ffn: FeedForward, h: torch.Tensor, neurons: int, norm: nn.LayerNorm) -> torch.Tensor:
    """`FeedForward.forward` on the first `neurons` intermediate neurons and h.shape[-1] residual dims."""
    d = h.shape[-1]
    u = ffn.act(linear_slice(ffn.up, ffn.inp(h, norm), neurons, d))  # [b, s, neurons]
    return ffn.residual(h, linear_slice(ffn.down, u, d, neurons), norm)


def sliced_block(block, h, bias, shape: WidthShape, attn_norm: nn.LayerNorm, ffn_norm: nn.LayerNorm) -> torch.Tensor:
    """One encoder block at width `shape` on hidden states h [b, s, shape.hidden]."""
    h = sliced_attention(block.attention, h, bias, shape.heads, attn_norm)
    return sliced_ffn(block.ffn, h, shape.ffn, ffn_norm)


class WidthNorms(nn.Module):
    """The LayerNorms private to one reduced width: two per adaptive layer, and the router step's
    (`reduce`, post-LN: the sliced stream is normalised again) or the final one (`final`, pre-LN:
    the sliced stream goes on un-normalised, the final LayerNorm before pooling is at width d_w)."""

    def __init__(self, hidden: int, layers: int, eps: float, pre_norm: bool = False):
        super().__init__()
        self.reduce = None if pre_norm else nn.LayerNorm(hidden, eps=eps)
        self.attn = nn.ModuleList(nn.LayerNorm(hidden, eps=eps) for _ in range(layers))
        self.ffn = nn.ModuleList(nn.LayerNorm(hidden, eps=eps) for _ in range(layers))
        self.final = nn.LayerNorm(hidden, eps=eps) if pre_norm else None


@torch.no_grad()
def _permute_embeddings(emb: nn.Module, hidden: torch.Tensor) -> list[nn.LayerNorm]:
    """Reorder the residual dimensions [d] the embeddings write (new position -> old index); returns
    the LayerNorms over d among them, for the caller to reorder with the rest."""
    if isinstance(emb, PatchEmbeddings):  # ViT: patch projection rows, CLS token, positions
        for t in (emb.projection.weight, emb.projection.bias, emb.cls):
            t.copy_(t[hidden])
        emb.position.copy_(emb.position[:, hidden])
        return []
    if emb.project is not None:  # ELECTRA: the projection to d writes the residual
        emb.project.weight.copy_(emb.project.weight[hidden])
        emb.project.bias.copy_(emb.project.bias[hidden])
        return []
    for e in (emb.word, emb.position, emb.token_type):
        e.weight.copy_(e.weight[:, hidden])
    return [emb.norm]


@torch.no_grad()
def _copy_slice(dst: nn.LayerNorm, src: nn.LayerNorm) -> None:
    n = dst.weight.shape[0]
    dst.weight.copy_(src.weight[:n])
    dst.bias.copy_(src.bias[:n])


# --- the model ---------------------------------------------------------------------------------------


class SharcsClassifier(AdaptiveClassifier):
    """Full-width layers 1..k, a router, then layers k+1..L at the routed width (see the module doc).

    forward(input_ids, attention_mask, token_type_ids=None, width=None, router_targets=None):
    - `width` (an index into config.widths) runs every sample at that width (what training does:
      one width per batch); in training mode with no width, every width runs on the whole batch
      (`extras["width_logits"]` [n_w, b, C], logits = the full width's) and `loss` sums them.
    - eval mode, no width: batched routing with the knob.
    - training mode: `aux_loss` = router_weight * BCE(router logits, router_targets [b, n_w]);
      without targets the label "the largest width only" (the recipe fits the router after training,
      on cached features: `adaptinf.recipes.sharcs.train_router`).
    extras: "width_pct" [b] (the width each sample ran at, in percent), "router_logits" [b, n_w].
    """

    method = "sharcs"
    Config = SharcsConfig
    knob_name = "threshold"
    description = "SHARCS: a router after layer k sends each sample to a width-sliced sub-network for the remaining layers"

    def __init__(self, spec: ModelSpec, config: SharcsConfig | None = None):
        super().__init__(spec, config)
        cfg, c = spec.encoder, self.config
        layers = cfg.num_hidden_layers
        if layers < 2:
            raise ValueError("SHARCS needs at least 2 layers: full-width layers before the router and adaptive ones after")
        self.router_layer = c.router_layer if c.router_layer is not None else max(1, layers // 3)
        if self.router_layer > layers - 1:
            raise ValueError(
                f"SharcsConfig.router_layer is {self.router_layer}, but the model has {layers} layers: "
                f"the router must leave at least one layer after it (use 1..{layers - 1})"
            )
        self.shapes = width_shapes(cfg, c.widths, c.shrink_residual)
        self.encoder = Encoder(cfg)
        self.dropout = nn.Dropout(c.classifier_dropout)
        self.classifier = nn.Linear(cfg.hidden_size, spec.num_labels)
        self.router = nn.Sequential(nn.Linear(cfg.hidden_size, c.router_hidden), nn.ReLU(),
                                    nn.Linear(c.router_hidden, len(c.widths)))
        for lin in (self.router[0], self.router[2], self.classifier):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        adaptive = layers - self.router_layer
        # private norms for the reduced widths (width 1.0 keeps the dense model's own norms)
        self.width_norms = nn.ModuleList(
            WidthNorms(s.hidden, adaptive, cfg.layer_norm_eps, cfg.pre_norm) for s in self.shapes[:-1]
        ) if c.shrink_residual else nn.ModuleList()
        self.init_private_norms()
        pct = torch.tensor([round(100 * s.width) for s in self.shapes])
        self.register_buffer("width_pct", pct, persistent=False)  # width index -> percent (extras)

    @property
    def num_widths(self) -> int:
        return len(self.shapes)

    @property
    def adaptive_blocks(self) -> list:
        return list(self.encoder.blocks[self.router_layer:])

    @torch.no_grad()
    def init_private_norms(self) -> None:
        """Each private LayerNorm starts as the leading slice of the shared one it replaces (the router
        step's from layer k's output norm)."""
        for norms in self.width_norms:
            if norms.reduce is not None:
                _copy_slice(norms.reduce, self.encoder.blocks[self.router_layer - 1].ffn.norm)
            if norms.final is not None:
                _copy_slice(norms.final, self.encoder.final_norm)
            for j, block in enumerate(self.adaptive_blocks):
                _copy_slice(norms.attn[j], block.attention.norm)
                _copy_slice(norms.ffn[j], block.ffn.norm)

    @classmethod
    def from_dense(cls, dense: AdaptiveClassifier, config: SharcsConfig | None = None) -> SharcsClassifier:
        """Encoder and classifier from the dense model (so width 1.0 is the dense model), a fresh
        router, private norms from slices of the dense norms. Importance reordering needs data: it
        is the first step of the recipe (`adaptinf.recipes.sharcs.fit`, `reorder` there)."""
        if not isinstance(dense, DenseClassifier):
            raise ValueError(f"conversion needs a dense model, got method {dense.method!r}")
        model = cls(dense.spec, config or SharcsConfig())
        model.encoder.load_state_dict(dense.encoder.state_dict())
        model.classifier.load_state_dict(dense.classifier.state_dict())
        model.init_private_norms()
        return model

    # --- knob and routing -----------------------------------------------------------------------
    def knob_values(self) -> list[float]:
        """Thresholds from 0 (every sample at the smallest width) to 1 (every sample at full width),
        denser near the ends, where router probabilities of a confident router gather."""
        mid = [round(0.05 * i, 2) for i in range(1, 20)]  # 0.05 .. 0.95
        return [ALL_SMALLEST, 0.001, 0.005, 0.01, 0.02, 0.03] + mid + [0.97, 0.98, 0.99, 0.995, 0.999, ALL_FULL]

    def check_knob(self, value: float | None) -> float | None:
        self._check_knob(value)
        return super().check_knob(None if value is None else float(value))

    def _check_knob(self, value) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise ValueError(f"sharcs: the threshold knob must be a finite number (0 = every sample at the smallest "
                             f"width, 1 = every sample at full width), got {value!r}")

    def route(self, router_logits: torch.Tensor, knob: float | None) -> torch.Tensor:
        """The width index [b] of every sample: the smallest i with sigmoid(z_i) >= knob (the largest
        width when none; knob None = 0.5). Compared in logit space, so thresholds near 1 stay exact
        where float32 sigmoids saturate. No host sync (the knob is a Python number)."""
        t = DEFAULT_THRESHOLD if knob is None else float(knob)
        b, n_w = router_logits.shape
        if t <= ALL_SMALLEST or t >= ALL_FULL:
            fill = 0 if t <= ALL_SMALLEST else n_w - 1
            return torch.full((b,), fill, dtype=torch.int64, device=router_logits.device)
        cut = math.log(t) - math.log1p(-t)  # logit(t)
        ok = router_logits[:, :-1].double() >= cut  # [b, n_w - 1]
        ok = torch.cat([ok, ok.new_ones(b, 1)], dim=1)  # the largest width takes the rest
        return ok.to(torch.int8).argmax(dim=-1)  # the first width that clears t (argmax returns the first)

    # --- cost -----------------------------------------------------------------------------------
    def _shared_cost(self, lengths: torch.Tensor) -> torch.Tensor:
        """FLOPs [b] every width pays: the embeddings (a projection, if any), the k full-width blocks
        and the router (mean + two Linears)."""
        cfg = self.spec.encoder
        d, r = cfg.hidden_size, self.config.router_hidden
        router = lengths * d + flops.linear(1, d, r) + flops.linear(1, r, self.num_widths)
        return flops.embeddings(lengths, cfg) + self.router_layer * flops.block(lengths, cfg) + router

    def _suffix_costs(self, lengths: torch.Tensor) -> torch.Tensor:
        """FLOPs [n_w, b] of the adaptive blocks at each width, the pooler (d_w -> d) and the classifier."""
        cfg = self.spec.encoder
        adaptive = cfg.num_hidden_layers - self.router_layer
        out = []
        for s in self.shapes:
            block = flops.attention_block(lengths, s.hidden, s.attn) + flops.ffn_block(lengths, s.hidden, s.ffn)
            pooler = flops.linear(1, s.hidden, cfg.hidden_size) if cfg.pooler else 0
            head = pooler + flops.linear(1, cfg.hidden_size if cfg.pooler else s.hidden, self.spec.num_labels)
            out.append(adaptive * block + head)
        return torch.stack(out)

    def cost(self, width_index: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """FLOPs [b] (float64) of samples of real lengths [b] that ran at widths `width_index` [b]."""
        suffix = self._suffix_costs(lengths).gather(0, width_index[None])[0]
        return (self._shared_cost(lengths) + suffix).to(torch.float64)

    # --- forward --------------------------------------------------------------------------------
    def _prefix(self, input_ids, attention_mask, token_type_ids):
        """Layers 1..k at full width and the router: (h [b, s, d], bias, router logits [b, n_w])."""
        h = self.encoder.embed(input_ids, token_type_ids)  # [b, s, d]
        bias = self.token_mask(attention_mask, h.dtype)  # a Layout at inference: padding-free
        h = self.encoder.run_blocks(h, bias, 0, self.router_layer)
        return h, bias, self.router(masked_mean(h, attention_mask))

    def _suffix(self, h: torch.Tensor, bias: torch.Tensor, i: int) -> torch.Tensor:
        """Layers k+1..L, pooler and classifier at width i: h [m, s, d] -> logits [m, C]."""
        shape = self.shapes[i]
        private = self.width_norms[i] if self.config.shrink_residual and i < self.num_widths - 1 else None

        def blocks(x: torch.Tensor, mask) -> torch.Tensor:  # padded [m, s, d] or packed [T, d]
            if private is not None:  # the router step: slice (post-LN: and the private norm)
                x = x[..., : shape.hidden] if private.reduce is None else private.reduce(x[..., : shape.hidden])
            for j, block in enumerate(self.adaptive_blocks):
                attn_norm = private.attn[j] if private is not None else block.attention.norm
                ffn_norm = private.ffn[j] if private is not None else block.ffn.norm
                x = sliced_block(block, x, mask, shape, attn_norm, ffn_norm)
            return x

        h = packed_run(blocks, h, bias)  # with a Layout: on the real tokens only
        pooled = self._pool(h, shape.hidden, private)  # [m, d] (pooler) or [m, d_w]
        return linear_slice(self.classifier, self.dropout(pooled), None, pooled.shape[-1])

    def _pool(self, h: torch.Tensor, hidden: int, private: WidthNorms | None) -> torch.Tensor:
        """`Encoder.pool` at residual width `hidden`: the first row of h [m, s, hidden], the final
        LayerNorm (pre-LN; the width's private copy when the residual shrank), then the pooler on its
        first `hidden` input columns (tanh, d outputs) where the encoder has one."""
        x = h[:, 0]
        if self.encoder.final_norm is not None:
            x = (self.encoder.final_norm if private is None else private.final)(x)
        pooler = self.encoder.pooler
        return x if pooler is None else torch.tanh(linear_slice(pooler.dense, x, None, hidden))

    def _routed(self, h, bias, lengths, width_index) -> torch.Tensor:
        """Batched inference: logits [b, C] with every sample run at its width.

        Samples are grouped by width (a stable sort); each group is cut to its own longest real
        length and runs the sliced weights as dense matmuls; logits are scattered back by row.
        The one host sync: the group sizes and longest lengths, read together.
        """
        b, s = h.shape[:2]
        n_w = self.num_widths
        counts = torch.bincount(width_index, minlength=n_w)
        longest = torch.zeros(n_w, dtype=lengths.dtype, device=lengths.device).scatter_reduce(
            0, width_index, lengths, reduce="amax")
        sizes = torch.cat([counts, longest]).tolist()
        order = torch.argsort(width_index, stable=True)
        logits, start = None, 0
        for i in range(n_w):
            n, length = sizes[i], sizes[n_w + i]
            if n == 0:
                continue
            if n == b and length == s:  # one group, no padding to cut: no gather
                return self._suffix(h, bias, i)
            rows = order[start : start + n]
            start += n
            z = self._suffix(h[rows, :length], bias[rows, :, :, :length], i)  # [n, C]
            if logits is None:
                logits = z.new_empty(b, z.shape[1])
            logits[rows] = z
        return logits

    def forward(self, input_ids, attention_mask, token_type_ids=None, knob=AT_DEFAULT, width: int | None = None,
                router_targets: torch.Tensor | None = None) -> ClassifierOutput:
        knob = self.run_knob(knob)
        lengths = flops.lengths_of(attention_mask)  # [b]
        h, bias, z = self._prefix(input_ids, attention_mask, token_type_ids)
        extras: dict[str, Any] = {"router_logits": z}
        if width is not None and not 0 <= width < self.num_widths:
            raise ValueError(f"width index {width} outside 0..{self.num_widths - 1} (widths {list(self.config.widths)})")
        if width is not None:
            logits = self._suffix(h, bias, width)
            index = torch.full_like(lengths, width)
            cost = self.cost(index, lengths)
        elif self.training:
            width_logits = torch.stack([self._suffix(h, bias, i) for i in range(self.num_widths)])  # [n_w, b, C]
            extras["width_logits"] = width_logits
            logits, index = width_logits[-1], torch.full_like(lengths, self.num_widths - 1)
            cost = (self._shared_cost(lengths) + self._suffix_costs(lengths).sum(dim=0)).to(torch.float64)
        else:
            index = self.route(z, knob)
            logits = self._routed(h, bias, lengths, index)
            cost = self.cost(index, lengths)
        extras["width_pct"] = self.width_pct[index]
        aux = None
        if self.training:
            if router_targets is None:  # the warm-up label: the largest width only
                router_targets = torch.zeros_like(z)
                router_targets[:, -1] = 1.0
            aux = self.config.router_weight * F.binary_cross_entropy_with_logits(z, router_targets.to(z.dtype))
        return ClassifierOutput(logits=logits, flops=cost, aux_loss=aux, extras=extras)

    # --- loss and importance reordering ---------------------------------------------------------
    def loss(self, out: ClassifierOutput, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """task_weight * the task loss + the router loss (when `forward` computed one).

        One width ran: cross-entropy. Every width ran (training with no width given): the sum over
        widths (the sandwich rule) of the full width's cross-entropy and, for each narrower width,
        distill_weight * KL(full width's detached prediction || its own) + (1 - distill_weight) * CE."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        width_logits = out.extras.get("width_logits")
        if width_logits is None:
            task = F.cross_entropy(out.logits, labels, reduction=reduction)
        else:
            n, b, c = width_logits.shape
            ce = F.cross_entropy(width_logits.reshape(n * b, c), labels.repeat(n), reduction="none").view(n, b)
            per_sample = ce[-1]  # [b] the full width
            if n > 1:
                alpha = self.config.distill_weight
                teacher = width_logits[-1].detach().float().log_softmax(-1)  # [b, C]
                student = width_logits[:-1].float().log_softmax(-1)  # [n - 1, b, C]
                kl = (teacher.exp() * (teacher - student)).sum(-1)  # [n - 1, b]
                per_sample = per_sample + (alpha * kl + (1 - alpha) * ce[:-1]).sum(0)
            task = per_sample.sum() if reduction == "sum" else per_sample.mean()
        loss = self.config.task_weight * task
        if out.aux_loss is not None:
            loss = loss + (out.aux_loss * labels.shape[0] if reduction == "sum" else out.aux_loss)
        return loss

    @torch.no_grad()
    def permute(self, heads: torch.Tensor, neurons: torch.Tensor, hidden: torch.Tensor | None) -> None:
        """Reorder heads [L - k, nh] and FFN neurons [L - k, d_ff] of every adaptive layer (index
        permutations, new position -> old index) and the residual dimensions [d] of the whole
        network; the function the model computes at full width is unchanged. Private norms are
        re-initialised from the reordered shared ones (call before training)."""
        hd = self.spec.encoder.head_dim
        for j, block in enumerate(self.adaptive_blocks):
            rows = (heads[j][:, None] * hd + torch.arange(hd)).flatten()  # head-major rows
            att = block.attention
            for lin in (att.q, att.k, att.v):
                lin.weight.copy_(lin.weight[rows])
                lin.bias.copy_(lin.bias[rows])
            att.out.weight.copy_(att.out.weight[:, rows])
            ffn = block.ffn
            ffn.up.weight.copy_(ffn.up.weight[neurons[j]])
            ffn.up.bias.copy_(ffn.up.bias[neurons[j]])
            ffn.down.weight.copy_(ffn.down.weight[:, neurons[j]])
        if hidden is not None:
            norms = _permute_embeddings(self.encoder.embeddings, hidden)
            norms += [] if self.encoder.final_norm is None else [self.encoder.final_norm]
            for block in self.encoder.blocks:
                att, ffn = block.attention, block.ffn
                for lin in (att.q, att.k, att.v, ffn.up):  # read the residual
                    lin.weight.copy_(lin.weight[:, hidden])
                for lin in (att.out, ffn.down):  # write the residual
                    lin.weight.copy_(lin.weight[hidden])
                    lin.bias.copy_(lin.bias[hidden])
                norms += [att.norm, ffn.norm]
            for norm in norms:
                norm.weight.copy_(norm.weight[hidden])
                norm.bias.copy_(norm.bias[hidden])
            # the pooler reads the residual (its d outputs are not permuted); without one, the classifier does
            reader = self.classifier if self.encoder.pooler is None else self.encoder.pooler.dense
            for lin in (reader, self.router[0]):
                lin.weight.copy_(lin.weight[:, hidden])
        self.init_private_norms()

    # --- evaluation -----------------------------------------------------------------------------
    @torch.inference_mode()
    def width_pass(self, enc: Encoded, batch_size: int = 64, progress: bool = False,
                   widths: bool = True) -> dict[str, torch.Tensor]:
        """One eval-mode pass over a split (the prefix once, then each width on every sample):
        "features" [n, d] (the router's input, layer k's mask-aware mean), "router" [n, n_w],
        "logits" [n_w, n, C] (when `widths`), "lengths" [n]. Training mode is restored."""
        if len(enc) == 0:
            raise ValueError("nothing to run: the encoded split is empty")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        n, d = len(enc), self.spec.encoder.hidden_size
        features = torch.empty(n, d)
        router = torch.empty(n, self.num_widths)
        logits = torch.empty(self.num_widths, n, self.spec.num_labels) if widths else None
        lengths = enc.lengths()
        try:
            for batch in tqdm(eval_batches(enc, batch_size, self.spec.encoder.pad_token_id),
                              total=math.ceil(n / batch_size), desc="sharcs widths", disable=not progress, leave=False):
                mask = batch.attention_mask.to(device)
                h = self.encoder.embed(batch.input_ids.to(device))
                bias = self.token_mask(mask, h.dtype)
                h = self.encoder.run_blocks(h, bias, 0, self.router_layer)
                f = masked_mean(h, mask)  # [m, d]
                features[batch.index] = f.float().cpu()
                router[batch.index] = self.router(f).float().cpu()
                if widths:
                    for i in range(self.num_widths):
                        logits[i, batch.index] = self._suffix(h, bias, i).float().cpu()
        finally:
            self.train(was_training)
        out = {"features": features, "router": router, "lengths": lengths}
        return out if logits is None else {**out, "logits": logits}

    def all_width_logits(self, enc: Encoded, batch_size: int = 64, progress: bool = False) -> tuple[torch.Tensor, ...]:
        """(router logits [n, n_w], every width's logits [n_w, n, C], real lengths [n]) for a split,
        from one eval-mode pass (`width_pass`)."""
        p = self.width_pass(enc, batch_size, progress)
        return p["router"], p["logits"], p["lengths"]

    def validation_report(self, val: Encoded, batch_size: int = 64) -> dict[str, Any]:
        """Per-width accuracy, accuracy and width shares at the router's own routing (threshold 0.5), and
        the selection score: the mean per-width accuracy (every width serves some samples, and a
        score that the router could raise by sending everything to full width would select for
        that)."""
        z, logits, _ = self.all_width_logits(val, batch_size)
        y = val.labels
        per_width = (logits.argmax(-1) == y).double().mean(dim=1)
        choice = self.route(z, None)
        routed = logits[choice, torch.arange(len(val))].argmax(-1)
        return {"score": float(per_width.mean()), "width_accuracy": per_width.tolist(),
                "routed_accuracy": float((routed == y).double().mean()),
                "routed_share": torch.bincount(choice, minlength=self.num_widths).double().div(len(val)).tolist()}

    def selection_score(self, val: Encoded, batch_size: int = 64) -> float:
        return self.validation_report(val, batch_size)["score"]

    def sweep_offline(self, enc: Encoded, knobs, batch_size: int = 64, progress: bool = False) -> list[SweepPoint]:
        """Every knob value from one pass that keeps every width's logits and the router logits:
        the routing rule (`route`) and cost (`cost`) are then applied per knob, as `forward` does.

        Extras per point: "width_pct" [n] and, with labels, "width_accuracy" (each width's own
        accuracy on every sample, the same at every knob)."""
        for k in knobs:
            self._check_knob(k)
        z, logits, lengths = self.all_width_logits(enc, batch_size, progress)
        rows = torch.arange(len(enc))
        pct = self.width_pct.cpu()
        common: dict[str, Any] = {"widths": list(self.config.widths)}
        y = enc.labels
        if y.shape == (len(enc),) and bool(((y >= 0) & (y < self.spec.num_labels)).all()):
            common["width_accuracy"] = (logits.argmax(-1) == y).double().mean(dim=1).tolist()
        points = []
        for k in knobs:
            choice = self.route(z, k)
            points.append(SweepPoint(k, logits[choice, rows].argmax(-1), self.cost(choice, lengths),
                                     {"width_pct": pct[choice], **common}))
        return points

