"""A small BERT-family encoder we own.

Every adaptive method is applied to this module rather than to a fork of `transformers`' BERT.
Weights load from Hugging Face BERT, RoBERTa / XLM-R, DistilBERT and ELECTRA checkpoints (see
`adaptinf.hf`) and outputs match the family's `transformers` model to fp32 precision
(tests/test_backbone_parity.py, tests/test_hf_families.py). The families share BERT's post-LN
block; they differ only in the embeddings, which `EncoderConfig` describes:
- `position_offset`: the first position id (RoBERTa's positions start at pad_token_id + 1);
- `type_vocab_size` 0: no token-type embeddings (DistilBERT);
- `embedding_size`: embeddings narrower or wider than the blocks, followed by a Linear projection
  to hidden_size (ELECTRA).

Weight layout, chosen so methods can slice and split it:
- `Attention.q`, `.k`, `.v` hold head-major rows (`[n_heads, head_dim]`), so keeping the first h
  heads keeps rows `[:h*head_dim]` of each and columns `[:h*head_dim]` of `Attention.out`.
  (Separate rather than fused: SDPA on CPU runs faster on the d-strided views they give than on
  views of a fused [q; k; v] output, which also costs no more matmul time; measured, torch 2.13.)
- `FeedForward.up` / `FeedForward.down` hold the intermediate neurons on up's rows and down's
  columns, so a neuron subset (width slice, MoE expert) is a row/column index set.

Step-wise execution: `embed` -> `run_blocks(h, mask, start, end)` -> `pool`, so early exit and
routing can stop, compact or branch between any two blocks.

Padding-free execution: pass a `Layout` (`token_layout(attention_mask)`) where a bias tensor is
expected and the blocks compute on the real tokens only. `run_blocks` packs h [b, s, d] into the
real rows [T, d] once, runs every token-wise layer (projections, FFN, LayerNorms) on them, and
attention scatters q/k/v back into the padded [b, s] frame for one batched SDPA call per block
(`attend`); the result is unpacked once at the end (pad rows 0). Real-token outputs equal the padded
path's (tests/test_packed.py). Attention is a small share of a block at these lengths (4*s*d of
~24*d^2 FLOPs per token), so its padding is left to length-bucketed batching.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


# fields added after BERT's; `to_dict` leaves them out at their defaults, so a BERT config is written as before
FAMILY_FIELDS = ("position_offset", "embedding_size")
_NON_NEGATIVE = ("pad_token_id", "type_vocab_size", "position_offset")


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of a BERT-family encoder (field names follow `transformers.BertConfig`).

    `type_vocab_size` 0 means no token-type embeddings (DistilBERT); `position_offset` is the row of
    the position table the first token uses (RoBERTa: pad_token_id + 1); `embedding_size` (None:
    hidden_size) is the embeddings' width, projected to hidden_size by a Linear when it differs (ELECTRA).
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0
    position_offset: int = 0
    embedding_size: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("int",) or (f.name == "embedding_size" and v is not None):
                # sizes must be positive (0 heads would divide by zero below); ids, offsets and the
                # token-type count (0: none) may be 0
                low = 0 if f.name in _NON_NEGATIVE else 1
                if not isinstance(v, int) or isinstance(v, bool) or v < low:
                    kind = "non-negative" if low == 0 else "positive"
                    raise ValueError(f"EncoderConfig.{f.name} must be a {kind} int, got {v!r}")
        if self.position_offset >= self.max_position_embeddings:
            raise ValueError(
                f"EncoderConfig.position_offset ({self.position_offset}) must be below "
                f"max_position_embeddings ({self.max_position_embeddings})"
            )
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(
                f"EncoderConfig.pad_token_id ({self.pad_token_id}) must be below vocab_size ({self.vocab_size})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"EncoderConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"EncoderConfig.{name} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def embedding_dim(self) -> int:
        """Width of the token, position and token-type embeddings (before any projection)."""
        return self.hidden_size if self.embedding_size is None else self.embedding_size

    @property
    def max_positions(self) -> int:
        """The longest input the position table covers (max_position_embeddings less the offset)."""
        return self.max_position_embeddings - self.position_offset

    def to_dict(self) -> dict:
        d = asdict(self)
        defaults = {f.name: f.default for f in fields(self)}
        return {k: v for k, v in d.items() if k not in FAMILY_FIELDS or v != defaults[k]}

    @classmethod
    def from_dict(cls, d: dict) -> EncoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown EncoderConfig fields: {sorted(unknown)}")
        return cls(**d)


def attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Key-padding mask [b, s] (1 = token, 0 = pad) -> additive SDPA mask [b, 1, 1, s].

    Additive (0 / dtype min) rather than boolean: on CPU, SDPA with a boolean mask on the strided
    q/k/v views of the fused projection runs about 2x slower (measured, torch 2.13).
    """
    keep = attention_mask.bool()[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=attention_mask.device).masked_fill_(~keep, torch.finfo(dtype).min)


