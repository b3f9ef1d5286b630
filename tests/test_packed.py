"""Padding-free execution (`adaptinf.backbone.Layout`) gives the padded path's outputs.

Every registered method in eval mode runs packed by default (`model.packed`); here each is run both
ways on a batch of very different lengths at several knobs, in float64 so that a knob's threshold
decisions cannot flip on rounding, and the logits, FLOPs and extras must agree.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch
from test_contract import build, knob_values

import adaptinf
from adaptinf.backbone import Encoder, EncoderConfig, Layout, attend, attention_bias, token_layout

METHODS = adaptinf.list_methods()
LENGTHS = (32, 2, 17, 9, 1, 25)


def _both(model, batch, knob):
    out = {}
    for packed in (False, True):
        model.set_packed(packed)
        with torch.no_grad():
            out[packed] = model(**batch, knob=knob)
    model.set_packed(True)
    return out[False], out[True]


@pytest.mark.parametrize("name", METHODS)
def test_packed_equals_padded(name, tiny_dense):
    model = build(name, tiny_dense).double()
    batch = make_batch(LENGTHS, tiny_dense.spec.encoder.vocab_size, seed=3)
    assert model.packed, "inference is padding-free by default"
    for knob in knob_values(model, at_most=5):
        padded, packed = _both(model, batch, knob)
        torch.testing.assert_close(packed.logits, padded.logits, rtol=1e-9, atol=1e-9, msg=f"{name} knob {knob}")
        torch.testing.assert_close(packed.flops, padded.flops, msg=f"{name} knob {knob}")
        for key, value in padded.extras.items():
            if torch.is_tensor(value) and not value.is_floating_point():
                assert torch.equal(packed.extras[key], value), (name, knob, key)


def test_packed_blocks_equal_padded_on_real_tokens():
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=40)
    enc = Encoder(cfg).eval().double()
    batch = make_batch((12, 3, 7), 50, seed=1)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        padded, pooled, _ = enc(**batch)
        packed, pooled_p, _ = enc(**batch, packed=True)
        h = enc.embed(batch["input_ids"])
        mid = enc.run_blocks(h, token_layout(batch["attention_mask"], h.dtype), 1, 2)
        mid_padded = enc.run_blocks(h, attention_bias(batch["attention_mask"], h.dtype), 1, 2)
    torch.testing.assert_close(packed[mask], padded[mask])
    torch.testing.assert_close(pooled_p, pooled)
    assert (packed[~mask] == 0).all(), "pad rows of the packed path are 0"
    torch.testing.assert_close(mid[mask], mid_padded[mask])


def test_layout_index_pack_unpack_and_slicing():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    lay = token_layout(mask)
    assert lay.index.tolist() == [0, 1, 2, 4, 8, 9]
    h = torch.arange(12.0).view(3, 4, 1)
    x = lay.pack(h)
    assert x.squeeze(1).tolist() == [0, 1, 2, 4, 8, 9]
    back = lay.unpack(x)
    assert torch.equal(back[mask.bool()], h[mask.bool()]) and (back[~mask.bool()] == 0).all()
    sub = lay[torch.tensor([2, 0]), :, :, :3]  # as code written for bias tensors slices them
    assert isinstance(sub, Layout) and sub.batch == (2, 3)
    assert sub.index.tolist() == [0, 1, 3, 4, 5]
    with pytest.raises(ValueError, match="Layout"):
        Layout(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="need a Layout"):
        attend(torch.zeros(6, 4), torch.zeros(6, 4), torch.zeros(6, 4), attention_bias(mask), 2)


def test_training_stays_padded(tiny_dense):
    """Packing is an inference choice: in training mode the blocks get the bias tensor, as before."""
    seen = []
    model = tiny_dense.train()
    hook = model.encoder.blocks[0].attention.register_forward_pre_hook(lambda m, args: seen.append(type(args[1])))
    model(**make_batch((5, 3), tiny_dense.spec.encoder.vocab_size))
    model.eval()
    model(**make_batch((5, 3), tiny_dense.spec.encoder.vocab_size))
    hook.remove()
    assert seen == [torch.Tensor, Layout]
