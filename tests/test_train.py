"""The application's models, data readers and loaders: shapes, parameter counts, on-disk formats, batches."""

import dataclasses
import gzip
import hashlib
import io
import pickle
import re
import struct
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import FileServer

from samopt.train import data as datasets
from samopt.train.data import cifar, download, fashion_mnist, image_folder, read_idx
from samopt.train.loader import FolderLoader, TensorLoader, batch_seed, fixed_subset
from samopt.train.models import (
    MODELS,
    build,
    resnet18,
    resnet34,
    resnet50,
    resnet_small,
    small_cnn,
    wrn16_4,
    wrn16_8,
    wrn28_10,
)


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


def test_wide_resnets_resnet50_and_the_small_resnet():
    # Published counts: WRN-28-10 36.5M and WRN-16-8 11.0M (Zagoruyko & Komodakis), torchvision's resnet50 25,557,032.
    assert count(wrn28_10()) == 36_479_194
    assert count(wrn16_4()) == 2_748_890
    assert count(wrn16_8()) == 10_961_370  # 11.0M published
    assert count(resnet50()) == 25_557_032
    assert count(resnet_small()) == 308_826
    assert wrn16_4(num_classes=100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert resnet_small(in_channels=1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert resnet50(num_classes=7)(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(ValueError, match="depth must be 6n \\+ 4"):
        build("wrn28-10", 10).__class__(27, 10)


def test_build_by_name_and_unknown_names():
    for name in MODELS:
        channels, side = (1, 28) if name == "small-cnn" else (3, 64 if name == "resnet50" else 32)
        model = build(name, 7, channels).eval()
        assert type(model) is type(MODELS[name](7, channels))
        assert model(torch.zeros(2, channels, side, side)).shape == (2, 7)
    with pytest.raises(ValueError, match="unknown model 'vgg'; choose one of: resnet18, resnet34, resnet50"):
        build("vgg", 10)


# ------------------------------------------------------------------ on-disk formats


def write_cifar(root, name: str, n_per_file: int = 4, seed: int = 0) -> dict:
    """The python-version pickle batches of CIFAR-10 or -100 as the distribution lays them out."""
    rng = np.random.default_rng(seed)
    sub, files, key, classes = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10),
        "cifar100": ("cifar-100-python", ["train", "test"], b"fine_labels", 100),
    }[name]
    (root / sub).mkdir(parents=True)
    written = {}
    for f in files:
        data = rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, n_per_file).tolist()
        batch = {b"data": data, key: labels, b"filenames": [b"x.png"] * n_per_file}
        if name == "cifar100":
            batch[b"coarse_labels"] = [0] * n_per_file
        with open(root / sub / f, "wb") as fh:
            pickle.dump(batch, fh)
        written[f] = (data, labels)
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_the_python_pickle_batches(tmp_path, name):
    written = write_cifar(tmp_path, name)
    x, y = cifar(name, "train", tmp_path)
    train = [k for k in written if k not in ("test_batch", "test")]
    assert x.shape == (4 * len(train), 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    data, labels = written[train[0]]
    # row-major 3072 bytes = 1024 red, 1024 green, 1024 blue values
    assert torch.equal(x[:4], torch.from_numpy(data.reshape(4, 3, 32, 32)))
    assert y[:4].tolist() == labels
    xt, _ = cifar(name, "test", tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"))
    assert xt.shape == (4, 3, 32, 32)
    loaded = datasets.load(name, tmp_path)
    assert loaded.num_classes == (10 if name == "cifar10" else 100) and loaded.in_channels == 3


def test_synthetic_data_has_cifar_shape_and_the_asked_size():
    data = datasets.load("synthetic", synthetic_size=100)
    assert data.x_train.shape == (100, 3, 32, 32) and data.x_test.shape == (20, 3, 32, 32)
    assert data.x_train.dtype == torch.uint8 and int(data.y_train.max()) < 10 and data.num_classes == 10
    assert torch.equal(datasets.load("synthetic", synthetic_size=100).x_train, data.x_train)  # fixed seed
    assert datasets.synthetic().x_train.shape[0] == 50_000  # CIFAR's size by default


def python2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as CIFAR's own files are written: Python 2 cPickle, protocol 2, str keys and numpy's old names."""

    def text(b: bytes) -> bytes:  # SHORT_BINSTRING
        return b"U" + bytes([len(b)]) + b

    raw = data.tobytes()
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + text(b"b") + b"\x87R("
        b"K\x01K" + bytes([data.shape[0]]) + b"M\x00\x0c\x86cnumpy\ndtype\n" + text(b"u1") + b"K\x00K\x01\x87R"
        b"(K\x03"
        + text(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T"
        + struct.pack("<I", len(raw))
        + raw
        + b"tb"
    )
    ints = b"".join(b"K" + bytes([v]) for v in labels)
    return b"\x80\x02}(" + text(b"data") + array + text(b"labels") + b"](" + ints + b"eu."


def test_cifar_batches_written_by_python_2_are_read(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / f).write_bytes(python2_cifar_pickle(data, [1, 9, 0]))
    x, y = cifar("cifar10", "test", tmp_path)
    assert torch.equal(x, torch.from_numpy(data.reshape(3, 3, 32, 32))) and y.tolist() == [1, 9, 0]
    for protocol in (2, 3, 4, 5):  # and whatever Python 3 and numpy 2 write
        (folder / "test_batch").write_bytes(pickle.dumps({b"data": data, b"labels": [4, 5, 6]}, protocol=protocol))
        assert cifar("cifar10", "test", tmp_path)[1].tolist() == [4, 5, 6]


class _Payload:
    """Unpickling this runs a shell command that leaves a file behind."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    "batch, refused",
    [
        (lambda m: {b"data": _Payload(m), b"labels": [0]}, "it refers to posix.system"),
        (lambda m: [_Payload(m)], "it refers to posix.system"),
        (lambda m: {b"data": np.array([_Payload(m)], dtype=object), b"labels": [0]}, "numpy dtype 'O8'"),
        (lambda m: {b"data": np.zeros((1, 3072)), b"labels": [0]}, "numpy dtype 'f8'"),
        (lambda m: {b"data": np.ma.zeros((1, 3072), np.uint8), b"labels": [0]}, "it refers to numpy.ma.core"),
    ],
)
def test_a_crafted_cifar_pickle_runs_nothing_and_is_refused_naming_the_file(tmp_path, batch, refused):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    write = {f"data_batch_{i}": {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]} for i in range(1, 6)}
    for name, body in write.items():
        (folder / name).write_bytes(pickle.dumps(body))
    (folder / "data_batch_3").write_bytes(pickle.dumps(batch(marker)))
    with pytest.raises(ValueError) as e:
        cifar("cifar10", "train", tmp_path)
    assert str(e.value).startswith(f"{folder / 'data_batch_3'} was refused: it is not a plain CIFAR batch")
    assert refused in str(e.value) and "restricted unpickler" in str(e.value)
    assert not marker.exists()  # the payload never ran


