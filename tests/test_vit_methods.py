"""Every registered method on a tiny pre-LN ViT (`EncoderConfig(pre_norm=True, image_size>0, ...)`),
through the same code as on the post-LN text encoder: conversion, train and eval forwards, the
full-budget equivalence with the dense model, packed == padded, save/load, and the distillation
targets (ACM's and PLANER's captured FFN inputs) on pre-LN blocks.

The contract tests (tests/test_contract.py) are reused as they are, on the ViT's dense model and a
batch of 4 patchified images."""

from __future__ import annotations

import dataclasses

import pytest
import test_contract as contract
import torch
from test_contract import build, knob_values
from test_packed import _both

import adaptinf
from adaptinf import flops
from adaptinf.backbone import EncoderConfig, patchify
from adaptinf.data import Encoded
from adaptinf.methods.dense import DenseClassifier, DenseConfig
from adaptinf.methods.early_exit import ENTROPY_NEVER, MAX_SOFTMAX_NEVER
from adaptinf.methods.sharcs import ALL_FULL
from adaptinf.model import ModelSpec
from adaptinf.registry import get_method

METHODS = adaptinf.list_methods()
IMAGE, PATCH, D, HEADS, FF, LAYERS = 8, 4, 32, 4, 64, 4
TOKENS = 1 + (IMAGE // PATCH) ** 2


def vit_spec(pooler: bool = False, dropout: float = 0.0) -> ModelSpec:
    enc = EncoderConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FF,
                        pre_norm=True, image_size=IMAGE, patch_size=PATCH, num_channels=1, image_mean=(0.5,),
                        image_std=(0.5,), pooler=pooler, layer_norm_eps=1e-6, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    return ModelSpec(enc, ("a", "b", "c"), max_length=TOKENS)


def vit_dense(pooler: bool = False, seed: int = 0) -> DenseClassifier:
    """A random pre-LN ViT classifier whose LayerNorms are not the identity (as after training), so a
    method that skips or swaps a norm changes the logits."""
    torch.manual_seed(seed)
    model = DenseClassifier(vit_spec(pooler), DenseConfig(classifier_dropout=0.0))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
        model.classifier.weight.mul_(20)  # logits of order 1: differences are not hidden by their scale
    return model.eval()


def images(n: int, seed: int) -> torch.Tensor:
    """n random 1-channel uint8 images [n, 1, IMAGE, IMAGE]."""
    return torch.randint(0, 256, (n, 1, IMAGE, IMAGE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def image_batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = patchify(images(n, seed), PATCH)  # [n, TOKENS, 16] uint8
    return {"input_ids": ids, "attention_mask": torch.ones(n, TOKENS, dtype=torch.int64)}


@pytest.fixture
def dense() -> DenseClassifier:
    return vit_dense()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return image_batch(4)


def test_the_vit_is_pre_ln_without_a_pooler(dense):
    enc = dense.encoder
    assert enc.final_norm is not None and enc.pooler is None
    assert enc.blocks[0].attention.pre_norm and enc.blocks[0].ffn.pre_norm


# --- the contract tests, on the ViT ------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_conversion_and_outputs(name, dense, batch):
    contract.test_output_shapes_and_values(name, dense, batch)
    contract.test_conversion_leaves_the_dense_model_untouched(name, dense, batch)
    contract.test_eval_forward_is_deterministic(name, dense, batch)


@pytest.mark.parametrize("name", METHODS)
def test_a_training_step_reaches_every_trainable_parameter(name, dense, batch):
    contract.test_gradients_reach_every_trainable_parameter(name, dense, batch)
    contract.test_sum_loss_is_batch_size_times_mean_loss(name, dense, batch)


@pytest.mark.parametrize("name", METHODS)
def test_training_mode_with_dropout_runs_and_trains(name):
    """Dropout on (train mode): the forward runs, the loss is finite and an optimizer step changes weights."""
    torch.manual_seed(0)
    dense = DenseClassifier(vit_spec(dropout=0.1)).eval()
    model = build(name, dense).train()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.trainable_parameters()]
    out = model(**image_batch(4, seed=3))
    loss = model.loss(out, torch.tensor([0, 1, 2, 0]))
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.trainable_parameters()))


