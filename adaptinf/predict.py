"""Predictions from a saved model: label, confidence and the compute each sample spent.

`predict_texts(model, texts)` (also `adaptinf.load(path).predict(texts)`) returns one `Prediction`
per text, in order; `predict_images(model, paths)` the same for a vision model's image files (or
a uint8 image tensor [N, C, H, W]). The compute a sample spent comes from the forward's per-sample extras (early
exit: `exit` position and `exit_layer`; SHARCS: `width_pct`; ACM: `executed_fraction` and
`mean_k`, the learners per token; any method: every per-sample tensor it returns) and its analytic
GFLOPs. A model saved by `adaptinf select` runs at its fixed knob.

`predict_file` streams a .txt (one text per line), .csv/.tsv or .jsonl file in chunks (for a vision
model: an image file, a folder of images, or such a file listing image paths) and writes one
JSON line per input row as it goes (one write and flush per chunk), so an interruption keeps everything
written so far. Rows that cannot be predicted (empty text, bytes that are not UTF-8, bad JSON, a
missing field) get an error record instead of stopping the run; texts longer than the model's
max_length are truncated and flagged.

Safety: the output is never the input (a hard or symbolic link to it is refused), a compressed input
is refused, and an existing output is replaced only with `overwrite`. While the output is partial,
`<output>.partial.json` holds what identifies the job (the input's size and sha256, the model's
method, knob and weights digest, batch/chunk size, text and id column); it is removed when the job
completes. Rerunning the same job resumes: the output is cut after its last complete record (a line
cut by a kill is dropped), the rows already written are skipped and the rest appended, to exactly the
output of one uninterrupted run. Another job's partial output is replaced only with `overwrite`.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

CHARS_PER_TOKEN_CAP = 64  # texts are cut to max_length * this many characters before tokenising


@dataclass
class Prediction:
    """One text's prediction.

    label / label_id: the predicted class; confidence: its softmax probability.
    gflops: analytic GFLOPs this sample spent (adaptinf.flops convention).
    compute: the method's per-sample compute (e.g. exit_layer, width_pct, executed_fraction, mean_k).
    truncated: the text was longer than the model's max_length tokens and was cut.
    error: why no prediction was made (then label, confidence and gflops are None).
    """

    label: str | None
    label_id: int | None
    confidence: float | None
    gflops: float | None
    compute: dict[str, Any] = field(default_factory=dict)
    truncated: bool = False
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _per_sample_compute(model, extras: dict, b: int, mask: torch.Tensor) -> dict[str, list]:
    """Per-sample compute from a forward's extras: every [b] tensor as is, every integer per-token
    tensor [..., b, s] as its mean over the sample's real tokens (named mean_<key>)."""
    out: dict[str, list] = {}
    s = mask.shape[1]
    real = mask.to(torch.float64)  # [b, s]
    for key, v in extras.items():
        if not isinstance(v, torch.Tensor) or v.is_complex():
            continue
        v = v.detach().cpu()
        if tuple(v.shape) == (b,):
            out[key] = v.tolist() if not v.is_floating_point() else [round(float(x), 6) for x in v]
        elif v.dim() >= 2 and tuple(v.shape[-2:]) == (b, s) and not v.is_floating_point():
            per_token = v.to(torch.float64).reshape(-1, b, s).mean(dim=0)  # [b, s]
            mean = (per_token * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)
            out[f"mean_{key}"] = [round(float(x), 6) for x in mean]
    layers = getattr(model, "exit_layers", None)
    if "exit" in out and layers is not None:  # early exit: position in the exit list -> layer
        out["exit_layer"] = [int(layers[i]) for i in out["exit"]]
    return out


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def is_vision(model) -> bool:
    """Whether the model takes images (its tokenizer is an `adaptinf.images.ImageProcessor`)."""
    from adaptinf.images import ImageProcessor

    return isinstance(model.tokenizer, ImageProcessor)