@pytest.mark.parametrize(
    "batch, message",
    [
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0.5, 1.0]}, "labels must be integers, found float64"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"labels must lie in \[0, 10\), found 0..10"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, r"2 images but labels of shape \(1,\)"),
        ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, r"images must be uint8 of shape \(n, 3072\)"),
        ({b"data": [1, 2], b"labels": [0, 1]}, r"images must be uint8 of shape \(n, 3072\), found list"),
    ],
)
def test_bad_cifar_contents_name_the_file(tmp_path, batch, message):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match=message) as e:
        cifar("cifar10", "test", tmp_path)
    assert str(e.value).startswith(str(folder / "test_batch"))
    (folder / "test_batch").write_bytes(pickle.dumps(batch)[:40])
    with pytest.raises(ValueError, match="test_batch is truncated or corrupt"):
        cifar("cifar10", "test", tmp_path)


def write_fashion_mnist(root, n=(5, 3), labels=None, image_shape=(28, 28), test_shape=None):
    rng = np.random.default_rng(0)
    for (prefix, count), shape in zip(
        (("train", n[0]), ("t10k", n[1])), (image_shape, test_shape or image_shape), strict=True
    ):
        write_idx(
            root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, *shape), dtype=np.uint8), 8, True
        )
        y = rng.integers(0, 10, count, dtype=np.uint8) if labels is None else labels(prefix, count)
        code = {np.dtype(np.uint8): 0x08, np.dtype(np.float32): 0x0D}[y.dtype]
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y, code, True)


