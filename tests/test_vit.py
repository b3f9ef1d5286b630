"""The owned ViT: `ViTModel` / `ViTForImageClassification` checkpoints load through
`adaptinf.hf.load_encoder` and reproduce `transformers` (fp32, CPU, eval) from the same pixel bytes
(HF's own image processor on one side, `patchify` and in-model normalisation on ours); packed runs
equal padded; the vision config round-trips and validates; FLOPs count the patch projection;
`vit-tiny` is deterministic."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from adaptinf import flops, hf
from adaptinf.backbone import Encoder, EncoderConfig, PatchEmbeddings, patchify, token_layout

TOL = dict(atol=1e-5, rtol=1e-5)
SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
# (image size, patch size, channels, mean, std): grayscale and RGB, 4 and 9 patches
IMAGES = [(8, 4, 1, [0.3], [0.2]), (12, 4, 3, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]


def vit_config(image: int, patch: int, channels: int, **kw):
    from transformers import ViTConfig

    return ViTConfig(**{**dict(image_size=image, patch_size=patch, num_channels=channels, **SHAPE), **kw})


@torch.no_grad()
def spread_vit(model: torch.nn.Module) -> torch.nn.Module:
    """Re-draw every weight so activations are O(1) (a wrong detail, e.g. a swapped LayerNorm or a
    patch flattened in the wrong order, then fails the tolerance; with ViT's init it might not)."""
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.copy_(1 + 0.3 * torch.randn_like(m.weight))
            m.bias.normal_(0, 0.5)
        elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.weight.normal_(0, 1.0 / m.weight[0].numel() ** 0.5)
            m.bias.normal_(0, 0.5)
    for name, p in model.named_parameters():
        if name.endswith(("cls_token", "position_embeddings")):
            p.normal_(0, 0.5)
    return model


def save_vit(directory, image, patch, channels, mean, std, classifier: bool = False, seed: int = 0, **kw):
    """A random tiny ViTModel (or ViTForImageClassification) and its ViTImageProcessor, saved."""
    from transformers import ViTForImageClassification, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = vit_config(image, patch, channels, **kw)
    if classifier:
        config.id2label = {0: "cat", 1: "dog", 2: "bird"}
        config.label2id = {v: k for k, v in config.id2label.items()}
    model = spread_vit((ViTForImageClassification if classifier else ViTModel)(config)).eval()
    model.save_pretrained(directory)
    ViTImageProcessor(do_resize=False, image_mean=mean, image_std=std).save_pretrained(directory)
    return model


def random_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


def hf_pixels(directory, images: torch.Tensor) -> torch.Tensor:
    """transformers' own preprocessing of the bytes: rescale 1/255, normalise (no resize)."""
    from transformers import ViTImageProcessor

    proc = ViTImageProcessor.from_pretrained(directory)
    arrays = [np.asarray(im.permute(1, 2, 0)) for im in images]  # HWC uint8
    return proc(arrays, return_tensors="pt", input_data_format="channels_last")["pixel_values"]


def ones_mask(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[:2], dtype=torch.int64)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("image,patch,channels,mean,std", IMAGES)
def test_vit_model_matches_transformers(tmp_path, image, patch, channels, mean, std, impl):
    save_vit(tmp_path, image, patch, channels, mean, std)
    from transformers import ViTModel

    ref = ViTModel.from_pretrained(tmp_path, attn_implementation=impl).eval()
    ours, path = hf.load_encoder(tmp_path)
    ours.eval()
    cfg = ours.cfg
    assert path == tmp_path
    assert (cfg.pre_norm, cfg.pooler, cfg.image_size, cfg.patch_size, cfg.num_channels) == (True, True, image, patch,
                                                                                            channels)
    assert_close(torch.tensor(cfg.image_mean), torch.tensor(mean)) and cfg.max_positions == 1 + (image // patch) ** 2
    imgs = random_images(3, channels, image)
    x = patchify(imgs, patch)
    with torch.no_grad():
        expected = ref(pixel_values=hf_pixels(tmp_path, imgs), output_hidden_states=True)
        last, pooled, states = ours(x, ones_mask(x), output_hidden_states=True)
        packed_last, packed_pooled, _ = ours(x, ones_mask(x), packed=True)
    assert len(states) == len(expected.hidden_states) == cfg.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(states, expected.hidden_states)):
        assert_close(a, b, **TOL, msg=lambda m, i=i: f"hidden state {i}: {m}")
    assert_close(last, expected.last_hidden_state, **TOL)  # after the final LayerNorm in both
    assert_close(pooled, expected.pooler_output, **TOL)
    assert_close(packed_last, last, **TOL)
    assert_close(packed_pooled, pooled, **TOL)
    assert expected.pooler_output.abs().mean() > 0.1  # O(1) activations: the comparison can fail


@pytest.mark.parametrize("image,patch,channels,mean,std", IMAGES)
def test_vit_classifier_logits_match_transformers(tmp_path, image, patch, channels, mean, std):
    ref = save_vit(tmp_path, image, patch, channels, mean, std, classifier=True)
    ours, _ = hf.load_encoder(tmp_path)
    ours.eval()
    assert ours.cfg.pooler is False and ours.pooler is None  # the classifier reads the normalised CLS row
    w, b, labels = hf.classifier_head(tmp_path)
    assert labels == ("cat", "dog", "bird")
    imgs = random_images(4, channels, image, seed=1)
    x = patchify(imgs, patch)
    with torch.no_grad():
        expected = ref(pixel_values=hf_pixels(tmp_path, imgs)).logits
        h = ours.run_blocks(ours.embed(x), token_layout(ones_mask(x)))  # the methods' step-wise path, packed
        logits = F.linear(ours.pool(h), w, b)
    assert_close(logits, expected, **TOL)
    assert expected.std() > 0.1


def test_saved_layout_names_load_too(tmp_path):
    """The names ViT checkpoints are saved with (transformers 4's in-memory names) copy as well."""
    from safetensors.torch import load_file
    from transformers import ViTModel

    image, patch, channels, mean, std = IMAGES[1]
    save_vit(tmp_path, image, patch, channels, mean, std)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert "encoder.layer.0.attention.attention.query.weight" in saved
    ours, _ = hf.load_encoder(tmp_path)
    again = Encoder(ours.cfg)
    assert hf.copy_weights_from_hf(again, saved, "vit")
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    ref = ViTModel.from_pretrained(tmp_path)
    assert hf.copy_weights_from_hf(Encoder(ours.cfg), ref.state_dict(), "vit")  # the in-memory names


def test_patchify_matches_the_patch_conv():
    imgs = random_images(2, 3, 12)
    conv = torch.nn.Conv2d(3, 5, 4, stride=4)
    x = patchify(imgs, 4)
    assert x.dtype == torch.uint8 and x.shape == (2, 10, 48) and not x[:, 0].any()
    with torch.no_grad():
        want = conv(imgs.float()).flatten(2).transpose(1, 2)  # [N, P, d], raster order
        got = F.linear(x[:, 1:].float(), conv.weight.view(5, -1), conv.bias)
    assert_close(got, want, atol=1e-3, rtol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        patchify(imgs.float(), 4)
    with pytest.raises(ValueError, match="patch_size 5"):
        patchify(imgs, 5)


def tiny_vision(**kw) -> EncoderConfig:
    base = dict(vocab_size=1, max_position_embeddings=5, type_vocab_size=0, **SHAPE, pre_norm=True, image_size=8,
                patch_size=4, num_channels=1, image_mean=[0.5], image_std=[0.25], pooler=False)
    return EncoderConfig(**{**base, **kw})


def test_packed_blocks_equal_padded_for_images():
    torch.manual_seed(0)
    enc = Encoder(tiny_vision(num_channels=3, image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.5, 0.5])).eval()
    x = patchify(random_images(5, 3, 8), 4)
    with torch.no_grad():
        h = enc.embed(x)
        a = enc.run_blocks(h, token_layout(ones_mask(x)))
        b = enc.run_blocks(h, torch.zeros(5, 1, 1, 5))
        c = enc.run_blocks(enc.run_blocks(h, token_layout(ones_mask(x)), 0, 1), token_layout(ones_mask(x)), 1)
    assert_close(a, b, **TOL)
    assert_close(c, b, **TOL)


def test_pre_and_post_norm_residuals():
    """inp/residual put the LayerNorm before the sub-layer (pre-LN) or after the residual add (post-LN)."""
    torch.manual_seed(0)
    h, delta = torch.randn(3, 32), torch.randn(3, 32)
    for pre in (True, False):
        enc = Encoder(tiny_vision(pre_norm=pre) if pre else EncoderConfig(vocab_size=10, **SHAPE)).eval()
        for sub in (enc.blocks[0].attention, enc.blocks[0].ffn):
            other = torch.nn.LayerNorm(32)
            with torch.no_grad():
                other.weight.mul_(2)
            if pre:
                assert_close(sub.inp(h), sub.norm(h)) and assert_close(sub.inp(h, other), other(h))
                assert_close(sub.residual(h, delta), h + delta)
                assert_close(sub.residual(h, delta, other), h + delta)
            else:
                assert sub.inp(h) is h
                assert_close(sub.residual(h, delta), sub.norm(h + delta))
                assert_close(sub.residual(h, delta, other), other(h + delta))


def test_vision_config_round_trips_and_bert_configs_are_unchanged():
    cfg = tiny_vision(num_channels=3, image_mean=[0.1, 0.2, 0.3], image_std=(0.5, 0.6, 0.7), pooler=True)
    assert cfg.image_mean == (0.1, 0.2, 0.3) and isinstance(cfg.image_std, tuple)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d == cfg.to_dict() and d["image_mean"] == [0.1, 0.2, 0.3] and "pooler" not in d  # pooler True: default
    assert EncoderConfig.from_dict(d) == cfg and hash(EncoderConfig.from_dict(d)) == hash(cfg)
    assert (cfg.is_vision, cfg.num_patches, cfg.patch_dim, cfg.max_positions) == (True, 4, 48, 5)
    bert = EncoderConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)
    assert list(bert.to_dict()) == ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                    "intermediate_size", "max_position_embeddings", "type_vocab_size",
                                    "layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob",
                                    "pad_token_id"]
    assert not bert.is_vision and bert.num_patches == 0 and bert.max_positions == 64
    pre_text = EncoderConfig(vocab_size=100, pre_norm=True, pooler=False)
    assert pre_text.to_dict()["pre_norm"] is True and EncoderConfig.from_dict(pre_text.to_dict()) == pre_text


