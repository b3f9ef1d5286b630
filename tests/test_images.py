"""Images on the data side: the image processor (patches, disk round trip, errors), the IDX reader and
the Fashion-MNIST split, a user's image folder, image tensors through Encoded / collate, vision
checkpoints (processor saved and re-attached, never a stale one) and prediction from image files."""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaptinf import images as im
from adaptinf.data import BUILTIN_TASKS, Encoded, TaskData, collate, encode, eval_batches, load_task, subsample
from adaptinf.images import PROCESSOR_FILE, ImageProcessor
from adaptinf.settings import BUILTIN_TASK_NAMES, TaskSettings, default_model, is_image_data


def reference_patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """The contract, written as loops: row 0 zeros, then patches in raster order, each (c, row, col)."""
    n, c, h, w = images.shape
    rows = [torch.zeros(n, c * p * p, dtype=torch.uint8)]
    for gy in range(h // p):
        for gx in range(w // p):
            rows.append(images[:, :, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p].reshape(n, -1))
    return torch.stack(rows, dim=1)


def random_images(n: int, c: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, s, s), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


# --- the processor ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    (dict(image_size=0, patch_size=4), "image_size"), (dict(image_size=28, patch_size=5), "patch_size"),
    (dict(image_size=28, patch_size=4, num_channels=2), "num_channels"),
    (dict(image_size=28.0, patch_size=4), "image_size"), (dict(image_size=28, patch_size=True), "patch_size"),
])
def test_processor_fields_are_validated(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ImageProcessor(**kwargs)


def test_processor_encode_is_the_patch_contract():
    proc = ImageProcessor(8, 4, 3)
    x = random_images(5, 3, 8)
    ids = proc.encode(x)
    assert ids.dtype == torch.uint8 and ids.shape == (5, proc.seq_len, proc.patch_dim) == (5, 5, 48)
    assert torch.equal(ids, reference_patchify(x, 4))
    assert not ids[:, 0].any()


def test_processor_conforms_size_and_channels():
    rgb = random_images(3, 3, 8)
    gray = ImageProcessor(8, 4, 1).conform(rgb)
    pil = [np.asarray(Image.fromarray(a.permute(1, 2, 0).numpy()).convert("L")) for a in rgb]
    assert torch.equal(gray[:, 0], torch.from_numpy(np.stack(pil)))  # PIL's own luma
    g = random_images(2, 1, 8)
    assert torch.equal(ImageProcessor(8, 4, 3).conform(g), g.expand(-1, 3, -1, -1))
    const = torch.full((2, 1, 8, 8), 77, dtype=torch.uint8)
    big = ImageProcessor(16, 4, 1).conform(const)
    assert big.shape == (2, 1, 16, 16) and bool((big == 77).all())
    with pytest.raises(ValueError, match="uint8 tensor"):
        ImageProcessor(8, 4, 1).encode(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        ImageProcessor(8, 4, 1).encode(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))


def test_processor_round_trip_and_file(tmp_path):
    proc = ImageProcessor(32, 8, 3)
    path = proc.save_pretrained(tmp_path / "m")
    d = json.loads(path.read_text())
    assert path.name == PROCESSOR_FILE and d == {"image_processor_type": "adaptinf", "size": {"height": 32, "width": 32},
                                                 "patch_size": 8, "num_channels": 3}
    assert ImageProcessor.from_pretrained(tmp_path / "m") == proc
    assert not list((tmp_path / "m").glob("*.tmp"))


@pytest.mark.parametrize("content, match", [
    (None, "not found"), ("{not json", "not valid JSON"), ("[1, 2]", "not an object"),
    (json.dumps({"image_processor_type": "ViTImageProcessor", "size": {"height": 224, "width": 224}}), "not an adaptinf"),
    (json.dumps({"image_processor_type": "adaptinf", "size": {"height": 28, "width": 32}, "patch_size": 4,
                 "num_channels": 1}), "square"),
    (json.dumps({"image_processor_type": "adaptinf", "size": {"height": 28, "width": 28}}), "missing"),
    (json.dumps({"image_processor_type": "adaptinf", "size": 28, "patch_size": 4, "num_channels": 1}), "'size'"),
    (json.dumps({"image_processor_type": "adaptinf", "size": {"height": 28, "width": 28}, "patch_size": 5,
                 "num_channels": 1}), "multiple of patch_size"),
])
def test_processor_from_pretrained_errors(tmp_path, content, match):
    if content is not None:
        (tmp_path / PROCESSOR_FILE).write_text(content)
    with pytest.raises(ValueError, match=match):
        ImageProcessor.from_pretrained(tmp_path)


def test_load_images_converts_resizes_and_names_bad_files(tmp_path):
    gray = write_png(tmp_path / "g.png", np.arange(64, dtype=np.uint8).reshape(8, 8))
    rgb = write_png(tmp_path / "c.png", np.zeros((8, 8, 3), dtype=np.uint8) + np.array([255, 0, 0], dtype=np.uint8))
    x = ImageProcessor(8, 4, 1).load_images([gray, rgb])
    assert x.shape == (2, 1, 8, 8) and x.dtype == torch.uint8
    assert torch.equal(x[0, 0], torch.arange(64, dtype=torch.uint8).view(8, 8)) and int(x[1, 0, 0, 0]) == 76
    assert ImageProcessor(16, 4, 3).load_images([gray]).shape == (1, 3, 16, 16)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png: cannot read the image"):
        ImageProcessor(8, 4, 1).load_images([gray, bad])
    with pytest.raises(ValueError, match="missing.png does not exist"):
        ImageProcessor(8, 4, 1).load_images([tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="list of paths"):
        ImageProcessor(8, 4, 1).load_images(str(gray))


# --- IDX and Fashion-MNIST --------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
    return path


@pytest.fixture
def tiny_fmnist(tmp_path) -> Path:
    """Fashion-MNIST's four files with 50 training and 10 test images of 4x4 pixels."""
    rng = np.random.default_rng(0)
    d = tmp_path / "fm"
    d.mkdir()
    for part, n in (("train", 50), ("test", 10)):
        images, labels = im.FASHION_MNIST_FILES[part]
        write_idx(d / images, rng.integers(0, 256, (n, 4, 4)))
        write_idx(d / labels, np.arange(n) % 10)
    return d


def test_read_idx(tiny_fmnist, tmp_path):
    x = im.read_idx(tiny_fmnist / "train-images-idx3-ubyte.gz")
    assert x.shape == (50, 4, 4) and x.dtype == np.uint8
    raw = tmp_path / "raw-idx1"
    raw.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 3) + bytes([1, 2, 3]))
    assert im.read_idx(raw).tolist() == [1, 2, 3]  # uncompressed too
    raw.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 4) + bytes([1, 2, 3]))
    with pytest.raises(ValueError, match="header says"):
        im.read_idx(raw)
    raw.write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + bytes(4))
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        im.read_idx(raw)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + bytes(40))[:20])
    with pytest.raises(ValueError, match="cannot be read"):
        im.read_idx(cut)