@pytest.mark.parametrize(
    "labels, message",
    [
        (lambda p, n: np.full(n, 10 if p == "t10k" else 0, np.uint8), r"t10k-labels.*labels must lie in \[0, 10\)"),
        (lambda p, n: np.full(n, 12, np.uint8), r"train-labels.*labels must lie in \[0, 10\), found 12..12"),
        (lambda p, n: np.full(n, 1.5, np.float32), "train-labels.*labels must be integers, found torch.float32"),
    ],
)
def test_fashion_mnist_labels_are_checked_in_both_splits_when_loaded(tmp_path, labels, message):
    write_fashion_mnist(tmp_path, labels=labels)
    with pytest.raises(ValueError, match=message):
        datasets.load("fashion-mnist", tmp_path)


def test_truncated_and_corrupt_idx_files_name_the_file(tmp_path):
    write_fashion_mnist(tmp_path)
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    whole = gz.read_bytes()
    gz.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz is truncated or corrupt \(EOFError"):
        datasets.load("fashion-mnist", tmp_path)
    gz.write_bytes(b"\x1f\x8b\x08\x00garbage-not-deflate")
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz is truncated or corrupt"):
        datasets.load("fashion-mnist", tmp_path)
    (tmp_path / "header").write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">I", 5))
    with pytest.raises(ValueError, match="header is truncated: its header needs 16 bytes for 3 dimensions, the file"):
        read_idx(tmp_path / "header")
    (tmp_path / "odd").write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 1) + b"\x00" * 6)
    with pytest.raises(ValueError, match=r"header says shape \(1,\) but the file holds 1 values and 2 stray byte"):
        read_idx(tmp_path / "odd")


def test_fashion_mnist_image_shapes_are_checked(tmp_path):
    write_fashion_mnist(tmp_path, test_shape=(32, 32))
    with pytest.raises(ValueError, match=r"training images are \(1, 28, 28\) .* test images are \(1, 32, 32\)"):
        datasets.load("fashion-mnist", tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.int32), 0x0C, True)
    with pytest.raises(
        ValueError, match=r"t10k-images.*must be uint8 of shape \(n, height, width\), found torch.int32"
    ):
        datasets.load("fashion-mnist", tmp_path)


