"""The MNIST loader: shipped files verify; missing, corrupt and truncated files fail clearly."""

import gzip
import shutil

import pytest

from pysim.mnist import DEFAULT_DIR, FILES, DataError, load_mnist, read_idx


def test_shipped_files_load_and_verify():
    d = load_mnist()
    assert d["train_images"].shape == (60000, 1, 28, 28) and d["test_labels"].shape == (10000,)
    assert d["test_labels"].bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def copy_dir(tmp_path):
    for name, _ in FILES.values():
        shutil.copy(DEFAULT_DIR / name, tmp_path / name)
    return tmp_path


def test_missing_dir_and_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(tmp_path / "nope")
    d = copy_dir(tmp_path)
    (d / FILES["test_labels"][0]).unlink()
    with pytest.raises(DataError, match="missing MNIST file .*t10k-labels"):
        load_mnist(d)


def test_corrupt_file_fails_checksum(tmp_path):
    d = copy_dir(tmp_path)
    p = d / FILES["train_labels"][0]
    raw = bytearray(p.read_bytes())
    raw[100] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        load_mnist(d)


def test_truncated_and_wrong_files_without_checksum(tmp_path):
    good = gzip.decompress((DEFAULT_DIR / FILES["test_labels"][0]).read_bytes())
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(good[:-10]))
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)
    p.write_bytes(b"definitely not gzip")
    with pytest.raises(DataError, match="not valid gzip"):
        read_idx(p)
    p.write_bytes(gzip.compress(b"\x01\x02\x03\x04 hello"))
    with pytest.raises(DataError, match="not an IDX"):
        read_idx(p)