def test_fashion_mnist_split(tiny_fmnist):
    task = im.fashion_mnist(seed=0, directory=tiny_fmnist)
    assert task.name == "fashion-mnist" and task.labels[0] == "T-shirt/top" and len(task.labels) == 10
    (tx, _), (vx, vy), (sx, sy) = task.train, task.validation, task.test
    assert len(vx) == round(0.1 * 60) == 6 and len(tx) == 44 and len(sx) == 10  # validation: 10% of all, from train
    assert tx.shape == (44, 1, 4, 4) and tx.dtype == torch.uint8 and sy == list(range(10))
    everything = im.read_fashion_mnist(tiny_fmnist, "train")[0]
    rows = {bytes(r.flatten().tolist()) for r in torch.cat([tx, vx])}
    assert rows == {bytes(r.flatten().tolist()) for r in everything}  # a partition of the official train set
    again = im.fashion_mnist(seed=0, directory=tiny_fmnist)
    assert torch.equal(again.validation[0], vx) and again.validation[1] == vy
    assert not torch.equal(im.fashion_mnist(seed=1, directory=tiny_fmnist).validation[0], vx)
    assert "(grayscale 4x4 images)" in TaskData(*task).summary()


def test_fashion_mnist_is_found_by_env_and_missing_says_how(tiny_fmnist, monkeypatch, tmp_path):
    monkeypatch.setenv(im.FASHION_MNIST_ENV, str(tiny_fmnist))
    assert im.fashion_mnist_dir() == tiny_fmnist
    monkeypatch.setenv(im.FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=f"{im.FASHION_MNIST_ENV}=.* lacks .*train-images"):
        im.fashion_mnist_dir()
    monkeypatch.delenv(im.FASHION_MNIST_ENV)
    monkeypatch.setattr(im, "fashion_mnist_candidates", lambda: [tmp_path / "nothing"])
    with pytest.raises(ValueError, match="make setup.*dataset-fashion-mnist"):
        im.fashion_mnist_dir()