@pytest.mark.parametrize("change,match", [
    (dict(image_size=10), "image_size \\(10\\) must be divisible by patch_size \\(4\\)"),
    (dict(image_mean=[0.5, 0.5]), "image_mean has 2 values; give one per channel \\(num_channels=1\\)"),
    (dict(image_std=[0.0]), "image_std must be positive"),
    (dict(image_std=["a"]), "image_std must be a list of finite numbers"),
    (dict(patch_size=0), "patch_size, num_channels, image_mean and image_std all set"),
    (dict(image_size=0, patch_size=0), "needs image_size"),
    (dict(num_channels=-1), "num_channels must be a non-negative int"),
    (dict(pre_norm=1), "pre_norm must be true or false"),
    (dict(position_offset=1), "no position_offset or embedding_size"),
])
def test_vision_config_validation(change, match):
    with pytest.raises(ValueError, match=match):
        tiny_vision(**change)


def test_wrong_image_inputs_are_clear_errors():
    enc = Encoder(tiny_vision())
    x = patchify(random_images(2, 1, 8), 4)
    assert isinstance(enc.embeddings, PatchEmbeddings) and enc.embed(x).shape == (2, 5, 32)
    with pytest.raises(ValueError, match=r"takes patchified images \[batch, 5, 16\].*got shape \(2, 10, 48\)"):
        enc.embed(patchify(random_images(2, 3, 12), 4))
    with pytest.raises(ValueError, match="got shape \\(2, 5\\)"):
        enc.embed(torch.zeros(2, 5, dtype=torch.int64))  # token ids
    with pytest.raises(ValueError, match="uint8 pixel bytes"):
        enc.embed(x.float())
    with pytest.raises(ValueError, match="no token types"):
        enc.embed(x, torch.zeros(2, 5, dtype=torch.int64))