@pytest.mark.parametrize("name", METHODS)
def test_batch_of_one_equals_the_batch_and_packed_equals_padded(name, dense, batch):
    model = build(name, dense)
    for knob in knob_values(model, at_most=5):  # each image alone gives what it gets in the batch
        with torch.no_grad():
            batched = model(**batch, knob=knob)
            for i in range(4):
                alone = model(**{k: v[i : i + 1] for k, v in batch.items()}, knob=knob)
                torch.testing.assert_close(alone.logits[0], batched.logits[i], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(alone.flops[0], batched.flops[i], atol=0, rtol=0)
    model.double()
    big = image_batch(6, seed=5)
    for knob in knob_values(model, at_most=5):
        padded, packed = _both(model, big, knob)
        torch.testing.assert_close(packed.logits, padded.logits, rtol=1e-9, atol=1e-9, msg=f"{name} knob {knob}")
        torch.testing.assert_close(packed.flops, padded.flops, msg=f"{name} knob {knob}")


@pytest.mark.parametrize("name", METHODS)
def test_save_and_load(name, dense, batch, tmp_path):
    contract.test_save_and_load_give_identical_outputs(name, dense, batch, tmp_path / "a")
    contract.test_saved_knob_is_restored(name, dense, tmp_path / "b")


@pytest.mark.parametrize("name", METHODS)
def test_offline_sweep_matches_forward(name, dense):
    model = build(name, dense)
    ids = patchify(images(10, seed=7), PATCH)
    enc = Encoded(ids, torch.tensor([i % 3 for i in range(10)]))
    knobs = knob_values(model)
    swept = model.sweep_offline(enc, knobs, batch_size=3)
    if swept is None:
        return
    mask = torch.ones(10, TOKENS, dtype=torch.int64)
    for point in swept:
        model.set_knob(point.knob)
        with torch.no_grad():
            out = model(ids, mask)
        assert torch.equal(point.predictions, out.logits.argmax(-1)), point.knob
        assert torch.equal(point.flops, out.flops), point.knob


# --- full budget: the converted model is the dense model ---------------------------------------------

# per method: the config that makes full budget exact and the knobs at full budget; every registered
# method must be listed (a new one says how it reproduces dense)
FULL_BUDGET = {
    "dense": ({}, [None]),
    "ee": ({"pooling": "cls"}, [None, MAX_SOFTMAX_NEVER]),
    "sweet": ({"pooling": "cls"}, [None, MAX_SOFTMAX_NEVER]),
    "multi-model": ({"pooling": "cls", "policy": "entropy"}, [None, ENTROPY_NEVER]),
    "sharcs": ({}, [ALL_FULL]),
    "acm": ({}, [None]),  # an untrained gate runs every learner
    "planer": ({}, [None, 1.0]),  # every expert of every layer
}


def test_every_method_has_a_full_budget_setting():
    assert set(FULL_BUDGET) == set(METHODS)


def _perturb(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("pooler", [False, True])
@pytest.mark.parametrize("name", METHODS)
def test_full_budget_reproduces_the_dense_model(name, pooler):
    dense = vit_dense(pooler)
    batch = image_batch(6, seed=2)
    sets, knobs = FULL_BUDGET[name]
    cls = get_method(name)
    model = cls.from_dense(dense, cls.Config.from_dict(sets)).eval()
    if name == "sharcs":  # private norms as after training: the full width must not read them
        _perturb(model.width_norms.parameters(), seed=3)
    with torch.no_grad():
        ref = dense(**batch)
        for knob in knobs:
            out = model(**batch, knob=knob)
            torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5, msg=f"{name} knob {knob}")
    if name == "acm":
        with torch.no_grad():
            forced = model(**batch, learners=model.config.learners)
        torch.testing.assert_close(forced.logits, ref.logits, rtol=1e-5, atol=1e-5)
    if name == "sharcs":  # the residual kept whole (DynaBERT-style) too
        other = cls.from_dense(dense, cls.Config(shrink_residual=False)).eval()
        with torch.no_grad():
            torch.testing.assert_close(other(**batch, knob=ALL_FULL).logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_early_exit_heads_pool_like_the_encoder():
    """Every exit head holds its own copy of the final norm (and pooler, when the encoder has one),
    and the encoder keeps neither: its copies would be unused parameters."""
    for pooler in (False, True):
        model = build("ee", vit_dense(pooler))
        assert model.encoder.final_norm is None and model.encoder.pooler is None
        for head in model.heads:
            assert head.norm is not None and (head.pooler is not None) == pooler
    # a text (post-LN) encoder's heads have no norm: their saved weights are as before
    from conftest import make_tiny_dense

    text = build("ee", make_tiny_dense(hidden=16, heads=2, ffn=32, layers=2))
    assert set(text.heads[0].state_dict()) == {"pooler.weight", "pooler.bias", "classifier.weight", "classifier.bias"}


# --- SHARCS: reordering on a ViT and a narrowed residual ---------------------------------------------


@pytest.mark.parametrize("pooler", [False, True])
def test_sharcs_reordering_keeps_the_full_width_model(pooler):
    """Permuting heads, neurons and the residual dimensions (patch projection, CLS token, positions,
    every norm incl. the final one, the classifier's columns without a pooler) keeps width 1.0 = dense."""
    dense = vit_dense(pooler)
    model = build("sharcs", dense)
    g = torch.Generator().manual_seed(0)
    k = len(model.adaptive_blocks)
    heads = torch.stack([torch.randperm(HEADS, generator=g) for _ in range(k)])
    neurons = torch.stack([torch.randperm(FF, generator=g) for _ in range(k)])
    model.permute(heads, neurons, torch.randperm(D, generator=g))
    batch = image_batch(5, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, knob=ALL_FULL).logits, dense(**batch).logits, rtol=1e-5, atol=1e-5)


def test_sharcs_residual_permutation_of_an_embedding_projection():
    """An encoder whose embeddings are projected to d (ELECTRA): the projection's rows carry the
    residual dimensions, the embedding tables (of width embedding_size) are left alone."""
    torch.manual_seed(0)
    enc = EncoderConfig(vocab_size=50, hidden_size=D, embedding_size=16, num_hidden_layers=3, num_attention_heads=HEADS,
                        intermediate_size=FF, max_position_embeddings=40, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    dense = DenseClassifier(ModelSpec(enc, ("a", "b"), 32), DenseConfig(classifier_dropout=0.0)).eval()
    model = build("sharcs", dense)
    model.permute(torch.stack([torch.arange(HEADS)] * 2), torch.stack([torch.arange(FF)] * 2), torch.randperm(D))
    ids = torch.randint(1, 50, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 9, dtype=torch.int64)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, knob=ALL_FULL).logits, dense(ids, mask).logits, rtol=1e-5, atol=1e-5)


