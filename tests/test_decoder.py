"""The owned GPT-2 decoder (`adaptinf.decoder`) reproduces `transformers.GPT2LMHeadModel` (fp32, CPU,
eval) on tiny random configs loaded through `adaptinf.hf.load_decoder`; padding, step-wise execution
and the KV cache change nothing on real tokens; generation (cached, greedy or seeded sampling) equals
the uncached recomputation and transformers' `generate`; bad configs, inputs and checkpoints are
one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_backbone_parity import TOL
from torch.testing import assert_close

from adaptinf import hf
from adaptinf.backbone import Block, EncoderConfig, FeedForward
from adaptinf.decoder import Decoder, DecoderConfig, KVCache, project_kv

VOCAB = 97
SHAPE = dict(vocab_size=VOCAB, n_positions=40, n_embd=32, n_layer=2, n_head=4)
LENGTHS = [9, 3, 12, 1]


def gpt2_config(impl: str = "eager", **overrides):
    from transformers import GPT2Config

    kw = dict(SHAPE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=VOCAB - 1,
              eos_token_id=VOCAB - 1, attn_implementation=impl)
    return GPT2Config(**{**kw, **overrides})


@torch.no_grad()
def spread(model: torch.nn.Module) -> torch.nn.Module:
    """Re-draw every weight so activations are O(1): GPT-2's init (std 0.02) leaves logits near
    uniform, where a wrong detail (erf instead of tanh GELU, q/k swapped, a missing transpose of a
    square Conv1D) changes them by less than the tolerance. Works on GPT2LMHeadModel and Decoder."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.normal_(0, 0.5)
        elif p.dim() == 1:  # LayerNorm weights
            p.copy_(1 + 0.3 * torch.randn_like(p))
        elif "wte" in name or "wpe" in name or "embeddings" in name:
            p.normal_(0, 0.5)
        else:
            p.normal_(0, 1.0 / p.shape[0] ** 0.5)  # Conv1D [in, out] and Linear [out, in]: ~1/sqrt(d)
    return model


def hf_pair(impl: str = "eager", seed: int = 0, **overrides):
    """A random tiny GPT2LMHeadModel and our Decoder holding its weights (copied from its state dict)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    config = gpt2_config(impl, **overrides)
    ref = spread(GPT2LMHeadModel(config)).eval()
    assert ref.config._attn_implementation == impl
    ours = Decoder(hf.decoder_config_from_hf(config)).eval()
    hf.copy_decoder_weights_from_hf(ours, ref.state_dict())
    return ref, ours


def batch(lengths, left: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [b, max(lengths)] padded on the right (or left) with id 0, and the mask."""
    g = torch.Generator().manual_seed(seed)
    s = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), s), generator=g)
    ar = torch.arange(s)[None, :]
    n = torch.tensor(lengths)[:, None]
    mask = (ar >= s - n) if left else (ar < n)
    return ids * mask, mask.long()