def predict_texts(model, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> list[Prediction]:
    """Predict every text (in order). Empty or non-string entries get a Prediction with `error` set."""
    from adaptinf.data import Encoded

    if isinstance(texts, str):
        raise ValueError("predict takes a list of texts; wrap a single text in a list")
    _check_positive("batch_size", batch_size)
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer attached (load it with adaptinf.load from a saved directory)")
    if is_vision(model):
        raise ValueError("the model is a vision model: it predicts images, not texts (predict_images with image "
                         "files; `adaptinf predict MODEL --input IMAGE|FOLDER|LIST.txt`)")
    texts = list(texts)
    results: list[Prediction | None] = [None] * len(texts)
    todo, todo_texts, cut = [], [], []
    max_len = model.spec.max_length
    cap = max_len * CHARS_PER_TOKEN_CAP
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            results[i] = Prediction(None, None, None, None, error=f"not a text ({type(t).__name__})")
        elif not t.strip():
            results[i] = Prediction(None, None, None, None, error="empty text")
        else:
            todo.append(i)
            todo_texts.append(t[:cap])
            cut.append(len(t) > cap)
    if todo:
        full = model.tokenizer(todo_texts, add_special_tokens=True, truncation=False)["input_ids"]
        ids = [x if len(x) <= max_len else x[: max_len - 1] + [x[-1]] for x in full]  # keep [SEP]
        truncated = [c or len(x) > max_len for c, x in zip(cut, full)]
        enc = Encoded(ids, torch.full((len(ids),), -1, dtype=torch.int64))
        for j, p in enumerate(_predict_encoded(model, enc, batch_size, progress)):
            p.truncated = truncated[j]
            results[todo[j]] = p
    return results  # type: ignore[return-value]


def predict_images(model, images: Sequence[str | os.PathLike] | torch.Tensor, batch_size: int = 32,
                   progress: bool = False) -> list[Prediction]:
    """Predict every image (in order): image files (an unreadable one gets a Prediction with `error`
    set) or a uint8 tensor [N, C, H, W]; converted and resized to the model's images."""
    from adaptinf.data import Encoded

    if isinstance(images, (str, os.PathLike)):
        raise ValueError("predict_images takes a list of image paths; wrap a single path in a list")
    _check_positive("batch_size", batch_size)
    if not is_vision(model):
        raise ValueError("the model is a text model: it predicts texts, not images (fine-tune a vision model, e.g. "
                         "--model vit-tiny, on an image task)")
    processor = model.tokenizer
    if isinstance(images, torch.Tensor):
        pixels, results, todo = processor.conform(images), [None] * len(images), list(range(len(images)))
    else:
        results, todo, loaded = [None] * len(images), [], []
        for i, path in enumerate(images):
            try:
                if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
                    raise ValueError(f"not an image path ({path!r})")
                loaded.append(processor.load_image(path))
                todo.append(i)
            except ValueError as e:
                results[i] = Prediction(None, None, None, None, error=str(e))
        pixels = torch.stack(loaded) if loaded else None
    if todo:
        enc = Encoded(processor.encode(pixels), torch.full((len(todo),), -1, dtype=torch.int64))
        for j, p in enumerate(_predict_encoded(model, enc, batch_size, progress)):
            results[todo[j]] = p
    return results  # type: ignore[return-value]


def _predict_encoded(model, enc, batch_size: int, progress: bool) -> list[Prediction]:
    """One Prediction per sample of `enc`, in order (batched by length; the model in eval mode)."""
    from tqdm.auto import tqdm

    from adaptinf.data import eval_batches

    results: list[Prediction | None] = [None] * len(enc)
    pad_id = model.spec.encoder.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batches = eval_batches(enc, batch_size, pad_id=pad_id, sort_by_length=True)
            for batch in tqdm(batches, total=math.ceil(len(enc) / batch_size), desc="predict", disable=not progress,
                              leave=False):
                out = model(batch.input_ids.to(device), batch.attention_mask.to(device))
                probs = out.logits.float().softmax(dim=-1).cpu()  # [b, C]
                conf, pred = probs.max(dim=-1)
                b = batch.index.shape[0]
                comp = _per_sample_compute(model, out.extras, b, batch.attention_mask)
                gflops = (out.flops.detach().to(torch.float64).cpu() / 1e9).tolist()
                for r, j in enumerate(batch.index.tolist()):
                    k = int(pred[r])
                    results[j] = Prediction(
                        label=model.spec.labels[k], label_id=k, confidence=round(float(conf[r]), 6),
                        gflops=round(gflops[r], 6), compute={key: vals[r] for key, vals in comp.items()})
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


# --- files --------------------------------------------------------------------------------------------


@dataclass
class Row:
    line: int  # 1-based line (.txt/.jsonl) or data row after the header (.csv/.tsv)
    text: str | None
    id: Any = None
    error: str | None = None


def _decode(raw: bytes, n: int) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"line {n} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at position {e.start})"


def _strip_eol(raw: bytes) -> bytes:
    return raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw


_COMPRESSED_SUFFIXES = {".gz": "gzip", ".tgz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".lzma": "xz", ".zip": "zip",
                        ".zst": "zstd", ".7z": "7z"}
_COMPRESSED_MAGIC = re.compile(rb"(?P<gzip>\x1f\x8b)|(?P<xz>\xfd7zXZ\x00)|(?P<zip>PK\x03\x04|PK\x05\x06)"
                               rb"|(?P<zstd>\x28\xb5\x2f\xfd)|(?P<bzip2>BZh[1-9](?:1AY&SY|\x17rE8P\x90))")


def _refuse_compressed(p: Path) -> None:
    """A compressed file (by its name or its first bytes) would be read as text: refuse it."""
    kind = _COMPRESSED_SUFFIXES.get(p.suffix.lower())
    if kind is None:
        with p.open("rb") as f:
            m = _COMPRESSED_MAGIC.match(f.read(10))
        kind = m.lastgroup if m else None
    if kind is not None:
        raise ValueError(f"{p} is {kind}-compressed and would be read as text; decompress it first")


def read_rows(path: str | Path, text_column: str = "text", id_column: str | None = None) -> Iterator[Row]:
    """The rows of an input file, one at a time; rows that cannot be read carry an error."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"input file {p} does not exist" if not p.exists() else f"{p} is not a file")
    _refuse_compressed(p)
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        yield from _csv_rows(p, text_column, id_column, "\t" if suffix == ".tsv" else ",")
        return
    with p.open("rb") as f:
        for n, raw in enumerate(f, 1):
            line, err = _decode(_strip_eol(raw), n)
            if n == 1 and line is not None:
                line = line.lstrip("\ufeff")
            if err:
                yield Row(n, None, error=err)
            elif suffix in (".jsonl", ".ndjson", ".json"):
                if not line.strip():
                    continue
                yield _json_row(n, line, text_column, id_column)
            else:  # plain text: one text per line
                yield Row(n, line)


def _json_row(n: int, line: str, text_column: str, id_column: str | None) -> Row:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return Row(n, None, error=f"line {n} is not valid JSON ({e.msg})")
    if not isinstance(obj, dict):
        return Row(n, None, error=f"line {n} is not a JSON object")
    rid = obj.get(id_column) if id_column else None
    if text_column not in obj:
        return Row(n, None, rid, error=f"line {n} has no field {text_column!r}")
    if not isinstance(obj[text_column], str):
        return Row(n, None, rid, error=f"line {n}: field {text_column!r} is not a string")
    return Row(n, obj[text_column], rid)


def _csv_rows(p: Path, text_column: str, id_column: str | None, delimiter: str) -> Iterator[Row]:
    # surrogateescape keeps reading past bytes that are not UTF-8; such rows become error records
    with p.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{p} is empty (a CSV needs a header row)") from None
        if text_column not in header:
            raise ValueError(f"{p}: no column {text_column!r}; the file has columns {header} (pass --text-column)")
        if id_column is not None and id_column not in header:
            raise ValueError(f"{p}: no column {id_column!r}; the file has columns {header}")
        ti = header.index(text_column)
        ii = header.index(id_column) if id_column is not None else None
        n = 0
        while True:
            n += 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield Row(n, None, error=f"row {n} cannot be parsed ({e})")
                continue
            if not row:
                n -= 1
                continue
            if len(row) <= ti:
                yield Row(n, None, error=f"row {n} has {len(row)} fields, no {text_column!r}")
                continue
            text = row[ti]
            rid = row[ii] if ii is not None and ii < len(row) else None
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                yield Row(n, None, rid, error=f"row {n} is not valid UTF-8")
                continue
            yield Row(n, text, rid)


def _image_files(folder: Path) -> list[Path]:
    from adaptinf.settings import IMAGE_SUFFIXES

    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in f.relative_to(folder).parts))
    if not files:
        raise ValueError(f"{folder} holds no image files (.png, .jpg, .jpeg, .bmp, .gif, .webp)")
    return files


def read_image_rows(path: str | Path, image_column: str = "image", id_column: str | None = None) -> Iterator[Row]:
    """The images a vision model predicts, one Row per image (its path as `text`): an image file, every
    image under a folder (sorted by path), or a .txt (one path per line) / .csv / .tsv / .jsonl
    (`image_column`) file listing paths, relative paths taken from the list file's folder."""
    from adaptinf.settings import IMAGE_SUFFIXES

    p = Path(path)
    if not p.exists():
        raise ValueError(f"input {p} does not exist")
    if p.is_dir():
        yield from (Row(n, str(f)) for n, f in enumerate(_image_files(p), 1))
        return
    if p.suffix.lower() in IMAGE_SUFFIXES:
        yield Row(1, str(p))
        return
    for n, row in enumerate(read_rows(p, image_column, id_column)):
        if row.error is None and row.text.strip():
            raw = row.text.strip()
            row.text = str(p.parent / raw)  # an absolute path stays as it is
            if n == 0 and not Path(row.text).exists() and Path(raw).suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"the model is a vision model and {p} lists texts, not image paths (line {row.line}: "
                                 f"{raw[:40]!r}); give an image, a folder of images, or a file of image paths")
        yield row


