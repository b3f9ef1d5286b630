"""Predictions from a saved model: label, confidence and the compute each sample spent.

`predict_texts(model, texts)` (also `adaptinf.load(path).predict(texts)`) returns one `Prediction`
per text, in order. The compute a sample spent comes from the forward's per-sample extras (early
exit: `exit` position and `exit_layer`; SHARCS: `width_pct`; ACM: `executed_fraction` and
`mean_k`, the learners per token; any method: every per-sample tensor it returns) and its analytic
GFLOPs. A model saved by `adaptinf select` runs at its fixed knob.

`predict_file` streams a .txt (one text per line), .csv/.tsv or .jsonl file in chunks and writes one
JSON line per input row as it goes (flushed after every chunk), so an interruption keeps everything
written so far. Rows that cannot be predicted (empty text, bytes that are not UTF-8, bad JSON, a
missing field) get an error record instead of stopping the run; texts longer than the model's
max_length are truncated and flagged.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Iterator, Sequence
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


def predict_texts(model, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> list[Prediction]:
    """Predict every text (in order). Empty or non-string entries get a Prediction with `error` set."""
    from tqdm.auto import tqdm

    from adaptinf.data import Encoded, eval_batches

    if isinstance(texts, str):
        raise ValueError("predict takes a list of texts; wrap a single text in a list")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer attached (load it with adaptinf.load from a saved directory)")
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
                        results[todo[j]] = Prediction(
                            label=model.spec.labels[k], label_id=k, confidence=round(float(conf[r]), 6),
                            gflops=round(gflops[r], 6), compute={key: vals[r] for key, vals in comp.items()},
                            truncated=truncated[j])
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


def read_rows(path: str | Path, text_column: str = "text", id_column: str | None = None) -> Iterator[Row]:
    """The rows of an input file, one at a time; rows that cannot be read carry an error."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"input file {p} does not exist" if not p.exists() else f"{p} is not a file")
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


def _count_lines(p: Path) -> int:
    n = 0
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
    return n


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
) -> dict:
    """Predict every row of `input_path` into `output_path` (JSON lines, one per input row, in order),
    chunk by chunk, flushing after each chunk. Returns counts (written, predicted, errors, truncated)."""
    from tqdm.auto import tqdm

    inp, outp = Path(input_path), Path(output_path)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    if not inp.is_file():
        raise ValueError(f"input file {inp} does not exist" if not inp.exists() else f"{inp} is not a file")
    if outp.exists() and outp.resolve() == inp.resolve():
        raise ValueError("--output must not be the input file")
    if outp.exists() and not overwrite:
        raise ValueError(f"{outp} exists; pass --overwrite to replace it, or choose another --output")
    rows = read_rows(inp, text_column, id_column)
    first = next(rows, None)  # reads the header of a CSV: a missing column fails before any output
    outp.parent.mkdir(parents=True, exist_ok=True)
    counts = {"written": 0, "predicted": 0, "errors": 0, "truncated": 0}
    total = max(0, _count_lines(inp) - (1 if inp.suffix.lower() in (".csv", ".tsv") else 0))
    bar = tqdm(total=total, desc=f"predict {inp.name}", unit="row", disable=not progress)

    def chunks() -> Iterator[list[Row]]:
        buf = [first] if first is not None else []
        for r in rows:
            buf.append(r)
            if len(buf) >= chunk_size:
                yield buf
                buf = []
        if buf:
            yield buf

    with outp.open("w", encoding="utf-8") as f:
        try:
            for chunk in chunks():
                ok = [r for r in chunk if r.error is None]
                try:
                    preds = predict_texts(model, [r.text for r in ok], batch_size=batch_size) if ok else []
                except Exception as e:
                    raise ValueError(f"prediction failed on rows {chunk[0].line}-{chunk[-1].line} ({type(e).__name__}: {e}); "
                                     f"the {counts['written']} records before them are in {outp}") from e
                by_line = {id(r): p for r, p in zip(ok, preds)}
                for r in chunk:
                    p = by_line.get(id(r)) or Prediction(None, None, None, None, error=r.error)
                    if p.error and r.error is None:  # e.g. an empty text
                        p.error = f"line {r.line}: {p.error}"
                    rec = {"line": r.line, **({"id": r.id} if id_column else {}), **p.to_dict()}
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    counts["written"] += 1
                    counts["errors"] += p.error is not None
                    counts["predicted"] += p.error is None
                    counts["truncated"] += p.truncated
                f.flush()
                bar.update(len(chunk))
        finally:
            bar.close()
    if counts["truncated"]:
        warnings.warn(f"{counts['truncated']} texts were longer than the model's max_length "
                      f"({model.spec.max_length} tokens) and were truncated (\"truncated\": true in their records)")
    if counts["errors"]:
        warnings.warn(f"{counts['errors']} rows could not be predicted; their records carry an \"error\"")
    return {**counts, "output": str(outp)}
