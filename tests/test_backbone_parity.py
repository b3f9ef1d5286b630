"""Our Encoder reproduces `transformers.BertModel` (fp32, CPU, eval), on random tiny configs and
on the real MiniLM-L6 checkpoint; step-wise execution and padding change nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from adaptinf import hf
from adaptinf.backbone import Encoder, EncoderConfig, attention_bias

TOL = dict(atol=1e-5, rtol=1e-5)


@torch.no_grad()
def spread_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Re-draw every weight so activations are O(1) (works on HF's BertModel and on our Encoder).

    BERT's own init (std 0.02) keeps pre-activations near 0 and attention near uniform, where a
    wrong detail (tanh-GELU instead of erf-GELU, an ignored mask, a swapped LayerNorm) changes
    outputs by less than the tolerance; with O(1) activations each of those fails the tests.
    """
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.copy_(1 + 0.3 * torch.randn_like(m.weight))
            m.bias.normal_(0, 0.5)
        elif isinstance(m, torch.nn.Linear):
            m.weight.normal_(0, 1.0 / m.in_features**0.5)
            m.bias.normal_(0, 0.5)
        elif isinstance(m, torch.nn.Embedding):
            m.weight.normal_(0, 0.5)
    return model


def hf_pair(heads: int, head_dim: int, layers: int, d_ff: int, impl: str, seed: int = 0):
    """A randomly initialised HF BertModel and our Encoder holding the same weights, both in eval."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=97,
        hidden_size=heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=d_ff,
        max_position_embeddings=48,
        attn_implementation=impl,
    )
    ref = BertModel(config).eval()
    assert ref.config._attn_implementation == impl
    spread_weights(ref)
    ours = Encoder(hf.encoder_config_from_hf(config)).eval()
    hf.copy_weights_from_hf(ours, ref.state_dict())
    return ref, ours


def assert_matches_hf(ref, ours: Encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    with torch.no_grad():
        expected = ref(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        last, pooled, states = ours(input_ids, attention_mask, output_hidden_states=True)
    real = attention_mask.bool()  # pad positions' outputs are meaningless in both; compare real tokens only
    assert len(states) == len(expected.hidden_states) == ours.num_layers + 1
    for i, (a, b) in enumerate(zip(states, expected.hidden_states)):
        assert_close(a[real], b[real], **TOL, msg=lambda m, i=i: f"hidden state {i}: {m}")
    assert_close(last[real], expected.last_hidden_state[real], **TOL)
    assert_close(pooled, expected.pooler_output, **TOL)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([4, 8, 16]),
    layers=st.integers(1, 3),
    d_ff=st.sampled_from([16, 48, 64]),
    lengths=st.lists(st.integers(1, 48), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_matches_transformers_on_random_configs(impl, heads, head_dim, layers, d_ff, lengths, seed):
    ref, ours = hf_pair(heads, head_dim, layers, d_ff, impl, seed)
    batch = make_batch(lengths, vocab_size=97, seed=seed)
    assert_matches_hf(ref, ours, batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_matches_transformers_on_a_padded_batch_with_token_types(impl):
    ref, ours = hf_pair(heads=4, head_dim=8, layers=2, d_ff=64, impl=impl)
    batch = make_batch([20, 2, 13, 1], vocab_size=97)
    token_type_ids = (torch.arange(20) >= 5).long().expand(4, 20) * batch["attention_mask"]
    with torch.no_grad():
        expected = ref(**batch, token_type_ids=token_type_ids)
        last, pooled, _ = ours(batch["input_ids"], batch["attention_mask"], token_type_ids)
    real = batch["attention_mask"].bool()
    assert_close(last[real], expected.last_hidden_state[real], **TOL)
    assert_close(pooled, expected.pooler_output, **TOL)


@pytest.mark.slow
def test_matches_transformers_on_real_minilm(minilm_tokenizer):
    from transformers import BertModel

    ours, path = hf.load_encoder("minilm-l6")
    ours.eval()
    ref = BertModel.from_pretrained(hf.resolve_model_path("minilm-l6"), attn_implementation="sdpa").eval()
    sentences = [
        "A gripping, beautifully shot film that never overstays its welcome.",
        "Dull.",
        "The plot meanders for two hours and the jokes land with a thud, but the lead performance "
        "is committed enough that you almost forgive the script its many sins.",
        "An instant classic!",
    ]
    batch = minilm_tokenizer(sentences, padding=True, return_tensors="pt")
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]  # really padded
    assert_matches_hf(ref, ours, batch["input_ids"], batch["attention_mask"])


def tiny_encoder(seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    cfg = EncoderConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return spread_weights(Encoder(cfg)).eval()


def test_stepwise_execution_equals_forward(tiny_batch):
    enc = tiny_encoder()
    ids, mask = tiny_batch["input_ids"], tiny_batch["attention_mask"]
    with torch.no_grad():
        last, pooled, _ = enc(ids, mask)
        h = enc.embed(ids)
        bias = attention_bias(mask, h.dtype)
        h = enc.run_blocks(h, bias, 0, 1)
        h = enc.run_blocks(h, bias, 1, 1)  # an empty range is a no-op
        h = enc.run_blocks(h, bias, 1, enc.num_layers)
        step_pooled = enc.pool(h)
    torch.testing.assert_close(h, last, atol=0, rtol=0)
    torch.testing.assert_close(step_pooled, pooled, atol=0, rtol=0)


@pytest.mark.parametrize("start,end", [(-1, 2), (2, 1), (0, 5)])
def test_run_blocks_rejects_bad_ranges(start, end):
    enc = tiny_encoder()
    h = torch.zeros(1, 3, 32)
    with pytest.raises(ValueError, match="block range"):
        enc.run_blocks(h, attention_bias(torch.ones(1, 3)), start, end)


@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=2, max_size=6),
    which=st.integers(0, 5),
    extra_pad=st.integers(0, 8),
)
def test_padding_invariance(lengths, which, extra_pad):
    """A sample's real-token outputs are the same alone and inside a padded batch."""
    enc = tiny_encoder(seed=1)
    which %= len(lengths)
    batch = make_batch(lengths, seed=len(lengths))
    ids = torch.nn.functional.pad(batch["input_ids"], (0, extra_pad))  # extra all-pad columns
    mask = torch.nn.functional.pad(batch["attention_mask"], (0, extra_pad))
    n = lengths[which]
    with torch.no_grad():
        last, pooled, _ = enc(ids, mask)
        alone_last, alone_pooled, _ = enc(ids[which : which + 1, :n], mask[which : which + 1, :n])
    assert_close(last[which, :n], alone_last[0], **TOL)
    assert_close(pooled[which], alone_pooled[0], **TOL)