def _scan_images(p: Path) -> tuple[int, dict]:
    """An image folder's or image file's count and what identifies its content (the relative paths,
    sizes and modification times of its images)."""
    files = _image_files(p) if p.is_dir() else [p]
    h, size = hashlib.sha256(), 0
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        size += st.st_size
    return len(files), {"path": str(p.resolve()), "size": size, "sha256": h.hexdigest()}


def _input_source(model, inp: Path, text_column: str, image_column: str, id_column: str | None):
    """(a function giving the input's rows, the resume settings particular to the model's kind)."""
    from adaptinf.settings import IMAGE_SUFFIXES

    if is_vision(model):
        return (lambda: read_image_rows(inp, image_column, id_column)), {"image_column": image_column}
    if inp.is_dir() or inp.suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(f"the model is a text model and --input {inp} is {'a folder' if inp.is_dir() else 'an image'}; "
                         "give a .txt, .csv, .tsv or .jsonl file of texts")
    return (lambda: read_rows(inp, text_column, id_column)), {}


# --- predict_file: safe output, resume ----------------------------------------------------------------

STATE_SUFFIX = ".partial.json"  # <output>.partial.json: the resume state, present while the output is partial
STATE_FORMAT = "adaptinf-predict-partial"
STATE_VERSION = 1
_ZERO_COUNTS = {"written": 0, "predicted": 0, "errors": 0, "truncated": 0}


