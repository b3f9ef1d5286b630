"""Images on the data side: the image processor a vision model carries, and the image tasks.

`ImageProcessor` is a vision model's `.tokenizer`: it turns image files into uint8 pixel tensors
(`load_images`) and those into the model's "input_ids" (`encode`): patches of raw bytes, shape
[N, 1+P, C*p*p] (row 0 the CLS slot, zeros; see `adaptinf.backbone.patchify`). Normalisation by
the model's mean and std happens inside the model, so everything on the data side stays uint8.
It is saved as `preprocessor_config.json` (Hugging Face's file name and keys, with
"image_processor_type": "adaptinf").

Tasks:
- `fashion_mnist`: the built-in image task, read from the original IDX files of the Debian package
  `dataset-fashion-mnist` (`make setup` fetches it);
- `image_folder`: a user's folder with one sub-folder of images per class.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from adaptinf.settings import DEFAULT_FRACTIONS, check_fractions, find_asset_dir, image_folder_files

PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_TYPE = "adaptinf"
# PIL modes with one channel: a folder of such images is loaded as grayscale ("L")
_SINGLE_CHANNEL_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


@dataclass(frozen=True)
class ImageProcessor:
    """Square images of `image_size` pixels with `num_channels` channels (1: grayscale, 3: RGB), cut
    into `patch_size` x `patch_size` patches."""

    image_size: int
    patch_size: int
    num_channels: int = 1

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "num_channels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ImageProcessor.{name} must be a positive integer, got {v!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"ImageProcessor.image_size ({self.image_size}) must be a multiple of patch_size "
                             f"({self.patch_size})")
        if self.num_channels not in (1, 3):
            raise ValueError(f"ImageProcessor.num_channels must be 1 (grayscale) or 3 (RGB), got {self.num_channels}")

    @classmethod
    def for_encoder(cls, cfg) -> ImageProcessor:
        """The processor of a vision `EncoderConfig` (its image_size, patch_size, num_channels)."""
        return cls(cfg.image_size, cfg.patch_size, cfg.num_channels)

    def describe(self) -> str:
        return f"{self.image_size}x{self.image_size} {self.mode} images, {self.patch_size}x{self.patch_size} patches"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        """Tokens per image: the CLS slot and the patches."""
        return 1 + self.num_patches

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size**2

    @property
    def mode(self) -> str:
        """The PIL mode images are converted to."""
        return "L" if self.num_channels == 1 else "RGB"

    # --- disk ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"image_processor_type": PROCESSOR_TYPE, "size": {"height": self.image_size, "width": self.image_size},
                "patch_size": self.patch_size, "num_channels": self.num_channels}

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `preprocessor_config.json` into `directory` (atomically); returns its path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / PROCESSOR_FILE
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, d: dict, source: str = "the image processor config") -> ImageProcessor:
        if not isinstance(d, dict):
            raise ValueError(f"{source} holds a JSON {type(d).__name__}, not an object")
        kind = d.get("image_processor_type")
        if kind != PROCESSOR_TYPE:
            raise ValueError(f"{source} is not an adaptinf image processor (image_processor_type {kind!r}, expected "
                             f"{PROCESSOR_TYPE!r}); load the checkpoint with `adaptinf finetune --model DIR` instead")
        size = d.get("size")
        if not isinstance(size, dict) or "height" not in size or "width" not in size:
            raise ValueError(f"{source}: 'size' must be an object with 'height' and 'width', got {size!r}")
        if size["height"] != size["width"]:
            raise ValueError(f"{source}: adaptinf handles square images; size is {size['height']}x{size['width']}")
        missing = [k for k in ("patch_size", "num_channels") if k not in d]
        if missing:
            raise ValueError(f"{source} is missing {missing}")
        try:
            return cls(size["height"], d["patch_size"], d["num_channels"])
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ImageProcessor:
        """The processor saved in `directory` (ValueError when its file is missing, corrupt or not ours)."""
        path = Path(directory) / PROCESSOR_FILE
        if not path.is_file():
            raise ValueError(f"{path} not found: {directory} holds no image processor (a vision model directory "
                             f"has {PROCESSOR_FILE})")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from e
        return cls.from_dict(d, str(path))

    # --- pixels -------------------------------------------------------------------------------------

    def load_image(self, path: str | os.PathLike) -> torch.Tensor:
        """One image file as uint8 [C, H, W] at this processor's size and channels."""
        return read_image(path, self.mode, (self.image_size, self.image_size))

    def load_images(self, paths: Sequence[str | os.PathLike]) -> torch.Tensor:
        """Image files as uint8 [N, C, H, W] (converted to grayscale or RGB, resized to image_size);
        ValueError naming the first file that cannot be read."""
        if isinstance(paths, (str, os.PathLike)):
            raise ValueError("load_images takes a list of paths; wrap a single path in a list")
        if not paths:
            raise ValueError("no image paths given")
        return torch.stack([self.load_image(p) for p in paths])

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, C, H, W] -> the model's input ids, uint8 [N, 1+P, C*p*p]. Images of another
        size are resized (bilinear, antialiased) and a channel count other than the model's is
        converted (grayscale repeated to RGB, RGB to luma as PIL's "L"), all in one batched op."""
        from adaptinf.backbone import patchify

        images = self.conform(images)
        return patchify(images, self.patch_size)

    def conform(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] at this processor's channels and size."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.dtype != torch.uint8:
            what = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) \
                else type(images).__name__
            raise ValueError(f"images must be a uint8 tensor [N, C, H, W], got a {what}")
        c = images.shape[1]
        if c not in (1, 3):
            raise ValueError(f"images have {c} channels; adaptinf reads grayscale (1) or RGB (3) images")
        if c != self.num_channels:
            images = images.expand(-1, 3, -1, -1) if c == 1 else _luma(images)
        if tuple(images.shape[2:]) != (self.image_size, self.image_size):
            x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)  # [N, C, S, S]
            images = x.round_().clamp_(0, 255).to(torch.uint8)
        return images.contiguous()


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    """RGB uint8 [N, 3, H, W] -> grayscale [N, 1, H, W] with PIL's "L" weights (ITU-R 601-2)."""
    w = torch.tensor([299, 587, 114], dtype=torch.int32).view(1, 3, 1, 1)
    return ((rgb.to(torch.int32) * w).sum(dim=1, keepdim=True) + 500).div(1000, rounding_mode="floor").to(torch.uint8)


