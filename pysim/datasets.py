"""Datasets the built-in workloads read: IDX image sets (MNIST and any set in its layout) and Tiny Shakespeare.

Nothing is downloaded. Files are checked before they are decoded:

- MNIST's four files always against their known SHA-256;
- any file named in a ``SHA256SUMS`` file beside it against that entry;
- an IDX file for its magic, its dimensions against its length, and the
  image and label files of a split against each other (same count).

Every problem is a :class:`DataError` (a ``ValueError``) whose one line says
which file and what to do. torchvision is not needed: an IDX file is a
big-endian header (magic, dims) followed by uint8 data.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATA_ROOT = Path(__file__).resolve().parent.parent / "data"
MNIST_DIR = DATA_ROOT / "mnist"
SHAKESPEARE_DIR = DATA_ROOT / "tinyshakespeare"

# The four IDX files of an image set, by split and kind. MNIST uses these names;
# other sets in the same layout (Fashion-MNIST, KMNIST, EMNIST letters) do too.
IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}
# MNIST's files are always verified against these, whatever SHA256SUMS says.
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    "train-labels-idx1-ubyte.gz": "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    "t10k-images-idx3-ubyte.gz": "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
    "t10k-labels-idx1-ubyte.gz": "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
}
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
_IDX_UBYTE = 0x08


class DataError(ValueError):
    """A data file is missing, corrupt or not what it claims to be."""


def data_dir(path: str | Path | None, default: Path, what: str) -> Path:
    """The folder to read: ``path`` or the shipped default; a clear error if it is not a folder."""
    root = Path(path) if path is not None else default
    if not root.is_dir():
        raise DataError(f"{what} directory {root} does not exist; pass --data-dir with the {what} files")
    return root


def read_sha256sums(root: Path) -> dict[str, str]:
    """``{file name: hex digest}`` from ``root/SHA256SUMS`` (``sha256sum`` format); empty if there is none."""
    path = root / "SHA256SUMS"
    if not path.is_file():
        return {}
    sums = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise DataError(f"{path}:{n} is not a sha256sum line ('<64 hex digits>  <file name>')")
        sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def read_checked(path: Path, sha256: str | None) -> bytes:
    """The bytes of ``path``, verified against ``sha256`` when one is given."""
    return _read_hashed(path, sha256)[0]


def _read_hashed(path: Path, sha256: str | None) -> tuple[bytes, str]:
    """The bytes of ``path`` and their SHA-256, verified against ``sha256`` when one is given."""
    if not path.is_file():
        raise DataError(f"missing data file {path}; copy it there or pass --data-dir")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if sha256 is not None and digest != sha256:
        raise DataError(f"corrupt data file {path}: SHA-256 mismatch; replace it with the original file")
    return raw, digest


def expected_sha256(root: Path, name: str) -> str | None:
    """The digest a file must have: MNIST's own in the shipped MNIST folder, else its entry in a
    ``SHA256SUMS`` beside it, else None (the file is then checked for structure only)."""
    if root.resolve() == MNIST_DIR.resolve():
        return MNIST_SHA256[name]
    return read_sha256sums(root).get(name)


def parse_idx(data: bytes, path: Path) -> np.ndarray:
    """An uncompressed IDX file of unsigned bytes as an array of its dimensions."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic)")
    ndim = data[3]
    if ndim < 1 or len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated (IDX header)")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims, dtype=np.int64)):
        raise DataError(f"{path} is truncated: header says {dims}, file holds {body.size} values")
    return body.reshape(dims)


def read_idx(path: Path, sha256: str | None = None) -> np.ndarray:
    """One IDX file, gzip'd (``.gz``) or not, verified against ``sha256`` first when given."""
    return decode_idx(read_checked(path, sha256), path)


def decode_idx(raw: bytes, path: Path) -> np.ndarray:
    """The array in the bytes ``raw`` of the IDX file ``path`` (gunzipped first if it is ``.gz``)."""
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"corrupt data file {path}: not valid gzip ({e})") from None
    return parse_idx(raw, path)


