"""Early exit family: EE, SWEET and the Multi-Model cascade (DeeBERT/PABEE-style exits; SWEET, ACL 2023).

A classifier ("exit") sits after chosen layers; at inference a sample stops at the first exit
whose confidence passes the knob. The three variants share the exits, the exit decision
(`MultiExitClassifier._exit_now`, the one place it is made), the cost accounting, calibration,
the offline knob sweep and batched inference with compaction (training: `adaptinf/recipes/early_exit.py`):

- `ee` (`EarlyExitClassifier`): one backbone, an `ExitHead` after each exit layer; trained with
  the sum of every exit's cross-entropy, so each exit's gradient reaches all layers below it.
- `sweet` (`SweetClassifier`): the same model, but in the training forward the hidden state is
  detached at each exit boundary, so a block is trained only by the exit right after it. Inference
  is identical to `ee`.
- `multi-model` (`MultiModelClassifier`): one independent model per exit depth e_i (embeddings,
  the first e_i layers, pooler and classifier, from the dense model); at inference a cascade in
  which an escalated sample runs the next model from scratch and pays for every model it ran.

Exit policies (`EarlyExitConfig.policy`), each with its own knob:
- "max-softmax": stop when max softmax(logits / T_i) >= threshold. Per-exit temperatures T_i are
  fitted by `calibrate` on a split other than the one that picks the threshold (the recipe: a
  seeded slice of the training split held out from training, `EarlyExitConfig.calibration`).
  A threshold above 1 never exits early.
- "entropy": stop when the entropy of softmax(logits / T_i) < threshold (strict, as DeeBERT), so
  threshold 0 never exits early (entropy is never negative) and log(C) exits almost everything.
- "patience": stop when the last k exits (this one included) predict the same class, k = knob
  (PABEE's patience t is k = t + 1); k = 1 always takes the first exit.
- "learned" (CALM's learned confidence): stop when a logistic model per exit (`decider`, saved with
  the weights) on cheap features of the logits (`decider_features`: calibrated max-prob, margin,
  entropy, agreement with exit i-1, PABEE's agreeing run, exit i-1's max-prob) gives P(exit i predicts
  what the last exit would) >= threshold; fitted post hoc (`adaptinf.recipes.early_exit.fit_decider`).
The last exit takes every sample still running, so every sample gets a prediction.
(Exit placement and distillation: `EarlyExitConfig`.)

Cost (adaptinf.flops convention): a sample that stops at exit i paid for the blocks it ran at its
real length plus every exit head evaluated for it (`flops.head`: pooler d x d where the encoder has
one + classifier d x C, plus one add per token state element with mean pooling); for the cascade,
the layers and head of every model it went through. Pre-LN encoders (ViT): every head applies its
own copy of the final LayerNorm to what it pools (the CLS row, or the mean of the token states).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adaptinf import flops
from adaptinf.backbone import Encoder, EncoderConfig, bias_of
from adaptinf.data import Encoded, eval_batches
from adaptinf.methods.dense import DenseClassifier, DenseConfig
from adaptinf.model import AT_DEFAULT, AdaptiveClassifier, ClassifierOutput, MethodConfig, ModelSpec, SweepPoint

POLICIES = ("max-softmax", "entropy", "patience", "learned")
POOLINGS = ("cls", "mean")
PLACEMENTS = ("auto", "every", "paper")  # exits chosen from the model's depth
CALIBRATIONS = ("holdout", "validation")
# SWEET's exits (after layers 1, 4, 6 and 12 of BERT-base's 12), as twelfths of the depth
PAPER_EXITS_TWELFTHS = (1, 4, 6, 12)
MAX_SOFTMAX_NEVER = 1.01  # a max-softmax (or learned) threshold that no probability reaches: never exit early
DECIDER_FEATURES = ("max_prob", "margin", "entropy", "agrees", "run", "previous_max_prob")  # `decider_features`
ENTROPY_NEVER = 0.0  # entropy < 0 never holds: never exit early


# --- configuration ----------------------------------------------------------------------------------


def _as_layers(value: Any) -> tuple[int, ...] | str:
    """Exit layers from a tuple/list of ints, a single int, or a string such as "1,3,6" or "[1,3,6]";
    a placement by depth ("auto", "paper") stays a string, "every" becomes () (every layer)."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word == "every":
            return ()
        if word in PLACEMENTS:
            return word
        parts = [p for p in value.strip().strip("[]()").replace(" ", "").split(",") if p]
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"EarlyExitConfig.exits: expected layer numbers such as [1, 3, 6] or one of "
                             f"{list(PLACEMENTS)}, got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"EarlyExitConfig.exits must hold integers (1-based layer numbers), got {list(value)}")
        return tuple(value)
    raise ValueError(f"EarlyExitConfig.exits must be a list of layer numbers such as [1, 3, 6], got {value!r}")


