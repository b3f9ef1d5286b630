"""The LM corpus (adaptinf/corpus.py): R lazy-load reader, splits, tokenizer, token streams, batches."""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import struct
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptinf import corpus
from adaptinf.corpus import (
    AUSTEN_NOVELS,
    EOS,
    Document,
    LMCorpus,
    LMData,
    austen_corpus,
    austen_novels,
    encode_documents,
    eval_token_count,
    lm_batches,
    lm_eval_batches,
    lm_steps_per_epoch,
    perplexity_from,
    read_lazyload_db,
    split_text,
    text_file_corpus,
    train_tokenizer,
    unserialize,
)

# --- a tiny R serialiser (serialize.c's XDR format, version 3) to write test databases ----------------


def _i(*v: int) -> bytes:
    return struct.pack(f">{len(v)}i", *v)


def _char(s: str | None) -> bytes:
    if s is None:
        return _i(9, -1)  # NA_character_
    raw = s.encode()
    return _i(9 | (8 << 12), len(raw)) + raw  # CHARSXP marked UTF-8


class _Writer:
    def __init__(self):
        self.syms: list[str] = []

    def sym(self, name: str) -> bytes:
        if name in self.syms:  # a symbol seen before is a reference into the table
            return _i(255 | ((self.syms.index(name) + 1) << 8))
        self.syms.append(name)
        return _i(1) + _char(name)

    def names_attr(self, names: list[str]) -> bytes:  # pairlist(names = c(...))
        return _i(2 | (1 << 10)) + self.sym("names") + self.obj(names) + _i(254)

    def obj(self, x, names: list[str] | None = None) -> bytes:
        attr = 1 << 9 if names is not None else 0
        if isinstance(x, bool):
            body = _i(10 | attr, 1, int(x))
        elif isinstance(x, list) and all(isinstance(v, int) for v in x) and x:
            body = _i(13 | attr, len(x), *x)
        elif isinstance(x, list) and all(isinstance(v, str) or v is None for v in x):
            body = _i(16 | attr, len(x)) + b"".join(_char(s) for s in x)
        elif isinstance(x, dict):
            body = _i(19 | (1 << 9), len(x)) + b"".join(self.obj(v) for v in x.values())
            return body + self.names_attr(list(x))
        else:
            raise TypeError(type(x))
        return body + (self.names_attr(names) if names is not None else b"")


def serialize(x) -> bytes:
    return b"X\n" + _i(3, 0x040201, 0x030500, 5) + b"UTF-8" + _Writer().obj(x)


def _compress(data: bytes, compressed: bool | int) -> bytes:
    """An object as R's lazyLoadDBinsertValue stores it (R_compress1/2/3)."""
    if compressed is False:
        return data
    head = struct.pack(">I", len(data))
    if compressed is True:
        return head + zlib.compress(data)
    return head + (b"2" + bz2.compress(data) if compressed == 2 else b"X" + lzma.compress(data))


def write_db(folder: Path, objects: dict, stem: str = "Rdata", compressed: bool | int = True) -> Path:
    """An R lazy-load database like a data package's: stem.rdb and its index stem.rdx."""
    folder.mkdir(parents=True, exist_ok=True)
    rdb, where = b"", {}
    for name, x in objects.items():
        blob = _compress(serialize(x), compressed)
        where[name] = [len(rdb), len(blob)]
        rdb += blob
    (folder / f"{stem}.rdb").write_bytes(rdb)
    flag = compressed if isinstance(compressed, bool) else [compressed]
    index = {"variables": where, "references": {}, "compressed": flag}
    (folder / f"{stem}.rdx").write_bytes(gzip.compress(serialize(index)))
    return folder / f"{stem}.rdb"


def fake_novel(title: str, n_chapters: int = 3) -> list[str]:
    lines = [title.upper(), "", "by Jane Austen", ""]
    for c in range(n_chapters):
        lines += [f"CHAPTER {c + 1}", "", f"It is a truth of {title} that chapter {c + 1} begins;", "and ends.", ""]
    return lines


@pytest.fixture
def austen_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "janeaustenr" / "data"
    write_db(d, {name: fake_novel(title) for name, title in AUSTEN_NOVELS.items()})
    monkeypatch.setenv(corpus.AUSTEN_ENV, str(d))
    return d


# --- R reader -------------------------------------------------------------------------------------