@dataclass
class ImageSet:
    """Images (uint8, N x C x H x W) and integer labels; normalised to float only per batch.

    Holding uint8 keeps a node's copy of the training set small (47 MB for
    MNIST); ``batch`` converts just the rows a step uses.
    """

    images: torch.Tensor   # uint8 (N, C, H, W)
    labels: torch.Tensor   # int64 (N,)
    mean: float
    std: float

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised float32 images, labels) of the given rows (row numbers: a tensor, array or list)."""
        rows = torch.as_tensor(idx)
        if rows.dim() != 1 or rows.dtype not in (torch.int64, torch.int32):   # index_select: faster, integers only
            return self._normalised(self.images[idx]), self.labels[idx]
        return self._normalised(self.images.index_select(0, rows)), self.labels.index_select(0, rows)

    def _normalised(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().div_(255.0).sub_(self.mean).div_(self.std)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


def load_idx_split(root: Path, split: str) -> ImageSet:
    """The images and labels of one split (``train`` or ``test``) of an IDX image set in ``root``."""
    names = IDX_FILES[(split, "images")], IDX_FILES[(split, "labels")]
    return _decode_split(root, split, {n: read_checked(root / n, expected_sha256(root, n)) for n in names})


def _decode_split(root: Path, split: str, raw: dict[str, bytes]) -> ImageSet:
    """One split from the (checked) bytes of its two files, by file name."""
    names = IDX_FILES[(split, "images")], IDX_FILES[(split, "labels")]
    images, labels = (decode_idx(raw[n], root / n) for n in names)
    if images.ndim not in (3, 4):
        raise DataError(f"{root / names[0]} holds {images.ndim}-D data; an image file is N x H x W (or N x C x H x W)")
    if labels.ndim != 1:
        raise DataError(f"{root / names[1]} holds {labels.ndim}-D data; a label file is 1-D")
    if len(images) != len(labels):
        raise DataError(f"{root} is inconsistent: {names[0]} has {len(images)} images but {names[1]} "
                        f"has {len(labels)} labels")
    if len(images) == 0:
        raise DataError(f"{root / names[0]} holds no images")
    img = torch.from_numpy(images.copy())
    if img.dim() == 3:
        img = img.unsqueeze(1)
    lab = torch.from_numpy(labels.astype(np.int64))
    return ImageSet(img, lab, 0.0, 1.0)


# Image sets decoded in this process, by folder and the SHA-256 of each of its four files (see load_image_set)
_DECODED: dict[tuple[str, tuple[str, ...]], tuple[ImageSet, ImageSet]] = {}
_DECODING = threading.Lock()   # one decode at a time: it sets torch's process-wide thread count


def load_image_set(path: str | Path | None = None) -> tuple[ImageSet, ImageSet]:
    """(train, test) of an IDX image set (default: the shipped MNIST), normalised with the training
    set's pixel mean and standard deviation. Number of classes and image size come from the files.

    The files are read and checked on every call; a set this process has already decoded from
    files with the same SHA-256 is not decoded again (0.3-0.5 s for MNIST): the sets returned share
    their tensors with it, so they must not be modified in place. Worker processes are forked from a
    server that has decoded the shipped MNIST (:mod:`pysim.shipped_data`), so its pages are shared by
    every worker of a run."""
    root = data_dir(path, MNIST_DIR, "IDX image set")
    read = _read_image_set(root)
    key = (str(root.resolve()), tuple(digest for _, digest in read.values()))
    with _DECODING:
        if key not in _DECODED:
            _DECODED[key] = _decode_image_set(root, {name: raw for name, (raw, _) in read.items()})
    return tuple(dataclasses.replace(s) for s in _DECODED[key])  # type: ignore[return-value]


def _decode_image_set(root: Path, raw: dict[str, bytes]) -> tuple[ImageSet, ImageSet]:
    train, test = (_decode_split(root, split, raw) for split in ("train", "test"))
    if train.image_shape != test.image_shape:
        raise DataError(f"{root}: training images are {train.image_shape} but test images are {test.image_shape}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the same sums (so the same mean and std, to the last bit) in every process
    try:
        pixels = train.images.float().div_(255.0)
        mean, std = float(pixels.mean()), float(pixels.std())
    finally:
        torch.set_num_threads(threads)
    del pixels
    for s in (train, test):
        s.mean, s.std = mean, std
    return train, test


def check_image_set(path: str | Path | None = None) -> None:
    """Fast check before any node starts: the four files are there and match their checksums."""
    _read_image_set(data_dir(path, MNIST_DIR, "IDX image set"))


def _read_image_set(root: Path) -> dict[str, tuple[bytes, str]]:
    """The four files of the image set in ``root``: their bytes and SHA-256, each checked."""
    return {name: _read_hashed(root / name, expected_sha256(root, name)) for name in IDX_FILES.values()}


@dataclass
class CharCorpus:
    """A text as character ids, with its vocabulary (sorted distinct characters)."""

    ids: torch.Tensor        # int64 (length,)
    vocab: str

    def __len__(self) -> int:
        return len(self.ids)


def load_shakespeare(path: str | Path | None = None, val_fraction: float = 0.1) -> tuple[CharCorpus, CharCorpus]:
    """Tiny Shakespeare as (train, validation) character ids: the first 90% and the last 10%."""
    root = data_dir(path, SHAKESPEARE_DIR, "Tiny Shakespeare")
    check_shakespeare(root)
    text = (root / "input.txt").read_bytes().decode("utf-8")
    vocab = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
    cut = int(len(ids) * (1 - val_fraction))
    return CharCorpus(ids[:cut], vocab), CharCorpus(ids[cut:], vocab)


def check_shakespeare(path: str | Path | None = None) -> None:
    """The corpus file is there and matches Tiny Shakespeare's SHA-256, or, in another folder with a
    ``SHA256SUMS`` beside it (another text in the same layout), that file's entry."""
    root = data_dir(path, SHAKESPEARE_DIR, "Tiny Shakespeare")
    listed = None if root.resolve() == SHAKESPEARE_DIR.resolve() else read_sha256sums(root).get("input.txt")
    raw = read_checked(root / "input.txt", listed or SHAKESPEARE_SHA256)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{root / 'input.txt'} is not UTF-8 text") from None