class Layout:
    """Where the real tokens of a right- or arbitrarily padded batch [b, s] are.

    Stands in for the additive attention bias: `layout.bias` is that tensor [b, 1, 1, s], indexing a
    layout indexes its bias (`layout[rows, :, :, :n]`, as code written for bias tensors does) and
    gives a layout again. `index` [T] are the flat positions (row * s + column) of the real tokens,
    found with one host sync on first use; `pack`/`unpack` move between [b, s, d] and [T, d].
    """

    __slots__ = ("bias", "_index", "_full")

    def __init__(self, bias: torch.Tensor):
        if bias.dim() != 4:
            raise ValueError(f"a Layout holds an additive attention bias [b, 1, 1, s], got shape {tuple(bias.shape)}")
        self.bias = bias
        self._index: torch.Tensor | None = None
        self._full: bool | None = None

    def __getitem__(self, key) -> Layout:
        return Layout(self.bias[key])

    @property
    def shape(self) -> torch.Size:
        return self.bias.shape

    @property
    def batch(self) -> tuple[int, int]:
        """(b, s) of the padded frame."""
        return self.bias.shape[0], self.bias.shape[-1]

    @property
    def index(self) -> torch.Tensor:
        if self._index is None:
            self._index = (self.bias[:, 0, 0, :] == 0).reshape(-1).nonzero().squeeze(1)
            self._full = self._index.numel() == self.bias.shape[0] * self.bias.shape[-1]
        return self._index

    def share_index(self, index: torch.Tensor) -> Layout:
        """Adopt an already computed real-token index (row * s + column of every real token, in
        order, e.g. `attention_mask.reshape(-1).nonzero()`), saving the host sync of finding it again."""
        self._index = index
        self._full = index.numel() == self.bias.shape[0] * self.bias.shape[-1]
        return self

    @property
    def full(self) -> bool:
        """No padding at all (e.g. batch 1): packing is a reshape and attention needs no mask."""
        if self._full is None:
            self.index
        return bool(self._full)

    @property
    def sdpa_mask(self) -> torch.Tensor | None:
        """The mask SDPA takes: None without padding (its faster unmasked kernels), else the bias."""
        return None if self.full else self.bias

    def pack(self, h: torch.Tensor) -> torch.Tensor:
        """h [b, s, w] -> the real tokens' rows [T, w] (a view when there is no padding)."""
        flat = h.reshape(-1, h.shape[-1])
        return flat if self.full else flat.index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, w] -> [b, s, w] with pad rows 0 (a view when there is no padding)."""
        b, s = self.batch
        if self.full:
            return x.view(b, s, x.shape[-1])
        return x.new_zeros(b * s, x.shape[-1]).index_copy_(0, self.index, x).view(b, s, x.shape[-1])


def token_layout(attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> Layout:
    """The `Layout` of a batch (1 = token, 0 = pad): pass it where a bias is expected to run padding-free."""
    return Layout(attention_bias(attention_mask, dtype))


def bias_of(mask: torch.Tensor | Layout) -> torch.Tensor:
    """The additive bias tensor [b, 1, 1, s] of a bias or a `Layout`."""
    return mask.bias if isinstance(mask, Layout) else mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | Layout, n_heads: int,
           dropout_p: float = 0.0) -> torch.Tensor:
    """Multi-head SDPA on projections q, k, v of width n_heads * head_dim.

    Padded inputs [b, s, w] take the bias tensor (or a Layout) and give [b, s, w]; packed inputs
    [T, w] (real tokens only) take a `Layout`, are scattered into its padded frame for one batched
    SDPA call and come back packed [T, w].
    """
    packed = q.dim() == 2
    if packed:
        if not isinstance(mask, Layout):
            raise ValueError("packed q/k/v [T, w] need a Layout (token_layout(attention_mask)), not a bias tensor")
        q, k, v = mask.unpack(q), mask.unpack(k), mask.unpack(v)
    b, s, w = q.shape

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(b, s, n_heads, w // n_heads).transpose(1, 2)  # [b, nh, s, hd]

    attn_mask = mask.sdpa_mask if isinstance(mask, Layout) else mask
    a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=attn_mask, dropout_p=dropout_p)
    a = a.transpose(1, 2).reshape(b, s, w)  # [b, s, w]
    return mask.pack(a) if packed else a


def linear_slice(lin: nn.Linear, x: torch.Tensor, rows: int | None = None, cols: int | None = None) -> torch.Tensor:
    """`lin` restricted to its first `rows` outputs and first `cols` inputs (None: all), on x [..., cols].

    The weight slice is a view run as an ordinary matmul; a Linear that provides `forward_slice`
    (an int8 Linear of `adaptinf.quantize`) runs its own kernel on the slice instead."""
    fast = getattr(lin, "forward_slice", None)
    if fast is not None:
        return fast(x, rows, cols)
    bias = None if lin.bias is None else lin.bias[:rows]
    return F.linear(x, lin.weight[:rows, :cols], bias)


def packed_run(fn, h: torch.Tensor, mask: torch.Tensor | Layout) -> torch.Tensor:
    """Run `fn(x, mask)` on the real tokens of padded h [b, s, d] when `mask` is a Layout (pack once,
    unpack once); on h itself otherwise. `fn` must be token-wise apart from `attend`."""
    if isinstance(mask, Layout) and h.dim() == 3:
        return mask.unpack(fn(mask.pack(h), mask))
    return fn(h, mask)


class Embeddings(nn.Module):
    """Token + position (+ token type) embeddings, LayerNorm, dropout, and (ELECTRA) a projection to d.

    Position i uses row `position_offset + i`: RoBERTa numbers real tokens from pad_token_id + 1
    (and gives pads pad_token_id); with right padding the real tokens get the same rows here, and
    pads are masked out of attention, so real-token outputs are the same. `token_type` has 0 rows
    when the family has no token types (DistilBERT).
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        e = cfg.embedding_dim
        self.word = nn.Embedding(cfg.vocab_size, e, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, e)
        self.token_type = nn.Embedding(cfg.type_vocab_size, e)
        self.norm = nn.LayerNorm(e, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.offset = cfg.position_offset
        self.project = nn.Linear(e, cfg.hidden_size) if e != cfg.hidden_size else None

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        s = input_ids.shape[1]
        if self.offset + s > self.position.num_embeddings:
            raise ValueError(f"input of {s} tokens is longer than the {self.position.num_embeddings - self.offset} "
                             "positions the encoder has")
        h = self.word(input_ids) + self.position.weight[self.offset : self.offset + s]  # [b, s, e]
        if self.token_type.num_embeddings == 0:
            if token_type_ids is not None:
                raise ValueError("this encoder has no token-type embeddings (DistilBERT); pass token_type_ids=None")
        elif token_type_ids is None:
            h = h + self.token_type.weight[0]
        else:
            h = h + self.token_type(token_type_ids)
        h = self.dropout(self.norm(h))
        return h if self.project is None else self.project(h)  # [b, s, d]


class Attention(nn.Module):
    """Multi-head self-attention with a post-LayerNorm residual."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.attn_dropout = cfg.attention_probs_dropout_prob

    def forward(self, h: torch.Tensor, bias: torch.Tensor | Layout) -> torch.Tensor:
        """h [b, s, d] with a bias [b, 1, 1, s] or a Layout (then computed on real tokens only), or
        packed h [T, d] with a Layout."""
        return packed_run(self._forward, h, bias)

    def _forward(self, h: torch.Tensor, bias: torch.Tensor | Layout) -> torch.Tensor:
        p = self.attn_dropout if self.training else 0.0
        a = attend(self.q(h), self.k(h), self.v(h), bias, self.n_heads, p)
        return self.norm(h + self.dropout(self.out(a)))


class FeedForward(nn.Module):
    """d -> intermediate (GELU, erf form) -> d, post-LayerNorm residual."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + self.dropout(self.down(F.gelu(self.up(h)))))


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.ffn = FeedForward(cfg)

    def forward(self, h: torch.Tensor, bias: torch.Tensor | Layout) -> torch.Tensor:
        return packed_run(self._forward, h, bias)

    def _forward(self, h: torch.Tensor, bias: torch.Tensor | Layout) -> torch.Tensor:
        return self.ffn(self.attention(h, bias))


class Pooler(nn.Module):
    """BERT pooler: tanh(Linear(h[:, 0]))."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))


class Encoder(nn.Module):
    """Embeddings, a stack of blocks and the pooler, runnable block by block."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.pooler = Pooler(cfg)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # BERT's initialisation, so a randomly initialised encoder behaves like a fresh BERT.
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])  # as BERT does; normal_ above overwrote nn.Embedding's zero row
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.embeddings(input_ids, token_type_ids)

    def run_blocks(self, h: torch.Tensor, bias: torch.Tensor | Layout, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Run blocks `start..end-1` on hidden states h [b, s, d] with SDPA mask `bias` [b, 1, 1, s],
        or padding-free with a `Layout` (h packed once on entry, unpacked once on return; pad rows 0)."""
        end = self.num_layers if end is None else end
        if not 0 <= start <= end <= self.num_layers:
            raise ValueError(f"block range {start}..{end} outside 0..{self.num_layers}")
        if start == end:
            return h

        def blocks(x: torch.Tensor, mask: torch.Tensor | Layout) -> torch.Tensor:
            for block in self.blocks[start:end]:
                x = block(x, mask)  # packed x [T, d] runs as it is
            return x

        return packed_run(blocks, h, bias)

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        return self.pooler(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        packed: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Returns (last hidden state [b, s, d], pooled [b, d], hidden states per layer incl. embeddings).

        `packed` computes on real tokens only (pad rows of the returned states are then 0, not the
        padded path's values, which nothing reads)."""
        h = self.embed(input_ids, token_type_ids)
        bias = (token_layout if packed else attention_bias)(attention_mask, h.dtype)
        if not output_hidden_states:  # packed: one pack and one unpack for the whole stack
            h = self.run_blocks(h, bias)
            return h, self.pool(h), []
        states = [h]
        for block in self.blocks:
            h = block(h, bias)
            states.append(h)
        return h, self.pool(h), states

