"""A small GPT-2 family causal decoder we own, built from the encoder's blocks.

The decoder is token + learned position embeddings, pre-LN `adaptinf.backbone.Block`s (the same
`Attention` with head-major q/k/v/out Linears and `FeedForward` up/down the methods already slice and
split, with GPT-2's tanh GELU, `hidden_act` "gelu_new"), a final LayerNorm and an LM head tied to the
token embeddings (`head` multiplies by `embeddings.word.weight`; there is no second copy). Weights load
from Hugging Face GPT-2 checkpoints (`adaptinf.hf.load_decoder`); logits match `GPT2LMHeadModel`'s to
fp32 precision (tests/test_decoder.py).

Step-wise execution mirrors `Encoder`: `embed` -> `run_blocks(h, start, end, cache=..., bias=...)` ->
`head`, so per-token early exit and routing can stop or branch between any two blocks. A block runs as
`self_attention(block.attention, ...)` (the attention pieces: `inp`, q/k/v, causal SDPA, `out`,
`residual`) then `block.ffn(h)`; `Block.forward` (bidirectional) is not used.

Padding. Positions are computed from the attention mask: a row's i-th real token gets position i
(`cumsum(mask) - 1`, pads clamped to 0), so
- right padding (training, scoring): real tokens get positions 0..n-1 and, being causal, never see
  the pads after them; the real-token logits equal the unpadded ones, with the mask or without it
  (`attention_mask=None` keeps SDPA's `is_causal` kernels; pass the mask to mask the pads anyway);
- left padding (batched generation): real tokens get positions 0..n-1 too, and the pads before them
  are masked out of attention (an additive mask, as `backbone.attention_bias`).
A pad's own output is meaningless either way. With a cache, pad on the left (`generate` checks it).

KV cache (`KVCache`): per layer preallocated keys / values [b, heads, capacity, head_dim], a filled
length shared by all layers, each row's next position, and (after a padded input) which slots are
real. See `KVCache` for why preallocated and for how an early-exited token's entries of the layers
it skipped are filled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaptinf.backbone import HIDDEN_ACTS, Attention, Block, EncoderConfig
from adaptinf.settings import from_known_fields

_SIZES = ("vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers", "num_attention_heads",
          "intermediate_size")
_DROPOUTS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "embedding_dropout_prob")
INIT_STD = 0.02  # GPT-2's initializer_range


@dataclass(frozen=True)
class DecoderConfig:
    """Shape of a GPT-2 family decoder.

    Its own dataclass rather than an `EncoderConfig` (which has token types, poolers and image fields
    a decoder does not), but with `EncoderConfig`'s names for what they share (hidden_size,
    num_hidden_layers, num_attention_heads, intermediate_size, layer_norm_eps, the dropouts,
    hidden_act), so code that reads those from a model's `cfg` reads either; `block_config()` is the
    `EncoderConfig` the blocks are built from. GPT-2 names: n_positions = max_position_embeddings,
    n_embd = hidden_size, n_layer, n_head, n_inner = intermediate_size, resid_pdrop =
    hidden_dropout_prob, attn_pdrop = attention_probs_dropout_prob, embd_pdrop =
    embedding_dropout_prob, activation_function = hidden_act. The LM head is always tied to the token
    embeddings. `bos_token_id` / `eos_token_id` are carried for tokenizers and generation (None: none).
    """

    vocab_size: int = 50257
    max_position_embeddings: int = 1024
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-5
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    embedding_dropout_prob: float = 0.1
    hidden_act: str = "gelu_new"
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in _SIZES:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DecoderConfig.{name} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"DecoderConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"DecoderConfig.layer_norm_eps must be a positive number, got {eps!r}")
        for name in _DROPOUTS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ValueError(f"DecoderConfig.{name} must be a number in [0, 1), got {v!r}")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"DecoderConfig.hidden_act must be one of {', '.join(map(repr, HIDDEN_ACTS))} "
                             f"(GPT-2: 'gelu_new'), got {self.hidden_act!r}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < self.vocab_size):
                raise ValueError(f"DecoderConfig.{name} must be None or a token id below vocab_size "
                                 f"({self.vocab_size}), got {v!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def pre_norm(self) -> bool:
        """Always pre-LN (as `EncoderConfig.pre_norm`, for code that reads either)."""
        return True

    @property
    def max_positions(self) -> int:
        """The longest sequence (prompt plus generated tokens) the position table covers."""
        return self.max_position_embeddings

    def block_config(self) -> EncoderConfig:
        """The `EncoderConfig` of this decoder's blocks: pre-LN, its widths, eps, dropouts and activation."""
        return EncoderConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings, type_vocab_size=0,
            layer_norm_eps=float(self.layer_norm_eps), hidden_dropout_prob=float(self.hidden_dropout_prob),
            attention_probs_dropout_prob=float(self.attention_probs_dropout_prob), pad_token_id=0, pre_norm=True,
            pooler=False, hidden_act=self.hidden_act,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DecoderConfig:
        return from_known_fields(cls, d)


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, per layer, for incremental decoding.

    `keys[i]` / `values[i]` [b, heads, capacity, head_dim] are preallocated (`KVCache.empty`); slots
    `0..length-1` are filled, the same number in every layer. `positions` [b] is each row's next
    position id (its count of real tokens so far); `key_mask` [b, capacity] (bool, True = real token)
    exists once a padded input was seen (None: every filled slot is real). `Decoder.forward` writes
    the new tokens' K/V into slots `length..length+s-1` of every layer and then calls `advance`;
    code that runs the blocks itself (`embed` / `run_blocks` / `head`) calls `advance` once all
    layers ran.

    Preallocated rather than concatenated each step: appending costs no reallocation and copy of the
    whole cache per token (O(n^2) copying over a generation), shapes stay fixed (friendlier to
    compiled or graph-captured decoding later), and any layer's slot t can be written at any time,
    independently of the other layers, which is what per-token early exit needs:

    Early-exit hook (copy-state propagation; not implemented here). When token t exits after block
    j, the layers j+1..L-1 it skipped still need K/V at slot t, since later tokens attend to it. The
    rule: compute them from the exited token's hidden state h_exit (the output of block j):
    `k, v = project_kv(blocks[l].attention, h_exit)` and `cache.write(l, t, k, v)` for each skipped
    l (`project_kv` is what `self_attention` itself uses, so the entry is exactly the one block l
    would have written had its input been h_exit). In a batch where rows exit at different layers,
    each layer l takes for its K/V `torch.where(exited[:, None, None], h_exit, h_l)` (exited rows'
    frozen state, the others' real input), so every row writes slot t of every layer in the same
    step and `length` stays shared.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor
    length: int = 0
    key_mask: torch.Tensor | None = None

    @classmethod
    def empty(cls, cfg: DecoderConfig, batch: int, capacity: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> KVCache:
        """An empty cache for `batch` rows of up to `capacity` tokens each (prompt plus generated)."""
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"KVCache batch must be a positive int, got {batch!r}")
        if not isinstance(capacity, int) or isinstance(capacity, bool) or not 1 <= capacity <= cfg.max_positions:
            raise ValueError(f"KVCache capacity must be an int in 1..{cfg.max_positions} (the decoder's positions), "
                             f"got {capacity!r}")
        shape = (batch, cfg.num_attention_heads, capacity, cfg.head_dim)
        n = cfg.num_hidden_layers
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
            positions=torch.zeros(batch, dtype=torch.long, device=device),
        )

    @property
    def batch(self) -> int:
        return self.positions.shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [b, heads, s, head_dim] at slots start..start+s-1 of `layer`; returns that layer's
        keys and values of slots 0..start+s-1 (views)."""
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def check_room(self, s: int) -> None:
        if self.length + s > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} tokens and has {self.length}; "
                             f"{s} more do not fit (make it with a larger capacity)")

    def mark(self, attention_mask: torch.Tensor | None) -> None:
        """Record which of the next s slots hold real tokens (attention_mask [b, s]; None: all)."""
        if attention_mask is None:
            return  # slots default to real
        if self.key_mask is None:
            self.key_mask = torch.ones(self.batch, self.capacity, dtype=torch.bool, device=attention_mask.device)
        self.key_mask[:, self.length : self.length + attention_mask.shape[1]] = attention_mask.bool()

    def advance(self, positions: torch.Tensor) -> None:
        """After all layers wrote the s new tokens: length += s; each row's next position follows the
        position of its last new token (`positions` [b, s] or [1, s], as `Decoder.positions` gave)."""
        self.length += positions.shape[1]
        self.positions = (positions[:, -1] + 1).expand(self.batch).clone()


@dataclass
class DecoderOutput:
    """Logits [b, s, vocab] and the cache (updated in place; None when the call had none)."""

    logits: torch.Tensor
    cache: KVCache | None = None


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, s, w = x.shape
    return x.view(b, s, n_heads, w // n_heads).transpose(1, 2)  # [b, nh, s, hd]


def project_kv(att: Attention, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values [b, heads, s, head_dim] block `att` computes from its input h [b, s, d]
    (pre-LN: from norm(h)). The cache entries of a token; also the early-exit fill (see `KVCache`)."""
    x = att.inp(h)
    return _heads(att.k(x), att.n_heads), _heads(att.v(x), att.n_heads)