def test_sharcs_narrow_widths_use_a_private_final_norm_on_pre_ln():
    model = build("sharcs", vit_dense())
    for norms, shape in zip(model.width_norms, model.shapes):
        assert norms.reduce is None and norms.final.normalized_shape == (shape.hidden,)
    batch = image_batch(3, seed=6)
    with torch.no_grad():
        before = model(**batch, width=0).logits
        model.width_norms[0].final.bias.add_(1.0)
        after = model(**batch, width=0).logits
    assert not torch.allclose(before, after), "the narrowest width pools through its private final norm"
    lengths = torch.full((3,), TOKENS)
    s = model.shapes[0]
    blocks = (LAYERS - model.router_layer) * (flops.attention_block(lengths, s.hidden, s.attn)
                                              + flops.ffn_block(lengths, s.hidden, s.ffn))
    # no pooler: the classifier reads the d_w-wide normalised CLS row
    torch.testing.assert_close(model._suffix_costs(lengths)[0], blocks + flops.linear(1, s.hidden, 3), rtol=0, atol=0)


# --- distillation targets on pre-LN blocks -----------------------------------------------------------


def test_acm_captures_the_ffn_sublayer_input_and_its_delta():
    """ACM distils each learner set from the FFN's sub-layer: input ffn.inp(h) (after the block's
    norm) and output the delta the residual adds; the teacher capture gives exactly those."""
    from adaptinf.recipes.finetune import capture_tokens

    dense = vit_dense()
    model = build("acm", dense)
    ffn = model.teacher.encoder.blocks[1].ffn
    batch = image_batch(2, seed=8)
    seen = {}
    ffn.register_forward_hook(lambda m, a, o: seen.update(h=a[0], out=o))
    points = {"in": (ffn.up, "input"), "out": (ffn.down, "output")}
    with capture_tokens(points) as cap, torch.no_grad():
        cap.select(batch["attention_mask"])
        model.teacher(**batch)
        h = seen["h"].reshape(-1, D)
        torch.testing.assert_close(cap["in"], ffn.norm(h))
        torch.testing.assert_close(h + cap["out"], seen["out"].reshape(-1, D))
        mod = model.module("1.ffn")
        torch.testing.assert_close(mod.learners.cumulative(cap["in"])[:, -1], cap["out"], rtol=1e-5, atol=1e-5)