def test_hf_vit_options_that_do_not_fit_are_one_line_errors(tmp_path):
    for option, match in [(dict(qkv_bias=False), "unsupported qkv_bias=False"),
                          (dict(hidden_act="relu"), "unsupported hidden_act 'relu'"),
                          (dict(image_size=[8, 12]), "square images"),
                          (dict(image_size=10), "patches must tile the image")]:
        vit_config(8, 4, 1, **option).save_pretrained(tmp_path)
        torch.save({}, tmp_path / "pytorch_model.bin")  # refused before the weights are read
        with pytest.raises(ValueError, match=match) as e:
            hf.load_encoder(tmp_path)
        assert "\n" not in str(e.value)


def test_preprocessor_normalisation(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": 0.5}))
    assert hf.image_normalisation(tmp_path, 3) == ((0.1, 0.2, 0.3), (0.5, 0.5, 0.5))
    assert hf.image_normalisation(tmp_path / "none", 1) == ((0.5,), (0.5,))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    assert hf.image_normalisation(tmp_path, 1) == ((0.0,), (1.0,))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3]}))
    with pytest.raises(ValueError, match="image_mean in .* has 3 values but the model has 1 channels"):
        hf.image_normalisation(tmp_path, 1)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"rescale_factor": 1.0}))
    with pytest.raises(ValueError, match="unsupported rescale_factor"):
        hf.image_normalisation(tmp_path, 1)