def test_unserialize_reads_vectors_lists_names_and_na():
    x = {"lines": ["a", None, "é £"], "ints": [3, -(2**31), 7], "flag": True}
    got = unserialize(serialize(x))
    assert got.names == ["lines", "ints", "flag"]
    assert [v.value for v in got.value] == [["a", None, "é £"], [3, None, 7], [1]]
    assert unserialize(gzip.compress(serialize(["x"]))).value == ["x"]  # a gzip'd .rds
    named = unserialize(_named_vector())
    assert named.value == ["p", "q"] and named.names == ["a", "b"]


def _named_vector() -> bytes:
    return b"X\n" + _i(3, 0x040201, 0x030500, 5) + b"UTF-8" + _Writer().obj(["p", "q"], names=["a", "b"])


def test_unserialize_refuses_what_it_does_not_read():
    with pytest.raises(ValueError, match="not an R XDR"):
        unserialize(b"A\n" + _i(3))
    with pytest.raises(ValueError, match="R type 3 .* is not read"):
        unserialize(b"X\n" + _i(2, 0, 0, 3))  # a closure
    with pytest.raises(ValueError, match="truncated"):
        unserialize(serialize(["abcdef"])[:-3])


@pytest.mark.parametrize("compressed", [True, False, 2, 3])
def test_lazyload_db_reads_every_object_or_the_named_ones(tmp_path, compressed):
    rdb = write_db(tmp_path, {"one": ["x", "y"], "two": ["z"], "nums": [1, 2, 3]}, compressed=compressed)
    got = read_lazyload_db(rdb)
    assert {k: v.value for k, v in got.items()} == {"one": ["x", "y"], "two": ["z"], "nums": [1, 2, 3]}
    assert list(read_lazyload_db(rdb, ["two"])) == ["two"]
    with pytest.raises(ValueError, match=r"holds no object \['three'\]"):
        read_lazyload_db(rdb, ["three"])


def test_lazyload_db_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_lazyload_db(tmp_path / "none.rdb")
    rdb = write_db(tmp_path, {"one": ["x"]})
    rdb.write_bytes(rdb.read_bytes()[:4] + b"garbage-not-zlib")
    with pytest.raises(ValueError, match="corrupt"):
        read_lazyload_db(rdb)
    rdb.with_suffix(".rdx").write_bytes(gzip.compress(serialize(["not", "an", "index"])))
    with pytest.raises(ValueError, match="not an R lazy-load index"):
        read_lazyload_db(rdb)


# --- Austen ---------------------------------------------------------------------------------------


def test_austen_novels_from_a_synthetic_package(austen_dir):
    novels = austen_novels()
    assert list(novels) == list(AUSTEN_NOVELS.values())
    assert novels["Emma"] == "\n".join(fake_novel("Emma")).strip("\n")


def test_austen_split_convention(austen_dir):
    c = austen_corpus()
    assert [d.title for d in c.validation] == ["Persuasion"] and [d.title for d in c.test] == ["Northanger Abbey"]
    assert [d.title for d in c.train] == ["Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma"]
    assert "validation Persuasion" in c.summary()


def test_austen_missing_files_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv(corpus.AUSTEN_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=r"ADAPTINF_AUSTEN=.* lacks \['Rdata.rdb', 'Rdata.rdx'\]"):
        austen_novels()
    monkeypatch.delenv(corpus.AUSTEN_ENV)
    monkeypatch.setattr(corpus, "austen_candidates", lambda: [tmp_path / "nowhere"])
    with pytest.raises(ValueError, match="make setup"):
        austen_novels()


def test_austen_package_without_a_novel(tmp_path):
    write_db(tmp_path, {"emma": ["EMMA"]})
    with pytest.raises(ValueError, match="holds no object"):
        austen_novels(tmp_path)


def _real_austen_dir() -> Path | None:
    try:
        return corpus.austen_dir()
    except ValueError:
        return None


@pytest.mark.skipif(_real_austen_dir() is None, reason="r-cran-janeaustenr not extracted (make setup)")
def test_the_real_package():
    novels = austen_novels(_real_austen_dir())
    firsts = {t: x.splitlines()[0] for t, x in novels.items()}
    assert firsts == {"Sense & Sensibility": "SENSE AND SENSIBILITY", "Pride & Prejudice": "PRIDE AND PREJUDICE",
                      "Mansfield Park": "MANSFIELD PARK", "Emma": "EMMA", "Northanger Abbey": "NORTHANGER ABBEY",
                      "Persuasion": "Persuasion"}
    assert "It is a truth universally acknowledged, that a single man in possession" in novels["Pride & Prejudice"]
    assert 3.9e6 < sum(map(len, novels.values())) < 4.1e6  # ~4.0M characters, ~717k words
    assert min(novels, key=lambda t: len(novels[t])) == "Northanger Abbey"