def rows(ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row's real tokens [1, n]."""
    return [r[m.bool()][None] for r, m in zip(ids, mask)]


@pytest.fixture(scope="module")
def pair():
    return hf_pair()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny GPT2LMHeadModel saved with save_pretrained, and that model."""
    ref, _ = hf_pair(seed=1)
    d = tmp_path_factory.mktemp("gpt2")
    ref.save_pretrained(d)
    return d, ref


# ---- parity with transformers ------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("overrides", [
    {}, dict(n_layer=3, n_head=2, n_inner=48), dict(n_head=1, n_embd=16, activation_function="gelu"),
    dict(reorder_and_upcast_attn=True), dict(activation_function="gelu_pytorch_tanh"),
])
def test_logits_match_transformers(impl, overrides):
    ref, ours = hf_pair(impl, **overrides)
    ids, mask = batch(LENGTHS)
    with torch.no_grad():
        expected = ref(ids).logits
        assert_close(ours(ids).logits, expected, **TOL)
        # right padding with the mask: the real tokens' logits, as transformers gives them
        real = mask.bool()
        assert_close(ours(ids, mask).logits[real], ref(ids, attention_mask=mask).logits[real], **TOL)
    assert expected.std() > 1.0  # O(1) logits: the tolerance is a real test


def test_the_tanh_gelu_is_what_separates_gpt2_from_bert():
    ref, ours = hf_pair()
    ids, _ = batch(LENGTHS)
    for blk in ours.blocks:
        blk.ffn.approximate = "none"  # the erf GELU
    with torch.no_grad():
        with pytest.raises(AssertionError):
            assert_close(ours(ids).logits, ref(ids).logits, **TOL)


def test_a_saved_checkpoint_loads_through_load_decoder(checkpoint):
    d, ref = checkpoint
    ours, path = hf.load_decoder(d)
    assert path == d and isinstance(ours, Decoder)
    assert ours.cfg == DecoderConfig(vocab_size=VOCAB, max_position_embeddings=40, hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     embedding_dropout_prob=0.0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    assert all(isinstance(b, Block) for b in ours.blocks)
    ids, mask = batch(LENGTHS)
    with torch.no_grad():
        assert_close(ours.eval()(ids).logits, ref(ids).logits, **TOL)


def test_a_gpt2model_checkpoint_loads_too(tmp_path, checkpoint):
    from transformers import GPT2Model

    d, ref = checkpoint
    GPT2Model.from_pretrained(d).save_pretrained(tmp_path)  # base model: no "transformer." prefix, no lm_head
    ours, _ = hf.load_decoder(tmp_path)
    ids, _ = batch(LENGTHS)
    with torch.no_grad():
        assert_close(ours.eval()(ids).logits, ref(ids).logits, **TOL)


def test_the_lm_head_is_the_token_embeddings(pair):
    _, ours = pair
    assert not any("head" in k for k in ours.state_dict())  # one copy, nothing to untie on save
    h = torch.randn(2, 3, 32)
    assert_close(ours.head(h), ours.final_norm(h) @ ours.embeddings.word.weight.t())


# ---- padding and step-wise execution -----------------------------------------------------------


@pytest.mark.parametrize("with_mask", [True, False])
def test_right_padding_changes_no_real_token(pair, with_mask):
    _, ours = pair
    ids, mask = batch(LENGTHS)
    with torch.no_grad():
        padded = ours(ids, mask if with_mask else None).logits
        for i, r in enumerate(rows(ids, mask)):
            assert_close(padded[i, : r.shape[1]], ours(r).logits[0], **TOL)


def test_left_padding_changes_no_real_token(pair):
    ref, ours = pair
    ids, mask = batch(LENGTHS, left=True)
    real = mask.bool()
    with torch.no_grad():
        padded = ours(ids, mask).logits
        for i, r in enumerate(rows(ids, mask)):
            assert_close(padded[i][real[i]], ours(r).logits[0], **TOL)
        # transformers with the position ids its generate() derives from the mask
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        assert_close(padded[real], ref(ids, attention_mask=mask, position_ids=pos).logits[real], **TOL)


def test_positions_come_from_the_mask(pair):
    _, ours = pair
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert ours.positions(4, mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 2], [0, 1, 2, 3]]
    assert ours.positions(3, None, 5).tolist() == [[5, 6, 7]]
    assert ours.positions(2, None, torch.tensor([1, 4])).tolist() == [[1, 2], [4, 5]]


def test_blocks_run_in_pieces_equal_forward(pair):
    _, ours = pair
    ids, _ = batch(LENGTHS)
    with torch.no_grad():
        h = ours.embed(ids)
        h = ours.run_blocks(h, 0, 1)
        h = ours.run_blocks(h, 1, 1)  # an empty range changes nothing
        h = ours.run_blocks(h, 1)
        assert_close(ours.head(h), ours(ids).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="block range 1..3 outside 0..2"):
        ours.run_blocks(h, 1, 3)


def test_a_block_run_from_its_pieces_equals_the_decoder_block(pair):
    """The attention sublayer is Attention's pieces (inp, q/k/v, causal SDPA, out, residual); the FFN
    is FeedForward itself, so a method that swaps `block.ffn` changes the decoder."""
    _, ours = pair
    blk = ours.blocks[0]
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        att = blk.attention
        x = att.inp(h)
        heads = lambda t: t.view(2, 5, 4, 8).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(heads(att.q(x)), heads(att.k(x)), heads(att.v(x)), is_causal=True)
        h1 = att.residual(h, att.out(a.transpose(1, 2).reshape(2, 5, 32)))
        u = blk.ffn.inp(h1)
        expected = blk.ffn.residual(h1, blk.ffn.down(blk.ffn.act(blk.ffn.up(u))))
        assert_close(ours.run_blocks(h, 0, 1), expected, **TOL)


def test_training_mode_backpropagates_to_every_weight_and_dropout_is_active():
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=VOCAB, max_position_embeddings=16, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32)
    model = Decoder(cfg).train()
    ids, _ = batch([8, 8])
    logits = model(ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert not torch.equal(model(ids).logits, logits)  # dropout 0.1
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


def test_gpt2_initialisation_scales_the_residual_projections():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=500, hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
                                  intermediate_size=1024, max_position_embeddings=64))
    assert abs(model.blocks[0].attention.q.weight.std().item() - 0.02) < 1e-3
    assert abs(model.blocks[0].ffn.down.weight.std().item() - 0.02 / 4) < 1e-3  # 0.02 / sqrt(2 * 8)
    assert model.blocks[0].attention.q.bias.abs().sum() == 0


# ---- KV cache and generation -------------------------------------------------------------------


def test_cached_logits_equal_the_full_pass(pair):
    _, ours = pair
    ids, _ = batch([12, 12, 12])
    with torch.no_grad():
        full = ours(ids).logits
        cache = KVCache.empty(ours.cfg, 3, 16)
        parts = [ours(ids[:, a:b], cache=cache).logits for a, b in ((0, 5), (5, 6), (6, 9), (9, 12))]
    assert cache.length == 12 and cache.positions.tolist() == [12, 12, 12]
    assert_close(torch.cat(parts, dim=1), full, **TOL)


def test_cached_logits_equal_the_full_pass_with_left_padding(pair):
    _, ours = pair
    ids, mask = batch([7, 3, 5], left=True)
    more = torch.randint(1, VOCAB, (3, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(torch.cat([ids, more], 1), torch.cat([mask, torch.ones_like(more)], 1)).logits
        cache = KVCache.empty(ours.cfg, 3, 11)
        first = ours(ids, mask, cache).logits
        rest = [ours(more[:, a:b], cache=cache).logits for a, b in ((0, 1), (1, 2), (2, 4))]
    assert cache.positions.tolist() == [11, 7, 9]
    got = torch.cat([first, *rest], dim=1)
    real = torch.cat([mask, torch.ones_like(more)], 1).bool()
    assert_close(got[real], full[real], **TOL)


def test_the_documented_step_by_step_run_with_a_cache_equals_forward(pair):
    """The sequence in `Decoder`'s docstring (what per-token early exit will split), and the cache
    entries `project_kv` gives for the early-exit fill are the ones the blocks wrote."""
    _, ours = pair
    ids, mask = batch([6, 4], left=True)
    with torch.no_grad():
        expected = ours(ids, mask, KVCache.empty(ours.cfg, 2, 8)).logits
        cache = KVCache.empty(ours.cfg, 2, 8)
        pos = ours.positions(6, mask, cache.positions)
        h0 = ours.embeddings(ids, pos)
        cache.mark(mask)
        bias = ours.attention_bias(6, mask, cache, h0.dtype)
        h1 = ours.run_blocks(h0, 0, 1, cache, bias)
        h = ours.run_blocks(h1, 1, None, cache, bias)
        cache.advance(pos)
        assert_close(ours.head(h), expected, atol=0, rtol=0)
        assert cache.length == 6 and cache.positions.tolist() == [6, 4]
        for layer, x in ((0, h0), (1, h1)):
            k, v = project_kv(ours.blocks[layer].attention, x)
            assert_close(cache.keys[layer][:, :, :6], k, atol=0, rtol=0)
            assert_close(cache.values[layer][:, :, :6], v, atol=0, rtol=0)


def greedy_uncached(model: Decoder, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding recomputing the whole prefix every step (no cache)."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_cached_greedy_generation_equals_uncached_and_transformers(pair):
    ref, ours = pair
    ids, _ = batch([6, 6, 6])
    out = ours.generate(ids, 10)
    assert out.shape == (3, 16) and torch.equal(out[:, :6], ids)
    assert torch.equal(out, greedy_uncached(ours, ids, 10))
    expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, expected)


def test_cached_sampling_equals_uncached_sampling(pair):
    """Random models fall into repeating one token under greedy decoding, where a wrong cache can go
    unnoticed; seeded sampling walks through varied sequences, and the cached draws must equal those
    of a loop that recomputes the whole prefix with the same generator."""
    _, ours = pair
    ids, _ = batch([5, 5, 5])
    out = ours.generate(ids, 15, do_sample=True, temperature=1.5, generator=torch.Generator().manual_seed(0))
    g, seq = torch.Generator().manual_seed(0), ids
    with torch.no_grad():
        for _ in range(15):
            probs = torch.softmax(ours(seq).logits[:, -1] / 1.5, dim=-1)
            seq = torch.cat([seq, torch.multinomial(probs, 1, generator=g)], dim=1)
    assert torch.equal(out, seq)
    assert len(set(out[:, 5:].flatten().tolist())) > 15  # varied: the test can fail


def test_left_padded_batched_generation_equals_each_prompt_alone_and_transformers(pair):
    ref, ours = pair
    ids, mask = batch([5, 2, 4], left=True)
    out = ours.generate(ids, 8, mask)
    for i, r in enumerate(rows(ids, mask)):
        assert torch.equal(out[i, 5:], ours.generate(r, 8)[0, r.shape[1] :])
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
    assert torch.equal(out, expected)


def test_generation_runs_one_forward_per_new_token_for_the_whole_batch(pair):
    _, ours = pair
    calls = []
    hook = ours.embeddings.register_forward_hook(lambda m, args, out: calls.append(tuple(out.shape[:2])))
    try:
        ours.generate(batch([4, 4])[0], 5)
    finally:
        hook.remove()
    assert calls == [(2, 4)] + [(2, 1)] * 4  # the prompt once, then one token per step (the last needs none)


def test_generation_stops_at_eos_and_pads_finished_rows(pair):
    _, ours = pair
    ids, _ = batch([5, 5, 5], seed=2)
    free = ours.generate(ids, 8)
    eos = int(free[0, 7])  # row 0's third new token (it may appear earlier in other rows too)
    out = ours.generate(ids, 8, eos_token_id=eos, pad_token_id=0)
    for row, f in zip(out, free):
        new, want = row[5:].tolist(), f[5 : 5 + len(row) - 5].tolist()
        stop = want.index(eos) + 1 if eos in want else len(want)
        assert new[:stop] == want[:stop] and all(t == 0 for t in new[stop:])
    hit_all = [eos in f[5:].tolist() for f in free]
    if all(hit_all):  # every row finished: generation stopped once the last one did
        assert out.shape[1] == 5 + max(f[5:].tolist().index(eos) + 1 for f in free)


def test_generation_stops_early_once_every_row_is_finished(pair):
    _, ours = pair
    ids, _ = batch([5], seed=2)
    free = ours.generate(ids, 8)
    eos = int(free[0, 7])
    out = ours.generate(ids, 8, eos_token_id=eos)
    first = free[0, 5:].tolist().index(eos)
    assert torch.equal(out, free[:, : 5 + first + 1])


def test_sampling_is_reproducible_with_a_seeded_generator(pair):
    _, ours = pair
    ids, _ = batch([4, 4, 4])

    def draw(seed, **kw):
        return ours.generate(ids, 12, do_sample=True, generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = draw(0, temperature=2.0), draw(0, temperature=2.0), draw(1, temperature=2.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(draw(5, top_k=1), ours.generate(ids, 12))  # top-1 sampling is greedy
    greedy = ours.generate(ids, 12)
    assert not torch.equal(a, greedy)


def test_top_k_sampling_draws_only_among_the_k_most_likely(pair):
    _, ours = pair
    ids, _ = batch([4, 4, 4, 4])
    out = ours.generate(ids, 10, do_sample=True, temperature=5.0, top_k=3,
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(out[:, :-1]).logits[:, 3:]  # the logits each new token was drawn from
    top = logits.topk(3, dim=-1).indices
    assert (top == out[:, 4:, None]).any(-1).all()
    assert not (logits.argmax(-1) == out[:, 4:]).all()  # temperature 5 with k = 3: not all greedy


def test_generation_leaves_the_training_mode_and_accepts_zero_new_tokens(pair):
    _, ours = pair
    ids, _ = batch([3])
    ours.train()
    try:
        assert torch.equal(ours.generate(ids, 4), ours.eval().generate(ids, 4))
        ours.train()
        ours.generate(ids, 2)
        assert ours.training
    finally:
        ours.eval()
    assert torch.equal(ours.generate(ids, 0), ids)


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=-1), "max_new_tokens must be a non-negative int"),
    (dict(max_new_tokens=40), "exceeds the decoder's 40 positions"),
    (dict(do_sample=True, temperature=0.0), "temperature must be a positive number"),
    (dict(do_sample=True, top_k=0), "top_k must be None or a positive int"),
    (dict(eos_token_id=VOCAB), "eos_token_id must be None or a token id below 97"),
    (dict(pad_token_id=0), "pad_token_id fills finished rows and needs eos_token_id"),
    (dict(attention_mask=torch.tensor([[1, 1, 1, 0]])), "generate needs left-padded prompts"),
    (dict(attention_mask=torch.tensor([[1, 1, 1]])), r"attention_mask has shape \(1, 3\), expected \(1, 4\)"),
])
def test_bad_generation_arguments_are_refused(pair, kw, match):
    _, ours = pair
    kw = {"max_new_tokens": 3, **kw}
    with pytest.raises(ValueError, match=match) as e:
        ours.generate(torch.ones(1, 4, dtype=torch.long), **kw)
    assert "\n" not in str(e.value)


def test_bad_forward_inputs_and_a_full_cache_are_refused(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        ours(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="41 tokens exceed the decoder's 40 positions"):
        ours(torch.ones(1, 41, dtype=torch.long))
    cache = KVCache.empty(ours.cfg, 1, 4)
    ours(torch.ones(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="the KV cache holds 4 tokens and has 3; 2 more do not fit"):
        ours(torch.ones(1, 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="made for batch 1, input_ids has 2 rows"):
        ours(torch.ones(2, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="capacity must be an int in 1..40"):
        KVCache.empty(ours.cfg, 1, 41)


# ---- config ------------------------------------------------------------------------------------


def test_config_round_trips_and_builds_pre_ln_gpt2_blocks():
    cfg = DecoderConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                        num_hidden_layers=2, max_position_embeddings=40, eos_token_id=5)
    assert DecoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    b = cfg.block_config()
    assert b.pre_norm and b.hidden_act == "gelu_new" and not b.pooler and b.type_vocab_size == 0
    assert cfg.head_dim == 8 and cfg.pre_norm
    with pytest.raises(ValueError, match=r"unknown DecoderConfig fields: \['n_embd'\]"):
        DecoderConfig.from_dict({**cfg.to_dict(), "n_embd": 32})


@pytest.mark.parametrize("kw,match", [
    (dict(hidden_size=0), "hidden_size must be a positive int"),
    (dict(num_hidden_layers=2.0), "num_hidden_layers must be a positive int"),
    (dict(vocab_size=True), "vocab_size must be a positive int"),
    (dict(hidden_size=30), r"hidden_size \(30\) must be divisible by num_attention_heads \(4\)"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps must be a positive number"),
    (dict(hidden_dropout_prob=1.0), r"hidden_dropout_prob must be a number in \[0, 1\)"),
    (dict(embedding_dropout_prob=-0.1), r"embedding_dropout_prob must be a number in \[0, 1\)"),
    (dict(hidden_act="relu"), "hidden_act must be one of 'gelu', 'gelu_new'"),
    (dict(eos_token_id=VOCAB), "eos_token_id must be None or a token id below vocab_size"),
    (dict(bos_token_id=-1), "bos_token_id must be None or a token id below vocab_size"),
])
def test_config_fields_are_validated(kw, match):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, intermediate_size=64)
    with pytest.raises(ValueError, match=match):
        DecoderConfig(**{**base, **kw})
    with pytest.raises(ValueError, match="Decoder takes a DecoderConfig"):
        Decoder(EncoderConfig())


def test_encoder_configs_keep_the_erf_gelu_and_are_written_as_before():
    cfg = EncoderConfig(vocab_size=50, hidden_size=8, num_attention_heads=2, intermediate_size=16)
    assert cfg.hidden_act == "gelu" and "hidden_act" not in cfg.to_dict()
    x = torch.randn(4, 8) * 3
    assert_close(FeedForward(cfg).act(x), F.gelu(x))
    tanh = EncoderConfig(vocab_size=50, hidden_size=8, num_attention_heads=2, intermediate_size=16,
                         hidden_act="gelu_new")
    assert tanh.to_dict()["hidden_act"] == "gelu_new" and EncoderConfig.from_dict(tanh.to_dict()) == tanh
    from transformers.activations import ACT2FN

    assert_close(FeedForward(tanh).act(x), ACT2FN["gelu_new"](x), **TOL)
    with pytest.raises(ValueError, match="EncoderConfig.hidden_act must be one of 'gelu', 'gelu_new'"):
        EncoderConfig(hidden_act="swish")


# ---- loading errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("option,match", [
    (dict(scale_attn_by_inverse_layer_idx=True), "unsupported scale_attn_by_inverse_layer_idx=True"),
    (dict(scale_attn_weights=False), "unsupported scale_attn_weights=False"),
    (dict(add_cross_attention=True), "unsupported add_cross_attention=True: the decoder has no cross-attention"),
    (dict(tie_word_embeddings=False), "unsupported tie_word_embeddings=False"),
    (dict(activation_function="relu"), "unsupported activation_function 'relu'"),
    (dict(eos_token_id=[1, 2]), r"unsupported eos_token_id \[1, 2\]"),
])
def test_unsupported_gpt2_options_are_one_line_errors(tmp_path, option, match):
    gpt2_config(**option).save_pretrained(tmp_path)
    torch.save({}, tmp_path / "pytorch_model.bin")  # refused before the weights are read
    with pytest.raises(ValueError, match=match) as e:
        hf.load_decoder(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("model_type", ["bert", "mystery-net", None])
def test_other_model_types_are_refused_by_load_decoder(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type} if model_type else {}))
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=f"has model_type {model_type!r}, not a GPT-2 decoder; load_decoder reads "
                                         r"gpt2 checkpoints \(encoders: load_encoder\)"):
        hf.load_decoder(tmp_path)


def test_missing_weights_and_an_untied_lm_head_are_refused(tmp_path, checkpoint):
    from safetensors.torch import load_file, save_file

    d, ref = checkpoint
    sd = load_file(str(d / "model.safetensors"))
    key = next(k for k in sd if k.endswith("h.1.mlp.c_fc.weight"))
    del sd[key]
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(ValueError, match="missing weight 'h.1.mlp.c_fc.weight'"):
        hf.load_decoder(tmp_path)
    _, ours = hf_pair()
    bad = dict(ref.state_dict())
    bad["lm_head.weight"] = bad["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="lm_head.weight differs from its token embeddings"):
        hf.copy_decoder_weights_from_hf(ours, bad)


def test_out_of_vocabulary_special_ids_are_dropped():
    cfg = hf.decoder_config_from_hf(gpt2_config(bos_token_id=50256, eos_token_id=[3]))
    assert cfg.bos_token_id is None and cfg.eos_token_id == 3