def test_make_setup_extracts_where_adaptinf_looks():
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert f"DEB_ROOT := $(VENV)/{im.DEB_ROOT}" in makefile and f"FMNIST_DIR := $(DEB_ROOT)/{im.DEB_DIR}" in makefile
    assert "setup: $(STAMP) fashion-mnist" in makefile and "apt-get download" in makefile
    for names in im.FASHION_MNIST_FILES.values():
        assert all(n in makefile for n in names)


def _real_fashion_mnist() -> Path | None:
    try:
        return im.fashion_mnist_dir()
    except ValueError:
        return None


@pytest.mark.skipif(_real_fashion_mnist() is None, reason="dataset-fashion-mnist is not installed (make setup fetches it)")
def test_real_fashion_mnist():
    task = load_task("fashion-mnist", seed=0)
    assert [len(task.split(s)[0]) for s in ("train", "validation", "test")] == [53_000, 7_000, 10_000]
    assert task.train[0].shape[1:] == (1, 28, 28) and task.test[0].dtype == torch.uint8
    assert sorted(set(task.test[1])) == list(range(10)) and task.test[1].count(0) == 1000


# --- a user's image folder --------------------------------------------------------------------------


def make_folder(root: Path, classes=("cat", "ant", "bee"), n: int = 5, size: int = 8, rgb_one: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        for i in range(n):
            write_png(root / c / f"{i}.png", rng.integers(0, 256, (size, size), dtype=np.uint8))
    if rgb_one:
        write_png(root / classes[0] / "rgb.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return root


def test_image_folder_task(tmp_path):
    root = make_folder(tmp_path / "pics")
    (root / "notes.txt").write_text("ignored")
    task = load_task(str(root), seed=0)
    assert task.labels == ("ant", "bee", "cat") and task.name == "pics"
    sizes = [len(task.split(s)[1]) for s in ("train", "validation", "test")]
    assert sizes == [9, 3, 3]  # stratified: 3 / 1 / 1 of each class's 5
    assert all(sorted(task.split(s)[1]) == [0, 1, 2] for s in ("validation", "test"))
    assert task.train[0].shape == (9, 1, 8, 8)
    again = load_task(str(root), seed=0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip((task.train, task.test), (again.train, again.test)))
    assert load_task(str(root), image_size=16).train[0].shape == (9, 1, 16, 16)
    with pytest.raises(ValueError, match="labels"):
        load_task(str(root), labels=("ant", "bee"))


def test_image_folder_rgb_and_sizes(tmp_path):
    root = make_folder(tmp_path / "p", rgb_one=True)
    assert load_task(str(root)).train[0].shape[1] == 3  # one RGB image makes the task RGB
    write_png(root / "ant" / "big.png", np.zeros((12, 12), dtype=np.uint8))
    with pytest.raises(ValueError, match="differ in size"):
        load_task(str(root))
    assert load_task(str(root), image_size=8).train[0].shape[2:] == (8, 8)


@pytest.mark.parametrize("case, match", [
    ("empty", "no class sub-folders"), ("loose", "images lie at the top"), ("one", "one class sub-folder"),
    ("no-images", "has no images"), ("unreadable", "broken.png: cannot read the image"),
])
def test_image_folder_errors(tmp_path, case, match):
    root = tmp_path / "d"
    root.mkdir()
    if case == "loose":
        write_png(root / "x.png", np.zeros((4, 4), dtype=np.uint8))
    elif case == "one":
        make_folder(root, classes=("only",))
    elif case == "no-images":
        make_folder(root, classes=("a", "b"))
        (root / "c").mkdir()
        (root / "c" / "readme.txt").write_text("x")
    elif case == "unreadable":
        make_folder(root, classes=("a", "b"))
        (root / "b" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match=match):
        load_task(str(root))


def test_image_task_settings(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "p")
    assert tuple(BUILTIN_TASKS) == BUILTIN_TASK_NAMES
    assert is_image_data("fashion-mnist") and is_image_data(str(root)) and not is_image_data("rotten-tomatoes")
    assert default_model("fashion-mnist") == "vit-tiny" and default_model("rotten-tomatoes") == "minilm-l6"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fashion-mnist").mkdir()  # a folder named like a built-in task does not replace it
    assert TaskSettings(data="fashion-mnist").data == "fashion-mnist"
    s = TaskSettings(data="p")
    assert s.data == str(root.resolve())
    digest = s.data_digest()
    assert digest.startswith("sha256:") and digest == TaskSettings(data=str(root)).data_digest()
    os.utime(root / "ant" / "0.png", (1, 1))
    assert s.data_digest() == digest  # by content, not by time
    write_png(root / "ant" / "0.png", np.ones((8, 8), dtype=np.uint8))
    assert s.data_digest() != digest
    assert TaskSettings(data="fashion-mnist").data_digest() == "fashion-mnist"


# --- Encoded and batches ----------------------------------------------------------------------------


def test_encoded_images_collate_and_batches():
    proc = ImageProcessor(8, 4, 1)
    x = random_images(7, 1, 8)
    enc = encode(x, list(range(7)), proc, max_length=2)  # max_length does not apply to images
    assert len(enc) == 7 and enc.is_image and enc.ids.shape == (7, 5, 16) and enc.truncated == 0
    b = collate(enc, [4, 1])
    assert b.input_ids.dtype == torch.uint8 and torch.equal(b.input_ids, enc.ids[[4, 1]])
    assert b.attention_mask.dtype == torch.int64 and bool((b.attention_mask == 1).all()) and b.attention_mask.shape == (2, 5)
    assert b.labels.tolist() == [4, 1] and b.index.tolist() == [4, 1]
    assert [i for bt in eval_batches(enc, 3) for i in bt.index.tolist()] == list(range(7))
    sub = Encoded([enc.ids[i] for i in (2, 5)], enc.labels[[2, 5]])  # how the recipes take subsets
    assert torch.equal(sub.ids, enc.ids[[2, 5]]) and torch.equal(enc.subset([2, 5]).ids, sub.ids)
    other = encode(x.clone(), list(range(7)), proc, 64)
    assert other.digest() == enc.digest()
    x[3, 0, 0, 0] ^= 1
    assert encode(x, list(range(7)), proc, 64).digest() != enc.digest()
    sx, sy = subsample((x, list(range(7))), 3, seed=0)
    assert sx.shape == (3, 1, 8, 8) and len(sy) == 3 and all(torch.equal(sx[i], x[y]) for i, y in enumerate(sy))


def test_encode_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="vision model.*texts"):
        encode(["a text"], [0], ImageProcessor(8, 4, 1), 16)
    with pytest.raises(ValueError, match="images and the model is a text model"):
        encode(random_images(2, 1, 8), [0, 1], lambda *a, **k: None, 16)


# --- vision checkpoints and prediction --------------------------------------------------------------


@pytest.fixture
def vit(tmp_path):
    from adaptinf.steps import dense_from_pretrained

    model, _ = dense_from_pretrained("vit-tiny", ("ant", "bee", "cat"), 64, 0.0, 0)
    return model.eval()


def test_vit_tiny_model_has_processor(vit):
    assert vit.tokenizer == ImageProcessor(28, 4, 1) and vit.spec.max_length == 50  # 1 + 7*7 patches


def test_vision_checkpoint_round_trip_and_stale_files(vit, tmp_path, tiny_dense, minilm_tokenizer):
    from adaptinf.checkpoint import save_model
    from adaptinf.registry import load_model

    d = tmp_path / "m"
    tiny_dense.tokenizer = minilm_tokenizer
    save_model(tiny_dense, d)  # a text model first: its tokenizer files are in d
    assert (d / "tokenizer.json").is_file()
    save_model(vit, d)
    assert (d / PROCESSOR_FILE).is_file() and not (d / "tokenizer.json").exists()
    back = load_model(d)
    assert back.tokenizer == vit.tokenizer
    ids = vit.tokenizer.encode(random_images(3, 1, 28))
    mask = torch.ones(ids.shape[:2], dtype=torch.int64)
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask).logits, vit(ids, mask).logits, rtol=0, atol=0)
    (d / PROCESSOR_FILE).unlink()
    assert load_model(d).tokenizer == vit.tokenizer  # made from the model's config
    ImageProcessor(32, 4, 1).save_pretrained(d)
    with pytest.raises(ValueError, match="does not fit the model"):
        load_model(d)
    save_model(tiny_dense, d)  # back to the text model: no processor left behind
    assert not (d / PROCESSOR_FILE).exists() and load_model(d).tokenizer is not None
    tiny_dense.tokenizer = None
    save_model(tiny_dense, d)
    assert not (d / PROCESSOR_FILE).exists() and not (d / "tokenizer.json").exists()


