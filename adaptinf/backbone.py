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

Vision (ViT): an `EncoderConfig` with `image_size` > 0 describes a ViT. Its inputs are uint8
"input_ids" [b, 1 + P, C*p*p] (`patchify`: row 0 the CLS slot, all zeros, rows 1..P the raw pixel
bytes of the P patches in raster order, each flattened in (channel, row, column) order), which
`PatchEmbeddings` normalises per channel, projects (the patch Conv2d as a Linear), prefixes with
the CLS token and adds learned positions to. An image is a fixed-length sequence with no padding,
so masks, lengths, packing and per-token FLOPs work as for text. `pre_norm` gives pre-LayerNorm
blocks and a final LayerNorm (`Encoder.final_norm`) before pooling; `pooler` False pools the
(normalised) CLS row itself, as `ViTForImageClassification` does. Methods never write a residual
themselves: `Attention.inp` / `.residual` and `FeedForward.inp` / `.residual` put the LayerNorm
where the block's family has it.

Padding-free execution: pass a `Layout` (`token_layout(attention_mask)`) where a bias tensor is
expected and the blocks compute on the real tokens only. `run_blocks` packs h [b, s, d] into the
real rows [T, d] once, runs every token-wise layer (projections, FFN, LayerNorms) on them, and
attention scatters q/k/v back into the padded [b, s] frame for one batched SDPA call per block
(`attend`); the result is unpacked once at the end (pad rows 0). Real-token outputs equal the padded
path's (tests/test_packed.py). Attention is a small share of a block at these lengths (4*s*d of
~24*d^2 FLOPs per token), so its padding is left to length-bucketed batching.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from adaptinf.settings import from_known_fields


# fields added after BERT's; `to_dict` leaves them out at their defaults, so a BERT config is written as before
FAMILY_FIELDS = ("position_offset", "embedding_size", "pre_norm", "image_size", "patch_size", "num_channels",
                 "image_mean", "image_std", "pooler", "hidden_act")
_NON_NEGATIVE = ("pad_token_id", "type_vocab_size", "position_offset", "image_size", "patch_size", "num_channels")
_VISION_INTS = ("image_size", "patch_size", "num_channels")
# FeedForward's activation: "gelu" is the exact (erf) GELU of BERT and ViT, "gelu_new" GPT-2's tanh approximation
HIDDEN_ACTS = {"gelu": "none", "gelu_new": "tanh"}  # name -> F.gelu's `approximate`


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of a BERT-family encoder (field names follow `transformers.BertConfig`).

    `type_vocab_size` 0 means no token-type embeddings (DistilBERT); `position_offset` is the row of
    the position table the first token uses (RoBERTa: pad_token_id + 1); `embedding_size` (None:
    hidden_size) is the embeddings' width, projected to hidden_size by a Linear when it differs (ELECTRA).
    `hidden_act` is the FFN's activation: "gelu" (the exact, erf GELU of BERT and ViT; the default,
    left out of `to_dict`) or "gelu_new" (GPT-2's tanh approximation; the blocks of `adaptinf.decoder`).
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
    pre_norm: bool = False
    image_size: int = 0
    patch_size: int = 0
    num_channels: int = 0
    image_mean: tuple[float, ...] = ()
    image_std: tuple[float, ...] = ()
    pooler: bool = True
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"EncoderConfig.hidden_act must be one of {', '.join(map(repr, HIDDEN_ACTS))}, "
                             f"got {self.hidden_act!r}")
        for name in ("pre_norm", "pooler"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EncoderConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if not isinstance(v, (tuple, list)) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v
            ):
                raise ValueError(f"EncoderConfig.{name} must be a list of finite numbers (one per channel), got {v!r}")
            object.__setattr__(self, name, tuple(float(x) for x in v))  # JSON gives lists; keep it hashable
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
        self._check_vision()

    def _check_vision(self) -> None:
        names = (*_VISION_INTS, "image_mean", "image_std")
        given = [n for n in names if getattr(self, n)]
        if not given:
            return
        missing = [n for n in names if n not in given]
        if missing:
            raise ValueError(
                f"EncoderConfig: a vision encoder needs image_size, patch_size, num_channels, image_mean and "
                f"image_std all set; {', '.join(given)} set but {', '.join(missing)} not (or leave all unset for text)"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"EncoderConfig.image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})"
            )
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != self.num_channels:
                raise ValueError(
                    f"EncoderConfig.{name} has {len(getattr(self, name))} values; give one per channel "
                    f"(num_channels={self.num_channels})"
                )
        if any(x <= 0 for x in self.image_std):
            raise ValueError(f"EncoderConfig.image_std must be positive, got {self.image_std}")
        if self.position_offset or self.embedding_size is not None:
            raise ValueError(
                "EncoderConfig: a vision encoder has no position_offset or embedding_size (leave them at 0 / None)"
            )

    @property
    def is_vision(self) -> bool:
        """A ViT (image inputs), not a text encoder."""
        return self.image_size > 0

    @property
    def num_patches(self) -> int:
        """Patches per image (0 for a text encoder)."""
        return (self.image_size // self.patch_size) ** 2 if self.is_vision else 0

    @property
    def patch_dim(self) -> int:
        """Values per patch token, C * p * p (0 for a text encoder)."""
        return self.num_channels * self.patch_size**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def embedding_dim(self) -> int:
        """Width of the token, position and token-type embeddings (before any projection)."""
        return self.hidden_size if self.embedding_size is None else self.embedding_size

    @property
    def max_positions(self) -> int:
        """The longest input the position table covers (max_position_embeddings less the offset; a
        vision encoder: 1 + num_patches, the length of every input)."""
        if self.is_vision:
            return 1 + self.num_patches
        return self.max_position_embeddings - self.position_offset

    def to_dict(self) -> dict:
        d = asdict(self)
        defaults = {f.name: f.default for f in fields(self)}
        out = {k: v for k, v in d.items() if k not in FAMILY_FIELDS or v != defaults[k]}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}  # as JSON writes them

    @classmethod
    def from_dict(cls, d: dict) -> EncoderConfig:
        return from_known_fields(cls, d)


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


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """uint8 images [N, C, H, W] (H = W) -> the vision encoder's input [N, 1 + P, C*p*p] (uint8).

    Row 0 is the CLS slot (all zeros); rows 1..P are the patches in raster order over the patch grid,
    each flattened in (channel, row-in-patch, column-in-patch) order, the order of
    `Conv2d(C, d, p, stride=p).weight.view(d, -1)`."""
    if images.dim() != 4:
        raise ValueError(f"patchify takes images [N, C, H, W], got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise ValueError(f"patchify takes uint8 pixel bytes (0..255), got dtype {images.dtype}")
    n, c, hgt, wid = images.shape
    p = patch_size
    if not isinstance(p, int) or isinstance(p, bool) or p < 1 or hgt % p or wid % p:
        raise ValueError(f"patch_size {p!r} must be a positive int dividing the image size {hgt}x{wid}")
    gh, gw = hgt // p, wid // p
    x = images.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * p * p)
    return torch.cat([x.new_zeros(n, 1, c * p * p), x], dim=1)


