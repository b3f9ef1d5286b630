"""Shared fixtures: a tiny dense classifier and a padded batch for it, and the MiniLM tokenizer.

The `slow` marker is declared in pyproject.toml; slow tests run by default (CI runs them too)
and can be skipped with `-m "not slow"`.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from adaptinf.backbone import EncoderConfig
from adaptinf.methods.dense import DenseClassifier
from adaptinf.model import ModelSpec


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny shapes run fastest on one thread; with more, a test run beside another job (a training
    run on the same cores) slows down ten-fold from oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_LENGTHS = (32, 2, 17, 9)  # one full-length sample, one of length 2 ([CLS] [SEP]), others between


def make_tiny_spec(vocab_size: int = 1000, labels: tuple[str, ...] = ("neg", "pos")) -> ModelSpec:
    """A 2-layer, hidden-32 classifier spec: the shape every fast test uses."""
    return ModelSpec(
        EncoderConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        labels=labels,
        max_length=32,
    )


@pytest.fixture
def tiny_spec() -> ModelSpec:
    return make_tiny_spec()


@pytest.fixture
def tiny_dense(tiny_spec) -> DenseClassifier:
    torch.manual_seed(0)
    return DenseClassifier(tiny_spec).eval()


def make_tiny_dense(seed: int = 0, *, hidden: int, heads: int, ffn: int, layers: int, vocab_size: int = 60) -> DenseClassifier:
    """A dropout-free dense classifier over labels a/b/c (max length 32) for the method tests, seeded."""
    from adaptinf.methods.dense import DenseConfig

    torch.manual_seed(seed)
    enc = EncoderConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ffn, max_position_embeddings=40, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return DenseClassifier(ModelSpec(enc, ("a", "b", "c"), 32), DenseConfig(classifier_dropout=0.0)).eval()


def make_batch(lengths, vocab_size: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids padded (id 0, mask 0) to the longest length: [CLS]-like first token 101."""
    g = torch.Generator().manual_seed(seed)
    s = max(lengths)
    input_ids = torch.zeros(len(lengths), s, dtype=torch.int64)
    attention_mask = torch.zeros(len(lengths), s, dtype=torch.int64)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = torch.randint(1, vocab_size, (n,), generator=g)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def random_batch(n: int, seed: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """n samples of seeded random lengths 2..24 (see make_batch)."""
    g = torch.Generator().manual_seed(seed)
    return make_batch(torch.randint(2, 25, (n,), generator=g).tolist(), vocab_size, seed)


def random_encoded(n: int, seed: int, vocab_size: int, num_labels: int):
    """An `Encoded` split of n random samples (ids without padding) with seeded random labels."""
    from adaptinf.data import Encoded

    b = random_batch(n, seed, vocab_size)
    ids = [row[:m].tolist() for row, m in zip(b["input_ids"], b["attention_mask"].sum(1))]
    return Encoded(ids, torch.randint(0, num_labels, (n,), generator=torch.Generator().manual_seed(seed + 1)))


@pytest.fixture
def tiny_batch(tiny_spec) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask [4, 32] with real lengths TINY_LENGTHS."""
    return make_batch(TINY_LENGTHS, tiny_spec.encoder.vocab_size)


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from adaptinf.hf import load_tokenizer

    return load_tokenizer("minilm-l6")


def save_random_bert(directory: Path, **config) -> Path:
    """A randomly initialised (seed 0) `BertModel` of `config` saved as a Hugging Face checkpoint in
    `directory`, with MiniLM's tokenizer beside it."""
    from transformers import BertConfig, BertModel

    from adaptinf.hf import resolve_model_path

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, max_position_embeddings=64, **config)).save_pretrained(directory)
    src = resolve_model_path("minilm-l6")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / f).exists():
            shutil.copy(src / f, directory / f)
    return directory


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A randomly initialised 2-layer BERT saved as a Hugging Face checkpoint, with MiniLM's tokenizer."""
    return save_random_bert(tmp_path_factory.mktemp("tiny-bert"), hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="session")
def random_bert_dir(tmp_path_factory):
    """A factory: `random_bert_dir(**config)` saves a random BERT of that shape (see `save_random_bert`)."""
    return lambda **config: save_random_bert(tmp_path_factory.mktemp("bert"), **config)


@pytest.fixture(scope="session")
def user_csv(tmp_path_factory):
    """A user's file (not the built-in task): 3 classes named by words, texts from the review data."""
    from adaptinf.data import rotten_tomatoes

    texts, labels = rotten_tomatoes(seed=0).train
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "review", "verdict"])
        for i, (t, y) in enumerate(zip(texts[:90], labels[:90])):
            w.writerow([i, t, ["bad", "good", "meh"][y if i % 5 else 2]])
    return path