def state_path(output_path: str | Path) -> Path:
    """The resume state kept next to a partial `adaptinf predict` output."""
    p = Path(output_path)
    return p.with_name(p.name + STATE_SUFFIX)


def _scan_input(p: Path) -> tuple[int, dict]:
    """The newlines in the file (the progress total) and what identifies its content (size, sha256)."""
    h, lines, size = hashlib.sha256(), 0, 0
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            lines += block.count(b"\n")
            size += len(block)
    return lines, {"path": str(p.resolve()), "size": size, "sha256": h.hexdigest()}


def model_fingerprint(model) -> str:
    """sha256 of what decides a model's predictions: method, config, spec, knob and every weight."""
    desc = {"method": model.method, "config": model.config.to_dict(), "spec": model.spec.to_dict(), "knob": model.knob}
    q = getattr(model, "quantization", None)  # an int8 / bf16 form predicts (slightly) differently
    if q is not None and q.mode != "none":
        desc["quantization"] = q.mode
    h = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{flat.dtype}:{tuple(t.shape)}".encode())
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def _job(model, model_dir, input_id: dict, settings: dict) -> dict:
    """The resume state's content: what identifies this job."""
    model_id = {"dir": str(Path(model_dir).resolve()) if model_dir is not None else None, "method": model.method,
                "knob": model.knob, "sha256": model_fingerprint(model)}
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "input": input_id, "model": model_id,
            "settings": settings}


def _mismatch(saved: dict, job: dict) -> str | None:
    """Why a saved resume state is not this job's (None when it is)."""
    try:
        if (saved["format"], saved["version"]) != (job["format"], job["version"]):
            return "its resume state has another format"
        old, new = saved["input"], job["input"]
        if (old["size"], old["sha256"]) != (new["size"], new["sha256"]):
            return (f"it was started on other input: {old['path']} of {old['size']} bytes, sha256 {old['sha256'][:12]}; "
                    f"now {new['path']} of {new['size']} bytes, sha256 {new['sha256'][:12]}")
        old, new = saved["model"], job["model"]
        if old["sha256"] != new["sha256"]:
            what = [f"{k} {old[k]!r} then, {new[k]!r} now" for k in ("method", "knob") if old[k] != new[k]]
            return f"it was started with another model ({'; '.join(what) or 'other weights or settings'})"
        for key, value in job["settings"].items():
            if saved["settings"][key] != value:
                return f"it was started with --{key.replace('_', '-')} {saved['settings'][key]!r}, now {value!r}"
    except (KeyError, TypeError, AttributeError):
        return "its resume state is unreadable"
    return None


