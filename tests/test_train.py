"""The application's models and data readers: shapes, parameter counts, on-disk formats."""

import gzip
import struct

import numpy as np
import pytest
import torch

from samopt.train.data import fashion_mnist, read_idx
from samopt.train.models import resnet18, resnet34, small_cnn


def write_idx(path, array: np.ndarray, code: int, compress: bool) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_reads_uint8_and_big_endian_int32(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    ints = np.array([1, -2, 70000], dtype=np.int32)
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"a{suffix}", images, 0x08, compress)
    write_idx(tmp_path / f"b{suffix}", ints, 0x0C, compress)
    a, b = read_idx(tmp_path / f"a{suffix}"), read_idx(tmp_path / f"b{suffix}")
    assert a.dtype == torch.uint8 and torch.equal(a, torch.from_numpy(images))
    assert b.dtype == torch.int32 and b.tolist() == [1, -2, 70000]


def test_read_idx_refuses_bad_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04\x05")
    with pytest.raises(ValueError, match="is not an IDX file"):
        read_idx(tmp_path / "junk")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match=r"header says shape \(10,\) but the file holds 3 values"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_reads_the_distribution_layout(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 3)):
        write_idx(
            tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), 8, True
        )
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8), 8, True)
    x, y = fashion_mnist("test", root=tmp_path)
    assert x.shape == (3, 28, 28) and x.dtype == torch.uint8 and y.shape == (3,) and y.dtype == torch.int64
    assert fashion_mnist("train", root=tmp_path)[0].shape == (5, 28, 28)
    with pytest.raises(ValueError, match="split must be one of 'train', 'test'; got 'val'"):
        fashion_mnist("val", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("train", root=tmp_path / "missing")


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_model_shapes_and_parameter_counts():
    assert count(resnet18()) == 11_173_962  # the CIFAR ResNet-18 of the Sparse SAM code
    assert count(resnet34()) == 21_282_122
    assert resnet18(num_classes=100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert resnet18(in_channels=1, width=8)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    cnn = small_cnn()
    assert cnn(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    assert count(cnn) == 32 * 9 + 2 * 32 + 64 * 32 * 9 + 2 * 64 + 64 * 7 * 7 * 10 + 10