def test_cifar_errors_say_how_to_get_the_data(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python version.*or pass --download"):
        cifar("cifar10", "train", tmp_path)
    (tmp_path / "cifar-100-python").mkdir()
    with open(tmp_path / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8)}, f)
    with pytest.raises(ValueError, match="is not a cifar100 batch: it has no b'data' / b'fine_labels' entries"):
        cifar("cifar100", "train", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; choose one of: fashion-mnist, cifar10, cifar100"):
        datasets.load("mnist")
    with pytest.raises(ValueError, match="dataset 'cifar10' needs --data-dir"):
        datasets.load("cifar10")


def write_image_folder(root, classes=("cat", "dog"), per_class=3, size=(40, 30)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.{'png' if i % 2 else 'JPEG'}")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


def test_image_folder_layout_and_folder_loader(tmp_path):
    write_image_folder(tmp_path)
    files, labels, classes = image_folder(tmp_path, "train")
    assert classes == ["cat", "dog"] and labels == [0, 0, 0, 1, 1, 1] and len(files) == 6
    data = datasets.load("imagenet", tmp_path)
    assert data.num_classes == 2 and data.root == tmp_path and data.x_train is None
    common = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "image_size": 16, "workers": 0}
    train = FolderLoader(tmp_path, "train", 4, train=True, seed=3, **common)
    assert len(train) == 1  # drop_last
    ((x, y),) = list(train.epoch(0))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.shape == (4,)
    ((x2, y2),) = list(train.epoch(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)  # a function of (seed, epoch, index)
    ((x3, _),) = list(train.epoch(1))
    assert not torch.equal(x, x3)
    parallel = FolderLoader(tmp_path, "train", 4, train=True, seed=3, **{**common, "workers": 2})
    ((xp, yp),) = list(parallel.epoch(0))
    assert torch.equal(x, xp) and torch.equal(y, yp)  # the same batch whatever the number of workers
    val = FolderLoader(tmp_path, "val", 4, train=False, **common)
    batches = list(val.epoch(0))
    assert [len(b[1]) for b in batches] == [4, 2] and batches[0][1].tolist() == [0, 0, 0, 1]
    # evaluation: shorter side to 16 * 256 / 224 = 18, centre crop 16, normalised
    from PIL import Image

    im = Image.open(image_folder(tmp_path, "val")[0][0]).convert("RGB").resize((24, 18), Image.Resampling.BILINEAR)
    ref = torch.from_numpy(np.array(im.crop((4, 1, 20, 17)))).permute(2, 0, 1).float()
    assert torch.allclose(batches[0][0][0], (ref - 127.5) / 63.75)
    with pytest.raises(FileNotFoundError, match=r"ImageNet split folder not found: .*missing/train"):
        image_folder(tmp_path / "missing", "train")


def test_download_fashion_mnist_and_cifar_from_a_server(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 6), ("t10k", 2)):
        write_idx(src / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), 8, True)
        write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8), 8, True)
    write_cifar(src, "cifar10")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    files = {p.name: p.read_bytes() for p in src.glob("*.gz")}
    files["cifar-10-python.tar.gz"] = archive.getvalue()
    sums = {name: hashlib.sha256(body).hexdigest() for name, body in files.items()}
    server = FileServer(files)
    try:
        download("fashion-mnist", tmp_path / "fm", base_url=server.url, sha256=sums)
        assert fashion_mnist("train", tmp_path / "fm")[0].shape == (6, 28, 28)
        download("cifar10", tmp_path / "c10", base_url=server.url + "cifar-10-python.tar.gz", sha256=sums)
        assert cifar("cifar10", "train", tmp_path / "c10")[0].shape == (20, 3, 32, 32)
        assert not list((tmp_path / "c10").glob("tmp*")) and not list((tmp_path / "fm").glob("*.part"))
        with pytest.raises(OSError, match=r"could not download .*missing\.gz.*Fetch the file by hand"):
            datasets.fetch(server.url + "missing.gz", tmp_path / "missing.gz", "0" * 64)
        assert not list(tmp_path.glob("missing.gz*"))
        # an archive that cannot be fetched: the hint names the archive and the folder to extract it into, not
        # the temporary folder the download would have gone to
        hint = re.escape(f"Fetch cifar-10-python.tar.gz by hand and extract it into {tmp_path / 'c10b'}")
        hint += re.escape(" (it holds cifar-10-batches-py/)") + "$"
        with pytest.raises(OSError, match=r"could not download .*nothing-here\.tar\.gz.*" + hint):
            download("cifar10", tmp_path / "c10b", base_url=server.url + "nothing-here.tar.gz", sha256=sums)
        assert list((tmp_path / "c10b").iterdir()) == []
    finally:
        server.close()


def test_a_download_whose_sha256_differs_is_deleted_and_named(tmp_path):
    body = b"\x1f\x8b not the real file"
    server = FileServer({"train-images-idx3-ubyte.gz": body})
    try:
        # the published sums by default: a file served under the real name but with other bytes is refused
        with pytest.raises(ValueError) as e:
            download("fashion-mnist", tmp_path / "fm", base_url=server.url)
        published = datasets.SHA256["fashion-mnist"]["train-images-idx3-ubyte.gz"]
        actual = hashlib.sha256(body).hexdigest()
        assert f"has SHA-256 {actual}, not the published {published}" in str(e.value)
        assert "train-images-idx3-ubyte.gz" in str(e.value) and "was deleted" in str(e.value)
        assert list((tmp_path / "fm").iterdir()) == []  # neither the file nor its partial download is left
        with pytest.raises(ValueError, match="not the published 00000000"):
            datasets.fetch(server.url + "train-images-idx3-ubyte.gz", tmp_path / "x.gz", "0" * 64)
        assert not list(tmp_path.glob("x.gz*"))
    finally:
        server.close()


def test_the_published_sums_cover_every_downloaded_file():
    assert set(datasets.SHA256) == set(datasets.URLS)
    assert set(datasets.SHA256["fashion-mnist"]) == {
        f"{p}-{k}-ubyte.gz" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")
    }
    for name in ("cifar10", "cifar100"):
        assert set(datasets.SHA256[name]) == {datasets.URLS[name].rsplit("/", 1)[1]}
    assert all(len(h) == 64 and int(h, 16) >= 0 for sums in datasets.SHA256.values() for h in sums.values())


# ------------------------------------------------------------------ loaders


def test_batch_seed_is_stable_and_distinct():
    assert batch_seed(0, 1, 2) == batch_seed(0, 1, 2) != batch_seed(0, 2, 1)
    # its definition: the first 8 bytes of BLAKE2b over "0/1/2", little-endian, top bit dropped
    expected = int.from_bytes(hashlib.blake2b(b"0/1/2", digest_size=8).digest(), "little") >> 1
    assert batch_seed(0, 1, 2) == expected
    assert 0 <= batch_seed(5) < 2**63


