"""pcl_ext.data: IDX/CIFAR/ImageFolder/digits loaders, augmentations, and the dataset factory."""
import gzip
import importlib.util
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")  # the trainer's dependencies, not the ops'
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from pcl_ext import data  # noqa: E402
from pcl_ext.data import build_datasets, read_idx  # noqa: E402

needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                   reason="digits ship with scikit-learn")


pytestmark = pytest.mark.usefixtures("one_thread")

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
             np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def write_idx(path, array, gz=False):
    """The IDX writer, independent of the reader: header by struct, data big-endian."""
    array = np.asarray(array)
    header = bytes([0, 0, IDX_CODES[array.dtype], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    Path(path).write_bytes(gzip.compress(raw) if gz else raw)
    return path


def check_triplet(train, train_eval, test, info, n_train, n_test, channels, size):
    """Shapes, dtypes and label ranges of build_datasets' output; two views differ."""
    assert (len(train), len(train_eval), len(test)) == (n_train, n_train, n_test)
    assert (info.channels, info.image_size) == (channels, size)
    torch.manual_seed(0)
    views, index = train[n_train - 1]
    assert index == n_train - 1 and len(views) == 2
    for v in views:
        assert v.shape == (channels, size, size) and v.dtype == torch.float32
    assert not torch.equal(views[0], views[1])
    for ds in (train_eval, test):
        x, y = ds[0]
        assert x.shape == (channels, size, size) and x.dtype == torch.float32
        assert isinstance(y, int) and 0 <= y < info.num_classes
        assert ds.targets.dtype == torch.int64 and len(ds.targets) == len(ds)
        assert 0 <= ds.targets.min() and ds.targets.max() < info.num_classes
    assert len(info.classes) == info.num_classes
    assert len(info.mean) == len(info.std) == channels


# ---------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.array([-7, 0, 2**30, -2**31], dtype=np.int32),
    np.array([[-1, 127], [3, -128]], dtype=np.int8),
    np.array([[1.5, -2.25, 1e30]], dtype=np.float32),
    np.array([np.pi, -1e-300], dtype=np.float64),
    np.array([-300, 258], dtype=np.int16),
], ids=["u8", "i32", "i8", "f32", "f64", "i16"])
def test_read_idx_roundtrip(tmp_path, gz, array):
    out = read_idx(write_idx(tmp_path / "a", array, gz))
    assert out.dtype == array.dtype and out.dtype.isnative and out.shape == array.shape
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("mangle,match", [
    (lambda raw: b"\x01" + raw[1:], "not an IDX file"),            # bad magic
    (lambda raw: raw[:2] + b"\x07" + raw[3:], "not an IDX file"),  # unknown type code
    (lambda raw: raw[:3] + b"\x00" + raw[4:], "not an IDX file"),  # zero dimensions
    (lambda raw: raw[:9], "header truncated"),
    (lambda raw: raw[:-1], "file holds"),                          # data truncated
    (lambda raw: raw + b"\x00", "file holds"),                     # trailing bytes
    (lambda raw: raw[:4] + struct.pack(">I", 3) + raw[8:], "file holds"),  # wrong dimension
])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_corrupted_header(tmp_path, mangle, match, gz):
    raw = write_idx(tmp_path / "ok", np.zeros((2, 3, 3), np.uint8)).read_bytes()
    bad = tmp_path / "bad-idx"
    bad.write_bytes(gzip.compress(mangle(raw)) if gz else mangle(raw))
    with pytest.raises(ValueError, match=match) as err:
        read_idx(bad)
    assert "bad-idx" in str(err.value)


