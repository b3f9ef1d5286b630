"""ACM on the decoder: every FFN a sequence of learners, a per-token gate picks how many run.

The classifier ACM's pieces (`adaptinf.methods.acm`: `Learners`, `Gate`, `AdaptiveModule`,
`split_ffn`, `learner_flops` / `gate_flops`, the gate-bias knob) applied to `adaptinf.decoder`'s
blocks. Each block's `FeedForward` is replaced by an `AcmFFN`, a `FeedForward` whose up/down are
gone: pre-LN, it returns h + (sum of the first k learners)(norm(h)) through the FeedForward's own
`inp` / `residual`, so `Decoder.run_blocks`, the KV cache and generation run it unchanged (the FFN
is per token: nothing of it enters the cache).

Conversion (`AcmLM.from_dense`): n learners (default 4) of ceil(d_ff / n) neurons each, an exact
split of the dense FFN's neurons ordered by importance (`split_ffn`); GPT-2's tanh GELU is kept
(`DecoderLearners`), so with every learner on the converted model is the dense model (logits to
fp32 rounding). The dense model is deep-copied as the frozen teacher of the training phases
(`AcmLM.teacher`, never saved).

Execution, per layer, on the b*s tokens [T, d] (no loop over tokens):
- training mode: each gate draws a Gumbel-softmax hard one-hot over k = min_learners..n (straight-through),
  every learner runs, the output is the one-hot times the cumulative outputs (the LM loss reaches
  the gates); `training_loss` = next-token CE (+ `kd_weight` * KL to the teacher's logits) + the
  budget / entropy / diversity terms (`aux_loss`);
- eval mode, the gate: k = argmax(gate logits - knob * k) (`AdaptiveModule.pick`), then the tokens
  run grouped by k (`Learners.run`: one host sync per layer, the histogram of k, none per learner),
  except when T * n <= PREFIX_WASTE (a generation step of batch <= 8 with 4 learners): then the
  learners run as one masked matmul pair with each token's learners above its k zeroed, with no
  host sync at all (wasting at most PREFIX_WASTE token-learner products, `Learners.run`'s own bound);
- `using_learners(k)`: every token runs exactly k learners and no gate runs (k = n: full compute,
  the dense model after conversion; after residual distillation the learners are a coarse-to-fine
  decomposition and k = n is no longer exactly the dense FFN).

Knob (as the classifier ACM's `gate_bias`): a finite number subtracted as knob * k from the gate
logits, larger = fewer learners; None (= 0) is the gate as trained. `knob_values()` lists
`adaptinf.methods.acm.KNOB_VALUES` cheapest first. Full compute is not a knob value (the gate is a
learned choice) but `using_learners(config.learners)`.

Cost (`adaptinf.flops` conventions, per token): the dense decoder without its FFNs, plus every
learner that ran (`learner_flops`) and every gate that ran (`gate_flops`, one per token and layer).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from adaptinf import flops
from adaptinf.backbone import HIDDEN_ACTS, EncoderConfig, FeedForward
from adaptinf.decoder import Decoder, DecoderOutput, KVCache
from adaptinf.lm import LanguageModel
from adaptinf.methods.acm import (DISTILL_MODES, KNOB_VALUES, LABEL_RULES, PREFIX_WASTE, AdaptiveModule, Learners,
                                  ffn_width, gate_flops, learner_flops, split_ffn)
from adaptinf.settings import from_known_fields


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class AcmLMConfig:
    """ACM on the decoder's FFNs.

    learners: n learners per FFN (2..16, at most the FFN's width), ceil(d_ff / n) neurons each.
    min_learners: the fewest learners the gate may choose (0..n-1): 1 by default, as a token whose
      FFN is skipped in a layer costs a decoder far more than a classifier (on gpt-tiny the gate
      biased toward k = 0 lost 28% perplexity where every token at k = 1 lost 1%); 0 as the
      classifier's FFN ACM.
    gate_hidden: width of each gate's two hidden layers.
    distill_mode, label_rule, tau, eps: phases 1 and 2 as the classifier ACM's (`AcmConfig`):
      "residual" distillation (learner k fits what the first k-1 leave), "relative" labels (the
      smallest k after which one more learner improves the error by less than a factor tau) or
      "absolute" (the smallest k within eps * |dense output|).
    beta: phase 3's target for the executed share of the learners' cost; beta_anneal: the share of
      phase-3 steps over which the target falls linearly from 1 to beta (0: beta from the start).
    budget_weight, entropy_weight, diversity_weight: phase 3's auxiliary terms (`AcmLM.aux_loss`).
    kd_weight: phase 3's weight of the KL divergence to the dense model's next-token distribution
      (0: next-token cross-entropy alone).
    gumbel_temperature: the gates' Gumbel-softmax temperature in phase 3.
    distill_steps, distill_lr / gate_steps, gate_lr: phases 1 / 2 (Adam, per layer; 0 steps skips
      the phase); batches of the training config's batch size and window.
    """

    learners: int = 4
    min_learners: int = 1
    gate_hidden: int = 32
    distill_mode: str = "residual"
    label_rule: str = "relative"
    tau: float = 1.2
    eps: float = 0.4
    beta: float = 0.6
    beta_anneal: float = 0.5
    budget_weight: float = 0.5
    entropy_weight: float = 0.05
    diversity_weight: float = 0.05
    kd_weight: float = 0.0
    gumbel_temperature: float = 0.8
    distill_steps: int = 200
    distill_lr: float = 1e-3
    gate_steps: int = 100
    gate_lr: float = 1e-2

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"AcmLMConfig.{name} must be {want}, got {getattr(self, name)!r}")

        if not _is_int(self.learners) or not 2 <= self.learners <= 16:
            raise bad("learners", "an integer from 2 to 16 (4: the paper's)")
        if not _is_int(self.min_learners) or not 0 <= self.min_learners < self.learners:
            raise bad("min_learners", f"an integer from 0 to learners - 1 ({self.learners - 1})")
        if not _is_int(self.gate_hidden) or self.gate_hidden < 1:
            raise bad("gate_hidden", "a positive integer (e.g. 32)")
        if self.distill_mode not in DISTILL_MODES:
            raise bad("distill_mode", f"one of {list(DISTILL_MODES)}")
        if self.label_rule not in LABEL_RULES:
            raise bad("label_rule", f"one of {list(LABEL_RULES)}")
        checks = {"tau": (lambda v: v > 1.0, "a number > 1 (an improvement factor; the paper's 1.2)"),
                  "eps": (lambda v: 0.0 < v < 1.0, "a number in (0, 1) (a relative error, e.g. 0.4)"),
                  "beta": (lambda v: 0.0 < v <= 1.0, "a number in (0, 1] (a share of the learners' cost)"),
                  "beta_anneal": (lambda v: 0.0 <= v <= 1.0, "a number in [0, 1] (a share of the phase-3 steps)"),
                  "gumbel_temperature": (lambda v: v > 0, "a positive number (e.g. 0.8)"),
                  "distill_lr": (lambda v: v > 0, "a positive number (e.g. 1e-3)"),
                  "gate_lr": (lambda v: v > 0, "a positive number (e.g. 1e-2)")}
        for name in ("budget_weight", "entropy_weight", "diversity_weight", "kd_weight"):
            checks[name] = (lambda v: v >= 0, "a number >= 0 (0 turns the term off)")
        for name, (ok, want) in checks.items():
            v = getattr(self, name)
            if not _is_num(v) or not ok(v):
                raise bad(name, want)
        for name in ("distill_steps", "gate_steps"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "an integer >= 0 (0 skips the phase)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AcmLMConfig:
        return from_known_fields(cls, d)


class DecoderLearners(Learners):
    """`Learners` with the decoder's activation (GPT-2's tanh GELU, `approximate` "tanh"), so an
    exact split of a decoder FFN stays exact (the classifier's take erf GELU or identity)."""

    def __init__(self, d: int, width: int, n: int, approximate: str):
        super().__init__(d, width, d, n, "gelu")
        self.approximate = approximate

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)