def read_image(path: str | os.PathLike, mode: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file as uint8 [C, H, W] in PIL `mode` ("L" or "RGB"), resized (bilinear) to `size`
    (height, width) when given; ValueError naming the file when it cannot be read."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"image file {p} does not exist" if not p.exists() else f"{p} is not a file")
    try:
        with Image.open(p) as img:
            img = img.convert(mode)
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.array(img, dtype=np.uint8)  # a writable copy
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{p}: cannot read the image ({type(e).__name__}: {e})") from None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # [C, H, W]
    return torch.from_numpy(np.ascontiguousarray(arr))


def image_mode(path: str | os.PathLike) -> str:
    """"L" when the file's image has one channel, else "RGB" (ValueError naming an unreadable file)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return "L" if img.mode in _SINGLE_CHANNEL_MODES else "RGB"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None


def image_size_of(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file, read from its header."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None


class ImageTask(NamedTuple):
    """An image task's splits, each (uint8 images [N, C, H, W], label ids): `adaptinf.data.TaskData(*it)`."""

    name: str
    labels: tuple[str, ...]
    train: tuple[torch.Tensor, list[int]]
    validation: tuple[torch.Tensor, list[int]]
    test: tuple[torch.Tensor, list[int]]


# --- Fashion-MNIST --------------------------------------------------------------------------------------

FASHION_MNIST_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot")
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FASHION_MNIST_ENV = "ADAPTINF_FASHION_MNIST"
# where `make setup` extracts the Debian package (dpkg -x ... .venv/deb-root), and where apt installs it
DEB_ROOT = "deb-root"
DEB_DIR = Path("usr/share/datasets/fashion-mnist")


def fashion_mnist_candidates() -> list[Path]:
    """Where the Fashion-MNIST files are looked for, in order: $ADAPTINF_FASHION_MNIST, the package
    extracted by `make setup` under the environment (sys.prefix) or the repository's .venv, the
    system install of `dataset-fashion-mnist`."""
    out = []
    if os.environ.get(FASHION_MNIST_ENV):
        out.append(Path(os.environ[FASHION_MNIST_ENV]))
    repo = Path(__file__).resolve().parents[1]
    for root in (Path(sys.prefix) / DEB_ROOT, repo / ".venv" / DEB_ROOT, Path("/")):
        if (root / DEB_DIR) not in out:
            out.append(root / DEB_DIR)
    return out


def fashion_mnist_dir() -> Path:
    """The first candidate folder holding all four IDX files (ValueError saying how to get them)."""
    names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
    return find_asset_dir(FASHION_MNIST_ENV, names, fashion_mnist_candidates(),
                          "the built-in task fashion-mnist needs the Debian package dataset-fashion-mnist; `make setup` "
                          "fetches it (apt-get download dataset-fashion-mnist, then dpkg -x into .venv/deb-root; its "
                          "files are in usr/share/datasets/fashion-mnist), or `apt-get install dataset-fashion-mnist`")


_IDX_TYPES = {0x08: np.uint8}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzip-compressed or not) as a numpy array: magic 0 0 type ndim, then ndim
    big-endian uint32 sizes, then the data. Only unsigned bytes (type 0x08) are read."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{p} cannot be read ({e}); the file is corrupt, reinstall dataset-fashion-mnist") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{p} is not an IDX file of unsigned bytes (magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{p}: truncated IDX header")
    shape = tuple(int(x) for x in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    n = math.prod(shape)
    if len(raw) - header != n:
        raise ValueError(f"{p}: the IDX header says {shape} ({n} bytes of data), the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_fashion_mnist(directory: str | os.PathLike, part: str) -> tuple[torch.Tensor, list[int]]:
    """The official "train" (60,000) or "test" (10,000) images uint8 [N, 1, 28, 28] and labels."""
    images_file, labels_file = FASHION_MNIST_FILES[part]
    images = read_idx(Path(directory) / images_file)
    labels = read_idx(Path(directory) / labels_file)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{directory}: {images_file} {images.shape} and {labels_file} {labels.shape} do not pair up")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_LABELS):
        raise ValueError(f"{directory}/{labels_file}: label {int(labels.max())} outside 0-9")
    return torch.from_numpy(images.copy()).unsqueeze(1), labels.astype(np.int64).tolist()


def fashion_mnist(seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                  directory: str | os.PathLike | None = None) -> ImageTask:
    """Fashion-MNIST: 70,000 grayscale 28x28 images of 10 clothing classes.

    Test is the official 10,000 test images (always, whatever `fractions` say). Validation is a seeded
    random sample of the official 60,000 training images, of `fractions[1]` of all 70,000 images
    (7,000 with the default 80/10/10, as large a share as the text tasks' validation); train is the
    rest of the official training images (53,000). `directory` defaults to `fashion_mnist_dir()`.
    """
    check_fractions(fractions)
    d = Path(directory) if directory is not None else fashion_mnist_dir()
    train_x, train_y = read_fashion_mnist(d, "train")
    test_x, test_y = read_fashion_mnist(d, "test")
    n = train_x.shape[0]
    n_val = min(n - 1, max(1, round(fractions[1] * (n + test_x.shape[0]))))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    y = torch.tensor(train_y, dtype=torch.int64)
    return ImageTask("fashion-mnist", FASHION_MNIST_LABELS, (train_x[train_idx], y[train_idx].tolist()),
                    (train_x[val_idx], y[val_idx].tolist()), (test_x, test_y))


# --- a user's image folder ------------------------------------------------------------------------------


def folder_labels(path: str | os.PathLike) -> tuple[str, ...]:
    """The class names of an image folder (its sub-folders, sorted), checked as `image_folder` does."""
    return tuple(dict.fromkeys(c for c, _ in image_folder_files(path)))


def _common_size(files: list[Path], image_size: int | None) -> tuple[int, int]:
    if image_size is not None:
        return image_size, image_size
    sizes = {}
    for f in files:
        sizes.setdefault(image_size_of(f), f)
    if len(sizes) > 1:
        (s1, f1), (s2, f2) = list(sizes.items())[:2]
        raise ValueError(f"the images differ in size ({f1}: {s1[1]}x{s1[0]}, {f2}: {s2[1]}x{s2[0]}); resize them to one "
                         "size, or use them with a model whose image size they are resized to")
    return next(iter(sizes))


def image_folder(path: str | os.PathLike, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 image_size: int | None = None, labels: Sequence[str] | None = None) -> ImageTask:
    """A user's folder of images, `DIR/<class name>/*.png|jpg|jpeg|bmp|gif|webp`, as a task.

    Classes are the sub-folder names, sorted (or `labels`, which must be the same set). Images are
    resized to `image_size` when given (the model's), else they must all have one size; they are
    grayscale when every image has one channel, else RGB. The split is seeded, by `fractions`
    (stratified: each class is split alone, so every split holds every class's share).
    """
    check_fractions(fractions)
    files = image_folder_files(path)
    classes = tuple(dict.fromkeys(c for c, _ in files))
    if labels is not None:
        if sorted(labels) != sorted(classes):
            raise ValueError(f"the model's labels {list(labels)} differ from the class folders of {path}: {list(classes)}")
        classes = tuple(labels)
    paths = [f for _, f in files]
    mode = "L" if all(image_mode(f) == "L" for f in paths) else "RGB"
    size = _common_size(paths, image_size)
    images = torch.stack([read_image(f, mode, size) for f in paths])  # [N, C, H, W]
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[c] for c, _ in files], dtype=torch.int64)
    sides = _stratified_sides(y, seed, fractions)
    splits = [(images[sides == s], y[sides == s].tolist()) for s in range(3)]
    return ImageTask(Path(path).name, classes, *splits)


def _stratified_sides(y: torch.Tensor, seed: int, fractions: Sequence[float]) -> torch.Tensor:
    """0/1/2 (train/validation/test) per sample: each class's samples shuffled (seeded) and cut by
    `fractions`; with fewer than 3 images in a class the split is over all images instead."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.bincount(y)
    if len(y) < 3:
        raise ValueError(f"need at least 3 images to make train/validation/test splits, got {len(y)}")
    groups = [torch.nonzero(y == c).flatten() for c in range(len(counts))] if int(counts.min()) >= 3 \
        else [torch.arange(len(y))]
    sides = torch.zeros(len(y), dtype=torch.int64)
    for idx in groups:  # one shuffle per class
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = len(idx)
        n_train = min(max(1, round(fractions[0] * n)), n - 2)
        n_val = min(max(1, round(fractions[1] * n)), n - n_train - 1)
        sides[idx[n_train:n_train + n_val]] = 1
        sides[idx[n_train + n_val:]] = 2
    return sides