def images(n=10, c=1, h=6, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8), torch.arange(n)


def test_tensor_loader_eval_batches_are_ordered_and_normalised():
    x, y = images()
    loader = TensorLoader(x, y, 4, mean=(0.5,), std=(0.25,), train=False)
    batches = list(loader.epoch(0))
    assert len(loader) == 3 and [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    assert torch.allclose(torch.cat([b[0] for b in batches]), (x.float() / 255 - 0.5) / 0.25, atol=1e-6)


def test_tensor_loader_shuffles_per_epoch_drops_the_last_batch_and_resumes_mid_epoch():
    x, y = images()
    loader = TensorLoader(x, y, 3, mean=(0.0,), std=(1 / 255,), train=True, seed=7)
    assert len(loader) == 3
    e0 = list(loader.epoch(0))
    labels = torch.cat([b[1] for b in e0])
    assert len(labels) == 9 and len(set(labels.tolist())) == 9
    assert torch.equal(labels, torch.randperm(10, generator=torch.Generator().manual_seed(batch_seed(7, 0, -1)))[:9])
    assert not torch.equal(labels, torch.cat([b[1] for b in loader.epoch(1)]))
    tail = list(loader.epoch(0, start=1))
    assert len(tail) == 2 and all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e0[1:], tail, strict=True)
    )
    # no augmentation: each image is the stored one (std 1/255, mean 0 gives back the raw values)
    assert torch.equal(e0[0][0], x[e0[0][1]].float())


def test_crop_flip_and_cutout_follow_their_definitions():
    x, y = images(n=64, h=8, w=8, seed=1)
    raw = x.float()
    crop = TensorLoader(x, y, 64, mean=(0.0,), std=(1 / 255,), train=True, crop_padding=2, seed=0)
    ((out, idx),) = list(crop.epoch(0))
    padded = F.pad(raw[idx], (2, 2, 2, 2))
    shifts = set()
    for k in range(64):  # every output is one 8x8 window of the zero-padded image
        hits = [(i, j) for i in range(5) for j in range(5) if torch.equal(out[k], padded[k, :, i : i + 8, j : j + 8])]
        assert hits, k
        shifts.add(hits[0])
    assert len(shifts) > 10
    flip = TensorLoader(x, y, 64, mean=(0.0,), std=(1 / 255,), train=True, flip=True, seed=0)
    ((out, idx),) = list(flip.epoch(0))
    flipped = [torch.equal(out[k], raw[idx[k]].flip(-1)) for k in range(64)]
    assert all(f or torch.equal(out[k], raw[idx[k]]) for k, f in enumerate(flipped)) and 15 < sum(flipped) < 49
    cut = TensorLoader(x.clamp(min=1), y, 64, mean=(0.0,), std=(1 / 255,), train=True, cutout=4, seed=0)
    ((out, _),) = list(cut.epoch(0))
    holes = (out == 0).flatten(1).sum(1)
    # a 4x4 square centred anywhere in the image, clipped at the border, on about half the images (p = 0.5)
    assert set(holes.tolist()) <= {0, 4, 6, 8, 9, 12, 16} and 15 < int((holes > 0).sum()) < 49
    for k in torch.nonzero(holes == 16).flatten().tolist():
        rows, cols = torch.nonzero(out[k, 0] == 0).unbind(1)
        assert rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3


def test_tensor_loader_rejects_bad_input():
    x, y = images()
    with pytest.raises(ValueError, match="x must be uint8 images of shape"):
        TensorLoader(x.float(), y, 2, mean=(0,), std=(1,), train=True)
    with pytest.raises(ValueError, match="x and y differ in length: 10 images, 9 labels"):
        TensorLoader(x, y[:9], 2, mean=(0,), std=(1,), train=True)
    with pytest.raises(ValueError, match="batch_size must be between 1 and the number of images 10, got 11"):
        TensorLoader(x, y, 11, mean=(0,), std=(1,), train=True)


# ------------------------------------------------------------------ label noise