def unpatchify(x: torch.Tensor, image_size: int, patch_size: int, num_channels: int) -> torch.Tensor:
    """The inverse of `patchify`: [N, 1 + P, C*p*p] (row 0, the CLS slot, dropped) -> [N, C, H, W]."""
    p, c, g = patch_size, num_channels, image_size // patch_size
    n = x.shape[0]
    return x[:, 1:].reshape(n, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, image_size, image_size)


class PatchEmbeddings(nn.Module):
    """ViT embeddings of `patchify`d uint8 input [b, 1 + P, C*p*p] -> [b, 1 + P, d].

    Bytes / 255, normalised per channel ((x - mean) / std; `mean` / `std` are buffers of length
    C*p*p, derived from the config and not saved), the patch projection (`projection`, HF's Conv2d
    weight viewed [d, C*p*p]) on rows 1..P, the CLS token (`cls` [d]) in row 0, plus the learned
    position embeddings (`position` [1 + P, d]), then dropout.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        self.cfg_shape = (1 + cfg.num_patches, cfg.patch_dim)
        self.projection = nn.Linear(cfg.patch_dim, d)
        self.cls = nn.Parameter(torch.zeros(d))
        self.position = nn.Parameter(torch.zeros(1 + cfg.num_patches, d))
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        per_value = lambda v: torch.tensor(v, dtype=torch.float32).repeat_interleave(p * p)  # noqa: E731
        self.register_buffer("mean", per_value(cfg.image_mean), persistent=False)  # [C*p*p]
        self.register_buffer("std", per_value(cfg.image_std), persistent=False)
        self.num_channels, self.patch_size = c, p

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is not None:
            raise ValueError("a vision encoder has no token types; pass token_type_ids=None")
        if input_ids.dim() != 3 or tuple(input_ids.shape[1:]) != self.cfg_shape:
            n, v = self.cfg_shape
            raise ValueError(
                f"this vision encoder takes patchified images [batch, {n}, {v}] (1 + patches, channels x "
                f"{self.patch_size} x {self.patch_size}; adaptinf.backbone.patchify), "
                f"got shape {tuple(input_ids.shape)}"
            )
        if input_ids.dtype != torch.uint8:
            raise ValueError(f"a vision encoder takes uint8 pixel bytes (0..255), got dtype {input_ids.dtype}")
        b = input_ids.shape[0]
        x = input_ids[:, 1:].to(self.position.dtype).div_(255).sub_(self.mean).div_(self.std)  # [b, P, C*p*p]
        e = self.projection(x)  # [b, P, d]
        h = torch.cat([self.cls.to(e.dtype).expand(b, 1, -1), e], dim=1) + self.position  # [b, 1 + P, d]
        return self.dropout(h)


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


def _sublayer_input(module: nn.Module, h: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
    if not module.pre_norm:
        return h
    return (module.norm if norm is None else norm)(h)


def _sublayer_residual(module: nn.Module, h: torch.Tensor, delta: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
    if module.pre_norm:
        return h + module.dropout(delta)
    return (module.norm if norm is None else norm)(h + module.dropout(delta))


class Attention(nn.Module):
    """Multi-head self-attention with a residual: post-LayerNorm (BERT: norm(h + out(attend(h)))) or
    pre-LayerNorm (ViT: h + out(attend(norm(h)))). `inp` / `residual` place the norm, so code that
    runs a block in pieces (the methods) works for both."""

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
        self.pre_norm = cfg.pre_norm

    def inp(self, h: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """The input q/k/v are computed from: pre-LN (norm or self.norm)(h); post-LN h itself."""
        return _sublayer_input(self, h, norm)

    def residual(self, h: torch.Tensor, delta: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """The block's output from its input h and the output projection's result `delta`:
        post-LN (norm or self.norm)(h + dropout(delta)); pre-LN h + dropout(delta)."""
        return _sublayer_residual(self, h, delta, norm)

    def forward(self, h: torch.Tensor, bias: torch.Tensor | Layout) -> torch.Tensor:
        """h [b, s, d] with a bias [b, 1, 1, s] or a Layout (then computed on real tokens only), or
        packed h [T, d] with a Layout."""
        return packed_run(self._forward, h, bias)

    def _forward(self, h: torch.Tensor, bias: torch.Tensor | Layout) -> torch.Tensor:
        p = self.attn_dropout if self.training else 0.0
        x = self.inp(h)
        a = attend(self.q(x), self.k(x), self.v(x), bias, self.n_heads, p)
        return self.residual(h, self.out(a))


class FeedForward(nn.Module):
    """d -> intermediate (GELU: erf form, or GPT-2's tanh form with cfg.hidden_act "gelu_new") -> d
    with a post-LayerNorm (BERT) or pre-LayerNorm (ViT, GPT-2) residual; `inp` / `residual` as in
    `Attention`, `act` the activation."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.pre_norm = cfg.pre_norm
        self.approximate = HIDDEN_ACTS[cfg.hidden_act]

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """The activation between `up` and `down` (code that runs the FFN in pieces calls this)."""
        return F.gelu(x, approximate=self.approximate)

    def inp(self, h: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """The input `up` is applied to: pre-LN (norm or self.norm)(h); post-LN h itself."""
        return _sublayer_input(self, h, norm)

    def residual(self, h: torch.Tensor, delta: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """post-LN (norm or self.norm)(h + dropout(delta)); pre-LN h + dropout(delta)."""
        return _sublayer_residual(self, h, delta, norm)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.residual(h, self.down(self.act(self.up(self.inp(h)))))


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
    """Embeddings, a stack of blocks and the pooler, runnable block by block.

    Text (BERT family): `Embeddings`, post-LN blocks, `Pooler`. Vision (cfg.image_size > 0):
    `PatchEmbeddings`; with cfg.pre_norm a `final_norm` LayerNorm (else None); `pooler` is None when
    cfg.pooler is False."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = PatchEmbeddings(cfg) if cfg.is_vision else Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.pre_norm else None
        self.pooler = Pooler(cfg) if cfg.pooler else None
        self.apply(self._init_vit_weights if cfg.is_vision else self._init_weights)

    @staticmethod
    def _init_vit_weights(m: nn.Module) -> None:
        # ViT's initialisation (as transformers' ViTModel): truncated normal std 0.02 for the Linears,
        # the CLS token and the positions; zero biases; LayerNorms 1 / 0
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbeddings):
            nn.init.trunc_normal_(m.cls, std=0.02)
            nn.init.trunc_normal_(m.position, std=0.02)

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
        """Token ids [b, s] (text) or patchified uint8 images [b, 1 + P, C*p*p] (vision) -> h [b, s, d]."""
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
        """h [b, s, d] (the blocks' output) -> [b, d]: the first (CLS) row, after the final LayerNorm
        (pre-LN), through the pooler (cfg.pooler; BERT's tanh(Linear)) or as it is."""
        if self.final_norm is None and self.cfg.pooler:
            return self.pooler(h)
        x = h[:, 0] if self.final_norm is None else self.final_norm(h[:, 0])
        return torch.tanh(self.pooler.dense(x)) if self.cfg.pooler else x

    def last_state(self, h: torch.Tensor) -> torch.Tensor:
        """The encoder's last hidden state from the blocks' output: final_norm(h) (pre-LN, as
        transformers' ViTModel returns it), else h."""
        return h if self.final_norm is None else self.final_norm(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        packed: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Returns (last hidden state [b, s, d], pooled [b, d], hidden states per layer incl. embeddings).

        Pre-LN: the last hidden state is after the final LayerNorm, the per-layer states before it
        (as transformers' ViTModel). `packed` computes on real tokens only (pad rows of the returned
        states are then 0, not the padded path's values, which nothing reads)."""
        h = self.embed(input_ids, token_type_ids)
        bias = (token_layout if packed else attention_bias)(attention_mask, h.dtype)
        if not output_hidden_states:  # packed: one pack and one unpack for the whole stack
            h = self.run_blocks(h, bias)
            return self.last_state(h), self.pool(h), []
        states = [h]
        for block in self.blocks:
            h = block(h, bias)
            states.append(h)
        return self.last_state(h), self.pool(h), states

