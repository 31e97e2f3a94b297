"""Data files: the shipped sets verify; other IDX sets load; bad files fail in one clear line."""

import gzip
import hashlib
import shutil

import numpy as np
import pytest

from pysim.datasets import (
    IDX_FILES,
    MNIST_DIR,
    DataError,
    check_image_set,
    load_image_set,
    load_shakespeare,
    read_idx,
)


def test_shipped_mnist_loads_and_verifies():
    train, test = load_image_set()
    assert train.images.shape == (60000, 1, 28, 28) and test.labels.shape == (10000,)
    assert test.labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    x, y = test.batch(np.arange(3))
    assert x.dtype.is_floating_point and x.shape == (3, 1, 28, 28) and abs(float(train.mean) - 0.1307) < 1e-3


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def make_set(root, h=20, w=24, classes=5, n_train=50, n_test=20, sums=True):
    rng = np.random.default_rng(0)
    arrays = {("train", "images"): rng.integers(0, 256, (n_train, h, w)),
              ("train", "labels"): rng.integers(0, classes, n_train),
              ("test", "images"): rng.integers(0, 256, (n_test, h, w)),
              ("test", "labels"): rng.integers(0, classes, n_test)}
    arrays[("train", "labels")][0] = classes - 1
    for key, arr in arrays.items():
        write_idx(root / IDX_FILES[key], arr)
    if sums:
        lines = [f"{hashlib.sha256((root / n).read_bytes()).hexdigest()}  {n}" for n in IDX_FILES.values()]
        (root / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return root


def test_other_image_sizes_and_class_counts_load(tmp_path):
    from pysim.workload import image_workload

    make_set(tmp_path)
    train, test = load_image_set(tmp_path)
    assert train.image_shape == (1, 20, 24) and len(test) == 20 and train.num_classes == 5
    model = image_workload(tmp_path).model()
    assert model(test.batch(np.arange(4))[0]).shape == (4, 5)


def test_wrong_sha256sums_entry_is_reported(tmp_path):
    make_set(tmp_path)
    lines = (tmp_path / "SHA256SUMS").read_text().splitlines()
    lines[0] = "0" * 64 + lines[0][64:]
    (tmp_path / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        check_image_set(tmp_path)


def test_non_idx_truncated_and_mismatched_files(tmp_path):
    make_set(tmp_path, sums=False)
    (tmp_path / IDX_FILES[("test", "labels")]).write_bytes(gzip.compress(b"\x01\x02\x03\x04 hello"))
    with pytest.raises(DataError, match="not an IDX"):
        load_image_set(tmp_path)
    make_set(tmp_path, sums=False)
    good = gzip.decompress((tmp_path / IDX_FILES[("train", "images")]).read_bytes())
    (tmp_path / IDX_FILES[("train", "images")]).write_bytes(gzip.compress(good[:-10]))
    with pytest.raises(DataError, match="truncated"):
        load_image_set(tmp_path)
    make_set(tmp_path, sums=False)
    write_idx(tmp_path / IDX_FILES[("test", "labels")], np.zeros(19))
    with pytest.raises(DataError, match="20 images but .* 19 labels"):
        load_image_set(tmp_path)
    (tmp_path / IDX_FILES[("test", "labels")]).write_bytes(b"definitely not gzip")
    with pytest.raises(DataError, match="not valid gzip"):
        read_idx(tmp_path / IDX_FILES[("test", "labels")])


def copy_mnist(root) -> None:
    """The shipped MNIST's four files and their SHA256SUMS, copied into ``root``."""
    for name in [*IDX_FILES.values(), "SHA256SUMS"]:
        shutil.copy(MNIST_DIR / name, root / name)


def flip_byte(path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_missing_and_corrupt_mnist(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_set(tmp_path / "nope")
    copy_mnist(tmp_path)
    (tmp_path / IDX_FILES[("test", "labels")]).unlink()
    with pytest.raises(DataError, match="missing data file .*t10k-labels"):
        check_image_set(tmp_path)
    shutil.copy(MNIST_DIR / IDX_FILES[("test", "labels")], tmp_path / IDX_FILES[("test", "labels")])
    flip_byte(tmp_path / IDX_FILES[("train", "labels")], 100)
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        check_image_set(tmp_path)


def test_shakespeare_split_and_checksum(tmp_path):
    train, val = load_shakespeare()
    assert len(train) + len(val) == 1115394 and len(val) == 1115394 - int(1115394 * 0.9)
    assert len(train.vocab) == 65 and int(train.ids.max()) < 65
    (tmp_path / "input.txt").write_text("not shakespeare")
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        load_shakespeare(tmp_path)


def test_a_decoded_set_is_reused_only_for_the_same_bytes(tmp_path):
    make_set(tmp_path, sums=False)
    a_train, a_test = load_image_set(tmp_path)
    b_train, b_test = load_image_set(tmp_path)
    assert b_train is not a_train and b_train.images.data_ptr() == a_train.images.data_ptr()   # not decoded again
    assert (b_train.mean, b_train.std) == (a_train.mean, a_train.std)
    make_set(tmp_path, h=21, sums=False)            # other bytes at the same paths: decoded afresh
    c_train, _ = load_image_set(tmp_path)
    assert c_train.image_shape == (1, 21, 24) and c_train.images.data_ptr() != a_train.images.data_ptr()
    # a file damaged after its set was decoded is still caught: every load checks the files
    copy_mnist(tmp_path)
    load_image_set(tmp_path)
    flip_byte(tmp_path / IDX_FILES[("test", "images")], 200)
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        load_image_set(tmp_path)


def test_mean_and_std_do_not_depend_on_the_thread_count(tmp_path):
    import torch

    from pysim import datasets

    make_set(tmp_path, n_train=3000, sums=False)
    threads = torch.get_num_threads()
    try:
        stats = []
        for n in (1, 2):
            datasets._DECODED.clear()
            torch.set_num_threads(n)
            train, _ = load_image_set(tmp_path)
            stats.append((train.mean, train.std))
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(threads)
    assert stats[0] == stats[1]


def test_the_fork_server_preload_decodes_the_shipped_mnist():
    import importlib

    from pysim import datasets, launch, shipped_data

    assert "pysim.shipped_data" in launch.NODE_PRELOAD
    datasets._DECODED.clear()
    importlib.reload(shipped_data)
    assert [root for root, _ in datasets._DECODED] == [str(MNIST_DIR.resolve())]