def test_planer_router_inputs_are_the_experts_input_on_teacher_and_student():
    """The routers are fitted on the experts' input (ffn.inp(h)); at the dense architecture the
    student's own FFN inputs equal the teacher's captured ones."""
    from adaptinf.recipes.finetune import capture_tokens
    from adaptinf.recipes.planer import _student_ffn_inputs

    dense = vit_dense()
    model = build("planer", dense)
    batch = image_batch(3, seed=9)
    teacher = model._teacher[0]
    points = {str(i): (teacher.encoder.blocks[i].ffn.up, "input") for i in range(LAYERS)}
    with capture_tokens(points) as cap, torch.no_grad():
        cap.select(batch["attention_mask"])
        teacher(**batch)
        student = _student_ffn_inputs(model, batch["input_ids"], batch["attention_mask"])
        for i in range(LAYERS):
            torch.testing.assert_close(student[i], cap[str(i)], rtol=1e-5, atol=1e-5)
        h = dense.encoder.embed(batch["input_ids"])
        x = dense.encoder.blocks[0].attention(h, torch.zeros(3, 1, 1, TOKENS))
        torch.testing.assert_close(student[0], dense.encoder.blocks[0].ffn.norm(x).reshape(-1, D), rtol=1e-5, atol=1e-5)


def test_structure_fits_planer_latency_length_to_the_image():
    from adaptinf.structure import adapt

    enc = vit_spec().encoder
    out, notes = adapt("planer", {"num_experts": 4}, enc)
    assert out["latency_seq_len"] == TOKENS and any("latency_seq_len" in n for n in notes)
    text = dataclasses.replace(enc, image_size=0, patch_size=0, num_channels=0, image_mean=(), image_std=())
    assert "latency_seq_len" not in adapt("planer", {"num_experts": 4}, text)[0]


# --- the recipes on a ViT ----------------------------------------------------------------------------


def image_encoded(n: int, seed: int) -> Encoded:
    return Encoded(patchify(images(n, seed), PATCH), torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed)))


RECIPE_SETS = {
    "ee": {"calibration": "validation"},
    "sweet": {"calibration": "validation"},
    "multi-model": {"calibration": "validation"},
    "sharcs": {"importance_samples": 8, "router_fit_epochs": 2, "window": 1},
    "acm": {"learners": 2, "distill_epochs": 1, "gate_epochs": 1},
}


@pytest.mark.parametrize("name", sorted(RECIPE_SETS))
def test_recipe_trains_the_method_on_images(name, tmp_path):
    """Each method's recipe end to end on 16 images (PLANER's needs the latency table's inputs: its
    router training and distillation targets are tested above)."""
    from adaptinf.registry import get_recipe, load_model
    from adaptinf.settings import TrainConfig

    cls = get_method(name)
    model = cls.from_dense(vit_dense(), cls.Config.from_dict(RECIPE_SETS[name]))
    train, val = image_encoded(16, seed=20), image_encoded(8, seed=21)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-3, eval_batch_size=8)
    summary = get_recipe(name)(model, train, val, cfg, tmp_path / "run", progress=False)
    assert summary["steps"] >= 2
    batch = image_batch(3, seed=22)
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.logits).all()
    best = tmp_path / "run" / ("e2e/best" if name == "acm" else "best")  # the kept model reloads as it is
    with torch.no_grad():
        torch.testing.assert_close(load_model(best)(**batch).logits, out.logits, rtol=0, atol=0)