def self_attention(att: Attention, h: torch.Tensor, bias: torch.Tensor | None = None, is_causal: bool = False,
                   cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
    """Causal self-attention with its residual: h [b, s, d] -> [b, s, d].

    Keys/values are this call's (no cache) or the cache's slots 0..length-1 followed by this call's,
    which are written into the cache's `layer` at slots length..length+s-1. `bias` is an additive
    mask [b or 1, 1, s, t] over the t keys; `is_causal` (no cache, no padding) uses SDPA's own causal
    mask instead; neither: every query sees every key (one new token after the cache)."""
    x = att.inp(h)
    q = _heads(att.q(x), att.n_heads)
    k, v = _heads(att.k(x), att.n_heads), _heads(att.v(x), att.n_heads)
    if cache is not None:
        k, v = cache.write(layer, cache.length, k, v)  # [b, nh, length + s, hd]
    p = att.attn_dropout if att.training else 0.0
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, is_causal=is_causal)
    b, s, d = h.shape
    return att.residual(h, att.out(a.transpose(1, 2).reshape(b, s, d)))


def causal_bias(s: int, past: int, key_mask: torch.Tensor | None, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor | None:
    """The additive mask [b or 1, 1, s, past + s] for s new queries after `past` cached keys: query i
    sees keys 0..past+i that are real (`key_mask` [b, past + s], True = real; None: all). None where
    no mask is needed (no pads and past == 0, where SDPA's is_causal applies, or a single query)."""
    if key_mask is None and (past == 0 or s == 1):
        return None
    t = past + s
    allowed = torch.arange(t, device=device)[None, :] <= torch.arange(past, t, device=device)[:, None]  # [s, t]
    allowed = allowed[None, None]  # [1, 1, s, t]
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]  # [b, 1, s, t]
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)


