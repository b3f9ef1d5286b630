"""FLOP counting: closed forms by hand, per-sample counts independent of padding, and a cross-check
against `torch.utils.flop_counter.FlopCounterMode`."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_LENGTHS, make_batch
from torch.utils.flop_counter import FlopCounterMode

from adaptinf import flops
from adaptinf.backbone import EncoderConfig
from adaptinf.methods.dense import DenseClassifier
from adaptinf.model import ModelSpec

aten = torch.ops.aten


def test_closed_forms_by_hand():
    L, d, d_ff, C = 10, 32, 64, 3
    cfg = EncoderConfig(vocab_size=100, hidden_size=d, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=d_ff, max_position_embeddings=64)
    assert flops.linear(L, d, d_ff) == 2 * 10 * 32 * 64 == 40_960
    assert flops.attention_core(L, d) == 2 * 10 * 10 * 32 + 2 * 10 * 10 * 32 == 12_800  # QKᵀ + PV
    qkv, out = 2 * L * d * 3 * d, 2 * L * d * d
    assert flops.attention_block(L, d) == qkv + 12_800 + out == 61_440 + 12_800 + 20_480
    assert flops.attention_block(L, d, d_attn=16) == 2 * L * d * 48 + 4 * L * L * 16 + 2 * L * 16 * d
    assert flops.ffn_block(L, d, d_ff) == 2 * 40_960
    assert flops.block(L, cfg) == 94_720 + 81_920 == 176_640
    assert flops.head(cfg, C) == 2 * d * d + 2 * d * C == 2048 + 192
    assert flops.dense_model(torch.tensor([L]), cfg, C).item() == 2 * 176_640 + 2240
    assert flops.dense_model(torch.tensor([L]), cfg, C, layers=1).item() == 176_640 + 2240
    assert flops.dense_model(torch.tensor([L]), cfg, C, layers=0).item() == 2240


def test_closed_forms_on_tensors_are_elementwise():
    cfg = EncoderConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=3)
    lengths = torch.tensor([1, 7, 128])
    got = flops.dense_model(lengths, cfg, 2)
    assert got.dtype == torch.int64 and got.shape == (3,)
    assert got.tolist() == [flops.dense_model(torch.tensor([n]), cfg, 2).item() for n in (1, 7, 128)]
    assert flops.lengths_of(torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])).tolist() == [2, 3, 1]


def test_minilm_cost_at_128_tokens():
    # MiniLM-L6 (d=384, d_ff=1536, 6 layers) at 128 tokens: a known figure, ~2.9 GFLOPs.
    cfg = EncoderConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_hidden_layers=6)
    per_block = 2 * 128 * (3 * 384 * 384 + 384 * 384 + 2 * 384 * 1536) + 4 * 128 * 128 * 384
    assert flops.dense_model(torch.tensor([128]), cfg, 2).item() == 6 * per_block + 2 * 384 * 384 + 2 * 384 * 2
    assert 2.8e9 < 6 * per_block < 3.0e9


def test_dense_flops_count_each_sample_at_its_real_length(tiny_dense, tiny_batch):
    cfg = tiny_dense.spec.encoder
    with torch.no_grad():
        out = tiny_dense(**tiny_batch)
        wider = tiny_dense(**{k: torch.nn.functional.pad(v, (0, 16)) for k, v in tiny_batch.items()})
    expected = [flops.dense_model(torch.tensor([n]), cfg, 2).item() for n in TINY_LENGTHS]
    assert out.flops.dtype == torch.float64
    assert out.flops.tolist() == expected
    assert wider.flops.tolist() == expected  # more padding costs nothing
    for i, n in enumerate(TINY_LENGTHS):  # and alone, unpadded
        alone = make_batch([n], cfg.vocab_size)
        assert tiny_dense(**alone).flops.item() == expected[i]


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QKᵀ and PV: 2·b·h·s_q·s_k·d_head each (FlopCounterMode has no formula for the CPU kernels)."""
    b, h, s_q, d_head = query_shape
    s_k = key_shape[2]
    return 4 * b * h * s_q * s_k * d_head


# CPU SDPA without dropout dispatches to this fused kernel (checked in torch 2.13 with a
# TorchDispatchMode). With dropout it takes the math path, which decomposes into bmm ops that
# FlopCounterMode already counts, so only the fused kernel needs a formula.
CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def counted_flops(model, batch) -> tuple[int, dict]:
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        model(**batch)
    return counter.get_total_flops(), counter.get_flop_counts()


