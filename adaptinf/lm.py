"""A language model: our `Decoder` with its tokenizer, saved and loaded as a directory, scored and sampled.

`LanguageModel` wraps a `adaptinf.decoder.Decoder` (the GPT-2 style causal decoder) with the
tokenizer it was trained with (`adaptinf.corpus.train_tokenizer`: byte-level BPE, `<|endoftext|>`
as id 0), its name and the context it was trained on (`seq_len`). The built-in model is `gpt-tiny`
(`BUILTIN_LMS`), trained from scratch by `adaptinf train-lm` (`adaptinf.recipes.lm`).

On disk (`save` / `load_lm`) a directory, as a classifier's (`adaptinf.checkpoint`, whose atomic
writers and weight checks it uses; never pickle):
    config.json        {"format": "adaptinf", "format_version": 1, "kind": "causal-lm",
                        "method": "dense", "method_config": {}, "decoder": DecoderConfig fields,
                        "lm": {"name", "seq_len"}, "extra": ...}
    model.safetensors  the `LanguageModel`'s state dict (`decoder.*`; the LM head is the token
                       embedding, stored once)
    tokenizer.json, tokenizer_config.json (`save_pretrained` of the tokenizer)
`kind` tells a language model from a classifier (a classifier's config has no `kind`); `method` is
the method applied to the decoder ("dense": none), `method_config` its settings and `knob` the
operating point it was saved at (`LanguageModel.knob`; None: the method's full-compute default).

Adaptive language models (issue 19: PLANER, per-token early exit, ACM on the decoder;
`adaptinf.lm_methods`) subclass `LanguageModel` and keep this contract, so training
(`adaptinf.recipes.lm.train_lm`), perplexity, generation, save/load and `adaptinf run --task austen`
treat every method alike:
    method                 its registry name (`adaptinf.lm_methods.LM_METHODS`)
    method_config()        its settings as a JSON object (saved; `from_config` rebuilds the structure)
    from_config(decoder, method_config, name, seq_len)   the unconverted structure, for `load_lm`
    knob_values()          the operating points a sweep evaluates, cheapest first (dense: [None]); None is
                           the method's default point (dense and early exit: full compute; ACM: its
                           gate as trained; PLANER: the searched architecture)
    check_knob(v)          a ValueError for a knob the method does not take; `knob` / `using_knob(v)`
    training_loss(inputs, targets)   what training minimises (dense: next-token cross-entropy)
    score(inputs, targets) (summed NLL, executed FLOPs) at the current knob, as tensors (no sync)
    generate(...)          `Decoder.generate`'s signature, at the current knob

Perplexity (`evaluate_perplexity`): exp of the mean next-token NLL over a split's token stream in
`adaptinf.corpus.lm_eval_batches` windows of the model's `seq_len` (every token after the first is
predicted once; each window's context restarts).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adaptinf import flops
from adaptinf.checkpoint import (CONFIG_FILE, FORMAT, WEIGHTS_FILE, load_weights, save_tensors_atomic,
                                 write_json_atomic)
from adaptinf.corpus import EOS, eval_token_count, lm_eval_batches, perplexity_from
from adaptinf.decoder import Decoder, DecoderConfig, DecoderOutput, KVCache
from adaptinf.version import __version__

LM_KIND = "causal-lm"
LM_FORMAT_VERSION = 1
DEFAULT_LM = "gpt-tiny"
# built-in decoders trained from scratch: DecoderConfig fields besides vocab_size (the tokenizer's) and dropouts
BUILTIN_LMS = {
    "gpt-tiny": dict(max_position_embeddings=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=512),
}
_DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "embedding_dropout_prob")


def builtin_lm_config(name: str, vocab_size: int, dropout: float = 0.0, eos_token_id: int | None = None,
                      overrides: dict | None = None) -> DecoderConfig:
    """The `DecoderConfig` of built-in LM `name` for a tokenizer of `vocab_size` tokens, every dropout at
    `dropout`; `overrides` replace DecoderConfig fields (e.g. {"hidden_size": 32} for a test model)."""
    overrides = dict(overrides or {})
    if name not in BUILTIN_LMS:
        raise ValueError(f"unknown built-in language model {name!r}; available: {', '.join(BUILTIN_LMS)}")
    fields = {**BUILTIN_LMS[name], **{f: dropout for f in _DROPOUT_FIELDS}}
    bad = sorted(set(overrides) & {"vocab_size", "bos_token_id", "eos_token_id"})
    if bad:
        raise ValueError(f"{bad} come from the tokenizer and cannot be set (set the tokenizer's vocabulary size instead)")
    known = set(DecoderConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown DecoderConfig fields {unknown}; known: {', '.join(sorted(known))}")
    return DecoderConfig(**{**fields, **overrides, "vocab_size": vocab_size, "bos_token_id": eos_token_id,
                            "eos_token_id": eos_token_id})


@dataclass(frozen=True)
class LMScore:
    """A summed next-token NLL (nats) over `tokens` predicted tokens; `loss` is its mean. `flops`:
    the FLOPs the model executed scoring them (at its knob), so `flops_per_token` is comparable
    across methods (0.0 where not counted)."""

    nll_sum: float
    tokens: int
    flops: float = 0.0

    @property
    def flops_per_token(self) -> float:
        return self.flops / self.tokens if self.tokens else 0.0

    @property
    def loss(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return perplexity_from(self.nll_sum, self.tokens)


@dataclass(frozen=True)
class Generation:
    """What `LanguageModel.generate_text` made: the prompt, its continuation (decoded new tokens up
    to, not including, an end-of-text), how many tokens were generated, whether an end-of-text
    stopped it, and whether the model's context cut `max_new_tokens` short."""

    prompt: str
    completion: str
    new_tokens: int
    stopped_at_eos: bool
    cut_by_context: bool

    @property
    def text(self) -> str:
        return self.prompt + self.completion