def fake_idx_dir(root, n_train=12, n_test=5, size=28, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(exist_ok=True)
    arrays = {}
    for split, n, gz in (("train", n_train, True), ("t10k", n_test, False)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{split}-images-idx3-ubyte{'.gz' if gz else ''}", images, gz)
        write_idx(root / f"{split}-labels-idx1-ubyte{'.gz' if gz else ''}", labels, gz)
        arrays[split] = images, labels
    return arrays


def test_fashion_mnist_from_idx_dir(tmp_path):
    arrays = fake_idx_dir(tmp_path / "fm")
    train, train_eval, test, info = build_datasets("fashion-mnist", tmp_path / "fm")
    check_triplet(train, train_eval, test, info, 12, 5, channels=1, size=28)
    assert info.small_images and info.num_classes == 10 and info.classes[9] == "Ankle boot"
    np.testing.assert_array_equal(train.base.images[:, 0].numpy(), arrays["train"][0])
    np.testing.assert_array_equal(test.targets.numpy(), arrays["t10k"][1])
    pixels = arrays["train"][0] / 255
    np.testing.assert_allclose(info.mean[0], pixels.mean(), rtol=1e-6)
    np.testing.assert_allclose(info.std[0], pixels.std(ddof=1), rtol=1e-6)


def test_fashion_mnist_resized(tmp_path):
    fake_idx_dir(tmp_path / "fm")
    train, _, test, info = build_datasets("fashion-mnist", tmp_path / "fm", image_size=32)
    assert info.image_size == 32 and train[0][0][0].shape == test[0][0].shape == (1, 32, 32)


def test_idx_dir_errors(tmp_path):
    fake_idx_dir(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        build_datasets("fashion-mnist", tmp_path / "fm")
    write_idx(tmp_path / "fm" / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))  # 5 images
    with pytest.raises(ValueError, match="do not match"):
        build_datasets("fashion-mnist", tmp_path / "fm")
    write_idx(tmp_path / "fm" / "t10k-labels-idx1-ubyte", np.array([0, 1, 10, 2, 3], np.uint8))
    with pytest.raises(ValueError, match="labels outside 0..9"):
        build_datasets("fashion-mnist", tmp_path / "fm")


@pytest.mark.skipif(not Path(data.FASHION_MNIST_ROOT).is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_debian_package():
    train, train_eval, test, info = build_datasets("fashion-mnist")
    check_triplet(train, train_eval, test, info, 60000, 10000, channels=1, size=28)
    assert train_eval.targets.bincount().tolist() == [6000] * 10
    assert test.targets.bincount().tolist() == [1000] * 10
    assert abs(info.mean[0] - 0.2860) < 1e-3 and abs(info.std[0] - 0.3530) < 1e-3


# ---------------------------------------------------------------------------- CIFAR-10

def fake_cifar(root, per_batch=3, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
             b"labels": rng.integers(0, 10, per_batch).tolist()}
        (root / name).write_bytes(pickle.dumps(d))
        batches[name] = d
    return batches


@pytest.mark.parametrize("nested", [False, True])
def test_cifar10(tmp_path, nested):
    batches = fake_cifar(tmp_path / "cifar-10-batches-py" if nested else tmp_path / "c")
    train, train_eval, test, info = build_datasets("cifar10", tmp_path if nested else tmp_path / "c")
    check_triplet(train, train_eval, test, info, 15, 3, channels=3, size=32)
    assert info.small_images and info.classes[0] == "airplane"
    first = batches["data_batch_1"]
    # channel-major rows: the first 1024 bytes are the red plane
    np.testing.assert_array_equal(train.base.images[1, 0].numpy(),
                                  first[b"data"][1, :1024].reshape(32, 32))
    np.testing.assert_array_equal(train.base.images[1, 2].numpy(),
                                  first[b"data"][1, 2048:].reshape(32, 32))
    labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert train_eval.targets.tolist() == labels
    assert test.targets.tolist() == batches["test_batch"][b"labels"]


def test_cifar10_errors(tmp_path):
    with pytest.raises(ValueError, match="root"):
        build_datasets("cifar10")
    fake_cifar(tmp_path / "c")
    (tmp_path / "c" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        build_datasets("cifar10", tmp_path / "c")
    bad = {b"data": np.zeros((3, 1024), np.uint8), b"labels": [0, 1, 2]}
    (tmp_path / "c" / "data_batch_4").write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match="data_batch_4"):
        build_datasets("cifar10", tmp_path / "c")


# ---------------------------------------------------------------------------- ImageFolder

def fake_image_folder(root, test_name="val", classes=("cat", "dog"), n=(3, 2)):
    rng = np.random.default_rng(0)
    for split, count in (("train", n[0]), (test_name, n[1])):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


@pytest.mark.parametrize("test_name", ["val", "test"])
def test_image_folder(tmp_path, test_name):
    fake_image_folder(tmp_path, test_name)
    train, train_eval, test, info = build_datasets("imagefolder", tmp_path, image_size=32)
    check_triplet(train, train_eval, test, info, 6, 4, channels=3, size=32)
    assert info.classes == ("cat", "dog") and info.small_images
    assert info.mean == data.IMAGENET_MEAN
    assert train_eval.targets.tolist() == [0, 0, 0, 1, 1, 1]


def test_image_folder_large_images_use_imagenet_stem(tmp_path):
    fake_image_folder(tmp_path, n=(1, 1))
    train, _, test, info = build_datasets("imagefolder", tmp_path, image_size=96)
    assert not info.small_images and test[0][0].shape == (3, 96, 96)
    assert any(isinstance(t, data.GaussianBlur) for r in train.transform.transform.transforms
               for t in getattr(r, "transforms", []))


def test_image_folder_errors(tmp_path):
    fake_image_folder(tmp_path / "a", classes=("cat",))
    (tmp_path / "a" / "val" / "cat").rename(tmp_path / "a" / "val" / "dog")
    with pytest.raises(ValueError, match="different class folders"):
        build_datasets("imagefolder", tmp_path / "a")
    (tmp_path / "b" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="val"):
        build_datasets("imagefolder", tmp_path / "b")


# ---------------------------------------------------------------------------- digits

@needs_sklearn
def test_digits():
    train, train_eval, test, info = build_datasets("digits")
    check_triplet(train, train_eval, test, info, 1437, 360, channels=1, size=32)
    assert info.small_images and info.num_classes == 10
    counts = test.targets.bincount(minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37                    # stratified
    again = build_datasets("digits")[2]
    assert torch.equal(again.base.images, test.base.images)              # deterministic split
    assert torch.equal(again.targets, test.targets)
    assert train.base.images.max() == 255 and train.base.images.min() == 0
    everything = torch.cat([train_eval.targets, test.targets]).bincount()
    from sklearn.datasets import load_digits
    assert everything.tolist() == np.bincount(load_digits().target).tolist()
    x = torch.stack([train_eval[i][0] for i in range(len(train_eval))])
    assert abs(x.mean()) < 1e-4 and abs(x.std() - 1) < 1e-3             # normalized


@needs_sklearn
def test_digits_are_never_flipped():
    train, *_ = build_datasets("digits")
    names = repr(train.transform)
    assert "HorizontalFlip" not in names and "Grayscale" not in names and "Blur" not in names
    assert "HorizontalFlip" in repr(data.pretrain_transform(28, 1, [0.5], [0.5]))


@needs_sklearn
def test_loader_batches_and_seed():
    train, *_ = build_datasets("digits")
    views, index = next(iter(DataLoader(train, batch_size=4, shuffle=False)))
    assert [v.shape for v in views] == [(4, 1, 32, 32)] * 2
    assert index.tolist() == [0, 1, 2, 3] and index.dtype == torch.int64
    torch.manual_seed(7)
    a = train[5][0]
    torch.manual_seed(7)
    b = train[5][0]
    assert all(torch.equal(u, v) for u, v in zip(a, b))


# ---------------------------------------------------------------------------- transforms

def test_blur_only_above_32px():
    for size, channels in ((32, 3), (28, 1)):
        assert "GaussianBlur" not in repr(data.pretrain_transform(size, channels, [0.5] * channels,
                                                                   [0.5] * channels))
    assert "GaussianBlur(sigma=(0.1, 2.0))" in repr(data.pretrain_transform(224, 3, [0.5] * 3,
                                                                              [0.5] * 3))


def test_gaussian_blur_pil_and_tensor():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    blur = data.GaussianBlur((1.5, 2.0))
    out_pil = np.asarray(blur(Image.fromarray(pixels)), dtype=np.float64)
    out_tensor = blur(torch.from_numpy(pixels).permute(2, 0, 1))
    assert out_pil.shape == pixels.shape and out_tensor.shape == (3, 64, 64)
    assert out_tensor.dtype == torch.uint8
    for out in (out_pil, out_tensor.permute(1, 2, 0).double().numpy()):
        assert out.std() < 0.5 * pixels.std()                       # white noise is smoothed
        assert abs(out.mean() - pixels.mean()) < 2


def test_colour_jitter_rgb_only():
    gray = repr(data.pretrain_transform(32, 1, [0.5], [0.5]))
    rgb = repr(data.pretrain_transform(32, 3, [0.5] * 3, [0.5] * 3))
    assert "hue" not in gray and "RandomGrayscale" not in gray
    assert "hue=(-0.1, 0.1)" in rgb and "RandomGrayscale" in rgb


def test_bad_name():
    with pytest.raises(ValueError, match="name"):
        build_datasets("mnist")


# ---------------------------------------------------------------------------- InfoMin views

@pytest.mark.parametrize("channels,size", [(1, 16), (1, 28), (3, 32), (3, 64)])
def test_infomin_views_shapes_dtype_and_seed(channels, size):
    augment = data.pretrain_transform(size, channels, [0.3] * channels, [0.2] * channels,
                                      aug="infomin")
    image = torch.randint(0, 256, (channels, 24, 24), dtype=torch.uint8)
    pil = Image.fromarray(image.permute(1, 2, 0).squeeze(-1).numpy())
    for source in (image, pil):
        torch.manual_seed(3)
        views = [augment(source) for _ in range(8)]
        for v in views:
            assert v.shape == (channels, size, size) and v.dtype == torch.float32
            assert torch.isfinite(v).all()
        torch.manual_seed(3)
        assert all(torch.equal(v, augment(source)) for v in views)  # deterministic under a seed
        assert not torch.equal(views[0], views[1])


def _rand_augment_layers(transform):
    """The RandomApply([RandAugment]) layers of an InfoMin transform."""
    return [x for x in transform.transforms if type(x).__name__ == "RandomApply"
            and type(x.transforms[0]).__name__ == "RandAugment"]


def test_infomin_preset():
    gray = data.pretrain_transform(16, 1, [0.3], [0.2], aug="infomin")
    rgb = data.pretrain_transform(64, 3, [0.5, 0.4, 0.3], [0.2] * 3, aug="infomin")
    for t, fill in ((gray, [76]), (rgb, [128, 102, 76])):
        layers = _rand_augment_layers(t)
        assert len(layers) == 2                                     # "rand-n2"
        for layer in layers:                                        # each kept or skipped
            assert layer.p == 0.5                                   # on its own, as timm's
            ra = layer.transforms[0]
            assert (ra.num_ops, ra.magnitude, ra.num_magnitude_bins) == (1, 30, 31)  # "m10"
            assert ra.fill == fill                                  # the data's mean colour
        jitter = t.transforms[1]
        assert t.transforms.index(layers[0]) > 1                    # on top of the jitter
        assert jitter.transforms[0].brightness == pytest.approx((0.2, 1.8))  # 0.8, not 0.4
        assert t.transforms[0].scale == (0.2, 1.0)   # InfoMin's crops with a MoCo queue
    assert "RandomGrayscale" not in repr(gray) and "hue" not in repr(gray)
    assert "hue=(-0.2, 0.2)" in repr(rgb) and "RandomGrayscale" in repr(rgb)
    assert "Blur" not in repr(gray) and "GaussianBlur" in repr(rgb)   # blur above 32 px only
    assert data.pretrain_transform(16, 1, [0.3], [0.2], aug="infomin",
                                   crop_scale=(0.3, 1.0)).transforms[0].scale == (0.3, 1.0)
    with pytest.raises(ValueError, match="`aug`"):
        data.pretrain_transform(16, 1, [0.3], [0.2], aug="infomax")
    # A milder RandAugment, or none
    milder = data.pretrain_transform(16, 1, [0.3], [0.2], aug="infomin", rand_augment=(1, 9))
    assert [layer.transforms[0].magnitude for layer in _rand_augment_layers(milder)] == [9]
    assert "RandAugment" not in repr(data.pretrain_transform(16, 1, [0.3], [0.2], aug="infomin",
                                                             rand_augment=(0, 30)))
    for bad in ((-1, 9), (2, 31)):
        with pytest.raises(ValueError, match="`rand_augment`"):
            data.pretrain_transform(16, 1, [0.3], [0.2], aug="infomin", rand_augment=bad)


def test_infomin_layers_fire_half_the_time():
    """Each RandAugment layer changes a view about half the time (it is skipped otherwise):
    with the crop, jitter and flip taken out, a view equals its source exactly when both
    layers were skipped (or drew ops that change nothing), about a quarter of the draws."""
    torch.manual_seed(0)
    t = data.pretrain_transform(16, 1, [0.3], [0.2], aug="infomin", flip=False,
                                crop_scale=(1.0, 1.0))
    t.transforms[1].p = 0.0  # no colour jitter
    image = torch.randint(40, 216, (1, 16, 16), dtype=torch.uint8)
    plain = data.pretrain_transform(16, 1, [0.3], [0.2], aug="infomin", flip=False,
                                    crop_scale=(1.0, 1.0), rand_augment=(0, 30))
    plain.transforms[1].p = 0.0
    reference = plain(image)
    unchanged = sum(torch.equal(t(image), reference) for _ in range(400)) / 400
    # P(unchanged) = (0.5 + 0.5 * P(op is a no-op here))^2, with Identity and Color (a no-op on
    # one channel) 2 of 14 ops: 0.32; always-on layers would give 0.02
    assert 0.22 < unchanged < 0.42


@needs_sklearn
def test_aug_plus_stays_the_default():
    train, *_ = build_datasets("digits", image_size=16)
    assert repr(train.transform.transform) == repr(
        data.pretrain_transform(16, 1, train.transform.transform.transforms[-2].mean,
                                train.transform.transform.transforms[-2].std, flip=False))
    assert "RandAugment" not in repr(train.transform) and "scale=(0.2, 1.0)" in repr(
        train.transform)
    infomin, *_ = build_datasets("digits", image_size=16, aug="infomin")
    assert "RandAugment" in repr(infomin.transform) and "scale=(0.2, 1.0)" in repr(
        infomin.transform)
    views, index = infomin[5]
    assert [v.shape for v in views] == [(1, 16, 16)] * 2 and index == 5