def test_hf_vit_directory_gives_an_image_processor(tmp_path):
    from adaptinf.images import ImageProcessor

    image, patch, channels, mean, std = IMAGES[1]
    save_vit(tmp_path, image, patch, channels, mean, std)
    assert hf.load_tokenizer(tmp_path) == ImageProcessor(12, 4, 3)
    assert hf.classifier_head(tmp_path) is None  # a base model: no classifier


def test_vit_tiny_builds_deterministically():
    from adaptinf.images import ImageProcessor

    state = torch.random.get_rng_state()
    a, path = hf.load_encoder("vit-tiny")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    torch.manual_seed(123)
    b, _ = hf.load_encoder("vit-tiny")
    assert path is None
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    cfg = a.cfg
    assert (cfg.image_size, cfg.patch_size, cfg.num_channels, cfg.hidden_size, cfg.num_hidden_layers,
            cfg.num_attention_heads, cfg.intermediate_size, cfg.pre_norm, cfg.pooler) == (28, 4, 1, 128, 6, 4, 512,
                                                                                         True, False)
    assert cfg.image_mean == (0.5,) and cfg.image_std == (0.5,) and cfg.max_positions == 50
    assert a.final_norm is not None and a.pooler is None
    assert 1.1e6 < sum(p.numel() for p in a.parameters()) < 1.3e6
    assert 0.01 < float(a.embeddings.position.detach().std()) < 0.03  # ViT's init, not zeros
    assert hf.load_tokenizer("vit-tiny") == ImageProcessor(28, 4, 1)
    x = patchify(random_images(2, 1, 28), 4)
    with torch.no_grad():
        _, pooled, _ = a.eval()(x, ones_mask(x))
    assert pooled.shape == (2, 128) and torch.isfinite(pooled).all()
    with pytest.raises(ValueError, match="has no checkpoint directory"):
        hf.resolve_model_path("vit-tiny")


def test_vision_flops_count_the_patch_projection_and_no_pooler():
    from torch.utils.flop_counter import FlopCounterMode

    from test_flops import CPU_SDPA

    cfg = tiny_vision(num_channels=3, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    d, P, pd, C = 32, 4, 48, 3
    n = torch.tensor([1 + P])
    assert flops.embeddings(n, cfg).item() == 2 * P * pd * d
    assert flops.head(cfg, C) == 2 * d * C and flops.head(cfg, C, pooler=True) == 2 * d * d + 2 * d * C
    assert flops.dense_model(n, cfg, C).item() == 2 * P * pd * d + 2 * flops.block(1 + P, cfg) + 2 * d * C
    torch.manual_seed(0)
    for pooler in (False, True):
        c = tiny_vision(num_channels=3, image_mean=[0.5] * 3, image_std=[0.5] * 3, pooler=pooler)
        enc, head = Encoder(c).eval(), torch.nn.Linear(d, C)
        x = patchify(random_images(1, 3, 8), 4)
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
            head(enc(x, ones_mask(x))[1])
        assert counter.get_total_flops() == flops.dense_model(n, c, C).item()


def test_image_size_of_reads_the_config_only(tmp_path):
    """`hf.image_size_of`: a built-in or a ViT checkpoint's image size without its weights; None for text."""
    from transformers import ViTConfig, ViTModel

    from adaptinf.hf import image_size_of

    assert image_size_of("vit-tiny") == 28 and image_size_of("minilm-l6") is None
    ViTModel(ViTConfig(image_size=12, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32)).save_pretrained(tmp_path)
    assert image_size_of(tmp_path) == 12