class DecoderEmbeddings(nn.Module):
    """Token embeddings (`word`, also the LM head) + learned position embeddings (`position`), dropout."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.embedding_dropout_prob)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids [b, s], positions [b or 1, s] -> [b, s, d]."""
        return self.dropout(self.word(input_ids) + self.position(positions))


class Decoder(nn.Module):
    """GPT-2 family causal LM: embeddings, pre-LN `Block`s, final LayerNorm, tied LM head.

    Step by step, as `hidden` runs it (what early exit between blocks will split):

        pos = model.positions(s, attention_mask, cache.positions)   # [b, s]
        h = model.embeddings(input_ids, pos)                        # or model.embed(...)
        cache.mark(attention_mask)                                  # which new slots are real
        bias = model.attention_bias(s, attention_mask, cache, h.dtype)
        h = model.run_blocks(h, 0, k, cache, bias); h = model.run_blocks(h, k, None, cache, bias)
        cache.advance(pos)                                          # once, after every block
        logits = model.head(h)
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        if not isinstance(cfg, DecoderConfig):
            raise ValueError(f"Decoder takes a DecoderConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        block_cfg = cfg.block_config()
        self.embeddings = DecoderEmbeddings(cfg)
        self.blocks = nn.ModuleList(Block(block_cfg) for _ in range(cfg.num_hidden_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.apply(self._init_weights)
        with torch.no_grad():  # GPT-2 scales the projections into the residual stream by 1/sqrt(2 * layers)
            for blk in self.blocks:
                for lin in (blk.attention.out, blk.ffn.down):
                    lin.weight.normal_(0.0, INIT_STD / math.sqrt(2 * cfg.num_hidden_layers))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=INIT_STD)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def positions(self, s: int, attention_mask: torch.Tensor | None = None,
                  position_offset: int | torch.Tensor = 0) -> torch.Tensor:
        """Position ids [1, s] (no mask, int offset) or [b, s]: a row's i-th real token gets
        offset + i (pads before it are clamped to the offset, pads after it repeat its position).
        `position_offset` is an int or one per row [b] (a cache's `positions`)."""
        device = self.embeddings.position.weight.device
        if attention_mask is None:
            pos = torch.arange(s, device=device)[None, :]  # [1, s]
        else:
            pos = (attention_mask.long().cumsum(1) - 1).clamp_min_(0)  # [b, s]
        if isinstance(position_offset, torch.Tensor):
            return pos + position_offset[:, None]
        return pos + position_offset

    def embed(self, input_ids: torch.Tensor, position_offset: int | torch.Tensor = 0,
              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [b, s] -> h [b, s, d], at positions from `positions(s, attention_mask, position_offset)`."""
        return self.embeddings(input_ids, self.positions(input_ids.shape[1], attention_mask, position_offset))

    def run_blocks(self, h: torch.Tensor, start: int = 0, end: int | None = None, cache: KVCache | None = None,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
        """Run blocks start..end-1 on h [b, s, d].

        `bias`: the additive mask `causal_bias` gives (`Decoder.attention_bias`); None: causal with
        no padding. With a cache, these s tokens' K/V are written at slots length..length+s-1 of each
        block run; the cache's length is not advanced (`KVCache.advance`, once every block ran). A
        block whose `skip_attention` / `skip_ffn` attribute is true runs without that piece."""
        end = self.num_layers if end is None else end
        if not 0 <= start <= end <= self.num_layers:
            raise ValueError(f"block range {start}..{end} outside 0..{self.num_layers}")
        past = 0 if cache is None else cache.length
        s = h.shape[1]
        if bias is None and past > 0 and s > 1:  # causal over the cached keys too: SDPA's is_causal aligns wrongly
            bias = causal_bias(s, past, None, h.dtype, h.device)
        is_causal = bias is None and past == 0 and s > 1
        for i in range(start, end):
            blk = self.blocks[i]
            # an architecture may drop a block's attention or FFN (PLANER sets these block attributes);
            # a skipped attention writes no cache entries: the same layers are skipped for every token
            if not getattr(blk, "skip_attention", False):
                h = self_attention(blk.attention, h, bias, is_causal, cache, i)
            if not getattr(blk, "skip_ffn", False):
                h = blk.ffn(h)
        return h

    def attention_bias(self, s: int, attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """The mask for s new tokens (attention_mask [b, s] of them; None: all real) after the cache's
        tokens. Call after `cache.mark(attention_mask)`."""
        device = self.embeddings.word.weight.device
        past = 0 if cache is None else cache.length
        if cache is not None and cache.key_mask is not None:
            key_mask = cache.key_mask[:, : past + s]
        else:
            key_mask = attention_mask
        return causal_bias(s, past, key_mask, dtype, device)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Blocks' output h [..., d] -> logits [..., vocab]: final LayerNorm, then the tied LM head."""
        return F.linear(self.final_norm(h), self.embeddings.word.weight)

    def check_input(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     cache: KVCache | None) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        b, s = input_ids.shape
        if s == 0:
            raise ValueError("input_ids has no tokens")
        if attention_mask is not None and tuple(attention_mask.shape) != (b, s):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, s)} "
                             "(with a cache: the new tokens' mask only)")
        past = 0
        if cache is not None:
            if cache.batch != b:
                raise ValueError(f"the KV cache was made for batch {cache.batch}, input_ids has {b} rows")
            cache.check_room(s)
            past = cache.length
        if past + s > self.cfg.max_positions:
            raise ValueError(f"{past + s} tokens exceed the decoder's {self.cfg.max_positions} positions")

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        """The blocks' output [b, s, d] (before the final LayerNorm); the cache, if any, is advanced."""
        self.check_input(input_ids, attention_mask, cache)
        s = input_ids.shape[1]
        offset = 0 if cache is None else cache.positions
        pos = self.positions(s, attention_mask, offset)
        h = self.embeddings(input_ids, pos)  # [b, s, d]
        if cache is not None:
            cache.mark(attention_mask)
        h = self.run_blocks(h, cache=cache, bias=self.attention_bias(s, attention_mask, cache, h.dtype))
        if cache is not None:
            cache.advance(pos)
        return h

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> DecoderOutput:
        """input_ids [b, s] (after the cache's tokens, if given; attention_mask [b, s] of these tokens,
        1 = real) -> `DecoderOutput` (logits [b, s, vocab], the cache updated in place)."""
        return DecoderOutput(self.head(self.hidden(input_ids, attention_mask, cache)), cache)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None, *,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None) -> torch.Tensor:
        """Continue the prompts input_ids [b, s] (left-padded when attention_mask has pads) by up to
        max_new_tokens tokens -> [b, s + n] (the prompts, then the new tokens).

        Greedy (argmax) by default; `do_sample` draws from softmax(logits / temperature), restricted
        to the `top_k` most likely tokens when given, with `generator` (seed it for reproducible
        draws). One forward per new token for the whole batch, through a preallocated `KVCache`.
        With `eos_token_id`, a row that produced it is finished: it gets `pad_token_id` (default: eos)
        after that, and generation stops early once every row is finished (n < max_new_tokens).
        Runs in eval mode (dropout off) and restores the module's mode."""
        self.check_generate(input_ids, max_new_tokens, attention_mask, do_sample, temperature, top_k,
                             eos_token_id, pad_token_id)
        if max_new_tokens == 0:
            return input_ids
        b, s = input_ids.shape
        was_training = self.training
        self.eval()
        try:
            cache = KVCache.empty(self.cfg, b, s + max_new_tokens, self.embeddings.word.weight.dtype, input_ids.device)
            first = self.head(self.hidden(input_ids, attention_mask, cache)[:, -1])  # the prompt, once
            new = decode_tokens(first, lambda nxt: self.head(self.hidden(nxt[:, None], None, cache)[:, -1]),
                                max_new_tokens, do_sample, temperature, top_k, generator, eos_token_id, pad_token_id)
        finally:
            self.train(was_training)
        return torch.cat([input_ids, new.to(input_ids.dtype)], dim=1)

    def check_generate(self, input_ids, max_new_tokens, attention_mask, do_sample, temperature, top_k,
                        eos_token_id, pad_token_id) -> None:
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        self.check_input(input_ids, attention_mask, None)
        if input_ids.shape[1] + max_new_tokens > self.cfg.max_positions:
            raise ValueError(f"prompt of {input_ids.shape[1]} tokens plus max_new_tokens {max_new_tokens} exceeds "
                             f"the decoder's {self.cfg.max_positions} positions")
        if not isinstance(do_sample, bool):
            raise ValueError(f"do_sample must be true or false, got {do_sample!r}")
        if do_sample:
            if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
                    not math.isfinite(temperature) or temperature <= 0:
                raise ValueError(f"temperature must be a positive number, got {temperature!r}")
            if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
                raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
        for name, v in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < self.cfg.vocab_size):
                raise ValueError(f"{name} must be None or a token id below {self.cfg.vocab_size}, got {v!r}")
        if pad_token_id is not None and eos_token_id is None:
            raise ValueError("pad_token_id fills finished rows and needs eos_token_id")
        if attention_mask is not None:
            m = attention_mask.bool()
            # left padding: each row's pads come first and its last token is real (one host sync)
            if not bool((m[:, 1:] >= m[:, :-1]).all() & m[:, -1].all()):
                raise ValueError("generate needs left-padded prompts (pads first, each row ending in a real token); "
                                 "got a mask with pads after real tokens")


def decode_tokens(logits: torch.Tensor, step, max_new_tokens: int, do_sample: bool, temperature: float,
                  top_k: int | None, generator: torch.Generator | None, eos_token_id: int | None,
                  pad_token_id: int | None) -> torch.Tensor:
    """The new tokens [b, n] of a generation: from last-position logits [b, V], pick a token per row
    (`pick_token`), then `step(tokens [b]) -> the next logits [b, V]` (one cached forward), up to
    max_new_tokens. With `eos_token_id`, a finished row gets `pad_token_id` (default eos) and the loop
    ends once every row is finished (one host sync per token for that check)."""
    pad = eos_token_id if pad_token_id is None else pad_token_id
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    new: list[torch.Tensor] = []
    for i in range(max_new_tokens):
        nxt = pick_token(logits, do_sample, temperature, top_k, generator)  # [b]
        if eos_token_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            finished |= nxt == eos_token_id
        new.append(nxt)
        if i == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
            break
        logits = step(nxt)
    return torch.stack(new, dim=1)


def pick_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens [b] from last-position logits [b, V]: argmax, or a draw after temperature and top-k."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