@dataclass
class Routing:
    """What the `AcmFFN`s of one model share for a call (set by `AcmLM` before the decoder runs):
    how k is chosen, and, when `record`, each layer's chosen k [T] (and training's one-hots)."""

    knob: float | None = None
    fixed_k: int | None = None
    temperature: float = 0.8
    record: bool = False
    k: list[torch.Tensor] = field(default_factory=list)
    onehots: list[torch.Tensor] = field(default_factory=list)

    def reset(self, knob: float | None, fixed_k: int | None, record: bool) -> None:
        self.knob, self.fixed_k, self.record = knob, fixed_k, record
        self.k, self.onehots = [], []

    def run(self, mod: AdaptiveModule, x: torch.Tensor, training: bool) -> torch.Tensor:
        """One layer's learners on its tokens x [T, d] -> [T, d]."""
        onehot = None
        if training:  # Gumbel-softmax hard one-hot (straight-through) times the cumulative outputs
            onehot = F.gumbel_softmax(mod.gate(x), tau=self.temperature, hard=True)  # [T, C], k = min_k..n
            y = torch.einsum("tc,tcd->td", onehot, mod.learners.cumulative(x)[:, mod.min_k :])
            k = mod.choices[onehot.detach().argmax(dim=-1)]
        elif self.fixed_k is not None:  # exactly fixed_k learners (0..n, whatever min_k), no gate
            k = torch.full((x.shape[0],), self.fixed_k, dtype=torch.long, device=x.device)
            y = x.new_zeros(x.shape) if self.fixed_k == 0 else mod.learners.prefix(x, k, self.fixed_k, uniform=True)
        else:
            k = mod.pick(mod.gate(x), self.knob)  # [T]
            y = run_learners(mod.learners, x, k)
        if self.record:
            self.k.append(k)
            if onehot is not None:
                self.onehots.append(onehot)
        return y