def test_encoder_config_round_trip_and_validation():
    cfg = EncoderConfig(hidden_size=64, num_attention_heads=4)
    assert EncoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="divisible"):
        EncoderConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="unknown EncoderConfig fields"):
        EncoderConfig.from_dict({**cfg.to_dict(), "rotary": True})
    with pytest.raises(ValueError, match="hidden_dropout_prob"):
        EncoderConfig(hidden_dropout_prob=1.0)
    with pytest.raises(ValueError, match="num_attention_heads must be a positive int"):
        EncoderConfig(num_attention_heads=0)
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        EncoderConfig(hidden_size=32.0)
    with pytest.raises(ValueError, match="pad_token_id .* below vocab_size"):
        EncoderConfig(vocab_size=100, pad_token_id=100)


def test_unsupported_hf_configs_are_refused():
    from transformers import BertConfig

    with pytest.raises(ValueError, match="hidden_act"):
        hf.encoder_config_from_hf(BertConfig(hidden_act="relu"))
    with pytest.raises(ValueError, match="position_embedding_type"):
        hf.encoder_config_from_hf(BertConfig(position_embedding_type="relative_key"))


def test_copy_weights_reports_missing_and_misshapen_weights():
    ref, ours = hf_pair(heads=2, head_dim=8, layers=1, d_ff=16, impl="sdpa")
    sd = ref.state_dict()
    missing = {k: v for k, v in sd.items() if k != "encoder.layer.0.output.dense.weight"}
    with pytest.raises(ValueError, match="missing weight 'encoder.layer.0.output.dense.weight'"):
        hf.copy_weights_from_hf(ours, missing)
    bad = dict(sd, **{"embeddings.word_embeddings.weight": torch.zeros(5, 16)})
    with pytest.raises(ValueError, match="has shape"):
        hf.copy_weights_from_hf(ours, bad)


def test_fresh_encoder_has_a_zero_pad_embedding():
    enc = Encoder(EncoderConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16, pad_token_id=3))
    assert not enc.embeddings.word.weight[3].any()
    assert enc.embeddings.word.weight[4].any()