def _read_state(p: Path) -> dict | None:
    """The saved resume state: None when there is none, {} when it cannot be read."""
    if not p.exists():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(p: Path, job: dict) -> None:
    tmp = p.with_name(p.name + ".tmp")
    try:
        tmp.write_text(json.dumps(job, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, p)  # atomic: a kill leaves the old state or the new one, never half of one
    except OSError as e:
        raise ValueError(f"cannot write {p}, the resume state of the output ({e.strerror or e})") from None


def _image_suffixes() -> tuple[str, ...]:
    from adaptinf.settings import IMAGE_SUFFIXES

    return IMAGE_SUFFIXES


def _check_paths(inp: Path, outp: Path) -> None:
    """The output (and its resume state) is not the input, not a folder, and its folder can be made."""
    for p in (outp, state_path(outp)):
        if p.exists() and os.path.samefile(p, inp):  # catches hard links and symbolic links too
            link = "" if str(p.resolve()) == str(inp.resolve()) else " (a link to it)"
            raise ValueError(f"--output {p} is the input file {inp}{link}; choose another --output")
    if outp.is_dir():
        raise ValueError(f"--output {outp} is a folder; give a file path")
    try:
        outp.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((a for a in (outp.parent, *outp.parent.parents) if a.exists() and not a.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker else e.strerror or str(e)
        raise ValueError(f"cannot create --output {outp}: {why}") from None


def _tally(counts: dict, error, truncated) -> None:
    counts["written"] += 1
    counts["errors"] += error is not None
    counts["predicted"] += error is None
    counts["truncated"] += bool(truncated)


def _kept_records(outp: Path, rows: Iterator[Row]) -> tuple[int, dict]:
    """The byte length and counts of the output's longest prefix of complete, valid records whose lines
    are the input's rows in order: what a resume keeps (a line cut by a kill is not complete)."""
    counts, offset = dict(_ZERO_COUNTS), 0
    with outp.open("rb") as f:
        for raw, row in zip(f, rows):
            try:
                rec = json.loads(raw) if raw.endswith(b"\n") else None
            except ValueError:
                rec = None
            if not isinstance(rec, dict) or rec.get("line") != row.line:
                break
            _tally(counts, rec.get("error"), rec.get("truncated"))
            offset += len(raw)
    return offset, counts


def _start_output(outp: Path, job: dict, overwrite: bool, reread: Callable[[], Iterator[Row]]) -> dict:
    """Resume a partial output of this same job (truncated to its last complete record), or start a new
    one; the counts of the records kept. A finished output, or another job's partial one, is replaced
    only with `overwrite`."""
    state = state_path(outp)
    saved = _read_state(state)
    if saved is not None and outp.exists():
        why = _mismatch(saved, job)
        if why is None:
            offset, counts = _kept_records(outp, reread())
            try:
                os.truncate(outp, offset)
            except OSError as e:
                raise ValueError(f"cannot resume {outp} ({e.strerror or e})") from None
            return counts
        if not overwrite:
            raise ValueError(f"{outp} is the partial output of another job: {why}; pass --overwrite to start over, "
                             f"or choose another --output")
    try:
        if outp.exists():  # emptied before the new state is written: a kill between leaves no stale records
            outp.open("wb").close()
        _write_state(state, job)
        outp.open("ab").close()
    except OSError as e:
        raise ValueError(f"cannot write --output {outp} ({e.strerror or e})") from None
    return dict(_ZERO_COUNTS)


def _chunks(rows: Iterator[Row], size: int, skip: int) -> Iterator[tuple[int, list[Row]]]:
    """(index of its first row, rows) for every chunk of `size` rows after the first `skip` rows."""
    rows = itertools.islice(rows, skip, None)
    start = skip
    while chunk := list(itertools.islice(rows, size)):
        yield start, chunk
        start += len(chunk)


def _chunk_records(model, chunk: list[Row], batch_size: int, id_column: str | None) -> list[dict]:
    """One output record per row of the chunk, in order (a vision model's records name their image)."""
    ok = [r for r in chunk if r.error is None]
    vision = is_vision(model)
    predict = predict_images if vision else predict_texts
    preds = iter(predict(model, [r.text for r in ok], batch_size=batch_size) if ok else [])
    records = []
    for r in chunk:
        p = next(preds) if r.error is None else Prediction(None, None, None, None, error=r.error)
        if p.error and r.error is None:  # e.g. an empty text
            p.error = f"line {r.line}: {p.error}"
        image = {"image": r.text} if vision else {}
        records.append({"line": r.line, **image, **({"id": r.id} if id_column else {}), **p.to_dict()})
    return records


def _write_records(model, f, chunks, done: int, counts: dict, settings: dict, outp: Path, bar) -> None:
    """Predict chunk by chunk and append the records from index `done` on, one write and flush per chunk."""
    for start, chunk in chunks:
        try:
            records = _chunk_records(model, chunk, settings["batch_size"], settings["id_column"])
        except Exception as e:
            raise ValueError(f"prediction failed on rows {chunk[0].line}-{chunk[-1].line} ({type(e).__name__}: {e}); "
                             f"the {counts['written']} records before them are in {outp}; "
                             f"rerun the same command to resume") from e
        new = records[max(0, done - start):]  # a resumed chunk is predicted whole: the same batches as one run
        text = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in new)
        try:
            f.write(text.encode("utf-8", "backslashreplace"))
            f.flush()
        except OSError as e:
            raise ValueError(f"writing {outp} failed ({e.strerror or e}) after {counts['written']} records; "
                             f"rerun the same command to resume") from None
        for rec in new:
            _tally(counts, rec["error"], rec["truncated"])
        bar.update(len(new))


def predict_file(
    model,
    input_path: str | Path,
    output_path: str | Path,
    batch_size: int = 32,
    chunk_size: int = 1024,
    text_column: str = "text",
    id_column: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    model_dir: str | Path | None = None,
    image_column: str = "image",
) -> dict:
    """Predict every row of `input_path` into `output_path` (JSON lines, one per input row, in order),
    chunk by chunk, flushing after each chunk. For a vision model the input is an image file, a folder
    of images or a file listing image paths (`read_image_rows`; `image_column` in a .csv/.jsonl). While the output is partial, `<output>.partial.json`
    says which job it belongs to; rerunning the same job resumes it, to the output one uninterrupted
    run writes. Returns counts (written, predicted, errors, truncated; resumed: records kept from before).
    `model_dir` is only recorded in the resume state (the model is identified by its weights)."""
    from tqdm.auto import tqdm

    inp, outp = Path(input_path), Path(output_path)
    _check_positive("batch_size", batch_size)
    _check_positive("chunk_size", chunk_size)
    reader, kind_settings = _input_source(model, inp, text_column, image_column, id_column)
    rows = reader()
    first = next(rows, None)  # a missing file, a compressed one or a CSV without the column fails before any output
    _check_paths(inp, outp)
    if outp.exists() and not state_path(outp).exists() and not overwrite:
        raise ValueError(f"{outp} exists; pass --overwrite to replace it, or choose another --output")
    images = is_vision(model) and (inp.is_dir() or inp.suffix.lower() in _image_suffixes())
    lines, input_id = _scan_images(inp) if images else _scan_input(inp)
    settings = {"batch_size": batch_size, "chunk_size": chunk_size, "text_column": text_column, "id_column": id_column,
                **kind_settings}
    job = _job(model, model_dir, input_id, settings)
    counts = _start_output(outp, job, overwrite, reader)
    done = counts["written"]
    total = max(0, lines - (1 if inp.suffix.lower() in (".csv", ".tsv") else 0))
    bar = tqdm(total=total, initial=done, desc=f"predict {inp.name}", unit="row", disable=not progress)
    all_rows = itertools.chain([first] if first is not None else [], rows)
    try:
        with outp.open("ab") as f:
            _write_records(model, f, _chunks(all_rows, chunk_size, done - done % chunk_size), done, counts, settings,
                           outp, bar)
            os.fsync(f.fileno())
    except OSError as e:
        raise ValueError(f"cannot write --output {outp} ({e.strerror or e}); rerun the same command to resume") from None
    finally:
        bar.close()
    state_path(outp).unlink(missing_ok=True)  # complete: no longer partial
    if counts["truncated"]:
        warnings.warn(f"{counts['truncated']} texts were longer than the model's max_length "
                      f"({model.spec.max_length} tokens) and were truncated (\"truncated\": true in their records)")
    if counts["errors"]:
        warnings.warn(f"{counts['errors']} rows could not be predicted; their records carry an \"error\"")
    return {**counts, "resumed": done, "output": str(outp)}