def run_learners(learners: Learners, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Each token's first k learners, x [T, d], k [T]: with no host sync when running every learner
    on every token wastes at most PREFIX_WASTE token-learner products (the masked prefix that
    `Learners.run` itself takes then), else `Learners.run` (token-grouped, one sync)."""
    if x.shape[0] * learners.n <= PREFIX_WASTE:
        return learners.prefix(x, k, learners.n)
    return learners.run(x, k)


class AcmFFN(FeedForward):
    """A block's FeedForward (its LayerNorm, dropout, `inp` / `residual`) with `up` / `down`
    replaced by `acm` (learners + gate): h -> residual(h, learners_k(inp(h)))."""

    def __init__(self, cfg: EncoderConfig, n: int, min_k: int, gate_hidden: int, routing: Routing):
        super().__init__(cfg)
        self.up = self.down = None  # replaced by the learners
        d = cfg.hidden_size
        self.acm = AdaptiveModule(d, ffn_width(cfg, n), d, n, "gelu", min_k, gate_hidden)
        self.acm.learners = DecoderLearners(d, ffn_width(cfg, n), n, HIDDEN_ACTS[cfg.hidden_act])
        self.routing = routing  # shared with the model and the other layers (a plain attribute)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.inp(h)  # [b, s, d]
        y = self.routing.run(self.acm, x.reshape(-1, x.shape[-1]), self.training)  # [b*s, d]
        return self.residual(h, y.view(h.shape))


class AcmLM(LanguageModel):
    """A `LanguageModel` whose FFNs are `AcmFFN`s (see the module docstring)."""

    method = "acm"

    def __init__(self, decoder: Decoder, tokenizer=None, name: str = "custom", seq_len: int | None = None,
                 config: AcmLMConfig | None = None):
        super().__init__(decoder, tokenizer, name, seq_len)
        config = AcmLMConfig() if config is None else config
        if not isinstance(config, AcmLMConfig):
            raise ValueError(f"AcmLM takes an AcmLMConfig, got {type(config).__name__}")
        if config.learners > decoder.cfg.intermediate_size:
            raise ValueError(f"AcmLMConfig.learners ({config.learners}) exceeds the FFN's "
                             f"{decoder.cfg.intermediate_size} neurons; use fewer learners")
        self.config = config
        self.routing = Routing(temperature=config.gumbel_temperature)
        block_cfg = decoder.cfg.block_config()
        for blk in decoder.blocks:
            if isinstance(blk.ffn, AcmFFN):
                raise ValueError("this decoder's FFNs are already ACMs; convert a dense model")
            new = AcmFFN(block_cfg, config.learners, config.min_learners, config.gate_hidden, self.routing)
            new.norm.load_state_dict(blk.ffn.norm.state_dict())
            blk.ffn = new
        self._teacher: list[LanguageModel] = []  # the frozen dense model (not a submodule: never saved)
        self._fixed_k: int | None = None
        self.budget_target: float | None = None  # phase 3's annealed target (set by the recipe); None: beta

    # --- the contract ---------------------------------------------------------------------------------

    def method_config(self) -> dict:
        return self.config.to_dict()

    @classmethod
    def from_config(cls, decoder: Decoder, method_config: dict, name: str = "custom",
                    seq_len: int | None = None) -> AcmLM:
        return cls(decoder, None, name, seq_len, AcmLMConfig.from_dict(method_config))

    @classmethod
    def from_dense(cls, dense: LanguageModel, config: AcmLMConfig | None = None) -> AcmLM:
        """Convert a trained dense LM (deep-copied; `dense` is untouched): learners = an exact split of
        each FFN (most important neurons in learner 0), gates untrained (they pick all learners); the
        dense model, frozen, becomes the teacher of the training phases."""
        if not isinstance(dense, LanguageModel) or dense.method != "dense":
            got = getattr(dense, "method", type(dense).__name__)
            raise ValueError(f"ACM converts a dense language model, got {got!r}")
        decoder = copy.deepcopy(dense.decoder)
        dense_ffns = [(blk.ffn.up, blk.ffn.down) for blk in decoder.blocks]
        model = cls(decoder, dense.tokenizer, dense.name, dense.seq_len, config)
        for blk, (up, down) in zip(decoder.blocks, dense_ffns):
            split_ffn(blk.ffn.acm.learners, up, down)
        model.attach_teacher(dense)
        model.train(dense.training)
        return model

    def attach_teacher(self, dense: LanguageModel) -> None:
        """Keep a frozen copy of the dense model `dense` as the teacher (e.g. after `load_lm`)."""
        if not isinstance(dense, LanguageModel) or dense.method != "dense" or dense.cfg != self.cfg:
            raise ValueError("the teacher must be a dense language model with this model's decoder config")
        teacher = LanguageModel(copy.deepcopy(dense.decoder), None, dense.name, dense.seq_len).eval()
        teacher.requires_grad_(False)
        self._teacher = [teacher]

    @property
    def teacher(self) -> LanguageModel | None:
        """The frozen dense model this one was converted from; None for a loaded model."""
        return self._teacher[0] if self._teacher else None

    def ffns(self) -> list[AcmFFN]:
        return [blk.ffn for blk in self.decoder.blocks]

    def knob_values(self) -> list[float]:
        """The classifier ACM's gate biases, cheapest (largest) first; 0.0 is the trained gate."""
        return sorted(KNOB_VALUES, reverse=True)

    def check_knob(self, value: float | None) -> float | None:
        if value is not None and not _is_num(value):
            raise ValueError(f"acm: the knob is a gate bias, a finite number subtracted as knob * k from the gate "
                             f"logits (None: the gate as trained), got {value!r}")
        return None if value is None else float(value)

    def check_learners(self, k: int | None) -> int | None:
        if k is not None and (not _is_int(k) or not 0 <= k <= self.config.learners):
            raise ValueError(f"acm: learners must be None (the gates choose) or an integer from 0 to "
                             f"{self.config.learners}, got {k!r}")
        return k

    @contextmanager
    def using_learners(self, k: int | None):
        """Inside the block every token runs exactly k learners and no gate (in eval mode; k =
        config.learners: full compute), None: the gates choose; the previous setting is restored."""
        old, self._fixed_k = self._fixed_k, self.check_learners(k)
        try:
            yield self
        finally:
            self._fixed_k = old

    # --- running -------------------------------------------------------------------------------------

    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, record: bool = False) -> tuple[DecoderOutput, Routing]:
        """The decoder's forward with the routing set for this call (the knob, `using_learners`)."""
        self.routing.reset(self.knob, self._fixed_k, record)
        return self.decoder(input_ids, attention_mask, cache), self.routing

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> DecoderOutput:
        return self._decode(input_ids, attention_mask, cache)[0]

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        """`Decoder.generate` at the current knob (or `using_learners`). A step of batch b runs
        b * n <= PREFIX_WASTE token-learner products without a host sync (b <= 8 at n = 4), else
        one host sync per layer (`Learners.run`)."""
        self.routing.reset(self.knob, self._fixed_k, False)
        return self.decoder.generate(input_ids, max_new_tokens, attention_mask, **kwargs)

    def learner_counts(self, inputs: torch.Tensor) -> torch.Tensor:
        """How many tokens of inputs [b, s] run k = 0..n learners in each layer, at the current knob:
        [layers, n + 1] int64 (no host sync)."""
        with torch.no_grad():
            _, r = self._decode(inputs, record=True)
        return torch.stack([torch.bincount(k, minlength=self.config.learners + 1) for k in r.k])

    def training_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Next-token CE (+ kd_weight * KL(teacher || model) per token) + `aux_loss` (training mode: the
        Gumbel gates; eval mode: CE at the current knob, no auxiliary terms)."""
        out, r = self._decode(inputs, record=True)
        logits = out.logits.flatten(0, 1).float()  # [b*s, V]
        loss = F.cross_entropy(logits, targets.flatten())
        if self.config.kd_weight > 0:
            if self.teacher is None:
                raise ValueError("acm: kd_weight > 0 needs the dense teacher (AcmLM.from_dense, or attach_teacher)")
            with torch.no_grad():
                t = self.teacher(inputs).logits.flatten(0, 1).float()
            kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
            loss = loss + self.config.kd_weight * kl
        if r.onehots:
            loss = loss + self.aux_loss(r.onehots, *inputs.shape)
        return loss

    def aux_loss(self, onehots: list[torch.Tensor], b: int, s: int) -> torch.Tensor:
        """Phase 3's terms from the layers' one-hots [b*s, C] (C: k = min_k..n): budget |mean executed share -
        target| + entropy of each sequence's histogram of k (per layer, normalised, maximised) +
        spread of the executed share across sequences (maximised), as the classifier ACM's."""
        c, n = self.config, self.config.learners
        choices = self.ffns()[0].acm.choices_f
        ks = torch.stack([oh @ choices.to(oh.dtype) for oh in onehots])  # [L, b*s], differentiable
        share = ks.view(len(onehots), b, s).mean(dim=(0, 2)) / n  # [b] executed share of the learners' cost
        target = c.beta if self.budget_target is None else self.budget_target
        budget = (share.mean() - target).abs()
        hist = torch.stack(onehots).view(len(onehots), b, s, -1).mean(dim=2)  # [L, b, C]
        entropy = ((hist * torch.log(hist + 1e-6)).sum(-1) / math.log(hist.shape[-1])).mean()  # -normalised entropy
        diversity = -2.0 * (share[:, None] - share[None, :]).abs().mean()
        return c.budget_weight * budget + c.entropy_weight * entropy + c.diversity_weight * diversity

    def score(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed NLL, FLOPs executed) at the current knob (or `using_learners`), fp64 tensors."""
        out, r = self._decode(inputs, record=True)
        nll = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").double()
        b, s = inputs.shape
        if self.training:  # every learner ran on every token (the Gumbel one-hot picks among their sums)
            executed = b * s * self.cfg.num_hidden_layers * self.config.learners
        else:
            executed = torch.stack([k.sum() for k in r.k]).sum()  # learner runs, over tokens and layers
        return nll, self.flops_of(b, s, executed, gates=r.fixed_k is None or self.training)

    def flops_of(self, b: int, s: int, executed: torch.Tensor | int, gates: bool = True) -> torch.Tensor:
        """FLOPs of b windows of s tokens that ran `executed` learners in all (summed over tokens and
        layers): the dense decoder without its FFNs, the learners, and one gate per token and layer
        when the gates ran (fp64 scalar, no host sync)."""
        cfg, c = self.cfg, self.config
        d, layers, tokens = cfg.hidden_size, cfg.num_hidden_layers, b * s
        fixed = b * flops.dense_decoder(s, cfg) - layers * tokens * flops.ffn_block(1, d, cfg.intermediate_size)
        if gates:
            fixed += layers * tokens * gate_flops(d, c.gate_hidden, c.learners + 1 - c.min_learners)
        device = self.decoder.embeddings.word.weight.device
        per_learner = learner_flops(d, ffn_width(cfg, c.learners), d)
        return torch.as_tensor(executed, dtype=torch.float64, device=device) * per_learner + float(fixed)
