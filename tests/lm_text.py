"""A tiny random-words corpus for the language-model tests (test_lm, test_lm_*, test_run_lm): a few
KB of Austen-flavoured words in paragraphs, a 300-token BPE tokenizer trained on its training split."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ("the", "lady", "said", "that", "she", "would", "not", "walk", "to", "house", "of", "Mr.", "Darcy", "and",
         "her", "sister", "was", "very", "happy", "with", "letter", "morning", "evening", "a", "in", "garden")


def random_text(seed: int = 0, paragraphs: int = 60) -> str:
    """Paragraphs of 1-3 sentences of 5-12 random words, separated by blank lines."""
    rng = random.Random(seed)
    paras = []
    for _ in range(paragraphs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                     for _ in range(rng.randint(1, 3))]
        paras.append(" ".join(sentences))
    return "\n\n".join(paras) + "\n"


def tiny_lm_data(folder: Path, seed: int = 0, paragraphs: int = 60, vocab_size: int = 300):
    """(tokenizer, LMData) of `random_text` written to folder/novel.txt."""
    from adaptinf.corpus import LMData, text_file_corpus, train_tokenizer

    path = Path(folder) / "novel.txt"
    path.write_text(random_text(seed, paragraphs))
    corpus = text_file_corpus(path)
    tok = train_tokenizer(corpus.texts("train"), vocab_size=vocab_size)
    return tok, LMData.from_corpus(corpus, tok)


TINY_DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=48)


def tiny_dense_lm(tok, seed: int = 0, overrides: dict | None = None, seq_len: int = 16):
    """A seeded built-in gpt-tiny shrunk to `TINY_DECODER` (or `overrides`), in eval mode."""
    from adaptinf.recipes.lm import build_lm

    model = build_lm(tok, "gpt-tiny", seed=seed, overrides=overrides or TINY_DECODER)
    model.seq_len = seq_len
    return model.eval()