def test_planer_router_training_on_images():
    from adaptinf.recipes.planer import train_routers
    from adaptinf.settings import TrainConfig

    model = build("planer", vit_dense())
    before = [p.clone() for p in model.routers.parameters()]
    stats = train_routers(model, image_encoded(16, seed=23), TrainConfig(batch_size=8))
    assert set(stats) == {str(i) for i in range(LAYERS)}
    assert all(v["unexplained_variance"] >= 0 for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.routers.parameters()))


def test_acm_attention_learners_read_the_normalised_input_on_pre_ln():
    """ACM on q/k/v/out too: with every learner on, the model is the dense model whose projections
    are the learners' sums (each a Linear: identity activation); built as such, the two agree only
    if the learners read `Attention.inp(h)` and their output goes through `Attention.residual`."""
    import copy

    dense = vit_dense()
    model = get_method("acm").from_dense(dense, get_method("acm").Config(targets="ffn,attn")).eval()
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        for name in model.names:
            layer, kind = name.split(".")
            if kind == "ffn":
                continue
            learners = model.module(name).learners
            zero = learners.cumulative(torch.zeros(1, D))[0, -1]  # [d] the bias
            weight = learners.cumulative(torch.eye(D))[:, -1] - zero  # [d_in, d_out]
            lin = getattr(ref.encoder.blocks[int(layer)].attention, kind)
            lin.weight.copy_(weight.t())
            lin.bias.copy_(zero)
        batch = image_batch(4, seed=11)
        got = model(**batch, learners=model.config.learners).logits
        torch.testing.assert_close(got, ref(**batch).logits, rtol=1e-4, atol=1e-4)


def test_sliced_blocks_at_full_width_are_the_pre_ln_blocks():
    """PLANER's head/neuron-sliced blocks and SHARCS' width-sliced block, at full width, are the
    backbone's pre-LN block (the norm before the sub-layer, the residual after it)."""
    from adaptinf.methods.planer import attention_heads, ffn_width
    from adaptinf.methods.sharcs import WidthShape, sliced_block

    block = vit_dense().encoder.blocks[2]
    h = torch.randn(3, TOKENS, D, generator=torch.Generator().manual_seed(0))
    bias = torch.zeros(3, 1, 1, TOKENS)
    with torch.no_grad():
        ref_a = block.attention(h, bias)
        torch.testing.assert_close(attention_heads(block.attention, h, bias, HEADS, 0.0), ref_a)
        torch.testing.assert_close(ffn_width(block.ffn, ref_a, FF), block.ffn(ref_a))
        full = WidthShape(1.0, HEADS, D, D, FF)
        torch.testing.assert_close(sliced_block(block, h, bias, full, block.attention.norm, block.ffn.norm), block(h, bias))
        assert not torch.allclose(attention_heads(block.attention, h, bias, HEADS // 2, 0.0), ref_a)


def test_dense_vit_exports_to_transformers_with_equal_logits(dense):
    """`DenseClassifier.to_hf` of a ViT is a `ViTForImageClassification` whose logits, fed by
    `bench.hf_case` from the same uint8 patch rows, equal ours (the "transformers" latency reference)."""
    from transformers import ViTForImageClassification

    from adaptinf.backbone import unpatchify
    from adaptinf.bench import hf_case
    from adaptinf.data import Batch

    imgs = images(5, seed=3)
    assert torch.equal(unpatchify(patchify(imgs, PATCH), IMAGE, PATCH, 1), imgs)
    hf_model = dense.to_hf()
    assert isinstance(hf_model, ViTForImageClassification)
    b = image_batch(5, seed=3)
    with torch.no_grad():
        want = dense(**b).logits
        zeros = torch.zeros(5, dtype=torch.long)
        got = hf_case(hf_model)(Batch(b["input_ids"], b["attention_mask"], zeros, zeros))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want.std() > 0.1
    with pytest.raises(ValueError, match="pooler"):
        vit_dense(pooler=True).to_hf()