def test_predict_images(vit, tmp_path, tiny_dense, minilm_tokenizer):
    from adaptinf.predict import predict_file, predict_images, predict_texts

    root = make_folder(tmp_path / "p", n=2, size=28)
    paths = sorted(root.rglob("*.png"))
    (root / "ant" / "bad.png").write_bytes(b"nope")
    preds = predict_images(vit, [*paths, root / "ant" / "bad.png"], batch_size=4)
    assert [p.error is None for p in preds] == [True] * len(paths) + [False] and "bad.png" in preds[-1].error
    assert preds[0].label in vit.spec.labels and preds[0].gflops > 0
    pixels = vit.tokenizer.load_images(paths)
    assert [p.label_id for p in predict_images(vit, pixels)] == [p.label_id for p in preds[:-1]]
    with pytest.raises(ValueError, match="vision model"):
        predict_texts(vit, ["a text"])
    tiny_dense.tokenizer = minilm_tokenizer
    with pytest.raises(ValueError, match="text model"):
        predict_images(tiny_dense, paths)
    counts = predict_file(vit, root, tmp_path / "out.jsonl", progress=False)
    recs = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert counts["written"] == 7 and counts["errors"] == 1 and recs[0]["image"] == str(paths[0])
    listing = tmp_path / "list.txt"
    listing.write_text("p/ant/0.png\np/bee/1.png\n")
    predict_file(vit, listing, tmp_path / "l.jsonl", progress=False)
    recs = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert [r["label_id"] for r in recs] == [preds[0].label_id, preds[3].label_id]
    listing.write_text("a gorgeous, moving film\n")
    with pytest.raises(ValueError, match="lists texts, not image paths"):
        predict_file(vit, listing, tmp_path / "t.jsonl", progress=False)
    with pytest.raises(ValueError, match="text model and --input"):
        predict_file(tiny_dense, root, tmp_path / "x.jsonl", progress=False)


def test_cli_task_alias_and_default_model():
    from adaptinf.cli import build_parser

    args = build_parser().parse_args(["finetune", "--task", "fashion-mnist", "--out", "x"])
    assert args.data == "fashion-mnist" and args.model is None
    args = build_parser().parse_args(["run", "--task", "fashion-mnist", "--out", "x"])
    assert args.data == "fashion-mnist"
