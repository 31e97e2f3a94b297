"""MNIST from its four IDX files (gzip), checked against known SHA-256 sums.

torchvision is not needed: an IDX file is a big-endian header (magic, dims)
followed by uint8 data.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b"),
}
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "data" / "mnist"
MEAN, STD = 0.1307, 0.3081


class DataError(ValueError):
    """A data file is missing, corrupt or not what it claims to be."""


def _check_file(path: Path, sha256: str | None) -> bytes:
    if not path.is_file():
        raise DataError(f"missing MNIST file {path}; copy the four MNIST .gz files there or pass --data-dir")
    raw = path.read_bytes()
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise DataError(f"corrupt MNIST file {path}: SHA-256 mismatch; replace it with the original file")
    return raw


def data_root(data_dir: str | Path | None) -> Path:
    root = Path(data_dir) if data_dir is not None else DEFAULT_DIR
    if not root.is_dir():
        raise DataError(f"MNIST directory {root} does not exist; pass --data-dir with the four MNIST .gz files")
    return root


def verify_mnist(data_dir: str | Path | None = None) -> None:
    """Checks that the four files are present and match their SHA-256 (fast: no decoding)."""
    root = data_root(data_dir)
    for name, digest in FILES.values():
        _check_file(root / name, digest)


def read_idx(path: Path, sha256: str | None = None) -> np.ndarray:
    """Reads one gzip'd IDX file, verifying its SHA-256 first when given."""
    raw = _check_file(path, sha256)
    try:
        data = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise DataError(f"corrupt MNIST file {path}: not valid gzip ({e})") from None
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated (IDX header)")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, file holds {body.size} values")
    return body.reshape(dims)


def load_mnist(data_dir: str | Path | None = None, verify: bool = True,
               train_rows: Callable[[int], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The four arrays as tensors: images float32 (N, 1, 28, 28), normalised; labels int64.

    ``train_rows(n)`` (optional) picks the training examples to keep, before they are
    converted to float: a node of a many-node run then holds only its shard."""
    root = data_root(data_dir)
    out = {}
    rows = None
    for key, (name, digest) in FILES.items():
        arr = read_idx(root / name, digest if verify else None)
        if key.startswith("train") and train_rows is not None:
            rows = train_rows(len(arr)) if rows is None else rows
            arr = arr[rows.numpy()]
        if key.endswith("images"):
            t = torch.from_numpy(arr.astype(np.float32) / 255.0).sub_(MEAN).div_(STD).unsqueeze(1)
        else:
            t = torch.from_numpy(arr.astype(np.int64))
        out[key] = t
    if len(out["train_images"]) != len(out["train_labels"]) or len(out["test_images"]) != len(out["test_labels"]):
        raise DataError(f"MNIST files in {root} disagree on the number of examples")
    return out
