"""PLANER on the decoder (the PLANER paper, Latifi et al., 2022, "Efficient Sparsely Activated
Transformers", whose own setting is autoregressive language modelling): a latency-targeted choice of
blocks per layer, mixtures of experts among them.

This module is the model: configuration, the FFN that runs as the architecture says, conversion,
knob, cost. The recipe (routers, latency table, search, distillation) is `adaptinf.recipes.lm_planer`.
The building blocks are the classifier PLANER's (`adaptinf.methods.planer`): `split_experts`
(balanced k-means of the FFN's neurons into E equal experts, an exact reordering, most important
expert first), `Router`, `select_experts`, `grouped_experts`, `ffn_width`, `expert_flops`,
`router_flops`.

Architecture: one "attn/ffn" string per layer (saved in the method config, readable):
- attention: "full" or "skip". A skipped attention writes no KV-cache entries for its layer; that is
  consistent because the architecture is the same for every token, so no later token reads them.
  (Half the heads is not offered: the cache would then hold entries of heads no token uses.)
- FFN: "dense", "half" / "quarter" (the first 1/2 or 1/4 of the regrouped neurons: the most
  important experts, `ffn_width`), "moe<k>" (each token runs the k experts its router ranks highest
  out of E; k < E), or "skip".
The empty architecture is every layer "full/dense": a freshly converted model is the dense model.

The FFN of every block is a `PlanerFFN` (a `FeedForward` with the same `up` / `down` / `norm`, plus
the layer's `router`), so the decoder runs it as `block.ffn(h)`; skipped pieces are the block
attributes `skip_attention` / `skip_ffn` that `Decoder.run_blocks` honours. MoE per token: pre-LN
x = norm(h), scores = router(x), the top-k experts (`select_experts`), their outputs summed
(`grouped_experts`: (token, expert) pairs sorted by expert, one `torch._grouped_mm` per projection
at inference where it works: no loop over tokens and no host sync; under autograd each active expert
runs one matmul pair after one host sync per MoE layer), h + down bias + that sum. Padding tokens
are routed like the others (their outputs are masked out of attention and never scored). Experts
are not weighted by the router, so with all E experts on the MoE is the dense FFN (tests).

Knob: experts per token, an int in 1..E, or None (the searched architecture as it is). At knob k
every FFN that runs experts is thinned to its router's top k: a "moe<j>" slot runs min(j, k), a
"dense" slot runs as an MoE of top k (a dense FFN is the MoE with every expert on); static widths
and skips are unchanged. So one model traces a curve even when the search kept no MoE slot.

Cost (`adaptinf.flops` conventions, per window of L tokens scored in one pass): the LM head on every
token, per layer the causal attention block unless skipped, and the FFN as it ran: dense or static
width `ffn_block`, MoE L * router + L * k * one expert (top-k runs exactly k experts per token),
skipped 0. An all-"full/dense" architecture costs `flops.dense_decoder` exactly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaptinf import flops
from adaptinf.backbone import FeedForward
from adaptinf.decoder import Decoder
from adaptinf.lm import LanguageModel
from adaptinf.methods.planer import (Router, expert_flops, ffn_width, grouped_experts, router_flops, select_experts,
                                     split_experts)
from adaptinf.settings import from_known_fields

ATTN = ("full", "skip")
FFN = ("dense", "half", "quarter", "skip")  # plus "moe<k>", 1 <= k < num_experts
WIDTH = {"dense": 1.0, "half": 0.5, "quarter": 0.25}


def parse_block(slot: str, num_experts: int) -> tuple[str, str, int]:
    """ "full/moe2" -> ("full", "moe", 2); k is 0 for a non-MoE FFN. ValueError naming the field."""
    parts = slot.split("/") if isinstance(slot, str) else []
    bad = ValueError(f"PlanerLMConfig.architecture: {slot!r} is not 'attn/ffn' with attn in {list(ATTN)} and ffn in "
                     f"{list(FFN)} or 'moe<k>' with 1 <= k < num_experts ({num_experts})")
    if len(parts) != 2 or parts[0] not in ATTN:
        raise bad
    attn, ffn = parts
    if ffn in FFN:
        return attn, ffn, 0
    if ffn.startswith("moe") and ffn[3:].isdigit() and 1 <= int(ffn[3:]) < num_experts:
        return attn, "moe", int(ffn[3:])
    raise bad


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class PlanerLMConfig:
    """PLANER on the decoder: the converted structure and the recipe's settings (`adaptinf.recipes.lm_planer`).

    num_experts: E, experts per FFN (must divide the FFN width); router_hidden: router width (d -> h -> E);
    kmeans_iters: balanced k-means iterations of the neuron grouping.
    architecture: one "attn/ffn" per layer; empty = every layer "full/dense" (before a search). A
        non-empty architecture is used as given: the recipe does not search.
    moe_ks: the MoE blocks offered to the search ("moe<k>" for each k); ffn_widths: also offer the
        static "half" / "quarter" FFN.
    latency_target: the target as a fraction of the dense model's latency of one generation step
        (batch 1, one new token after `cache_tokens` cached ones; the latency table's estimate).
    cache_tokens, latency_repeats: the generation-step table's cache length and timed rounds.
    search_margin: the search aims at (1 - search_margin) * target.
    proxy_windows: validation windows (of the model's seq_len) of the search's zero-shot proxy (KL to dense).
    candidates: distinct searched architectures (greedy over every block, then with every FFN kept, with
        every attention kept, with nothing skipped) each distilled for `candidate_steps` steps and the
        best on validation perplexity kept (a trained proxy); 1 = the greedy result alone.
    router_steps, router_lr, router_batch: router fitting on the dense model's FFN inputs (Adam steps
        of `router_batch` training windows); refit_steps: the routers refitted on the student's own FFN
        inputs after the search and after distillation (0 = never).
    ce_weight, distill_weight, distill_temperature, hidden_weight: distillation loss = ce_weight * CE +
        distill_weight * T^2 * KL(dense || model) at T + hidden_weight * mean over the layers that run a
        block of the relative squared error of the layer's output against the dense model's.
    """

    num_experts: int = 8
    router_hidden: int = 64
    kmeans_iters: int = 10
    architecture: tuple[str, ...] = ()
    moe_ks: tuple[int, ...] = (1, 2, 4)
    ffn_widths: bool = True
    latency_target: float = 0.5
    cache_tokens: int = 128
    latency_repeats: int = 5
    search_margin: float = 0.03
    proxy_windows: int = 8
    candidates: int = 3
    candidate_steps: int = 30
    router_steps: int = 100
    router_lr: float = 5e-3
    router_batch: int = 4
    refit_steps: int = 20
    ce_weight: float = 1.0
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    hidden_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("architecture", "moe_ks"):
            v = getattr(self, name)
            if isinstance(v, str) and name == "architecture":
                v = [p for p in v.replace(" ", "").split(",") if p]
            if not isinstance(v, (list, tuple)):
                raise ValueError(f"PlanerLMConfig.{name} must be a list, got {v!r}")
            object.__setattr__(self, name, tuple(v))
        if not _is_int(self.num_experts) or not 2 <= self.num_experts <= 64:
            raise ValueError(f"PlanerLMConfig.num_experts must be an integer from 2 to 64, got {self.num_experts!r}")
        for name in ("router_hidden", "latency_repeats", "proxy_windows", "router_batch", "cache_tokens"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"PlanerLMConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("kmeans_iters", "candidate_steps", "router_steps", "refit_steps"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"PlanerLMConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for slot in self.architecture:
            parse_block(slot, self.num_experts)
        if not all(_is_int(k) and 1 <= k < self.num_experts for k in self.moe_ks):
            raise ValueError(f"PlanerLMConfig.moe_ks must be integers in 1..num_experts-1 ({self.num_experts - 1}), "
                             f"got {list(self.moe_ks)!r}")
        if not _number(self.latency_target) or not 0 < self.latency_target <= 1:
            raise ValueError(f"PlanerLMConfig.latency_target must be a fraction of the dense latency in (0, 1], "
                             f"got {self.latency_target!r}")
        if not _number(self.search_margin) or not 0 <= self.search_margin < 0.5:
            raise ValueError(f"PlanerLMConfig.search_margin must be in [0, 0.5), got {self.search_margin!r}")
        if not _is_int(self.candidates) or not 1 <= self.candidates <= 4:
            raise ValueError(f"PlanerLMConfig.candidates must be an integer from 1 to 4, got {self.candidates!r}")
        for name in ("router_lr", "distill_temperature"):
            if not _number(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"PlanerLMConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("ce_weight", "distill_weight", "hidden_weight"):
            if not _number(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"PlanerLMConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.ffn_widths, bool):
            raise ValueError(f"PlanerLMConfig.ffn_widths must be true or false, got {self.ffn_widths!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {**d, "architecture": list(self.architecture), "moe_ks": list(self.moe_ks)}

    @classmethod
    def from_dict(cls, d: dict) -> PlanerLMConfig:
        return from_known_fields(cls, d)


# --- the FFN that runs as its slot says -----------------------------------------------------------------


class PlanerFFN(FeedForward):
    """A decoder block's FFN under PLANER: the dense FFN's `up` / `down` / `norm` (neurons regrouped
    into E contiguous experts by `split_experts`) and the layer's `router`; `mode` says how it runs:
    "dense", "width" (the first `width` neurons) or "moe" (each token's top `k` experts). A skipped
    FFN is the block's `skip_ffn` (the decoder does not call it)."""

    def __init__(self, cfg, num_experts: int, router_hidden: int):
        super().__init__(cfg)
        self.num_experts = num_experts
        self.router = Router(cfg.hidden_size, router_hidden, num_experts)
        self.router.requires_grad_(False)  # fitted by the recipe on FFN inputs, never by backprop
        # down stored column-major: an expert's columns are one contiguous [m, d] block (grouped_experts)
        w = self.down.weight
        self.down.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)
        self.mode, self.k, self.width = "dense", num_experts, cfg.intermediate_size

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.mode == "moe":
            return self.moe(h, self.k)
        if self.mode == "width":
            return ffn_width(self, h, self.width)
        return super().forward(h)

    def moe(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """h [b, s, d] -> h + the sum of each token's top-k experts (no loop over tokens)."""
        b, s, d = h.shape
        x = self.inp(h).reshape(b * s, d)  # [T, d] the experts' and the router's input
        with torch.no_grad():
            sel = select_experts(self.router(x), k, None)  # [T, E] bool, exactly min(k, E) per token
        y = grouped_experts(x, sel, self.up.weight, self.up.bias, self.down.weight, act=self.act) + self.down.bias
        return self.residual(h, y.view(b, s, d))

    def expert_norms(self, x: torch.Tensor) -> torch.Tensor:
        """The norm of every expert's output (no bias) for FFN inputs x [T, d] -> [T, E]: the router's target."""
        a = self.act(F.linear(x, self.up.weight, self.up.bias)).view(x.shape[0], self.num_experts, -1)  # [T, E, m]
        w = self.down.weight.view(self.down.weight.shape[0], self.num_experts, -1)  # [d, E, m]
        return torch.einsum("tem,dem->ted", a, w).norm(dim=-1)


# --- the model -------------------------------------------------------------------------------------


class PlanerLM(LanguageModel):
    """The decoder with a per-layer choice of attention (full / skip) and FFN (dense / half / quarter /
    MoE top-k / skip) blocks; see the module docstring."""

    method = "planer"

    def __init__(self, decoder: Decoder, tokenizer=None, name: str = "custom", seq_len: int | None = None,
                 config: PlanerLMConfig | None = None):
        super().__init__(decoder, tokenizer, name, seq_len)
        self.config = config or PlanerLMConfig()
        cfg, e = decoder.cfg, self.config.num_experts
        if cfg.intermediate_size % e:
            raise ValueError(f"PlanerLMConfig.num_experts ({e}) must divide the FFN width "
                             f"(intermediate_size {cfg.intermediate_size})")
        if self.config.architecture and len(self.config.architecture) != cfg.num_hidden_layers:
            raise ValueError(f"PlanerLMConfig.architecture has {len(self.config.architecture)} entries; the decoder has "
                             f"{cfg.num_hidden_layers} layers (one 'attn/ffn' per layer)")
        block_cfg = cfg.block_config()
        for blk in decoder.blocks:
            ffn = PlanerFFN(block_cfg, e, self.config.router_hidden)
            ffn.load_state_dict(blk.ffn.state_dict(), strict=False)
            blk.ffn = ffn
        self._teacher: list[LanguageModel] = []  # the frozen dense model (a plain list: never saved)
        self._arch: list[tuple[str, str, int]] = []
        self.set_architecture(list(self.config.architecture) or ["full/dense"] * cfg.num_hidden_layers)

    # --- knob: pushed into the blocks whenever it changes (set_knob, using_knob, load_lm) ------------
    @property
    def knob(self) -> int | None:
        return self.__dict__.get("_knob")

    @knob.setter
    def knob(self, value: int | None) -> None:
        self.__dict__["_knob"] = value
        if self.__dict__.get("_arch"):
            self._configure()

    def knob_values(self) -> list[int | None]:
        e = self.config.num_experts
        return sorted({k for k in (1, 2, e // 2) if 1 <= k < e}) + [None]

    def check_knob(self, value) -> int | None:
        if value is None:
            return None
        e = self.config.num_experts
        if not _is_int(value) or not 1 <= value <= e:
            raise ValueError(f"planer: the knob is the experts per token, an integer in 1..{e} (or None: the "
                             f"searched architecture as it is), got {value!r}")
        return int(value)

    # --- architecture ----------------------------------------------------------------------------------
    @property
    def architecture(self) -> list[str]:
        return [f"{a}/{f}{k if f == 'moe' else ''}" for a, f, k in self._arch]

    def set_architecture(self, arch: list[str]) -> None:
        """Use `arch` (one "attn/ffn" per layer) and record it in the config (saved with the model)."""
        if len(arch) != self.cfg.num_hidden_layers:
            raise ValueError(f"architecture has {len(arch)} entries, the decoder has {self.cfg.num_hidden_layers} layers")
        self._arch = [parse_block(s, self.config.num_experts) for s in arch]
        self.config = dataclasses.replace(self.config, architecture=tuple(self.architecture))
        self._configure()

    @contextlib.contextmanager
    def using_architecture(self, arch: list[str]):
        before = self.architecture
        self.set_architecture(list(arch))
        try:
            yield self
        finally:
            self.set_architecture(before)

    def block_choices(self) -> list[str]:
        """The candidate blocks of a slot (the latency table's rows): "attn:full|skip", "ffn:dense|...|skip"."""
        widths = ["half", "quarter"] if self.config.ffn_widths else []
        return (["attn:full", "attn:skip", "ffn:dense"] + [f"ffn:{w}" for w in widths]
                + [f"ffn:moe{k}" for k in sorted(set(self.config.moe_ks))] + ["ffn:skip"])

    def ffn_run(self, layer: int) -> tuple[str, int]:
        """How layer `layer`'s FFN runs at the current knob: ("skip", 0), ("width", neurons) or ("moe", k)."""
        _, f, k = self._arch[layer]
        e, knob = self.config.num_experts, self.knob
        if f == "skip":
            return "skip", 0
        if f == "moe" or (f == "dense" and knob is not None and knob < e):
            return "moe", min(k or e, knob or e)
        return "width", int(self.cfg.intermediate_size * WIDTH[f])

    def _configure(self) -> None:
        for i, (blk, (a, _, _)) in enumerate(zip(self.decoder.blocks, self._arch)):
            mode, n = self.ffn_run(i)
            blk.skip_attention, blk.skip_ffn = a == "skip", mode == "skip"
            blk.ffn.mode = "dense" if mode == "width" and n == self.cfg.intermediate_size else mode
            blk.ffn.k = n if mode == "moe" else self.config.num_experts
            blk.ffn.width = n if mode == "width" else self.cfg.intermediate_size

    # --- conversion -------------------------------------------------------------------------------------
    def method_config(self) -> dict:
        return self.config.to_dict()

    @classmethod
    def from_config(cls, decoder: Decoder, method_config: dict, name: str = "custom",
                    seq_len: int | None = None) -> PlanerLM:
        return cls(decoder, None, name, seq_len, PlanerLMConfig.from_dict(method_config))

    @classmethod
    def from_dense(cls, dense: LanguageModel, config: PlanerLMConfig | None = None) -> PlanerLM:
        """A deep copy of the dense model's weights with every FFN's neurons regrouped into experts
        (exact), fresh routers and the architecture of `config` (default all "full/dense": the dense
        function); the dense model, copied and frozen, kept as the distillation teacher."""
        if not isinstance(dense, LanguageModel) or dense.method != "dense":
            raise ValueError(f"PLANER converts a dense language model, got {getattr(dense, 'method', type(dense).__name__)!r}")
        model = cls(Decoder(dense.cfg), dense.tokenizer, dense.name, dense.seq_len, config)
        missing = model.load_state_dict(dense.state_dict(), strict=False).missing_keys
        assert all(".router." in k for k in missing), missing
        for i, blk in enumerate(model.decoder.blocks):
            split_experts(blk.ffn, model.config.num_experts, model.config.kmeans_iters, seed=i)
        model.train(dense.training)
        model.set_teacher(dense)
        return model

    def set_teacher(self, dense: LanguageModel) -> None:
        """Keep a frozen copy of `dense` (not a submodule: not saved, not optimised) for distillation."""
        teacher = copy.deepcopy(dense).eval()
        teacher.requires_grad_(False)
        self._teacher = [teacher]

    @property
    def routers(self) -> list[Router]:
        return [blk.ffn.router for blk in self.decoder.blocks]

    def expert_norms(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.decoder.blocks[layer].ffn.expert_norms(x)

    # --- training ----------------------------------------------------------------------------------------
    def layer_states(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's output [b, s, d] on windows inputs [b, s] (no padding), at the current knob."""
        h, out = self.decoder.embed(inputs), []
        for i in range(self.cfg.num_hidden_layers):
            h = self.decoder.run_blocks(h, i, i + 1)
            out.append(h)
        return out

    def training_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """ce_weight * CE + (with a teacher) distill_weight * T^2 * KL(dense || model) of the next-token
        distributions + hidden_weight * the mean relative squared error of the layers that run a block."""
        c = self.config
        states = self.layer_states(inputs)
        logits = self.decoder.head(states[-1]).flatten(0, 1).float()  # [b * s, V]
        loss = c.ce_weight * F.cross_entropy(logits, targets.flatten())
        if not self._teacher or (c.distill_weight == 0 and c.hidden_weight == 0):
            return loss
        teacher = self._teacher[0]
        with torch.no_grad():
            t_states = teacher_states(teacher, inputs)
            t_logits = teacher.decoder.head(t_states[-1]).flatten(0, 1).float()
        T = c.distill_temperature
        kl = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True,
                      reduction="batchmean")
        loss = loss + c.distill_weight * T * T * kl
        ran = [i for i, (a, f, _) in enumerate(self._arch) if (a, f) != ("skip", "skip")]
        if c.hidden_weight > 0 and ran:
            err = sum((states[i] - t_states[i]).pow(2).sum() / t_states[i].pow(2).sum().clamp_min(1e-12) for i in ran)
            loss = loss + c.hidden_weight * err / len(ran)
        return loss

    # --- cost ----------------------------------------------------------------------------------------------
    def sequence_flops(self, length: int) -> int:
        """FLOPs of one window of `length` tokens in one pass, as the blocks run at the current knob."""
        cfg, c = self.cfg, self.config
        d, m = cfg.hidden_size, cfg.intermediate_size // c.num_experts
        total = flops.lm_head(length, cfg)
        for i, (a, _, _) in enumerate(self._arch):
            if a != "skip":
                total += flops.linear(length, d, 3 * d) + flops.causal_attention_core(length, d) + flops.linear(length, d, d)
            mode, n = self.ffn_run(i)
            if mode == "moe":
                total += length * (router_flops(d, c.router_hidden, c.num_experts) + n * expert_flops(d, m))
            elif mode == "width":
                total += flops.ffn_block(length, d, n)
        return total

    def flops_per_token(self, context: int | None = None) -> float:
        n = self.seq_len if context is None else context
        return self.sequence_flops(n) / n

    def score(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed NLL, FLOPs executed) of windows inputs/targets [b, s] at the current knob (no host sync)."""
        nll = self.loss(inputs, targets, reduction="sum").double()
        b, s = inputs.shape
        return nll, torch.as_tensor(float(self.sequence_flops(s) * b), dtype=torch.float64, device=nll.device)


def teacher_states(teacher: LanguageModel, inputs: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's output [b, s, d] of a dense language model on windows inputs [b, s]."""
    h, out = teacher.decoder.embed(inputs), []
    for i in range(teacher.cfg.num_hidden_layers):
        h = teacher.decoder.run_blocks(h, i, i + 1)
        out.append(h)
    return out
