"""RoBERTa / XLM-R, DistilBERT and ELECTRA checkpoints (and BERT) load into our Encoder through
`adaptinf.hf.load_encoder` and reproduce the family's `transformers` model (fp32, CPU, eval) on
the real tokens of padded batches; unsupported families and options are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_batch
from test_backbone_parity import TOL, spread_weights
from torch.testing import assert_close

from adaptinf import flops, hf
from adaptinf.backbone import Encoder, EncoderConfig
from adaptinf.methods.dense import DenseClassifier
from adaptinf.model import ModelSpec

VOCAB = 97
SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
LENGTHS = [20, 2, 13, 1, 7]
FAMILIES = ["bert", "roberta", "xlm-roberta", "distilbert", "electra"]


def hf_config(family: str, **overrides):
    import transformers as t

    if family == "distilbert":
        kw = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=40)
        return t.DistilBertConfig(**{**kw, **overrides})
    kw = dict(vocab_size=VOCAB, max_position_embeddings=40, **SHAPE)
    if family in ("roberta", "xlm-roberta"):  # RoBERTa's layout: pad id 1, positions from 2, one token type
        kw.update(pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1, max_position_embeddings=42)
    if family == "electra":
        kw.update(embedding_size=16)  # != hidden_size: an embeddings_project Linear 16 -> 32
    cls = {"bert": t.BertConfig, "roberta": t.RobertaConfig, "xlm-roberta": t.XLMRobertaConfig,
           "electra": t.ElectraConfig}[family]
    return cls(**{**kw, **overrides})


def save_checkpoint(directory, family: str, seed: int = 0, **model_kw):
    """A random tiny model of `family` (weights spread to O(1) activations) saved with save_pretrained."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = spread_weights(AutoModel.from_config(hf_config(family), **model_kw))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    return request.param, save_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


