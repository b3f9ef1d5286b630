"""Per-token early exit on the decoder (CALM-style confidence exits), registry name "early-exit".

Exits. An exit sits after each layer in `EarlyExitLMConfig.exits` (1-based layer numbers; default
every layer; the last layer must be one). Every exit is CALM's shared output: the decoder's final
LayerNorm (or, with `exit_norm`, the exit's own LayerNorm, a copy of the final one at conversion)
then the tied LM head; the last exit is the model's own head (`Decoder.head`). A token stops at the
first exit whose confidence reaches the knob (a threshold): "max-prob" (max softmax probability),
"margin" (top-1 minus top-2 probability), or "classifier" (CALM's learned measure: sigmoid of a
Linear d -> 1 per exit on the exit's normalised state, trained to predict that the exit's top-1
token equals the last layer's; 2d FLOPs per check instead of an LM head, which on gpt-tiny, vocab
4096 at d 128, costs more than two blocks). Knob None: no exit is checked, the dense model.

Copy-state KV propagation (the rule; see `adaptinf.decoder.KVCache`). A token that exits after
layer j keeps its hidden state h_exit (block j's output) frozen; each later layer l > j still
gets the token's keys/values, computed from h_exit: `project_kv(blocks[l].attention, h_exit)`,
exactly the entry block l would have written had its input been h_exit. Later tokens attend to
those entries. In a batch (or a window) where tokens exit at different layers every layer runs on
`torch.where(exited, h_exit, h_l)`, so an exited token's K/V comes from its frozen state, the
others' from their real input, every token writes its slot of every layer in the same step and
the cache length stays shared. The same rule holds in all three paths, so they agree token for
token (tests/test_lm_early_exit.py):
- `score` (teacher-forced windows, perplexity): one pass over the window, every layer on the
  where-frozen states (no host sync);
- `decode_exits` (the text fed token by token through the KV cache) and `generate` (prefill of the
  prompt with the same per-token exits, then one token per step): once every token of a step has
  exited (one host sync per exit checked), the remaining layers only write K/V (project_kv), no
  attention or FFN: the saving is real at batch 1 and whenever a whole batch step exits.

FLOPs (adaptinf.flops convention, per token as token-by-token execution runs it): a token at
position p that stops at exit e (after layer j_e) costs j_e full causal blocks at p
(`decoder_token`'s per-block terms), (L - j_e) K/V projections (d -> 2d) and its checks: softmax
measures e + 1 LM heads (the exits it checked; the taken exit's logits are the check's), the
classifier e + 1 Linears d -> 1 and one LM head (the taken exit's). A token that reaches the last
layer pays L blocks, n - 1 checks and the final head.
`score` computes the window as a masked dense pass (to stay free of host syncs) but counts this.

Training (`training_loss`, via `adaptinf.recipes.lm_early_exit.fit` -> `train_lm`): CALM's
weighted sum of every exit's next-token cross-entropy, weights proportional to the exit's layer
number ("layer"; or "uniform"), normalised to sum 1; plus, with `distill_weight` w > 0, w * t^2 *
KL(softmax(z_last / t) || softmax(z_e / t)) per earlier exit (z_last detached: the model's own
last layer is the teacher), weighted like its cross-entropy; with "classifier", plus the mean BCE
of each exit's classifier against "this exit's argmax equals the last layer's" (CALM's consistency
label), on a detached state so it does not move the LM.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaptinf import flops
from adaptinf.decoder import Decoder, DecoderOutput, KVCache, decode_tokens, project_kv
from adaptinf.lm import LanguageModel
from adaptinf.settings import from_known_fields

CONFIDENCES = ("max-prob", "margin", "classifier")
LOSS_WEIGHTS = ("layer", "uniform")
# the sweep's thresholds, cheapest first (0 exits every token at the first exit); None (dense) last
THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def _as_exits(value) -> tuple[int, ...]:
    """Exit layers from a list/tuple of ints, "every" (every layer: stored as ()) or "1,2,4"."""
    if isinstance(value, str):
        if value.strip().lower() == "every":
            return ()
        try:
            return tuple(int(p) for p in value.strip().strip("[]()").replace(" ", "").split(",") if p)
        except ValueError:
            raise ValueError(f"EarlyExitLMConfig.exits: expected layer numbers such as [1, 2, 4] or 'every', "
                             f"got {value!r}") from None
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise ValueError(f"EarlyExitLMConfig.exits must be a list of 1-based layer numbers such as [1, 2, 4] "
                     f"(or 'every'), got {value!r}")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class EarlyExitLMConfig:
    """Per-token early exit settings.

    exits: 1-based layer numbers after which an exit sits, increasing, the last layer included;
        () or "every": every layer (checked against the decoder's depth when the model is built).
    confidence: "max-prob" (max softmax probability >= threshold), "margin" (top-1 minus top-2
        probability >= threshold) or "classifier" (a learned per-exit sigmoid >= threshold; train it).
    exit_norm: each exit but the last has its own LayerNorm (a copy of the final LayerNorm at
        conversion, 2d parameters) instead of sharing the final one; the LM head is always shared.
    loss_weights: exit e's cross-entropy weight: "layer" (proportional to its layer number, CALM)
        or "uniform"; normalised to sum 1.
    distill_weight: w >= 0; each exit but the last adds w * t^2 * KL(final || exit) (0: none).
    distill_temperature: the softening t of that term.
    (loss_weights and distill_* act in training only.)
    """

    exits: tuple[int, ...] = ()
    confidence: str = "max-prob"
    exit_norm: bool = True
    loss_weights: str = "layer"
    distill_weight: float = 0.0
    distill_temperature: float = 1.0

    def __post_init__(self) -> None:
        exits = _as_exits(self.exits)
        object.__setattr__(self, "exits", exits)
        if any(e < 1 for e in exits):
            raise ValueError(f"EarlyExitLMConfig.exits are 1-based layer numbers (>= 1), got {list(exits)}")
        if list(exits) != sorted(set(exits)):
            raise ValueError(f"EarlyExitLMConfig.exits must be increasing without repeats, got {list(exits)}; "
                             f"did you mean {sorted(set(exits))}?")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"EarlyExitLMConfig.confidence must be one of {list(CONFIDENCES)}, got {self.confidence!r}")
        if not isinstance(self.exit_norm, bool):
            raise ValueError(f"EarlyExitLMConfig.exit_norm must be true or false, got {self.exit_norm!r}")
        if self.loss_weights not in LOSS_WEIGHTS:
            raise ValueError(f"EarlyExitLMConfig.loss_weights must be one of {list(LOSS_WEIGHTS)}, "
                             f"got {self.loss_weights!r}")
        if not _number(self.distill_weight) or self.distill_weight < 0:
            raise ValueError(f"EarlyExitLMConfig.distill_weight must be a number >= 0 (0: no distillation), "
                             f"got {self.distill_weight!r}")
        if not _number(self.distill_temperature) or self.distill_temperature <= 0:
            raise ValueError(f"EarlyExitLMConfig.distill_temperature must be a number > 0 (1: the plain softmax), "
                             f"got {self.distill_temperature!r}")

    def resolve(self, num_layers: int) -> tuple[int, ...]:
        """The exit layers of a decoder of `num_layers` blocks (every layer when `exits` is empty)."""
        if not self.exits:
            return tuple(range(1, num_layers + 1))
        if self.exits[-1] > num_layers:
            raise ValueError(f"EarlyExitLMConfig.exits {list(self.exits)} name layer {self.exits[-1]}, but the "
                             f"decoder has {num_layers} layers")
        if self.exits[-1] != num_layers:
            raise ValueError(f"EarlyExitLMConfig.exits {list(self.exits)} must include the last layer ({num_layers}), "
                             f"whose head every token that does not exit earlier uses: use "
                             f"{list(self.exits) + [num_layers]}")
        return self.exits

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exits"] = list(self.exits)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EarlyExitLMConfig:
        return from_known_fields(cls, d)


@dataclass
class ExitPass:
    """What one pass over s tokens gave: `picked` the logits [b, s, V] (no targets) or next-token NLL
    [b, s] (fp32) of the exit each token took, `exit_index` [b, s] that exit's position in the exit
    list (0-based; the last = no early exit), `h` the blocks' output with exited tokens frozen."""

    picked: torch.Tensor
    exit_index: torch.Tensor
    h: torch.Tensor


@dataclass
class ExitScore:
    """Per-token details of `EarlyExitLM.score_tokens`: NLL [b, s] (fp32), exit index [b, s] and
    FLOPs [b, s] (fp64) executed for each token."""

    nll: torch.Tensor
    exit_index: torch.Tensor
    flops: torch.Tensor


class EarlyExitLM(LanguageModel):
    """A decoder with per-token confidence exits and copy-state KV propagation (module docstring).

    The knob is the confidence threshold: a number in [0, 1] (0: every token takes the first exit;
    higher: fewer exit early) or None (no early exit, the dense model, no exit checked)."""

    method = "early-exit"

    def __init__(self, decoder: Decoder, tokenizer=None, name: str = "custom", seq_len: int | None = None,
                 config: EarlyExitLMConfig | None = None):
        super().__init__(decoder, tokenizer, name, seq_len)
        config = EarlyExitLMConfig() if config is None else config
        if not isinstance(config, EarlyExitLMConfig):
            raise ValueError(f"EarlyExitLM takes an EarlyExitLMConfig, got {type(config).__name__}")
        if config.confidence == "margin" and decoder.cfg.vocab_size < 2:
            raise ValueError("EarlyExitLMConfig.confidence 'margin' needs a vocabulary of at least 2 tokens")
        self.config = config
        self.exit_layers = config.resolve(decoder.num_layers)
        d, eps = decoder.cfg.hidden_size, decoder.cfg.layer_norm_eps
        n_norms = len(self.exit_layers) - 1 if config.exit_norm else 0
        self.exit_norms = nn.ModuleList(nn.LayerNorm(d, eps=eps) for _ in range(n_norms))
        with torch.no_grad():
            for norm in self.exit_norms:
                norm.load_state_dict(decoder.final_norm.state_dict())
        n_cls = len(self.exit_layers) - 1 if config.confidence == "classifier" else 0
        self.exit_classifiers = nn.ModuleList(nn.Linear(d, 1) for _ in range(n_cls))
        for lin in self.exit_classifiers:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)  # untrained: confidence 0.5 everywhere
        self.register_buffer("exit_layer", torch.tensor(self.exit_layers, dtype=torch.int64), persistent=False)

    # --- the method contract ----------------------------------------------------------------------

    def method_config(self) -> dict:
        return self.config.to_dict()

    @classmethod
    def from_config(cls, decoder: Decoder, method_config: dict, name: str = "custom",
                    seq_len: int | None = None) -> EarlyExitLM:
        return cls(decoder, None, name, seq_len, EarlyExitLMConfig.from_dict(method_config))

    @classmethod
    def from_dense(cls, dense: LanguageModel, config: EarlyExitLMConfig | None = None) -> EarlyExitLM:
        """Exits on a copy of a trained dense LM (tokenizer, name, seq_len carried; `dense` untouched);
        each exit's LayerNorm starts as the final one, so an exit is the dense head on an earlier layer."""
        if not isinstance(dense, LanguageModel) or dense.method != "dense":
            raise ValueError(f"EarlyExitLM.from_dense takes a dense LanguageModel, got "
                             f"{getattr(dense, 'method', type(dense).__name__)!r}")
        model = cls(copy.deepcopy(dense.decoder), dense.tokenizer, dense.name, dense.seq_len, config)
        return model.train(dense.training)

    def knob_values(self) -> list[float | None]:
        return [*THRESHOLDS, None]

    def check_knob(self, value: float | None) -> float | None:
        if value is None:
            return None
        if not _number(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"an early-exit knob is a confidence threshold in [0, 1] (0: every token exits at the "
                             f"first exit; None: no early exit, the dense model), got {value!r}")
        return float(value)

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)

    # --- exits ------------------------------------------------------------------------------------

    def exit_logits(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """Exit e's logits [..., V] from h [..., d] (a block's output): its LayerNorm (or the shared
        final one) and the tied LM head; the last exit is the decoder's own head."""
        if e == self.num_exits - 1:
            return self.decoder.head(h)
        return F.linear(self._exit_norm(e, h), self.decoder.embeddings.word.weight)

    def _exit_norm(self, e: int, h: torch.Tensor) -> torch.Tensor:
        return self.exit_norms[e](h) if self.config.exit_norm else self.decoder.final_norm(h)

    def check_confidence(self, e: int, h: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        """Exit e's confidence [...] for states h [..., d]: the learned classifier's, or the softmax
        measure of its logits."""
        if self.config.confidence == "classifier":
            return torch.sigmoid(self.exit_classifiers[e](self._exit_norm(e, h)).squeeze(-1).float())
        return self.confidence(logits)

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] -> [...]: max softmax probability, or top-1 minus top-2 probability (fp32)."""
        z = logits.float()
        lse = z.logsumexp(dim=-1)
        if self.config.confidence == "max-prob":
            return (z.amax(dim=-1) - lse).exp()
        top = z.topk(2, dim=-1).values
        return (top[..., 0] - lse).exp() - (top[..., 1] - lse).exp()

    def _block(self, layer: int, h: torch.Tensor, exited: torch.Tensor, cache: KVCache | None,
               bias: torch.Tensor | None) -> torch.Tensor:
        """Block `layer` on h [b, s, d] whose exited tokens (exited [b, s]) hold their frozen state: their
        K/V come from it (copy-state), their output is the frozen state again."""
        out = self.decoder.run_blocks(h, layer, layer + 1, cache, bias)
        return torch.where(exited[..., None], h, out)

    def _exit_pass(self, h: torch.Tensor, knob: float, cache: KVCache | None = None, bias: torch.Tensor | None = None,
                   targets: torch.Tensor | None = None, real: torch.Tensor | None = None,
                   skip: bool = False) -> ExitPass:
        """Run every block on the embedded tokens h [b, s, d] with per-token exits at threshold `knob`.

        With `targets` [b, s] the exit's next-token NLL is kept, else its logits. `skip` (cached decoding):
        after each exit checked, one host sync asks whether every real token (`real` [b, s], None: all)
        has exited (and, with the classifier, whether any did: else its LM head is not run); if every
        one has, the remaining layers only write the K/V of the frozen states into the cache."""
        b, s, _ = h.shape
        exited = torch.zeros(b, s, dtype=torch.bool, device=h.device)
        exit_index = torch.full((b, s), self.num_exits - 1, dtype=torch.long, device=h.device)
        picked = None
        start = 0
        learned = self.config.confidence == "classifier"
        for e, j in enumerate(self.exit_layers):
            for layer in range(start, j):
                h = self._block(layer, h, exited, cache, bias)
            start = j
            last = e == self.num_exits - 1
            z = None if learned and not last else self.exit_logits(e, h)  # [b, s, V]
            now = exited if last else ~exited & (self.check_confidence(e, h, z) >= knob)  # [b, s]
            done = exited | now
            all_done, any_now = True, True
            if skip and not last:  # one host sync
                all_done, any_now = torch.stack([(done if real is None else done | ~real.bool()).all(),
                                                 now.any()]).tolist()
            if any_now or last:
                z = self.exit_logits(e, h) if z is None else z
                val = z if targets is None else F.cross_entropy(z.flatten(0, 1).float(), targets.flatten(),
                                                                reduction="none").view(b, s)
                keep_new = ~exited if last else now
                picked = val if picked is None else torch.where(self._rows(keep_new, val), val, picked)
            if last:
                break
            exit_index = torch.where(now, e, exit_index)
            exited = done
            if skip and all_done:
                self._write_kv(h, cache, j)
                break
        return ExitPass(picked, exit_index, h)

    @staticmethod
    def _rows(mask: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        return mask[..., None] if val.dim() > mask.dim() else mask

    def _check_cost(self) -> int:
        """FLOPs of one exit check that does not exit: an LM head, or the classifier's d -> 1."""
        d = self.cfg.hidden_size
        return flops.linear(1, d, 1) if self.config.confidence == "classifier" else flops.lm_head(1, self.cfg)

    def _write_kv(self, h: torch.Tensor, cache: KVCache, start: int) -> None:
        """Every token has exited: layers start..L-1 get the K/V of the frozen states, nothing else runs."""
        for layer in range(start, self.decoder.num_layers):
            k, v = project_kv(self.decoder.blocks[layer].attention, h)
            cache.write(layer, cache.length, k, v)

    def _cached_step(self, ids: torch.Tensor, mask: torch.Tensor | None, cache: KVCache, knob: float) -> ExitPass:
        """ids [b, s] after the cache's tokens, through the exits, the cache written and advanced."""
        dec = self.decoder
        s = ids.shape[1]
        pos = dec.positions(s, mask, cache.positions)
        h = dec.embeddings(ids, pos)
        cache.mark(mask)
        bias = dec.attention_bias(s, mask, cache, h.dtype)
        out = self._exit_pass(h, knob, cache, bias, real=mask, skip=True)
        cache.advance(pos)
        return out

    # --- cost ---------------------------------------------------------------------------------------

    def token_flops(self, exit_index: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """FLOPs (fp64) of tokens at 0-based `positions` that took exits `exit_index` (broadcast
        together): full blocks up to the exit, K/V projections after it, one LM head per exit checked."""
        cfg = self.cfg
        d, n_layers = cfg.hidden_size, cfg.num_hidden_layers
        j = self.exit_layer[exit_index]
        block = (flops.linear(1, d, 4 * d) + flops.ffn_block(1, d, cfg.intermediate_size)
                 + 2 * 2 * (positions + 1) * d)  # q/k/v + out, FFN, scores and sum over p + 1 keys
        kv = flops.linear(1, d, 2 * d)
        if self.config.confidence == "classifier":
            last = exit_index == self.num_exits - 1
            checks = (exit_index + 1 - last.long()) * flops.linear(1, d, 1) + flops.lm_head(1, cfg)
        else:
            checks = (exit_index + 1) * flops.lm_head(1, cfg)
        return (j * block + (n_layers - j) * kv + checks).to(torch.float64)

    # --- scoring --------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> DecoderOutput:
        """Logits [b, s, V] at the current knob, each token's from the exit it took (knob None: the
        dense decoder's); with a cache, the tokens go through it as generation feeds them."""
        if self.knob is None:
            return self.decoder(input_ids, attention_mask, cache)
        self.decoder.check_input(input_ids, attention_mask, cache)
        if cache is not None:
            return DecoderOutput(self._cached_step(input_ids, attention_mask, cache, self.knob).picked, cache)
        h = self.decoder.embed(input_ids, attention_mask=attention_mask)
        bias = self.decoder.attention_bias(input_ids.shape[1], attention_mask, None, h.dtype)
        return DecoderOutput(self._exit_pass(h, self.knob, bias=bias).picked)

    def score_tokens(self, inputs: torch.Tensor, targets: torch.Tensor) -> ExitScore:
        """Per-token NLL, exit and FLOPs of windows inputs/targets [b, s] at the current knob (knob None:
        the dense model, every token at the last exit, no exit checked). No host sync."""
        if self.knob is None:
            logits = self.decoder(inputs).logits
            nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view(targets.shape)
            last = torch.full_like(targets, self.num_exits - 1)
            pos = torch.arange(inputs.shape[1], device=inputs.device)
            cost = self.token_flops(last, pos) - self._check_cost() * (self.num_exits - 1)
            return ExitScore(nll, last, cost.expand(targets.shape))
        h = self.decoder.embed(inputs)
        out = self._exit_pass(h, self.knob, targets=targets)
        pos = torch.arange(inputs.shape[1], device=inputs.device)[None, :]
        return ExitScore(out.picked, out.exit_index, self.token_flops(out.exit_index, pos))

    def score(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.knob is None:
            return super().score(inputs, targets)
        res = self.score_tokens(inputs, targets)
        return res.nll.double().sum(), res.flops.sum()

    @torch.no_grad()
    def decode_exits(self, input_ids: torch.Tensor) -> ExitPass:
        """Feed input_ids [b, s] token by token through a KV cache (what generation does), at the
        current knob: the logits [b, s, V] and exit [b, s] of every token (knob None: the dense model)."""
        self.decoder.check_input(input_ids, None, None)
        b, s = input_ids.shape
        knob = math.inf if self.knob is None else self.knob
        cache = KVCache.empty(self.cfg, b, s, self.decoder.embeddings.word.weight.dtype, input_ids.device)
        steps = [self._cached_step(input_ids[:, t : t + 1], None, cache, knob) for t in range(s)]
        return ExitPass(torch.cat([p.picked for p in steps], 1), torch.cat([p.exit_index for p in steps], 1),
                        torch.cat([p.h for p in steps], 1))

    # --- training -------------------------------------------------------------------------------------

    def exit_weights(self) -> list[float]:
        """Each exit's cross-entropy weight: proportional to its layer number ("layer") or equal, sum 1."""
        raw = [float(j) for j in self.exit_layers] if self.config.loss_weights == "layer" else [1.0] * self.num_exits
        return [w / sum(raw) for w in raw]

    def training_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Weighted sum of every exit's mean next-token cross-entropy, plus the distillation of each
        earlier exit from the last one (module docstring). Every token runs every layer."""
        h = self.decoder.embed(inputs)
        hs = []
        start = 0
        for j in self.exit_layers:
            h = self.decoder.run_blocks(h, start, j)
            hs.append(h)
            start = j
        zs = [self.exit_logits(e, x).flatten(0, 1).float() for e, x in enumerate(hs)]  # [b*s, V] each
        y = targets.flatten()
        w = self.exit_weights()
        loss = sum(wi * F.cross_entropy(z, y) for wi, z in zip(w, zs))
        cfg = self.config
        if cfg.distill_weight > 0 and self.num_exits > 1:
            t = cfg.distill_temperature
            teacher = F.log_softmax(zs[-1].detach() / t, dim=-1)
            for wi, z in zip(w[:-1], zs[:-1]):
                kl = F.kl_div(F.log_softmax(z / t, dim=-1), teacher, log_target=True, reduction="batchmean")
                loss = loss + cfg.distill_weight * wi * t * t * kl
        if self.exit_classifiers:
            final = zs[-1].argmax(-1)
            bce = [F.binary_cross_entropy_with_logits(
                self.exit_classifiers[e](self._exit_norm(e, hs[e]).detach().flatten(0, 1)).squeeze(-1).float(),
                (zs[e].argmax(-1) == final).float()) for e in range(self.num_exits - 1)]
            loss = loss + sum(bce) / len(bce)
        return loss

    # --- generation -----------------------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        """`Decoder.generate`'s arguments and result, with per-token exits at the current knob (None:
        the dense decoder's own generation)."""
        if self.knob is None:
            return self.decoder.generate(input_ids, max_new_tokens, attention_mask, **kwargs)
        return self.generate_with_exits(input_ids, max_new_tokens, attention_mask, **kwargs)[0]

    @torch.no_grad()
    def generate_with_exits(self, input_ids: torch.Tensor, max_new_tokens: int,
                            attention_mask: torch.Tensor | None = None, *, do_sample: bool = False,
                            temperature: float = 1.0, top_k: int | None = None,
                            generator: torch.Generator | None = None, eos_token_id: int | None = None,
                            pad_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(`generate`'s ids [b, s + n], the exit [b, n] each new token was predicted at).

        The prompt is prefilled with the same per-token exits as `score` (so its cache is what
        token-by-token decoding writes), then one step per new token for the whole batch. Host syncs
        per new token: one per exit checked (at most num_exits - 1: "has every row exited?", which
        lets the remaining layers write K/V only), plus one for `eos_token_id` as `Decoder.generate`."""
        dec = self.decoder
        dec.check_generate(input_ids, max_new_tokens, attention_mask, do_sample, temperature, top_k,
                            eos_token_id, pad_token_id)
        b, s = input_ids.shape
        if max_new_tokens == 0:
            return input_ids, input_ids.new_zeros(b, 0)
        knob = math.inf if self.knob is None else self.knob
        was_training = self.training
        self.eval()
        try:
            cache = KVCache.empty(self.cfg, b, s + max_new_tokens, dec.embeddings.word.weight.dtype, input_ids.device)
            exits: list[torch.Tensor] = []

            def last(res: ExitPass) -> torch.Tensor:  # the last position's logits; its exit recorded
                exits.append(res.exit_index[:, -1])
                return res.picked[:, -1]

            first = last(self._cached_step(input_ids, attention_mask, cache, knob))  # the prompt, once
            new = decode_tokens(first, lambda nxt: last(self._cached_step(nxt[:, None], None, cache, knob)),
                                max_new_tokens, do_sample, temperature, top_k, generator, eos_token_id, pad_token_id)
        finally:
            self.train(was_training)
        ids = torch.cat([input_ids, new.to(input_ids.dtype)], dim=1)
        return ids, torch.stack(exits, dim=1)