# --- a user's text file ---------------------------------------------------------------------------


def _paragraphs(n: int) -> str:
    return "\n\n".join(f"Paragraph {i}: some words here.\nA second line of it." for i in range(n)) + "\n"


def test_split_text_cuts_at_paragraphs_near_the_fractions():
    text = _paragraphs(100)
    parts = split_text(text)
    assert "".join(parts) == text
    assert [round(len(p) / len(text), 2) for p in parts] == pytest.approx([0.8, 0.1, 0.1], abs=0.02)
    assert all(p.startswith("Paragraph") for p in parts)  # every cut at a paragraph start


def test_split_text_falls_back_to_lines_and_refuses_too_little():
    text = "".join(f"line {i}\n" for i in range(10))  # no blank line
    parts = split_text(text, (0.6, 0.2, 0.2))
    assert "".join(parts) == text and [p.count("\n") for p in parts] == [6, 2, 2]
    with pytest.raises(ValueError, match="too short to split"):
        split_text("one line\ntwo lines\n")
    with pytest.raises(ValueError, match="fractions"):
        split_text(text, (0.5, 0.5, 0.0))


def test_text_file_corpus(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text(_paragraphs(50))
    c = text_file_corpus(p)
    assert c.name == "book" and [d.title for d in c.train] == ["book.txt (train part)"]
    assert "".join(d.text for s in ("train", "validation", "test") for d in c.split(s)) == p.read_text()


@pytest.mark.parametrize("content, match", [(b"", "is empty"), (b"  \n\n ", "only whitespace"),
                                            (b"\xff\xfe bad", "not UTF-8"), (b"a\nb\n", "too short to split")])
def test_text_file_errors(tmp_path, content, match):
    p = tmp_path / "t.txt"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        text_file_corpus(p)


def test_text_file_missing(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        text_file_corpus(tmp_path / "none.txt")


# --- tokenizer ------------------------------------------------------------------------------------

TRAIN_TEXTS = [_paragraphs(40), "It is a truth universally acknowledged, that a single man in possession of a "
               "good fortune, must be in want of a wife.\n\n\"My dear Mr. Bennet,\" said his lady to him one day."]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TRAIN_TEXTS, vocab_size=300)


def test_tokenizer_is_deterministic(tmp_path, tok):
    tok.save_pretrained(tmp_path / "a")
    train_tokenizer(TRAIN_TEXTS, vocab_size=300).save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert len(tok) == 300 and tok.eos_token == EOS and tok.convert_tokens_to_ids(EOS) == 0


def test_tokenizer_saves_and_loads_like_a_model_tokenizer(tmp_path, tok):
    from adaptinf.hf import load_tokenizer

    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = "Mr. Bennet said, \"a single man\"  £5 naïve 🙂\n\n\tend"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert loaded.decode(loaded.encode(text)) == text and loaded.eos_token_id == tok.eos_token_id


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_tokenizer_round_trips_any_text(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_tokenizer_errors():
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 257"):
        train_tokenizer(TRAIN_TEXTS, vocab_size=100)
    with pytest.raises(ValueError, match="wrap it in a list"):
        train_tokenizer("a single string")
    with pytest.raises(ValueError, match="non-empty list"):
        train_tokenizer(["", "  "])


# --- token streams --------------------------------------------------------------------------------


def test_streams_put_eos_around_every_document(tok):
    ids = encode_documents(tok, ["first doc", "second"])
    assert ids.dtype == torch.int32 and ids[0] == ids[-1] == 0 and int((ids == 0).sum()) == 3
    inner = ids.tolist()[1:-1]
    cut = inner.index(0)
    assert tok.decode(inner[:cut]) == "first doc" and tok.decode(inner[cut + 1 :]) == "second"


def test_lm_data_from_a_corpus(tok):
    docs = lambda *ts: tuple(Document(f"d{i}", t) for i, t in enumerate(ts))  # noqa: E731
    c = LMCorpus("tiny", docs(TRAIN_TEXTS[0], TRAIN_TEXTS[1]), docs("The validation text."), docs("And the test."))
    data = LMData.from_corpus(c, tok)
    counts = data.token_counts()
    assert counts["train"] > counts["validation"] > 2 and data.vocab_size == 300 and data.eos_id == 0
    assert data.split("test").tolist() == encode_documents(tok, ["And the test."]).tolist()
    assert "tiny (vocab 300): train" in data.summary()
    with pytest.raises(ValueError, match="outside"):
        LMData("x", data.train, data.validation, torch.tensor([0, 300], dtype=torch.int32), 0, 300)
    with pytest.raises(ValueError, match="at least 2"):
        LMData("x", data.train, data.validation, torch.tensor([0], dtype=torch.int32), 0, 300)
    with pytest.raises(ValueError, match="LMCorpus.test"):
        LMCorpus("x", c.train, c.validation, ())


# --- batches --------------------------------------------------------------------------------------

STREAM = torch.arange(103, dtype=torch.int32)  # token value = its position


def _starts(batches) -> list[int]:
    return [int(s) for b in batches for s in b.inputs[:, 0]]


def test_training_batches_are_shifted_windows():
    batches = list(lm_batches(STREAM, batch_size=4, seq_len=10, seed=0, epoch=0))
    assert len(batches) == lm_steps_per_epoch(103, 4, 10) == 3  # 9 windows: 4 + 4 + 1
    assert [tuple(b.inputs.shape) for b in batches] == [(4, 10), (4, 10), (1, 10)]
    for b in batches:
        assert b.inputs.dtype == b.targets.dtype == torch.int64
        torch.testing.assert_close(b.targets, b.inputs + 1)  # next token, contiguous
    starts = _starts(batches)
    offset = min(starts)
    assert 0 <= offset < 10 and sorted(starts) == [offset + 10 * k for k in range(9)]  # each window once


def test_training_batches_follow_seed_and_epoch():
    run = lambda seed, epoch, **kw: _starts(lm_batches(STREAM, 4, 10, seed, epoch, **kw))  # noqa: E731
    assert run(0, 0) == run(0, 0)
    assert len({tuple(run(0, e)) for e in range(5)}) > 1 and run(1, 0) != run(0, 0)
    assert len({min(run(0, e)) for e in range(8)}) > 1  # window boundaries move between epochs
    assert run(0, 3, start_step=1) == run(0, 3)[4:]  # resuming
    assert len(run(0, 0, drop_last=True)) == 8
    assert all(len(run(0, e)) == 9 for e in range(5))  # the same count every epoch


def test_training_batches_on_a_short_stream():
    one = list(lm_batches(torch.arange(11), 2, 10, 0, 0))  # exactly one window
    assert len(one) == 1 and one[0].inputs.tolist() == [list(range(10))]
    with pytest.raises(ValueError, match="too short for seq_len=10"):
        next(lm_batches(torch.arange(10), 2, 10, 0, 0))
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        next(lm_batches(STREAM, 2, 0, 0, 0))


@pytest.mark.parametrize("n", [101, 103, 2, 11])
def test_eval_batches_predict_every_token_once(n):
    stream = torch.arange(n, dtype=torch.int32)
    batches = list(lm_eval_batches(stream, batch_size=4, seq_len=10))
    targets = torch.cat([b.targets.flatten() for b in batches])
    inputs = torch.cat([b.inputs.flatten() for b in batches])
    assert targets.tolist() == list(range(1, n)) and inputs.tolist() == list(range(n - 1))
    assert targets.numel() == eval_token_count(stream)
    assert all(b.inputs.shape == b.targets.shape and b.inputs.shape[1] <= 10 for b in batches)


def test_perplexity_of_uniform_predictions_is_the_vocabulary_size():
    vocab, stream = 50, torch.randint(0, 50, (77,), generator=torch.Generator().manual_seed(0))
    nll = 0.0
    for b in lm_eval_batches(stream, 3, 8):
        logits = torch.zeros(*b.inputs.shape, vocab)
        nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), reduction="sum"))
    assert perplexity_from(nll, eval_token_count(stream)) == pytest.approx(vocab)
    assert perplexity_from(torch.tensor(0.0), 5) == 1.0
    for bad in ((1.0, 0), (float("nan"), 3), (-1.0, 3)):
        with pytest.raises(ValueError):
            perplexity_from(*bad)
    assert math.isclose(perplexity_from(10 * math.log(7), 10), 7)