def family_batch(lengths, pad: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded ids (pad id `pad`, mask 0) whose real tokens avoid the pad id."""
    b = make_batch(lengths, vocab_size=VOCAB - 3, seed=seed)
    ids = torch.where(b["attention_mask"].bool(), b["input_ids"] + 2, torch.full_like(b["input_ids"], pad))
    return {"input_ids": ids, "attention_mask": b["attention_mask"]}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_family_matches_transformers_on_a_padded_batch(family_dir, impl):
    from transformers import AutoModel

    family, d = family_dir
    ours, path = hf.load_encoder(d)
    assert path == d
    ref = AutoModel.from_pretrained(d, local_files_only=True, attn_implementation=impl).eval()
    batch = family_batch(LENGTHS, ours.cfg.pad_token_id)
    with torch.no_grad():
        expected = ref(**batch, output_hidden_states=True)
        last, pooled, states = ours.eval()(batch["input_ids"], batch["attention_mask"], output_hidden_states=True)
    real = batch["attention_mask"].bool()
    assert len(states) == len(expected.hidden_states) == 3
    for i, (a, b) in enumerate(zip(states, expected.hidden_states)):
        assert_close(a[real], b[real], **TOL, msg=lambda m, i=i: f"{family} hidden state {i}: {m}")
    assert_close(last[real], expected.last_hidden_state[real], **TOL)
    if getattr(expected, "pooler_output", None) is not None:  # BERT and RoBERTa have a pooler
        assert_close(pooled, expected.pooler_output, **TOL)


def test_family_configs_map_to_the_encoder_config(family_dir):
    family, d = family_dir
    enc, _ = hf.load_encoder(d)
    expected = {
        "bert": EncoderConfig(vocab_size=VOCAB, max_position_embeddings=40, **SHAPE),
        "roberta": EncoderConfig(vocab_size=VOCAB, max_position_embeddings=42, type_vocab_size=1, pad_token_id=1,
                                 position_offset=2, **SHAPE),
        "distilbert": EncoderConfig(vocab_size=VOCAB, max_position_embeddings=40, type_vocab_size=0, **SHAPE),
        "electra": EncoderConfig(vocab_size=VOCAB, max_position_embeddings=40, embedding_size=16, **SHAPE),
    }
    assert enc.cfg == expected.get(family, expected["roberta"])
    assert enc.cfg.max_positions == 40


def test_roberta_positions_offset_arange_equals_its_position_ids_on_real_tokens():
    """RoBERTa numbers positions from input_ids (real tokens pad+1.., pads pad); ours are offset+arange,
    which agree on every real token of a right-padded batch, the only ones that reach the output."""
    from transformers import RobertaModel

    ref = RobertaModel(hf_config("roberta"))
    batch = family_batch(LENGTHS, pad=1)
    theirs = ref.embeddings.create_position_ids_from_input_ids(batch["input_ids"], 1)
    ours = 2 + torch.arange(batch["input_ids"].shape[1]).expand_as(theirs)
    real = batch["attention_mask"].bool()
    assert torch.equal(theirs[real], ours[real])
    assert (theirs[~real] == 1).all() and not torch.equal(theirs, ours)  # pads differ, and are masked


def test_a_sample_is_the_same_alone_and_padded(family_dir):
    enc, _ = hf.load_encoder(family_dir[1])
    batch = family_batch(LENGTHS, enc.cfg.pad_token_id)
    with torch.no_grad():
        last, pooled, _ = enc.eval()(batch["input_ids"], batch["attention_mask"])
        for i, n in enumerate(LENGTHS):
            alone, alone_pooled, _ = enc(batch["input_ids"][i : i + 1, :n], batch["attention_mask"][i : i + 1, :n])
            assert_close(last[i, :n], alone[0], **TOL)
            assert_close(pooled[i], alone_pooled[0], **TOL)


def test_a_checkpoint_without_a_pooler_gets_a_fresh_seeded_one(tmp_path):
    d = save_checkpoint(tmp_path / "roberta", "roberta", add_pooling_layer=False)
    torch.manual_seed(1)
    a, _ = hf.load_encoder(d)
    torch.manual_seed(2)
    b, _ = hf.load_encoder(d)
    assert torch.equal(a.pooler.dense.weight, b.pooler.dense.weight)  # whatever the global seed
    assert not a.pooler.dense.bias.any() and 0.015 < a.pooler.dense.weight.std() < 0.025
    fresh = Encoder(a.cfg)
    hf.fresh_pooler(fresh)
    assert torch.equal(fresh.pooler.dense.weight, a.pooler.dense.weight)


def test_a_checkpoint_missing_an_encoder_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    d = save_checkpoint(tmp_path / "electra", "electra")
    sd = load_file(str(d / "model.safetensors"))
    del sd["embeddings_project.weight"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing weight 'embeddings_project.weight'"):
        hf.load_encoder(d)


@pytest.mark.parametrize("model_type", ["gpt2", "mystery-net", None])
def test_unknown_model_types_are_one_line_errors(tmp_path, model_type):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type} if model_type else {}))
    save_file({"dummy": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        hf.load_encoder(tmp_path)
    assert str(e.value) == (f"unsupported model_type {model_type!r}; "
                            "adaptinf loads bert, roberta, xlm-roberta, distilbert, electra, vit checkpoints")


@pytest.mark.parametrize("family,option,match", [
    ("distilbert", dict(sinusoidal_pos_embds=True), "unsupported sinusoidal_pos_embds=True"),
    ("distilbert", dict(activation="relu"), "unsupported activation 'relu'"),
    ("roberta", dict(hidden_act="gelu_new"), "unsupported hidden_act 'gelu_new'"),
    ("xlm-roberta", dict(position_embedding_type="relative_key"), "unsupported position_embedding_type"),
    ("electra", dict(hidden_act="relu"), "unsupported hidden_act 'relu'"),
])
def test_unsupported_options_are_one_line_errors(tmp_path, family, option, match):
    hf_config(family, **option).save_pretrained(tmp_path)
    torch.save({}, tmp_path / "pytorch_model.bin")  # refused before the weights are read
    with pytest.raises(ValueError, match=match) as e:
        hf.load_encoder(tmp_path)
    assert "\n" not in str(e.value)


def test_old_encoder_configs_load_and_bert_configs_are_written_as_before():
    old = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
           "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "pad_token_id": 0}
    cfg = EncoderConfig.from_dict(old)
    assert cfg.position_offset == 0 and cfg.embedding_size is None and cfg.embedding_dim == 32
    assert cfg.to_dict() == old  # no new keys at their defaults
    new = EncoderConfig.from_dict({**old, "position_offset": 2, "embedding_size": 16, "type_vocab_size": 0})
    assert EncoderConfig.from_dict(new.to_dict()) == new and new.max_positions == 62


@pytest.mark.parametrize("kw,match", [
    (dict(embedding_size=0), "embedding_size must be a positive int"),
    (dict(embedding_size=16.0), "embedding_size must be a positive int"),
    (dict(position_offset=-1), "position_offset must be a non-negative int"),
    (dict(position_offset=64), "position_offset .* below max_position_embeddings"),
    (dict(type_vocab_size=-1), "type_vocab_size must be a non-negative int"),
])
def test_family_fields_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        EncoderConfig(vocab_size=100, hidden_size=32, num_attention_heads=4, max_position_embeddings=64, **kw)


def test_embeddings_refuse_overlong_inputs_and_token_types_they_lack():
    enc = Encoder(EncoderConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16, max_position_embeddings=10, position_offset=2, type_vocab_size=0))
    ids = torch.ones(1, 8, dtype=torch.int64)
    assert enc.embed(ids).shape == (1, 8, 8)
    with pytest.raises(ValueError, match="longer than the 8 positions"):
        enc.embed(torch.ones(1, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match="no token-type embeddings"):
        enc.embed(ids, torch.zeros_like(ids))


def dense_from(enc: Encoder, seed: int = 0) -> DenseClassifier:
    torch.manual_seed(seed)
    model = DenseClassifier(ModelSpec(enc.cfg, ("neg", "pos"), 32))
    model.encoder.load_state_dict(enc.state_dict())
    return model.eval()


def test_dense_classifier_runs_on_every_family(family_dir):
    family, d = family_dir
    model = dense_from(hf.load_encoder(d)[0])
    batch = family_batch(LENGTHS, model.spec.encoder.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (len(LENGTHS), 2) and torch.isfinite(out.logits).all()
    lengths = torch.tensor(LENGTHS)
    assert out.flops.tolist() == flops.dense_model(lengths, model.spec.encoder, 2).tolist()
    if family == "bert":
        assert_close(model.to_hf()(**batch).logits, out.logits, **TOL)
    else:  # only BERT-layout encoders export as BertForSequenceClassification
        with pytest.raises(ValueError, match="cannot export this encoder as a transformers BertModel"):
            model.to_hf()


def test_electra_projection_flops_agree_with_the_flop_counter():
    from test_flops import counted_flops

    cfg = EncoderConfig(vocab_size=VOCAB, max_position_embeddings=40, embedding_size=16, **SHAPE)
    model = dense_from(Encoder(cfg))
    batch = family_batch([11], cfg.pad_token_id)
    total, counts = counted_flops(model, batch)
    assert total == model(**batch).flops.item() == flops.dense_model(torch.tensor([11]), cfg, 2).item()
    assert sum(counts["DenseClassifier.encoder.embeddings.project"].values()) == flops.embeddings(11, cfg) == 2 * 11 * 16 * 32


def save_tokenizer(directory, pad_id: int) -> None:
    """A tiny WordPiece tokenizer whose [PAD] has id `pad_id` (as in the checkpoint's config)."""
    from transformers import BertTokenizerFast

    specials = ["[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    specials.insert(pad_id, "[PAD]")
    words = "a an the film plot was good bad dull great fun not very slow".split()
    tokens = specials + words + [f"w{i}" for i in range(VOCAB - len(specials) - len(words))]
    BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(directory)


@pytest.mark.parametrize("family", ["roberta", "distilbert", "electra"])
def test_dense_from_pretrained_end_to_end(tmp_path, family):
    from adaptinf.steps import dense_from_pretrained

    d = save_checkpoint(tmp_path / family, family)
    pad = hf_config(family).pad_token_id
    save_tokenizer(d, pad)
    model, path = dense_from_pretrained(str(d), ("neg", "pos"), 24, 0.1, seed=0)
    assert path == d and model.tokenizer.pad_token_id == pad
    enc = model.tokenizer(["a good film", "the plot was very slow and not fun"], padding=True, return_tensors="pt")
    assert model.tokenizer.unk_token_id not in enc["input_ids"][0]
    assert (enc["input_ids"][0][enc["attention_mask"][0] == 0] == pad).all()
    with torch.no_grad():
        out = model.eval()(enc["input_ids"], enc["attention_mask"])
    assert out.logits.shape == (2, 2) and torch.isfinite(out.logits).all()