def test_cpu_sdpa_op_is_the_one_we_map(tiny_dense):
    """Without a custom mapping, FlopCounterMode sees no attention FLOPs on CPU; ours are the difference."""
    batch = make_batch([7], tiny_dense.spec.encoder.vocab_size)
    with torch.no_grad(), FlopCounterMode(display=False) as plain:
        tiny_dense(**batch)
    total, counts = counted_flops(tiny_dense, batch)
    sdpa_ops = set(counts["Global"]) - {aten.addmm, aten.mm, aten.bmm}
    assert sdpa_ops and sdpa_ops <= set(CPU_SDPA), counts["Global"]
    cfg = tiny_dense.spec.encoder
    assert total - plain.get_total_flops() == cfg.num_hidden_layers * flops.attention_core(7, cfg.hidden_size)


@pytest.mark.parametrize(
    "spec,length",
    [
        ("tiny", 1),
        ("tiny", 2),
        ("tiny", 23),
        ("tiny", 32),
        (ModelSpec(EncoderConfig(), labels=("rotten", "fresh")), 20),  # MiniLM-L6's shape, random weights
    ],
    ids=["tiny-1", "tiny-2", "tiny-23", "tiny-32", "minilm-20"],
)
def test_flop_counter_agrees_with_our_count(spec, length, tiny_spec):
    """On one unpadded sample FlopCounterMode (Linear + SDPA) counts exactly what we count.

    Both count the pooler on the first token only (d·d MACs) and the classifier once, because the
    model slices h[:, 0] before the pooler's Linear; embeddings are lookups (no matmul) in both.
    """
    spec = tiny_spec if spec == "tiny" else spec
    torch.manual_seed(0)
    model = DenseClassifier(spec).eval()
    batch = make_batch([length], spec.encoder.vocab_size)
    total, counts = counted_flops(model, batch)
    ours = model(**batch).flops.item()
    assert total == ours, counts["Global"]
    # and per part: the head is the pooler plus the classifier
    head = counts["DenseClassifier.encoder.pooler"][aten.addmm] + counts["DenseClassifier.classifier"][aten.addmm]
    assert head == flops.head(spec.encoder, spec.num_labels)
    block0 = sum(counts["DenseClassifier.encoder.blocks.0"].values())
    assert block0 == flops.block(length, spec.encoder)


def test_flop_counter_agrees_in_train_mode(tiny_dense):
    """With attention dropout, CPU SDPA takes the math path (bmm ops); the count is the same."""
    batch = make_batch([11], tiny_dense.spec.encoder.vocab_size)
    tiny_dense.train()
    total, counts = counted_flops(tiny_dense, batch)
    assert aten.bmm in counts["Global"]
    assert total == flops.dense_model(torch.tensor([11]), tiny_dense.spec.encoder, 2).item()


@pytest.mark.parametrize("name, times", [("dense", 1), ("ee", 1), ("multi-model", 2), ("sharcs", 1), ("acm", 1),
                                         ("planer", 1)])
def test_every_method_counts_an_embedding_projection(name, times):
    """An encoder whose embeddings are narrower than its hidden size (ELECTRA) pays a projection per
    real token; at full budget every method's FLOPs exceed the same model's without it by exactly
    that (the 2-exit cascade embeds twice when a sample runs both models)."""
    import dataclasses

    from adaptinf.methods.dense import DenseClassifier, DenseConfig
    from adaptinf.model import ModelSpec
    from adaptinf.registry import get_method
    from adaptinf.structure import adapt

    base = EncoderConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    lengths = torch.tensor([5, 9])
    ids = torch.randint(1, 60, (2, 9))
    mask = (torch.arange(9)[None] < lengths[:, None]).long()
    out = {}
    for proj in (None, 16):
        torch.manual_seed(0)
        enc = dataclasses.replace(base, embedding_size=proj)
        dense = DenseClassifier(ModelSpec(enc, ("a", "b"), 16), DenseConfig(classifier_dropout=0.0)).eval()
        cls = get_method(name)
        sets = {"exits": [1, 2], "policy": "patience"} if name == "multi-model" else {}
        sets, _ = adapt(name, sets, enc)  # e.g. SHARCS's widths for 2 heads
        model = cls.from_dense(dense, cls.Config.from_dict(sets)).eval()
        with torch.no_grad():
            knob = 2.0 if name == "multi-model" else None  # patience 2: every sample runs both models
            extra = {"width": model.num_widths - 1} if name == "sharcs" else {}  # full width, whatever the router says
            out[proj] = model(ids, mask, knob=knob, **extra).flops.double()
    projection = flops.embeddings(lengths, dataclasses.replace(base, embedding_size=16)).double()
    assert bool((projection > 0).all())
    torch.testing.assert_close(out[16] - out[None], times * projection)