@dataclass
class EarlyExitConfig(MethodConfig):
    """Settings shared by `ee`, `sweet` and `multi-model`.

    exits: 1-based layer numbers after which an exit sits (sorted, unique; the last layer must be
        one of them); or a placement from the model's depth: "every" (stored as (): every layer),
        "paper" (SWEET's 1, 4, 6, 12 of 12 scaled to the depth, `paper_exits`), "auto" (the
        method's own: "paper" for sweet, every layer for ee and multi-model).
    policy: "max-softmax" or "learned" (knob: a probability threshold), "entropy" (knob: threshold)
        or "patience" (knob: k). "learned" needs its decider fitted (the recipe does, after the
        temperatures, on the same split).
    classifier_dropout: dropout before each exit's classifier in training (the dense model's 0.1).
    pooling: what an exit's pooler reads: "cls" (the first token, BERT's pooler, as the dense
        model) or "mean" (the mask-aware mean of the token states). A shallow layer's first token
        carries little of the sentence (measured: exits 1-3 of MiniLM-L6 with "cls" heads stay at
        the majority class), so "mean" is the default; with "cls" the last exit of a fresh
        conversion is exactly the dense model.
    distill_weight: weight w of each earlier exit's distillation from the last exit (0: none): exit
        i < last adds w * t^2 * KL(softmax(z_last / t) || softmax(z_i / t)) to its cross-entropy,
        z_last detached (with SWEET too, so its gradient separation holds).
    distill_temperature: the softening t of that term.
    calibration: where the recipe fits the per-exit temperatures: "holdout" (a seeded slice of the
        training split, `calibration_fraction` of it, left out of training) or "validation" (the
        split that also picks the threshold and the epoch: slightly optimistic).
    calibration_fraction: the share of the training split held out for "holdout".
    (distill_* and calibration* act in training only; a saved model's inference does not read them.)
    """

    exits: tuple[int, ...] | str = "auto"
    policy: str = "max-softmax"
    classifier_dropout: float = 0.1
    pooling: str = "mean"
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    calibration: str = "holdout"
    calibration_fraction: float = 0.05

    def __post_init__(self) -> None:
        self.exits = _as_layers(self.exits)
        super().__post_init__()

    def validate(self) -> None:
        if isinstance(self.exits, str):
            if self.exits not in PLACEMENTS:
                raise ValueError(f"EarlyExitConfig.exits: a placement by depth must be one of "
                                 f"{list(PLACEMENTS)}, got {self.exits!r}")
        elif any(e < 1 for e in self.exits):
            raise ValueError(f"EarlyExitConfig.exits are 1-based layer numbers (>= 1), got {list(self.exits)}")
        elif list(self.exits) != sorted(set(self.exits)):
            raise ValueError(f"EarlyExitConfig.exits must be increasing without repeats, got {list(self.exits)}; "
                             f"did you mean {sorted(set(self.exits))}?")
        for name, allowed in (("policy", POLICIES), ("pooling", POOLINGS), ("calibration", CALIBRATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"EarlyExitConfig.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name, ok, want in (  # a value of the wrong type fails the comparison: `check_field_types` names it
            ("classifier_dropout", 0.0 <= self.classifier_dropout < 1.0, "in [0, 1)"),
            ("distill_weight", 0.0 <= self.distill_weight < math.inf, "a number >= 0 (0: no distillation)"),
            ("distill_temperature", 0.0 < self.distill_temperature < math.inf, "a number > 0 (1: the plain softmax)"),
            ("calibration_fraction", 0.0 < self.calibration_fraction < 0.5, "in (0, 0.5), e.g. 0.05"),
        ):
            if not ok:
                raise ValueError(f"EarlyExitConfig.{name} must be {want}, got {getattr(self, name)!r}")


def paper_exits(num_layers: int) -> tuple[int, ...]:
    """SWEET's exit placement (layers 1, 4, 6, 12 of 12) scaled to `num_layers`: ceil(k * L / 12) for
    k in 1, 4, 6, 12, repeats dropped (L=6 -> 1, 2, 3, 6; L=4 -> 1, 2, 4; L=12 -> 1, 4, 6, 12)."""
    if num_layers < 1:
        raise ValueError(f"a model needs at least one layer for an exit, got {num_layers}")
    return tuple(sorted({-(-k * num_layers // 12) for k in PAPER_EXITS_TWELFTHS}))


def resolve_exits(exits: tuple[int, ...] | str, num_layers: int, auto: str = "every") -> tuple[int, ...]:
    """The exit layers of a model with `num_layers` blocks, checked against it: empty = every layer,
    "paper" = `paper_exits`, "auto" = the placement `auto` ("every" or "paper")."""
    if exits == "auto":
        exits = auto
    if exits == "paper":
        return paper_exits(num_layers)
    if not exits or exits == "every":
        return tuple(range(1, num_layers + 1))
    if exits[-1] > num_layers:
        raise ValueError(f"EarlyExitConfig.exits {list(exits)} name layer {exits[-1]}, but the model has {num_layers} layers")
    if exits[-1] != num_layers:
        raise ValueError(
            f"EarlyExitConfig.exits {list(exits)} must include the last layer ({num_layers}) so that every "
            f"sample gets a prediction: use {list(exits) + [num_layers]}"
        )
    return tuple(exits)


# --- building blocks ---------------------------------------------------------------------------------


def summarise(h: torch.Tensor, bias: torch.Tensor, pooling: str) -> torch.Tensor:
    """What an exit's pooler reads: h [m, s, d] -> [m, d], the first token ("cls") or the mean over
    each row's real tokens ("mean"; padding found from the additive attention bias [m, 1, 1, s'])."""
    if pooling == "cls":
        return h[:, 0]
    keep = (bias_of(bias)[:, 0, 0, : h.shape[1]] == 0).to(h.dtype)  # [m, s] 1 = real token
    return (h * keep[..., None]).sum(dim=1) / keep.sum(dim=1, keepdim=True)


class ExitHead(nn.Module):
    """An exit's copy of the dense model's head (`Encoder.pool` on the summarised tokens, then the
    classifier): the final LayerNorm of a pre-LN encoder (`norm`), BERT's tanh(Linear d->d) where
    the encoder has a pooler (`pooler`), dropout, Linear d->C."""

    def __init__(self, cfg: EncoderConfig, num_labels: int, dropout: float = 0.0, pooling: str = "cls"):
        super().__init__()
        d = cfg.hidden_size
        self.pooling = pooling
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps) if cfg.pre_norm else None
        self.pooler = nn.Linear(d, d) if cfg.pooler else None
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(d, num_labels)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """h [b, s, d] (a block's output), additive attention bias [b, 1, 1, s] -> logits [b, C]."""
        x = summarise(h, bias, self.pooling)  # [b, d]
        x = x if self.norm is None else self.norm(x)
        x = x if self.pooler is None else torch.tanh(self.pooler(x))
        return self.classifier(self.dropout(x))

    @torch.no_grad()
    def copy_from(self, encoder: Encoder, classifier: nn.Linear) -> None:
        """Take the weights of a dense model's final norm, pooler and classifier (those it has)."""
        self.classifier.load_state_dict(classifier.state_dict())
        if self.norm is not None:
            self.norm.load_state_dict(encoder.final_norm.state_dict())
        if self.pooler is not None:
            self.pooler.load_state_dict(encoder.pooler.dense.state_dict())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
    """The temperature T minimising the mean NLL of softmax(logits / T) on (logits [n, C], labels [n]).

    NLL is convex in 1/T, hence unimodal in log T: a grid over T in [0.01, 100] (T = 1 included, so
    the result is never worse than no scaling) locates the minimum, ternary search refines it.
    Returns (T, NLL at T = 1, NLL at T).
    """
    z, y = logits.double(), labels.long()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(z / math.exp(log_t), y))

    grid = math.log(100.0) * np.arange(-40, 41) / 40  # log T, step 0.115, exactly 0 in the middle
    values = [nll(t) for t in grid]
    k = int(np.argmin(values))
    lo, hi = float(grid[max(k - 1, 0)]), float(grid[min(k + 1, len(grid) - 1)])
    for _ in range(60):  # ternary search in the grid minimum's bracket: its width times (2/3)^60
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        lo, hi = (lo, b) if nll(a) < nll(b) else (a, hi)
    best, best_t = min((values[k], float(grid[k])), (nll((lo + hi) / 2), (lo + hi) / 2))
    return math.exp(best_t), nll(0.0), best


# --- what the three variants share -------------------------------------------------------------------


class MultiExitClassifier(AdaptiveClassifier):
    """Base of the early exit family (not registered itself).

    Subclasses define the stages: `_start` (state before the first exit), `_stage` (run up to exit
    i and return its logits) and `_compact` (keep only some rows of the state), plus
    `_layers_per_exit` (blocks a sample stopping at exit i has run).

    forward:
    - in training mode, or with no knob set: every exit runs on every sample;
      `extras["exit_logits"]` [n_exits, b, C], logits = the last exit's, flops = every layer and
      head (what the training step costs).
    - in eval mode with a knob: batched inference with compaction; logits of the exit each sample
      took, `extras["exit"]` [b] its position in the exit list (0-based).
    Logits are the heads' raw logits; the temperatures only enter the exit decision.
    """

    Config = EarlyExitConfig
    detach_between_exits: ClassVar[bool] = False  # SWEET: each segment starts from a detached state
    auto_exits: ClassVar[str] = "every"  # what exits="auto" means for this variant

    def __init__(self, spec: ModelSpec, config: EarlyExitConfig | None = None):
        super().__init__(spec, config)
        self.exit_layers = resolve_exits(self.config.exits, spec.encoder.num_hidden_layers, self.auto_exits)
        # per-exit temperatures, fitted by `calibrate` (never on test) and saved with the weights
        self.register_buffer("temperature", torch.ones(len(self.exit_layers)))
        # policy "learned": per exit the weights over `DECIDER_FEATURES` and a bias (0 until fitted: P = 0.5)
        self.register_buffer("decider", torch.zeros(len(self.exit_layers), len(DECIDER_FEATURES) + 1),
                             persistent=self.config.policy == "learned")
        # blocks run and times the embeddings ran (once, or once per cascade model) for a sample stopping at exit i
        self.register_buffer("layers_run", torch.tensor(self._layers_per_exit(), dtype=torch.int64), persistent=False)
        self.register_buffer("embeddings_run", torch.tensor(self._embeddings_per_exit(), dtype=torch.int64),
                             persistent=False)

    @property
    def knob_name(self) -> str:
        """"threshold" (max-softmax, entropy, learned), or "patience": the number of agreeing exits k."""
        return "patience" if self.config.policy == "patience" else "threshold"

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)

    def set_policy(self, policy: str) -> None:
        """Switch a built (e.g. trained) model to another exit policy; the knob is cleared (its
        meaning changes). With "learned" the decider is saved with the weights (fit it first)."""
        self.config = dataclasses.replace(self.config, policy=policy)  # validated
        self.register_buffer("decider", self.decider, persistent=policy == "learned")
        self.set_knob(None)

    # --- to define per variant ------------------------------------------------------------------
    def _layers_per_exit(self) -> list[int]:
        """Blocks run by a sample that stops at exit i (one entry per exit)."""
        return list(self.exit_layers)

    def _embeddings_per_exit(self) -> list[int]:
        """Times the embeddings ran for a sample that stops at exit i: once on one backbone."""
        return [1] * len(self.exit_layers)

    def _start(self, input_ids, attention_mask, token_type_ids) -> tuple:
        raise NotImplementedError

    def _stage(self, i: int, state: tuple, detach: bool = False) -> tuple[torch.Tensor, tuple]:
        """Run from exit i-1 (or the input) to exit i: (logits [m, C], new state)."""
        raise NotImplementedError

    def _compact(self, state: tuple, rows: torch.Tensor, length: int) -> tuple:
        """The state of rows `rows` only, cut to `length` positions (every kept row fits)."""
        raise NotImplementedError

    # --- knob -----------------------------------------------------------------------------------
    def knob_values(self) -> list[float]:
        c, n = self.spec.num_labels, self.num_exits
        if self.config.policy == "patience":
            return [float(k) for k in range(1, n + 1)]
        u = 1.0 - np.geomspace(1.0, 1e-4, 24)  # 0 .. 0.9999, dense near 1
        if self.config.policy in ("max-softmax", "learned"):
            low = 1.0 / c if self.config.policy == "max-softmax" else 0.0
            grid = low + (1.0 - low) * u  # everything exits first .. near 1
            return sorted({round(float(v), 6) for v in grid} | {1.0, MAX_SOFTMAX_NEVER})
        grid = math.log(c) * (1.0 - u)  # log C (nearly everything exits first) .. near 0
        return sorted({round(float(v), 6) for v in grid} | {ENTROPY_NEVER}, reverse=True)

    def check_knob(self, value: float | None) -> float | None:
        self._check_knob(value)
        return super().check_knob(value)

    def knob_between(self, a: float, b: float) -> float | None:
        if self.config.policy != "patience":
            return (a + b) / 2
        mid = float(math.floor((a + b) / 2))  # patience counts exits: an integer strictly between, if any
        return mid if min(a, b) < mid < max(a, b) else None

    def _check_knob(self, value) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{self.method}: the {self.knob_name} must be a number, got {value!r}")
        if self.config.policy == "patience" and not (math.isfinite(value) and value >= 1 and value == int(value)):
            raise ValueError(
                f"{self.method}: with policy 'patience' the knob is the number of consecutive agreeing exits, "
                f"an integer from 1 to {self.num_exits}; got {value!r}"
            )

    # --- the exit decision ----------------------------------------------------------------------
    def _exit_now(
        self, i: int, logits: torch.Tensor, knob: float, memo: tuple | None
    ) -> tuple[torch.Tensor, tuple | None]:
        """Which rows stop at exit i: (done [m] bool, policy state to carry to exit i+1).

        Row-wise only, so a row's decision never depends on the other rows of its batch.
        `memo` is the patience state (previous prediction, length of the agreeing run) [m] each
        (and, for "learned", the previous max-prob: `decider_features`).
        """
        policy = self.config.policy
        if policy == "learned":
            x, memo = self.decider_features(i, logits, memo)  # [m, F]
            return torch.sigmoid((x * self.decider[i, :-1]).sum(-1) + self.decider[i, -1]) >= knob, memo  # per row
        if policy == "patience":
            pred = logits.argmax(dim=-1)  # [m]
            run = torch.ones_like(pred) if memo is None else torch.where(pred == memo[0], memo[1] + 1, 1)
            return run >= knob, (pred, run)
        z = logits.float() / self.temperature[i]  # [m, C]
        if policy == "max-softmax":
            return z.softmax(dim=-1).amax(dim=-1) >= knob, None
        logp = z.log_softmax(dim=-1)
        entropy = -(logp.exp() * logp).sum(dim=-1)  # [m], >= 0
        return entropy < knob, None

    def decider_features(self, i: int, logits: torch.Tensor, memo: tuple | None) -> tuple[torch.Tensor, tuple]:
        """The learned decider's features at exit i, `DECIDER_FEATURES` [m, F] float32, and the state
        to carry to exit i+1 (prediction, agreeing run, max-prob) [m] each; `memo`: exit i-1's state
        (None at the first exit). Probabilities are softmax(logits / T_i)."""
        p = (logits.float() / self.temperature[i]).softmax(dim=-1)  # [m, C]
        top = p.topk(min(2, p.shape[-1]), dim=-1).values  # [m, 2]
        pred = p.argmax(dim=-1)  # [m]
        entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=-1)  # [m]
        run = torch.ones_like(pred) if memo is None else torch.where(pred == memo[0], memo[1] + 1, 1)  # [m]
        previous = torch.zeros_like(top[:, 0]) if memo is None else memo[2]  # [m] exit i-1's max-prob
        x = torch.stack([top[:, 0], top[:, 0] - top[:, -1], entropy, (run > 1).float(), run.float(), previous], -1)
        return x, (pred, run, top[:, 0])

    # --- cost -----------------------------------------------------------------------------------
    def cost(self, exit_index: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """FLOPs [b] (float64) of samples of real lengths [b] that stop at exits `exit_index` [b]: the blocks
        they ran at their length, one head per exit evaluated for them (and "learned": the decider's)."""
        cfg = self.spec.encoder
        per_block = flops.block(lengths, cfg)  # [b] int64
        per_head = flops.head(cfg, self.spec.num_labels)
        if self.config.pooling == "mean":
            per_head = per_head + lengths * cfg.hidden_size  # one add per token state element (the divide is d more)
        heads = (exit_index + 1) * per_head
        if self.config.policy == "learned":  # a dot product over the features per decision taken
            heads = heads + 2 * len(DECIDER_FEATURES) * (exit_index + 1).clamp(max=self.num_exits - 1)
        embed = self.embeddings_run[exit_index] * flops.embeddings(lengths, cfg)  # a projection, if any
        return (self.layers_run[exit_index] * per_block + heads + embed).to(torch.float64)

    # --- forward --------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask, token_type_ids=None, knob=AT_DEFAULT) -> ClassifierOutput:
        knob = self.run_knob(knob)
        lengths = flops.lengths_of(attention_mask)  # [b]
        if self.training or knob is None:
            exit_logits = self.all_exit_logits(input_ids, attention_mask, token_type_ids)  # [n, b, C]
            last = torch.full_like(lengths, self.num_exits - 1)
            extras = {"exit_logits": exit_logits, "exit": last}
            return ClassifierOutput(logits=exit_logits[-1], flops=self.cost(last, lengths), extras=extras)
        logits, exit_index = self._exit_early(input_ids, attention_mask, token_type_ids, lengths, knob)
        return ClassifierOutput(logits=logits, flops=self.cost(exit_index, lengths), extras={"exit": exit_index})

    def all_exit_logits(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """Every exit's logits for every sample, [n_exits, b, C] (what training uses)."""
        state, out = self._start(input_ids, attention_mask, token_type_ids), []
        for i in range(self.num_exits):
            logits, state = self._stage(i, state, detach=i > 0 and self.detach_between_exits)
            out.append(logits)
        return torch.stack(out)

    def _exit_early(self, input_ids, attention_mask, token_type_ids, lengths, knob) -> tuple[torch.Tensor, ...]:
        """Batched inference with compaction: (logits [b, C], exit index [b]).

        `active` holds the batch rows still running. After each exit every active row's logits and
        exit index are written to the outputs by index (a row that goes on is overwritten at a
        later exit), then the running state (hidden states, mask rows, policy state) keeps only the
        rows that go on, cut to the longest of them. No loop over samples.
        """
        b = input_ids.shape[0]
        out_exit = torch.full((b,), self.num_exits - 1, dtype=torch.int64, device=input_ids.device)
        if b == 0:
            return torch.zeros(0, self.spec.num_labels, device=input_ids.device), out_exit
        state = self._start(input_ids, attention_mask, token_type_ids)
        active = torch.arange(b, device=input_ids.device)  # [m] batch rows still running
        active_len = lengths  # [m]
        width = input_ids.shape[1]
        out_logits, memo = None, None
        for i in range(self.num_exits):
            logits, state = self._stage(i, state)  # [m, C]
            if out_logits is None:
                out_logits = logits.new_zeros(b, logits.shape[1])
            out_logits[active] = logits
            out_exit[active] = i
            if i == self.num_exits - 1:
                break
            done, memo = self._exit_now(i, logits, knob, memo)
            keep = ~done
            # The one host sync per exit, inherent to compaction: the size of the batch that goes
            # on (and its longest real length, to drop padding columns no kept row needs).
            n_keep, width_keep = torch.stack([keep.sum(), torch.where(keep, active_len, 0).amax()]).tolist()
            if n_keep == 0:
                break
            if n_keep < active.shape[0] or width_keep < width:
                # kept rows in their order, without another sync (a stable sort puts them first)
                rows = torch.argsort(done.to(torch.int8), stable=True)[:n_keep]
                state = self._compact(state, rows, width_keep)
                active, active_len, width = active[rows], active_len[rows], width_keep
                memo = None if memo is None else tuple(t[rows] for t in memo)
        return out_logits, out_exit

    # --- training -------------------------------------------------------------------------------
    def loss(self, out: ClassifierOutput, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Sum over exits of each exit's loss (mean over the batch, or sum for 'sum'): its
        cross-entropy, plus for every exit but the last, with `distill_weight` w > 0,
        w * t^2 * KL(softmax(z_last / t) || softmax(z_i / t)) with z_last detached.

        Needs the training forward's `extras["exit_logits"]`; an output of the early-exit path
        (eval mode with a knob) gets the plain cross-entropy of its logits.
        """
        exit_logits = out.extras.get("exit_logits")
        if exit_logits is None:
            return super().loss(out, labels, reduction)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        n, b, c = exit_logits.shape
        ce = F.cross_entropy(exit_logits.reshape(n * b, c), labels.repeat(n), reduction="none").view(n, b)
        w, t = self.config.distill_weight, self.config.distill_temperature
        if w > 0 and n > 1:
            target = (exit_logits[-1].detach().float() / t).log_softmax(dim=-1)  # [b, C], a target only
            student = (exit_logits[:-1].float() / t).log_softmax(dim=-1)  # [n-1, b, C]
            kl = (target.exp() * (target - student)).sum(dim=-1)  # [n-1, b]
            ce = torch.cat([ce[:-1] + (w * t * t) * kl.to(ce.dtype), ce[-1:]])
        loss = ce.sum() if reduction == "sum" else ce.mean(dim=1).sum()
        if out.aux_loss is not None:
            loss = loss + (out.aux_loss * b if reduction == "sum" else out.aux_loss)
        return loss

    # --- calibration and the offline sweep -----------------------------------------------------
    @torch.inference_mode()
    def exit_logits(self, enc: Encoded, batch_size: int = 64, progress: bool = False) -> tuple[torch.Tensor, ...]:
        """Every exit's logits for a whole split from one pass: ([n_exits, n, C] float32 on CPU,
        real lengths [n] int64), in the order of `enc`. Eval mode; the model's mode is restored."""
        if len(enc) == 0:
            raise ValueError("nothing to run: the encoded split is empty")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = torch.empty(self.num_exits, len(enc), self.spec.num_labels, dtype=torch.float32)
        lengths = enc.lengths()
        batches = eval_batches(enc, batch_size, pad_id=self.spec.encoder.pad_token_id, sort_by_length=True)
        try:
            for batch in tqdm(batches, total=math.ceil(len(enc) / batch_size), desc=f"{self.method} exits",
                              disable=not progress, leave=False):
                z = self.all_exit_logits(batch.input_ids.to(device), batch.attention_mask.to(device))
                out[:, batch.index] = z.float().cpu()
        finally:
            self.train(was_training)
        return out, lengths

    def selection_score(self, val: Encoded, batch_size: int = 64) -> float:
        """Mean validation accuracy over the exits: every exit serves some samples, so the epoch
        kept is the one best for the whole curve, not for the last exit alone."""
        logits, _ = self.exit_logits(val, batch_size)  # [n_exits, n, C]
        return float((logits.argmax(-1) == val.labels).double().mean())

    def exit_decisions(self, exit_logits: torch.Tensor, knob: float | None) -> torch.Tensor:
        """The exit [n] each sample takes at `knob`, from all exits' logits [n_exits, n, C]; the
        same rule, row by row, as the batched forward."""
        self._check_knob(knob)
        n = exit_logits.shape[1]
        exit_index = torch.full((n,), self.num_exits - 1, dtype=torch.int64)
        if knob is None:
            return exit_index
        running, memo = torch.ones(n, dtype=torch.bool), None
        with torch.no_grad():
            for i in range(self.num_exits - 1):
                done, memo = self._exit_now(i, exit_logits[i].to(self.temperature.device), knob, memo)
                done = done.cpu()
                exit_index = torch.where(running & done, i, exit_index)
                running &= ~done
        return exit_index

    def sweep_offline(self, enc: Encoded, knobs, batch_size: int = 64, progress: bool = False) -> list[SweepPoint]:
        """Every knob value from one pass that stores every exit's logits (see `exit_decisions`).

        Extras per point: "exit" [n] (the exit each sample took) and, when every sample is
        labelled, "exit_accuracy" (the accuracy of each exit on its own, the same at every knob).
        """
        for k in knobs:
            self._check_knob(k)
        z, lengths = self.exit_logits(enc, batch_size, progress)
        rows = torch.arange(len(enc))
        common: dict[str, Any] = {"exit_layers": list(self.exit_layers)}
        y = enc.labels
        if y.shape == (len(enc),) and bool(((y >= 0) & (y < self.spec.num_labels)).all()):
            common["exit_accuracy"] = (z.argmax(dim=-1) == y).double().mean(dim=1).tolist()
        points = []
        for k in knobs:
            exit_index = self.exit_decisions(z, k)
            cost = self.cost(exit_index.to(self.layers_run.device), lengths.to(self.layers_run.device)).cpu()
            points.append(SweepPoint(k, z[exit_index, rows].argmax(dim=-1), cost, {"exit": exit_index, **common}))
        return points

    def calibrate(self, calib: Encoded, batch_size: int = 64) -> dict[str, list[float]]:
        """Fit each exit's temperature on `calib` (held-out training samples or validation, never
        test) by minimising its NLL; returns the temperatures, the NLL before (T = 1) and after,
        and each exit's accuracy on `calib`."""
        y = calib.labels
        if y.shape != (len(calib),) or bool(((y < 0) | (y >= self.spec.num_labels)).any()):
            raise ValueError("calibration needs every sample labelled with one of the model's labels")
        z, _ = self.exit_logits(calib, batch_size)
        t, before, after = (list(v) for v in zip(*(fit_temperature(z[i], y) for i in range(self.num_exits))))
        with torch.no_grad():
            self.temperature.copy_(torch.tensor(t))
        return {"temperature": t, "nll_before": before, "nll_after": after,
                "exit_accuracy": (z.argmax(dim=-1) == y).double().mean(dim=1).tolist()}


# --- EE and SWEET: one backbone, a head after each exit layer ---------------------------------------


class EarlyExitClassifier(MultiExitClassifier):
    """One backbone with an exit head after each exit layer; every exit trains all layers below it."""

    method = "ee"
    description = "early exit: a classifier after chosen layers, trained with the sum of exit losses"

    def __init__(self, spec: ModelSpec, config: EarlyExitConfig | None = None):
        super().__init__(spec, config)
        c = spec.num_labels
        self.encoder = Encoder(spec.encoder)
        # every exit has its own final norm and pooler in its head; the encoder's would be unused copies
        self.encoder.pooler = self.encoder.final_norm = None
        self.heads = nn.ModuleList(ExitHead(spec.encoder, c, self.config.classifier_dropout, self.config.pooling)
                                   for _ in self.exit_layers)

    @classmethod
    def from_dense(cls, dense: AdaptiveClassifier, config: EarlyExitConfig | None = None) -> MultiExitClassifier:
        """Backbone from the dense model; every exit head starts as the dense pooler + classifier,
        so with pooling "cls" the last exit of a fresh conversion is the dense model."""
        if not isinstance(dense, DenseClassifier):
            raise ValueError(f"conversion needs a dense model, got method {dense.method!r}")
        model = cls(dense.spec, config or EarlyExitConfig())
        state = {k: v for k, v in dense.encoder.state_dict().items() if not k.startswith(("pooler.", "final_norm."))}
        model.encoder.load_state_dict(state)
        for head in model.heads:
            head.copy_from(dense.encoder, dense.classifier)
        return model

    def _start(self, input_ids, attention_mask, token_type_ids):
        h = self.encoder.embed(input_ids, token_type_ids)  # [b, s, d]
        return h, self.token_mask(attention_mask, h.dtype), 0  # a Layout at inference: padding-free segments

    def _stage(self, i, state, detach=False):
        h, bias, layer = state
        if detach:
            h = h.detach()
        h = self.encoder.run_blocks(h, bias, layer, self.exit_layers[i])  # [m, s, d]
        return self.heads[i](h, bias), (h, bias, self.exit_layers[i])

    def _compact(self, state, rows, length):
        h, bias, layer = state
        return h[rows, :length], bias[rows, :, :, :length], layer


class SweetClassifier(EarlyExitClassifier):
    """EE with the hidden state detached at each exit boundary in training (SWEET, ACL 2023)."""

    method = "sweet"
    description = "SWEET: early exit where each block of layers is trained only by the exit right after it"
    # Each segment starts from a detached copy of the hidden state, so exit i's loss reaches only the
    # blocks in (e_{i-1}, e_i] (and the embeddings for the first exit). Values, hence inference, unchanged.
    detach_between_exits = True
    # With an exit after every layer each segment is one layer, trained greedily by its own exit
    # (measured on MiniLM-L6: every exit 78-79%, the last 5 points below EE's); the paper's
    # placement scaled to depth gives the last exit the top half of the network.
    auto_exits = "paper"


# --- Multi-Model: a cascade of independent models of increasing depth -------------------------------


class MultiModelClassifier(MultiExitClassifier):
    """One independent model per exit depth e_i, run as a cascade at inference.

    Training minimises the sum of the sub-models' cross-entropies; their parameters are disjoint,
    so each sub-model gets exactly its own gradient. Note that gradient clipping in
    `adaptinf.recipes.finetune.finetune` is over the global norm of all sub-models together.
    """

    method = "multi-model"
    description = "multi-model cascade: independent models of increasing depth; an escalated sample runs the next from scratch"

    def __init__(self, spec: ModelSpec, config: EarlyExitConfig | None = None):
        super().__init__(spec, config)
        sub = DenseConfig(classifier_dropout=self.config.classifier_dropout)
        depth = [dataclasses.replace(spec, encoder=dataclasses.replace(spec.encoder, num_hidden_layers=e))
                 for e in self.exit_layers]
        self.models = nn.ModuleList(DenseClassifier(sub_spec, sub) for sub_spec in depth)

    def _layers_per_exit(self) -> list[int]:
        return np.cumsum(self.exit_layers).tolist()  # an escalated sample re-runs every model from the input

    def _embeddings_per_exit(self) -> list[int]:
        return list(range(1, len(self.exit_layers) + 1))  # every model it went through embedded the input

    @classmethod
    def from_dense(cls, dense: AdaptiveClassifier, config: EarlyExitConfig | None = None) -> MultiModelClassifier:
        """Model i = the dense embeddings, first e_i layers, pooler and classifier; the last is the
        dense model itself."""
        if not isinstance(dense, DenseClassifier):
            raise ValueError(f"conversion needs a dense model, got method {dense.method!r}")
        model = cls(dense.spec, config or EarlyExitConfig())
        state = dense.state_dict()
        for e, sub in zip(model.exit_layers, model.models):
            sub.load_state_dict({k: v for k, v in state.items() if not _block_at_or_after(k, e)})
        return model

    def _start(self, input_ids, attention_mask, token_type_ids):
        return input_ids, attention_mask, token_type_ids

    def _stage(self, i, state, detach=False):
        input_ids, attention_mask, token_type_ids = state
        sub = self.models[i]
        h = sub.encoder.embed(input_ids, token_type_ids)  # [m, s, d]
        bias = sub.token_mask(attention_mask, h.dtype)
        h = sub.encoder.run_blocks(h, bias)
        pooled = sub.encoder.pool(summarise(h, bias, self.config.pooling)[:, None])  # [m, d]; "cls": the dense one
        return sub.classifier(sub.dropout(pooled)), state

    def _compact(self, state, rows, length):
        return tuple(None if t is None else t[rows, :length] for t in state)


def _block_at_or_after(key: str, layer: int) -> bool:
    """Whether a dense state-dict key belongs to encoder block `layer` (0-based) or a later one."""
    parts = key.split(".")
    return parts[:2] == ["encoder", "blocks"] and int(parts[2]) >= layer
