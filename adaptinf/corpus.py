"""The language-modelling corpus, its tokenizer, and the token streams and batches an LM trains on.

Corpora (`LMCorpus`: the documents of each split):
- `austen_corpus()`: Jane Austen's six novels from the Debian package `r-cran-janeaustenr`
  (`make setup` fetches it; no R needed: `read_lazyload_db` reads R's lazy-load database). A fixed
  split, no seed: validation = *Persuasion*, test = *Northanger Abbey*, training = the other four
  (*Sense & Sensibility*, *Pride & Prejudice*, *Mansfield Park*, *Emma*). The two held out are the
  shortest novels, which leaves the most text to train on, and are the pair published together
  (posthumously) in 1817. Each novel is its lines joined with newlines, as the package stores them.
- `text_file_corpus(path)`: a user's UTF-8 text file as one document cut into three contiguous
  parts by characters (80/10/10 by default: train, validation, test, in reading order, not
  shuffled), each cut moved to the nearest paragraph start (the line after a blank line), or to
  the nearest line start when the text has too few blank lines for three parts.

Tokenizer: `train_tokenizer` trains a byte-level BPE (`tokenizers`) on the training split only, with
one special token, `<|endoftext|>` (end of text, also bos/unk/pad as in GPT-2), and wraps it as a
`transformers.PreTrainedTokenizerFast`, so it saves and loads as `tokenizer.json` with a model.
Training it is deterministic: the same texts and settings give the same `tokenizer.json`.

Token streams (`LMData`): one int32 tensor per split, `EOS doc EOS doc ... EOS`: every document is
preceded and followed by the end-of-text token, so each of its tokens is predicted with EOS as the
first context, and generation from nothing starts at EOS.

Batches (`LMBatch`: inputs and next-token targets, int64 [b, s]):
- `lm_batches`: training; the stream cut into windows of seq_len + 1 tokens (stride seq_len, so a
  window's last target is the next window's first input) from a random offset, in a seeded
  shuffled order; offset and order come from (seed, epoch), and every epoch has the same number of
  windows (`lm_steps_per_epoch`).
- `lm_eval_batches`: evaluation; non-overlapping windows from the start, the last one shorter, so
  every token after the first is predicted exactly once (`eval_token_count`). The context restarts
  at each window (no sliding window). Perplexity = exp(mean NLL over the predicted tokens):
  `perplexity_from(nll_sum, n_tokens)`.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from adaptinf.settings import DEFAULT_FRACTIONS, check_fractions, find_asset_dir

EOS = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 4096
MIN_VOCAB_SIZE = 257  # the 256 byte symbols and EOS

# --- R's lazy-load database ---------------------------------------------------------------------------
# An R package's data/Rdata.rdx is a gzip'd serialisation of list(variables = list(name = c(offset,
# length)), references, compressed); each object is bytes [offset, offset + length) of Rdata.rdb: a
# 4-byte big-endian uncompressed length, then a zlib stream (compressed = TRUE; 2 and 3, bzip2 and
# xz, put a type byte before the stream; FALSE: neither header nor compression) of the object's
# serialisation (R's serialize.c, XDR format "X\n"). `rdata` (PyPI) parses .rda/.rds but not these
# databases, and importing it loads pandas and xarray (~100 MB) to read a list of strings; this
# reader covers the types data packages hold.

_NIL, _REF, _ALTREP = 254, 255, 238
_SINGLETONS = {242, 241, 253, 252, 251, 250}  # empty/base/global env, unbound value, missing arg, base namespace
_SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP, _EXPRSXP = 1, 2, 9, 10, 13, 14, 16, 19, 20
_ATTRLISTSXP = 239
_NA_INT = -(2**31)
_UTF8, _LATIN1, _BYTES, _ASCII = 1 << 3, 1 << 2, 1 << 1, 1 << 6


class RSymbol(str):
    """An R symbol (a pairlist tag), told apart from a string."""


@dataclass
class RValue:
    """A vector or pairlist with its attributes. `value`: list[str | None] (character), list[int]
    (integer, logical; NA is None), list[float] (double), list (list), or list[(tag, value)]
    (pairlist); `attributes`: {name: value}."""

    value: Any
    attributes: dict[str, Any]

    @property
    def names(self) -> list[str] | None:
        n = self.attributes.get("names")
        return n.value if isinstance(n, RValue) else None


class _XdrReader:
    """R's unserialize for the types of a data package (see serialize.c, ReadItem)."""

    def __init__(self, data: bytes, source: str):
        self.data, self.pos, self.source, self.refs = data, 0, source, []
        if data[:2] != b"X\n":
            raise ValueError(f"{source}: not an R XDR serialisation (starts {data[:2]!r}; ASCII and native "
                             "formats are not read)")
        self.pos = 2
        version = self.int()
        self.int(), self.int()  # the R versions that wrote it and that can read it
        if version not in (2, 3):
            raise ValueError(f"{source}: R serialisation version {version} (2 and 3 are read)")
        self.native = "utf-8"
        if version == 3:
            self.native = self.bytes(self.int()).decode("ascii").lower() or "utf-8"

    def bytes(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"{self.source}: truncated R serialisation at byte {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.bytes(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # a long vector: upper and lower 32 bits
            n = (self.int() << 32) + (self.int() & 0xFFFFFFFF)
        return n

    def charsxp(self, levels: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self.bytes(n)
        enc = "utf-8" if levels & (_UTF8 | _ASCII) else "latin-1" if levels & (_LATIN1 | _BYTES) else self.native
        return raw.decode(enc, errors="replace")

    def item(self) -> Any:
        flags = self.int()
        kind, levels = flags & 0xFF, flags >> 12
        has_attr = bool(flags & (1 << 9))
        if kind == _NIL or kind in _SINGLETONS:
            return None
        if kind == _REF:
            i = (flags >> 8) or self.int()
            return self.refs[i - 1]
        if kind == _SYMSXP:
            sym = RSymbol(self.item() or "")
            self.refs.append(sym)
            return sym
        if kind in (_LISTSXP, _ATTRLISTSXP):
            return self._pairlist(flags)
        if kind == _CHARSXP:
            value = self.charsxp(levels)
        elif kind in (_LGLSXP, _INTSXP):
            n = self.length()
            value = [None if v == _NA_INT else v for v in struct.unpack(f">{n}i", self.bytes(4 * n))]
        elif kind == _REALSXP:
            n = self.length()
            value = list(struct.unpack(f">{n}d", self.bytes(8 * n)))
        elif kind == _STRSXP:
            value = [self.charsxp(self.int() >> 12) for _ in range(self.length())]
        elif kind in (_VECSXP, _EXPRSXP):
            value = [self.item() for _ in range(self.length())]
        else:
            what = "an ALTREP object" if kind == _ALTREP else f"R type {kind}"
            raise ValueError(f"{self.source}: {what} at byte {self.pos - 4} is not read (character, integer, "
                             "logical, double vectors, lists and pairlists are)")
        attributes = self._attributes(self.item()) if has_attr else {}
        return value if kind == _CHARSXP else RValue(value, attributes)

    def _pairlist(self, flags: int) -> RValue:
        cells, attributes = [], {}
        while True:  # a pairlist is a chain of cells: [attributes] [tag] car cdr
            if flags & (1 << 9):
                attributes = self._attributes(self.item())
            tag = self.item() if flags & (1 << 10) else None
            cells.append((tag, self.item()))
            flags = self.int()
            if flags & 0xFF not in (_LISTSXP, _ATTRLISTSXP):
                self.pos -= 4
                if self.item() is not None:
                    raise ValueError(f"{self.source}: a pairlist ends in a value, not NULL")
                return RValue(cells, attributes)

    @staticmethod
    def _attributes(pairlist: Any) -> dict[str, Any]:
        if not isinstance(pairlist, RValue):
            return {}
        return {str(tag): v for tag, v in pairlist.value}


def unserialize(data: bytes, source: str = "R data") -> Any:
    """One R object from its XDR serialisation (`serialize(x, NULL)`, or a gzip'd .rds)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return _XdrReader(data, source).item()


def _decompress(blob: bytes, compressed: int, source: str) -> bytes:
    if compressed == 0:  # stored as it is, without a length header
        return blob
    if len(blob) < 5:
        raise ValueError(f"{source}: an object of {len(blob)} bytes is too short")
    size = struct.unpack(">I", blob[:4])[0]
    if compressed == 1:
        out = zlib.decompress(blob[4:])
    elif compressed in (2, 3):  # a type byte: '0' stored, 'Z' zlib, '2' bzip2, 'X' xz
        import bz2
        import lzma

        kind, body = blob[4:5], blob[5:]
        funcs = {b"0": bytes, b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress}
        if kind not in funcs:
            raise ValueError(f"{source}: unknown compression type {kind!r}")
        out = funcs[kind](body)
    else:
        raise ValueError(f"{source}: unknown compression {compressed} in the index (0 to 3 are read)")
    if len(out) != size:
        raise ValueError(f"{source}: object decompresses to {len(out)} bytes, its header says {size}")
    return out


def read_lazyload_db(rdb: str | os.PathLike, names: Sequence[str] | None = None) -> dict[str, Any]:
    """The objects of an R lazy-load database (`X.rdb` with its index `X.rdx` beside it), by name:
    all of them, or `names` (ValueError naming any missing). Values as `unserialize` returns them."""
    rdb = Path(rdb)
    rdx = rdb.with_suffix(".rdx")
    for p in (rdb, rdx):
        if not p.is_file():
            raise ValueError(f"{p} not found: an R lazy-load database is a .rdb file with its .rdx index beside it")
    try:
        index = unserialize(rdx.read_bytes(), str(rdx))
        variables = dict(zip(index.names, index.value))["variables"]
        where = dict(zip(variables.names, (v.value for v in variables.value)))
        flag = dict(zip(index.names, index.value)).get("compressed")
        compressed = int(flag.value[0]) if isinstance(flag, RValue) and flag.value else 1
    except (OSError, EOFError, zlib.error, AttributeError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{rdx} is not an R lazy-load index ({type(e).__name__}: {e})") from e
    wanted = list(where) if names is None else list(names)
    missing = [n for n in wanted if n not in where]
    if missing:
        raise ValueError(f"{rdb} holds no object {missing}; it holds {sorted(where)}")
    out = {}
    with open(rdb, "rb") as f:
        for name in wanted:
            offset, length = where[name]
            f.seek(offset)
            blob = f.read(length)
            source = f"{rdb} object {name!r}"
            try:
                out[name] = unserialize(_decompress(blob, compressed, source), source)
            except (zlib.error, OSError, EOFError, struct.error) as e:
                raise ValueError(f"{source} cannot be read ({e}); the file is corrupt") from e
    return out


# --- Jane Austen -------------------------------------------------------------------------------------

# the package's objects (its data/Rdata.rdx names them) and their titles (janeaustenr's
# austen_books()), in order of publication
AUSTEN_NOVELS = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
AUSTEN_VALIDATION = "Persuasion"
AUSTEN_TEST = "Northanger Abbey"
AUSTEN_ENV = "ADAPTINF_AUSTEN"
AUSTEN_FILES = ("Rdata.rdb", "Rdata.rdx")
# where `make setup` extracts the Debian package (dpkg -x into .venv/deb-root, as for Fashion-MNIST
# in adaptinf.images), and where apt installs it
_DEB_ROOT = "deb-root"
AUSTEN_DEB_DIR = Path("usr/lib/R/site-library/janeaustenr/data")


def austen_candidates() -> list[Path]:
    """Where the novels are looked for, in order: $ADAPTINF_AUSTEN, the package extracted by `make
    setup` under the environment (sys.prefix) or the repository's .venv, the system install."""
    out = [Path(os.environ[AUSTEN_ENV])] if os.environ.get(AUSTEN_ENV) else []
    repo = Path(__file__).resolve().parents[1]
    for root in (Path(sys.prefix) / _DEB_ROOT, repo / ".venv" / _DEB_ROOT, Path("/")):
        if root / AUSTEN_DEB_DIR not in out:
            out.append(root / AUSTEN_DEB_DIR)
    return out


def austen_dir() -> Path:
    """The first candidate folder holding Rdata.rdb and Rdata.rdx (ValueError saying how to get them)."""
    return find_asset_dir(AUSTEN_ENV, AUSTEN_FILES, austen_candidates(),
                          "the Austen corpus needs the Debian package r-cran-janeaustenr; `make setup` fetches it "
                          "(apt-get download r-cran-janeaustenr, then dpkg -x into .venv/deb-root; do not apt-get "
                          f"install it, that pulls all of R): its data folder is {AUSTEN_DEB_DIR} below where it is extracted")


def austen_novels(directory: str | os.PathLike | None = None) -> dict[str, str]:
    """The six novels, title -> text (the package's lines joined with newlines, blank lines at the
    ends dropped), in order of publication. `directory` (the package's data folder) defaults to
    `austen_dir()`."""
    d = Path(directory) if directory is not None else austen_dir()
    objects = read_lazyload_db(d / AUSTEN_FILES[0], list(AUSTEN_NOVELS))
    out = {}
    for name, title in AUSTEN_NOVELS.items():
        obj = objects[name]
        if not isinstance(obj, RValue) or not all(isinstance(s, str) or s is None for s in obj.value):
            raise ValueError(f"{d / AUSTEN_FILES[0]}: {name!r} is not a character vector")
        out[title] = "\n".join(s or "" for s in obj.value).strip("\n")
    return out


# --- corpora ----------------------------------------------------------------------------------------


class Document(NamedTuple):
    title: str
    text: str


@dataclass(frozen=True)
class LMCorpus:
    """The documents of the three splits: train (fits the model and the tokenizer), validation
    (model selection, thresholds), test (reporting only)."""

    name: str
    train: tuple[Document, ...]
    validation: tuple[Document, ...]
    test: tuple[Document, ...]

    def __post_init__(self) -> None:
        for split in ("train", "validation", "test"):
            docs = getattr(self, split)
            if not docs or not all(isinstance(d, Document) and d.text.strip() for d in docs):
                raise ValueError(f"LMCorpus.{split} must hold at least one Document with text")

    def split(self, name: str) -> tuple[Document, ...]:
        if name not in ("train", "validation", "test"):
            raise ValueError(f"unknown split {name!r}; use train, validation or test")
        return getattr(self, name)

    def texts(self, split: str) -> list[str]:
        return [d.text for d in self.split(split)]

    def summary(self) -> str:
        parts = [f"{s} {', '.join(d.title for d in self.split(s))} ({sum(len(d.text) for d in self.split(s)):,} chars)"
                 for s in ("train", "validation", "test")]
        return f"{self.name}: " + "; ".join(parts)


def austen_corpus(directory: str | os.PathLike | None = None) -> LMCorpus:
    """The six novels split by the fixed convention of this module's docstring (no seed)."""
    novels = austen_novels(directory)
    held_out = (AUSTEN_VALIDATION, AUSTEN_TEST)
    train = tuple(Document(t, x) for t, x in novels.items() if t not in held_out)
    return LMCorpus("austen", train, *((Document(t, novels[t]),) for t in held_out))


def _nearest(targets: Sequence[float], starts: Sequence[int]) -> list[int]:
    return [min(starts, key=lambda s: (abs(s - t), s)) for t in targets]


def split_text(text: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> tuple[str, str, str]:
    """`text` cut in three contiguous parts of about `fractions` of its characters, each cut at the
    nearest paragraph start (a line after a blank line), else at the nearest line start.
    ValueError when the text has fewer than three non-blank lines to share out."""
    check_fractions(fractions)
    targets = (fractions[0] * len(text), (fractions[0] + fractions[1]) * len(text))
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    line_starts = offsets[1:-1]
    para_starts = [offsets[i] for i in range(1, len(lines)) if not lines[i - 1].strip() and lines[i].strip()]
    for starts in (para_starts, line_starts):
        if len(starts) < 2:
            continue
        a, b = _nearest(targets, starts)
        parts = (text[:a], text[a:b], text[b:])
        if all(p.strip() for p in parts):
            return parts
    raise ValueError(f"a text of {len(text)} characters and {len(lines)} lines is too short to split into train, "
                     "validation and test: give at least three non-blank lines (a real corpus: thousands)")


def text_file_corpus(path: str | os.PathLike, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> LMCorpus:
    """A user's UTF-8 text file, cut by `split_text` (ValueError for a missing, empty, non-UTF-8 or
    too short file)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"text file {p} does not exist" if not p.exists() else f"{p} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p} is not UTF-8 text ({e}); convert it, e.g. `iconv -t utf-8`") from e
    if not text.strip():
        raise ValueError(f"{p} is empty" + (" (only whitespace)" if text else ""))
    try:
        parts = split_text(text, fractions)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
    names = ("train", "validation", "test")
    return LMCorpus(p.stem, *((Document(f"{p.name} ({n} part)", x),) for n, x in zip(names, parts)))


def lm_corpus(data: str) -> LMCorpus:
    """`austen` (the built-in corpus) or the path of a text file."""
    return austen_corpus() if data == "austen" else text_file_corpus(data)


# --- tokenizer --------------------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2):
    """A byte-level BPE tokenizer trained on `texts` (the training split), as a
    `transformers.PreTrainedTokenizerFast` whose `<|endoftext|>` is its eos, bos, unk and pad token.
    Any text encodes (every byte is in the vocabulary) and decodes back to itself. The vocabulary
    holds at most `vocab_size` tokens (fewer when the texts have fewer pairs seen `min_frequency`
    times: size a model by `len(tokenizer)`). Deterministic: the same texts and settings give the
    same tokenizer.json."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} (256 bytes and {EOS}), got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be a positive integer, got {min_frequency!r}")
    if isinstance(texts, str) or not texts or not any(t.strip() for t in texts):
        raise ValueError("train_tokenizer needs a non-empty list of texts (a single string: wrap it in a list)")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS,
                                   clean_up_tokenization_spaces=False)


def encode_documents(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """One int32 stream: EOS doc EOS doc ... EOS (no other special tokens)."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    if eos is None or eos == tokenizer.unk_token_id and tokenizer.unk_token != EOS:
        raise ValueError(f"the tokenizer has no {EOS} token; train one with adaptinf.corpus.train_tokenizer")
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets (tokenizers >= 0.21)
    encodings = encode(list(texts), add_special_tokens=False)
    ids = [eos]
    for e in encodings:
        ids += e.ids
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


# --- token streams and batches ----------------------------------------------------------------------

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class LMData:
    """One token stream per split (1-D int32, `EOS doc EOS ... EOS`), with the EOS id and the
    vocabulary size of the tokenizer that made them."""

    name: str
    train: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor
    eos_id: int
    vocab_size: int

    def __post_init__(self) -> None:
        for s in SPLITS:
            t = getattr(self, s)
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"LMData.{s} must be a 1-D int32/int64 tensor of token ids")
            if t.numel() < 2:
                raise ValueError(f"LMData.{s} has {t.numel()} tokens; a split needs at least 2 (one to predict)")
            if int(t.min()) < 0 or int(t.max()) >= self.vocab_size:
                raise ValueError(f"LMData.{s} holds ids outside [0, vocab_size={self.vocab_size})")
        if not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(f"LMData.eos_id must lie in [0, vocab_size={self.vocab_size}), got {self.eos_id}")

    @classmethod
    def from_corpus(cls, corpus: LMCorpus, tokenizer) -> LMData:
        streams = [encode_documents(tokenizer, corpus.texts(s)) for s in SPLITS]
        return cls(corpus.name, *streams, eos_id=tokenizer.convert_tokens_to_ids(EOS), vocab_size=len(tokenizer))

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; use train, validation or test")
        return getattr(self, name)

    def token_counts(self) -> dict[str, int]:
        """Tokens per split, EOS markers included."""
        return {s: self.split(s).numel() for s in SPLITS}

    def summary(self) -> str:
        counts = self.token_counts()
        return f"{self.name} (vocab {self.vocab_size}): " + ", ".join(f"{s} {n:,} tokens" for s, n in counts.items())


class LMBatch(NamedTuple):
    inputs: torch.Tensor  # [b, s] int64
    targets: torch.Tensor  # [b, s] int64: inputs shifted by one (targets[:, i] follows inputs[:, i])


def _check_batching(stream: torch.Tensor, batch_size: int, seq_len: int) -> None:
    if not isinstance(stream, torch.Tensor) or stream.dim() != 1:
        raise ValueError("the token stream must be a 1-D tensor of ids")
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _windows(n_tokens: int, seq_len: int) -> int:
    """Training windows per epoch: one seq_len of slack kept free for the random offset (none needed
    when the stream holds exactly one window)."""
    return max((n_tokens - seq_len) // seq_len, 1 if n_tokens > seq_len else 0)


def lm_steps_per_epoch(n_tokens: int, batch_size: int, seq_len: int, drop_last: bool = False) -> int:
    n = _windows(n_tokens, seq_len)
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def lm_batches(stream: torch.Tensor, batch_size: int, seq_len: int, seed: int, epoch: int, *,
               drop_last: bool = False, start_step: int = 0) -> Iterator[LMBatch]:
    """Training batches of one epoch: windows of seq_len + 1 tokens, stride seq_len, from an offset
    in [0, seq_len) drawn from (seed, epoch), in a shuffled order drawn from the same generator.
    The last batch is smaller unless `drop_last`. From `start_step` on (resuming)."""
    _check_batching(stream, batch_size, seq_len)
    n = _windows(stream.numel(), seq_len)
    if n == 0:
        raise ValueError(f"a stream of {stream.numel()} tokens is too short for seq_len={seq_len}: it needs at "
                         f"least {seq_len + 1}; lower seq_len")
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)  # adaptinf.data.epoch_order's convention
    slack = stream.numel() - 1 - n * seq_len
    offset = int(torch.randint(0, min(slack, seq_len - 1) + 1, (1,), generator=g))
    windows = stream[offset:].unfold(0, seq_len + 1, seq_len)  # [>= n, s + 1], a view
    order = torch.randperm(n, generator=g)
    for step in range(start_step, lm_steps_per_epoch(stream.numel(), batch_size, seq_len, drop_last)):
        chunk = windows[order[step * batch_size : (step + 1) * batch_size]].long()  # [b, s + 1]
        yield LMBatch(chunk[:, :-1], chunk[:, 1:])


def eval_token_count(stream: torch.Tensor) -> int:
    """Tokens `lm_eval_batches` predicts: all but the first."""
    return stream.numel() - 1


def lm_eval_batches(stream: torch.Tensor, batch_size: int, seq_len: int) -> Iterator[LMBatch]:
    """Evaluation batches covering the stream once: non-overlapping windows from the start (each
    window's context restarts), then the remainder as a last batch of one shorter row. Every token
    after the first is a target exactly once."""
    _check_batching(stream, batch_size, seq_len)
    if stream.numel() < 2:
        raise ValueError(f"a stream of {stream.numel()} tokens has nothing to predict")
    n_full = (stream.numel() - 1) // seq_len
    windows = stream[: n_full * seq_len + 1].unfold(0, seq_len + 1, seq_len) if n_full else None  # [n_full, s + 1]
    for start in range(0, n_full, batch_size):
        chunk = windows[start : start + batch_size].long()
        yield LMBatch(chunk[:, :-1], chunk[:, 1:])
    rest = stream[n_full * seq_len :].long()
    if rest.numel() > 1:
        yield LMBatch(rest[None, :-1], rest[None, 1:])


def perplexity_from(nll_sum: float | torch.Tensor, n_tokens: int) -> float:
    """exp(nll_sum / n_tokens): the perplexity of a summed negative log-likelihood (nats) over
    `n_tokens` predicted tokens (`eval_token_count`)."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    nll = float(nll_sum)
    if not math.isfinite(nll) or nll < 0:
        raise ValueError(f"nll_sum must be a finite, non-negative sum of NLLs in nats, got {nll}")
    return math.exp(nll / n_tokens)
