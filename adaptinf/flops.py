"""Per-sample FLOPs of the work that actually ran: one convention for every method.

Convention (the same for dense and every adaptive method):
- 2 FLOPs per multiply-add of a matrix product (Linear layers, attention scores Q·Kᵀ and the
  weighted sum P·V). Biases, LayerNorm, GELU, softmax, tanh and residual adds are not counted
  (they are O(s·d) against the O(s·d²) matmuls; `torch.utils.flop_counter` ignores them too).
- Embedding lookups cost 0. An embedding projection (ELECTRA: embedding_size -> hidden_size, a
  Linear on every real token) is counted (`embeddings`); without one the embeddings cost 0.
- A vision encoder (ViT) has a length of 1 + P tokens (P patches plus the CLS token, no padding);
  its patch projection (C·p·p -> d on the P patch tokens, the patch Conv2d) is counted in
  `embeddings`: 2·P·C·p·p·d per image. Pixel normalisation and the final LayerNorm of a pre-LN
  encoder are elementwise and not counted.
- Padding is excluded: every sample is counted at its own real length L (tokens with mask 1),
  whatever the padded batch length was.
- The pooler (d→d on the first token; none when the encoder has `pooler` False) and every
  classifier / exit head / router / gate that ran are counted.
- A causal decoder (`adaptinf.decoder`) counts the attention it needs, not a square: the token at
  position p (0-based) scores p + 1 keys, so a sequence of L tokens costs 2·2·d·L(L+1)/2 in Q·Kᵀ and
  P·V per block (`causal_attention_core`), the same whether it runs in one pass or token by token
  through a KV cache (`decoder_token` summed over positions equals `dense_decoder`). The tied LM
  head (d -> vocab) is counted on every token that gets logits.

All functions take lengths as tensors and return tensors, so a model can compute its cost inside
`forward` without a host sync.
"""

from __future__ import annotations

import torch

from adaptinf.backbone import EncoderConfig
from adaptinf.decoder import DecoderConfig


def linear(tokens: torch.Tensor | int, d_in: int, d_out: int) -> torch.Tensor | int:
    """A Linear d_in -> d_out applied to `tokens` tokens."""
    return 2 * tokens * d_in * d_out


def attention_core(length: torch.Tensor | int, d_attn: int) -> torch.Tensor | int:
    """Q·Kᵀ and P·V over all heads for a sequence of `length` tokens (d_attn = heads × head_dim)."""
    return 2 * 2 * length * length * d_attn


def attention_block(length, d: int, d_attn: int | None = None):
    """Fused q/k/v projection, scores, weighted sum and output projection."""
    d_attn = d if d_attn is None else d_attn
    return linear(length, d, 3 * d_attn) + attention_core(length, d_attn) + linear(length, d_attn, d)


def ffn_block(length, d: int, d_ff: int):
    return linear(length, d, d_ff) + linear(length, d_ff, d)


def embeddings(length, cfg: EncoderConfig):
    """The embeddings at real length `length`: the projection embedding_size -> hidden_size where the
    encoder has one (ELECTRA), else 0 (lookups are free); for a vision encoder the patch projection
    C·p·p -> hidden_size on the length - 1 patch tokens (the CLS row is a parameter)."""
    if cfg.is_vision:
        return linear(length - 1, cfg.patch_dim, cfg.hidden_size)
    e = cfg.embedding_dim
    return linear(length, e, cfg.hidden_size) if e != cfg.hidden_size else 0 * length


def block(length, cfg: EncoderConfig):
    """One full-width transformer block at real length `length`."""
    return attention_block(length, cfg.hidden_size) + ffn_block(length, cfg.hidden_size, cfg.intermediate_size)


def head(cfg: EncoderConfig, num_labels: int, pooler: bool | None = None) -> int:
    """Pooler (first token, d -> d) plus the classifier d -> num_labels; `pooler` (None: cfg.pooler)
    False leaves the pooler out (a ViT classifying the normalised CLS row)."""
    with_pooler = cfg.pooler if pooler is None else pooler
    return with_pooler * linear(1, cfg.hidden_size, cfg.hidden_size) + linear(1, cfg.hidden_size, num_labels)


def dense_model(lengths: torch.Tensor, cfg: EncoderConfig, num_labels: int, layers: int | None = None) -> torch.Tensor:
    """Per-sample FLOPs of the dense classifier: embeddings (a projection, if any; a ViT's patch
    projection) + `layers` blocks (default all) + pooler (if the encoder has one) + classifier."""
    n = cfg.num_hidden_layers if layers is None else layers
    return embeddings(lengths, cfg) + n * block(lengths, cfg) + head(cfg, num_labels)


def lengths_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Real length of every sample [b] (int64) from a [b, s] padding mask."""
    return attention_mask.sum(dim=1, dtype=torch.int64)


# --- causal decoders (adaptinf.decoder) ---------------------------------------------------------------


def causal_attention_core(length: torch.Tensor | int, d_attn: int) -> torch.Tensor | int:
    """Q·Kᵀ and P·V of causal self-attention over `length` tokens: query i scores keys 0..i, so
    L(L+1)/2 query-key pairs (2·2·d_attn FLOPs each) instead of the encoder's L²."""
    return 2 * length * (length + 1) * d_attn


def decoder_block(length, cfg: DecoderConfig):
    """One causal block over a sequence of `length` tokens: q/k/v, causal scores and sum, output, FFN."""
    d = cfg.hidden_size
    return (linear(length, d, 3 * d) + causal_attention_core(length, d) + linear(length, d, d)
            + ffn_block(length, d, cfg.intermediate_size))


def lm_head(tokens, cfg: DecoderConfig):
    """The tied LM head (d -> vocab) on `tokens` tokens."""
    return linear(tokens, cfg.hidden_size, cfg.vocab_size)


def dense_decoder(lengths, cfg: DecoderConfig, layers: int | None = None):
    """FLOPs of scoring sequences of `lengths` tokens in one pass: `layers` causal blocks (default
    all) and the LM head on every token (embedding lookups cost 0)."""
    n = cfg.num_hidden_layers if layers is None else layers
    return n * decoder_block(lengths, cfg) + lm_head(lengths, cfg)


def decoder_token(position, cfg: DecoderConfig, layers: int | None = None):
    """FLOPs of one token at 0-based `position` after `position` cached tokens (a generation step):
    per block its projections and attention over position + 1 keys, then the LM head on it.
    Summed over positions 0..L-1 it equals `dense_decoder(L)`."""
    d = cfg.hidden_size
    n = cfg.num_hidden_layers if layers is None else layers
    per_block = (linear(1, d, 3 * d) + 2 * 2 * (position + 1) * d + linear(1, d, d)
                 + ffn_block(1, d, cfg.intermediate_size))
    return n * per_block + lm_head(1, cfg)