class LanguageModel(nn.Module):
    """A causal decoder with its tokenizer: `forward` is the decoder's (logits [b, s, vocab] and the
    cache), `loss` the mean next-token cross-entropy, `generate_text` continues a prompt."""

    kind = LM_KIND
    method = "dense"

    def __init__(self, decoder: Decoder, tokenizer=None, name: str = "custom", seq_len: int | None = None):
        super().__init__()
        if not isinstance(decoder, Decoder):
            raise ValueError(f"LanguageModel takes a Decoder, got {type(decoder).__name__}")
        seq_len = decoder.cfg.max_positions if seq_len is None else seq_len
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 2 <= seq_len <= decoder.cfg.max_positions:
            raise ValueError(f"LanguageModel seq_len must be an int in 2..{decoder.cfg.max_positions} (the decoder's "
                             f"positions), got {seq_len!r}")
        if tokenizer is not None and len(tokenizer) > decoder.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the decoder's vocabulary {decoder.cfg.vocab_size}")
        self.decoder, self.tokenizer, self.name, self.seq_len = decoder, tokenizer, name, seq_len
        self.knob: float | None = None

    # --- the method contract (see the module docstring); dense: no method, one operating point ---------

    def method_config(self) -> dict:
        """This method's settings as a JSON object (saved in config.json)."""
        return {}

    @classmethod
    def from_config(cls, decoder: Decoder, method_config: dict, name: str = "custom",
                    seq_len: int | None = None) -> LanguageModel:
        """The model's structure from a saved `method_config` (weights not loaded): `load_lm` uses it."""
        if method_config:
            raise ValueError(f"a dense language model takes no method settings, got {sorted(method_config)}")
        return cls(decoder, None, name, seq_len)

    def knob_values(self) -> list[float | None]:
        """The operating points a sweep evaluates, cheapest first; None is the method's default point."""
        return [None]

    def check_knob(self, value: float | None) -> float | None:
        if value is not None:
            raise ValueError(f"a {self.method!r} language model has no knob (got {value!r}); use None")
        return None

    def set_knob(self, value: float | None) -> None:
        self.knob = self.check_knob(value)

    @contextmanager
    def using_knob(self, value: float | None):
        """Run at knob `value` inside the block; the previous knob is restored after it."""
        old = self.knob
        self.set_knob(value)
        try:
            yield self
        finally:
            self.knob = old

    def training_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """What `adaptinf.recipes.lm.train_lm` minimises (a scalar with grad): the mean next-token
        cross-entropy here; a method adds its exits', distillation or budget terms."""
        return self.loss(inputs, targets)

    def score(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed next-token NLL, FLOPs executed) of one batch of windows inputs/targets [b, s], at
        the current knob, as fp64 scalar tensors (no host sync). Dense: every token runs every block."""
        nll = self.loss(inputs, targets, reduction="sum").double()
        b, s = inputs.shape
        cost = torch.as_tensor(float(flops.dense_decoder(s, self.cfg)) * b, dtype=torch.float64, device=nll.device)
        return nll, cost

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        """`Decoder.generate` (the same arguments), at the current knob."""
        return self.decoder.generate(input_ids, max_new_tokens, attention_mask, **kwargs)

    @property
    def cfg(self) -> DecoderConfig:
        return self.decoder.cfg

    @property
    def eos_id(self) -> int | None:
        if self.tokenizer is not None:
            return self.tokenizer.convert_tokens_to_ids(EOS)
        return self.cfg.eos_token_id

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> DecoderOutput:
        return self.decoder(input_ids, attention_mask, cache)

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy of `targets` [b, s] given `inputs` [b, s] (fp32 logits)."""
        logits = self(inputs).logits  # [b, s, V]
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)

    def flops_per_token(self, context: int | None = None) -> float:
        """Mean FLOPs per token of scoring a window of `context` tokens (default `seq_len`) in one pass
        (`adaptinf.flops.dense_decoder`: causal attention, the LM head on every token)."""
        n = self.seq_len if context is None else context
        return flops.dense_decoder(n, self.cfg) / n

    # --- text in, text out ---------------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """[1, n] ids: end-of-text (the start of a document, as in training) then the prompt's tokens."""
        if self.tokenizer is None:
            raise ValueError("this language model has no tokenizer; load it with adaptinf.lm.load_lm")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("the prompt is empty; give some text to continue")
        ids = [self.eos_id] + self.tokenizer.encode(prompt, add_special_tokens=False)
        if len(ids) >= self.cfg.max_positions:
            raise ValueError(f"the prompt is {len(ids) - 1} tokens long; the model's context holds "
                             f"{self.cfg.max_positions} (the prompt, after an end-of-text marker, and the new tokens): "
                             f"shorten the prompt to under {self.cfg.max_positions - 1} tokens")
        return torch.tensor([ids], dtype=torch.long, device=self.decoder.embeddings.word.weight.device)

    @torch.no_grad()
    def generate_text(self, prompt: str, max_new_tokens: int = 128, *, greedy: bool = False,
                      temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> Generation:
        """Continue `prompt` by up to `max_new_tokens` tokens: sampled (softmax at `temperature`, the
        `top_k` most likely tokens when given, a generator seeded with `seed`: the same call gives the
        same text) or `greedy`. Stops at end-of-text; never past the model's context (the count is
        cut to what fits, `cut_by_context`)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        ids = self.encode_prompt(prompt)
        n = min(max_new_tokens, self.cfg.max_positions - ids.shape[1])
        gen = None if greedy else torch.Generator(device=ids.device).manual_seed(seed)
        out = self.generate(ids, n, do_sample=not greedy, temperature=temperature, top_k=top_k,
                                    generator=gen, eos_token_id=self.eos_id)
        new = out[0, ids.shape[1]:].tolist()
        stopped = self.eos_id in new
        kept = new[: new.index(self.eos_id)] if stopped else new
        completion = self.tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return Generation(prompt, completion, len(kept), stopped, n < max_new_tokens)

    # --- disk ----------------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write the model (and its tokenizer) to `directory` (see the module docstring); config.json
        last, so an interrupted save never looks complete."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic({k: v.clone() for k, v in self.state_dict().items()}, out / WEIGHTS_FILE,
                            metadata={"format": FORMAT, "kind": LM_KIND})
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)
        write_json_atomic(out / CONFIG_FILE, {
            "format": FORMAT, "format_version": LM_FORMAT_VERSION, "adaptinf_version": __version__,
            "kind": LM_KIND, "method": self.method, "method_config": self.method_config(), "knob": self.knob,
            "decoder": self.cfg.to_dict(), "lm": {"name": self.name, "seq_len": self.seq_len},
            **({"extra": extra} if extra else {}),
        })
        return out


def _corrupt(path: Path, what: str) -> ValueError:
    return ValueError(f"{path}: {what}; the checkpoint is corrupt (re-save it, or retrain with `adaptinf train-lm`)")


def read_lm_config(directory: str | os.PathLike) -> dict:
    """config.json of a language-model directory, checked: an adaptinf directory, of this format
    version, of kind causal-lm (a classifier directory is named as one), with a decoder config."""
    import json

    d = Path(directory)
    if not d.exists():
        raise ValueError(f"model directory {d} does not exist")
    if not d.is_dir():
        raise ValueError(f"{d} is a file; pass the model directory (holding {CONFIG_FILE} and {WEIGHTS_FILE})")
    path = d / CONFIG_FILE
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} not found: not an adaptinf model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupt(path, f"not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise _corrupt(path, f"a JSON {type(cfg).__name__}, not an object")
    if cfg.get("format") != FORMAT:
        hint = " (a Hugging Face checkpoint?)" if "model_type" in cfg else ""
        raise ValueError(f"{d} is not an adaptinf model directory{hint}")
    if "kind" not in cfg and "spec" in cfg:
        raise ValueError(f"{d} holds a {cfg.get('method')!r} classifier, not a language model; generate and "
                         "perplexity need a language model directory (`adaptinf train-lm ... --out OUT` saves OUT/best)")
    if cfg.get("kind") != LM_KIND:
        raise _corrupt(path, f"kind {cfg.get('kind')!r} is not {LM_KIND!r}")
    if cfg.get("format_version") != LM_FORMAT_VERSION:
        raise ValueError(f"{d} has language-model format version {cfg.get('format_version')!r}; this adaptinf reads "
                         f"version {LM_FORMAT_VERSION}. Re-create it with this version of adaptinf.")
    from adaptinf.lm_methods import LM_METHODS

    if cfg.get("method") not in LM_METHODS:
        raise ValueError(f"{d} holds a language model with method {cfg.get('method')!r}; this adaptinf loads "
                         f"{', '.join(map(repr, LM_METHODS))} language models")
    for key in ("decoder", "lm"):
        if not isinstance(cfg.get(key), dict):
            raise _corrupt(path, f"{key!r} is missing or not a JSON object")
    if not isinstance(cfg.get("method_config", {}), dict):
        raise _corrupt(path, "'method_config' is not a JSON object")
    return cfg


def load_lm(directory: str | os.PathLike, with_tokenizer: bool = True) -> LanguageModel:
    """The language model saved in `directory` (eval mode), its tokenizer attached."""
    d = Path(directory)
    cfg = read_lm_config(d)
    from adaptinf.lm_methods import lm_method

    try:
        dcfg = DecoderConfig.from_dict(cfg["decoder"])
        cls = lm_method(cfg["method"])
        model = cls.from_config(Decoder(dcfg), cfg.get("method_config") or {}, str(cfg["lm"].get("name", "custom")),
                                cfg["lm"].get("seq_len"))
        model.set_knob(cfg.get("knob"))
    except (TypeError, ValueError) as e:
        raise _corrupt(d / CONFIG_FILE, str(e)) from e
    load_weights(model, d, f"{LM_KIND} ({cfg['method']})")
    model.eval()
    if with_tokenizer:
        if not (d / "tokenizer.json").is_file():
            raise ValueError(f"{d} has no tokenizer.json; a language model directory holds its tokenizer "
                             "(re-save it with LanguageModel.save)")
        from adaptinf.hf import load_tokenizer

        tok = load_tokenizer(d)
        eos = tok.convert_tokens_to_ids(EOS)
        if len(tok) > dcfg.vocab_size or eos is None or tok.convert_ids_to_tokens(eos) != EOS:
            raise _corrupt(d, f"its tokenizer ({len(tok)} tokens) does not fit the decoder "
                              f"(vocabulary {dcfg.vocab_size}, {EOS} needed)")
        model.tokenizer = tok
    return model


@torch.no_grad()
def evaluate_perplexity(model: LanguageModel, stream: torch.Tensor, batch_size: int = 32, seq_len: int | None = None,
                        max_tokens: int | None = None) -> LMScore:
    """The summed next-token NLL, and the FLOPs executed, of a token stream (a split of
    `adaptinf.corpus.LMData`) in `lm_eval_batches` windows of `seq_len` (default the model's), at the
    model's current knob, in eval mode (the mode is restored). `max_tokens`: score only the stream's
    first max_tokens + 1 tokens. One host sync at the end."""
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be None or a positive int, got {max_tokens!r}")
        stream = stream[: max_tokens + 1]
    seq_len = model.seq_len if seq_len is None else seq_len
    if seq_len > model.cfg.max_positions:
        raise ValueError(f"seq_len {seq_len} exceeds the model's {model.cfg.max_positions} positions")
    device = model.decoder.embeddings.word.weight.device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    cost = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for batch in lm_eval_batches(stream, batch_size, seq_len):
            nll, c = model.score(batch.inputs.to(device), batch.targets.to(device))
            total += nll
            cost += c
    finally:
        model.train(was_training)
    nll = float(total)
    if not math.isfinite(nll):
        raise ValueError("the model's loss is not finite (NaN or inf weights?)")
    return LMScore(nll, eval_token_count(stream), float(cost))