@pytest.mark.parametrize("mode", ["symmetric", "pairflip"])
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.4, 0.73])
def test_noisy_labels_are_a_pure_function_of_seed_rate_and_subset(mode, rate):
    labels = torch.randint(0, 10, (997,), generator=torch.Generator().manual_seed(5))
    noisy = datasets.noisy_labels(labels, rate, 10, mode=mode, seed=3)
    assert torch.equal(noisy, datasets.noisy_labels(labels, rate, 10, mode=mode, seed=3))  # the same every time
    flipped = noisy != labels
    assert int(flipped.sum()) == round(rate * 997)  # exactly that many, and each one really changed
    assert noisy.dtype == labels.dtype and bool(((noisy >= 0) & (noisy < 10)).all())
    if mode == "pairflip":
        assert torch.equal(noisy[flipped], (labels[flipped] + 1) % 10)
    if rate:
        assert not torch.equal(noisy, datasets.noisy_labels(labels, rate, 10, mode=mode, seed=4))


def test_symmetric_noise_draws_every_other_class_uniformly():
    labels = torch.zeros(40_000, dtype=torch.int64)
    noisy = datasets.noisy_labels(labels, 0.9, 4, seed=0)
    counts = torch.bincount(noisy, minlength=4)
    assert counts[0] == 4_000 and all(abs(int(c) - 12_000) < 600 for c in counts[1:])  # 36,000 spread over 3


@pytest.mark.parametrize("rate, message", [(1.0, r"label_noise must be a real number in \[0, 1\), got 1.0"),
                                           (-0.1, r"label_noise must be a real number in \[0, 1\)")])  # fmt: skip
def test_noise_rates_outside_the_unit_interval_are_refused(rate, message):
    with pytest.raises(ValueError, match=message):
        datasets.noisy_labels(torch.zeros(3, dtype=torch.int64), rate, 10)
    with pytest.raises(ValueError, match="label_noise_mode must be one of 'symmetric', 'pairflip'; got 'asym'"):
        datasets.noisy_labels(torch.zeros(3, dtype=torch.int64), 0.2, 10, mode="asym")


def test_the_memorisation_metric_is_its_definition():
    from samopt.train.optimizers import Amp
    from samopt.train.vision import memorisation

    class Fixed(torch.nn.Module):  # predicts class x[0, 0, 0] of each image
        def forward(self, x):
            return F.one_hot(x[:, 0, 0, 0].round().long(), 4).float()

    images = torch.tensor([0, 1, 2, 3, 3, 1], dtype=torch.uint8).view(6, 1, 1, 1)
    noisy = torch.tensor([0, 2, 2, 1, 3, 0])  # the labels the model was trained on
    true = torch.tensor([1, 1, 3, 3, 2, 0])
    loader = TensorLoader(images, noisy, 4, mean=(0.0,), std=(1 / 255,), train=False)
    got = memorisation(Fixed(), loader, true, Amp("none", torch.device("cpu")))
    # predictions 0, 1, 2, 3, 3, 1: noisy labels hit at 0, 2, 4 (3 of 6); true labels at 1, 3 (2 of 6)
    assert got == {"flipped_acc_noisy": 0.5, "flipped_acc_true": pytest.approx(1 / 3)}


def test_a_noisy_run_trains_on_the_noisy_labels_and_tests_and_measures_on_the_true_ones():
    from samopt.train.config import TrainConfig
    from samopt.train.vision import _Loaders

    data = datasets.synthetic(300, 80, shape=(1, 4, 4), seed=2)
    cfg = TrainConfig(dataset="synthetic", label_noise=0.4, train_subset=200, batch_size=16)
    loaders = _Loaders(cfg, data, torch.device("cpu"))
    keep = fixed_subset(300, 200, "training images")
    x, y = data.x_train[keep], data.y_train[keep]
    noisy = datasets.noisy_labels(y, 0.4, 10, seed=0)
    flipped = noisy != y
    assert int(flipped.sum()) == 80
    assert torch.equal(loaders.train.x, x) and torch.equal(loaders.train.y, noisy)  # trained on the noisy labels
    assert torch.equal(loaders.test.x, data.x_test) and torch.equal(loaders.test.y, data.y_test)  # a clean test set
    images, true = loaders.flipped
    assert torch.equal(images.x, x[flipped]) and torch.equal(images.y, noisy[flipped]) and torch.equal(true, y[flipped])
    assert _Loaders(dataclasses.replace(cfg, label_noise=0.0), data, torch.device("cpu")).flipped is None
