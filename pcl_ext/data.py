"""Datasets and MoCo v2 augmentations for the PCL trainer; everything is read offline.

``build_datasets(name, root)`` returns what a PCL run needs:

* ``train``: ``([view_q, view_k], index)``, two augmented views and the dataset index (PCL
  looks the index up in the cluster assignments of the last E-step);
* ``train_eval``: ``(image, label)`` of the same training images with the eval transform, in
  index order (the E-step's features and the kNN memory bank);
* ``test``: ``(image, label)`` of the held-out split;
* ``info``: a :class:`DatasetInfo` (classes, channels, size, which ResNet stem to use).

Datasets (``name``):

* ``digits``: scikit-learn's ``load_digits()`` (1,797 8x8 images, shipped in the wheel),
  stratified split 1,437 / 360 with seed 0, upsampled once to 32x32 (bilinear), so that random
  crops move by fractions of a stroke instead of whole 8x8 pixels and the CIFAR stem applies.
* ``fashion-mnist``: the four IDX files (gzipped or not) in ``root``; by default the Debian
  package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``). 28x28.
* ``cifar10``: CIFAR-10's python pickles (``data_batch_1..5``, ``test_batch``) in ``root`` or
  ``root/cifar-10-batches-py``. 32x32. Pickles run code when loaded: use trusted files only.
* ``imagefolder``: ``root/train`` and ``root/val`` (or ``root/test``), one folder per class,
  read with ``torchvision.datasets.ImageFolder``. 224x224 unless ``image_size`` says otherwise.

The first three are held in memory as uint8 tensors ``[N, C, H, W]``.
"""
from __future__ import annotations

import gzip
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2

__all__ = ["DATASETS", "DatasetInfo", "ArrayDataset", "Transformed", "TwoCrops",
           "GaussianBlur", "read_idx", "load_digits", "load_idx_dir", "load_cifar10",
           "pretrain_transform", "eval_transform", "build_datasets", "AUGMENTATIONS",
           "RAND_AUGMENT"]

DATASETS = ("digits", "fashion-mnist", "cifar10", "imagefolder")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The views of the pre-training pairs, with the smallest crop area each uses by default.
# InfoMin's code crops from 0.08 with a memory bank, from 0.2 with MoCo's queue (this package's).
AUGMENTATIONS = {"aug-plus": 0.2, "infomin": 0.2}
RAND_AUGMENT = (2, 30)  # InfoMin Aug's RandAugment: layers per image, magnitude bin (of 0..30)
RAND_AUGMENT_P = 0.5  # ... each layer applied with this probability (timm's, as InfoMin's code)

PathLike = Union[str, Path]
Arrays = tuple[Tensor, Tensor, Tensor, Tensor]  # train images, train labels, test images, test labels


@dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about a dataset."""
    name: str
    num_classes: int
    channels: int                 # 1 (grayscale) or 3 (RGB): build_encoder(in_channels=...)
    image_size: int               # side of the square network input
    small_images: bool            # CIFAR stem, for inputs <= 64 px: build_encoder(small_images=...)
    mean: tuple[float, ...]       # per-channel normalization of the inputs
    std: tuple[float, ...]
    classes: tuple[str, ...]


class ArrayDataset(Dataset):
    """In-memory images ``uint8 [N, C, H, W]`` and labels ``int64 [N]``; yields ``(image, label)``."""

    def __init__(self, images: Tensor, targets: Tensor):
        assert images.dtype == torch.uint8 and images.dim() == 4 and len(images) == len(targets)
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.targets[index])


class Transformed(Dataset):
    """``base``'s images through ``transform``; yields ``(x, label)``, or ``(x, index)`` if
    ``with_index`` (PCL's training set). ``targets`` is the int64 tensor of all labels."""

    def __init__(self, base: Dataset, transform: Callable, with_index: bool = False):
        self.base, self.transform, self.with_index = base, transform, with_index

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Union[Tensor, list[Tensor]], int]:
        image, label = self.base[index]
        return self.transform(image), (index if self.with_index else label)

    @property
    def targets(self) -> Tensor:
        return torch.as_tensor(self.base.targets, dtype=torch.int64)


class TwoCrops:
    """Two independent draws of ``transform`` of one image: MoCo's query and key views."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image) -> list[Tensor]:
        return [self.transform(image), self.transform(image)]

    def __repr__(self) -> str:
        return f"TwoCrops({self.transform!r})"


class GaussianBlur:
    """MoCo v2's blur with ``sigma ~ U(sigma)`` px, drawn from torch's generator (seeded per
    DataLoader worker). PIL images use PIL's filter, ~5x faster than the tensor kernel at 224 px."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image):
        sigma = float(torch.empty(()).uniform_(*self.sigma))
        if isinstance(image, Image.Image):
            return image.filter(ImageFilter.GaussianBlur(radius=sigma))
        return v2.functional.gaussian_blur(image, 2 * math.ceil(3 * sigma) + 1, [sigma])

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma})"


# ---------------------------------------------------------------------------- file formats

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike) -> np.ndarray:
    """Read one IDX file (LeCun's MNIST format), gzipped or not, into a native-endian array.

    Header: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian
    uint32; the data follow, big-endian, and must fill the rest of the file exactly.
    Raises ``ValueError`` naming the file on any header mismatch.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by file name
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex(' ')}; expected "
                         f"00 00 <type in {sorted(_IDX_DTYPES)}> <ndim >= 1>)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise ValueError(f"{path}: IDX header truncated ({len(raw)} bytes, {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", raw[4:start])
    expected = start + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} of {dtype.name} ({expected} "
                         f"bytes), but the file holds {len(raw)} bytes")
    return np.frombuffer(raw, dtype, offset=start).reshape(shape).astype(dtype.newbyteorder("="))


def _resize(images: Tensor, size: int) -> Tensor:
    """uint8 ``[N, C, H, W]`` to ``[N, C, size, size]``, bilinear (antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _mean_std(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``[N, C, H, W]`` images scaled to [0, 1], exact, from
    256-bin histograms (a float copy of CIFAR-10 would take 600 MB)."""
    values = torch.arange(256, dtype=torch.float64) / 255
    hist = torch.stack([torch.bincount(images[:, c].reshape(-1), minlength=256)
                        for c in range(images.shape[1])]).double()  # C x 256
    n = hist.sum(1)
    mean = hist @ values / n
    var = (hist * (values - mean[:, None]) ** 2).sum(1) / (n - 1)
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


def load_digits() -> Arrays:
    """scikit-learn's 8x8 digits (values 0..16 scaled to 0..255), stratified 1,437 / 360
    split with seed 0."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    images = torch.from_numpy(np.round(digits.images * (255 / 16)).astype(np.uint8))
    images, labels = images.unsqueeze(1), torch.from_numpy(digits.target)
    train, test = train_test_split(np.arange(len(labels)), test_size=360, random_state=0,
                                   stratify=digits.target)
    train, test = torch.from_numpy(train), torch.from_numpy(test)
    return images[train], labels[train].long(), images[test], labels[test].long()


def load_idx_dir(root: PathLike) -> Arrays:
    """The four MNIST-layout IDX files in ``root`` (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-…``; each may end in ``.gz``) as tensors."""
    root = Path(root)

    def read(stem: str) -> np.ndarray:
        for path in (root / f"{stem}.gz", root / stem):
            if path.is_file():
                return read_idx(path)
        raise FileNotFoundError(f"{root}: no {stem}[.gz] (for Fashion-MNIST: apt-get install "
                                f"dataset-fashion-mnist, or pass the folder of its IDX files)")

    out = []
    for split in ("train", "t10k"):
        images, labels = read(f"{split}-images-idx3-ubyte"), read(f"{split}-labels-idx1-ubyte")
        if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 \
                or len(labels) != len(images):
            raise ValueError(f"{root}: {split} images {images.dtype}{list(images.shape)} and "
                             f"labels {labels.dtype}{list(labels.shape)} do not match; expected "
                             "uint8 [N, H, W] and [N]")
        out += [torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()]
    return tuple(out)


def load_cifar10(root: PathLike) -> Arrays:
    """CIFAR-10's python pickles in ``root`` or ``root/cifar-10-batches-py``: dicts with
    ``b'data'`` uint8 ``[n, 3072]`` (channel-major 32x32) and ``b'labels'``."""
    root = Path(root)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{root}: no CIFAR-10 batch {name!r}")
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch.get(b"data", batch.get("data")))
        labels = np.asarray(batch.get(b"labels", batch.get("labels")), dtype=np.int64)
        if data.dtype != np.uint8 or data.shape != (len(labels), 3072):
            raise ValueError(f"{path}: data is {data.dtype}{list(data.shape)} for "
                             f"{len(labels)} labels; expected uint8 [{len(labels)}, 3072]")
        return data.reshape(-1, 3, 32, 32), labels

    train = [read(f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = read("test_batch")
    return (torch.from_numpy(np.concatenate([x for x, _ in train])),
            torch.from_numpy(np.concatenate([y for _, y in train])),
            torch.from_numpy(test_x), torch.from_numpy(test_y))


# ---------------------------------------------------------------------------- transforms

def pretrain_transform(image_size: int, channels: int, mean: Sequence[float],
                       std: Sequence[float], *, flip: bool = True,
                       crop_scale: Optional[tuple[float, float]] = None,
                       aug: str = "aug-plus",
                       rand_augment: tuple[int, int] = RAND_AUGMENT) -> v2.Compose:
    """The views of a pre-training pair, adapted to grayscale and small images; PIL or uint8
    tensor in, normalized float32 ``[C, image_size, image_size]`` out.

    ``aug="aug-plus"``, MoCo v2's: RandomResizedCrop(scale=crop_scale, default (0.2, 1)),
    ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, RandomGrayscale(p=0.2), GaussianBlur with
    p=0.5, RandomHorizontalFlip if ``flip``.

    ``aug="infomin"``, InfoMin Aug (Tian et al., NeurIPS 2020) as its authors' code builds it
    for a MoCo queue: the same crops (default scale (0.2, 1); their 0.08 is for a memory bank),
    stronger colour jitter (0.8, 0.8, 0.8, 0.2), then RandAugment "rand-n2-m10": two layers,
    each applied with probability 0.5 (timm's RandAugment, which InfoMin uses, keeps or skips
    every op on its own), each one torchvision RandAugment op at magnitude 30 of 31 bins, the
    strongest (timm's scale tops at 10), filling with the data's mean colour.
    ``rand_augment = (layers, magnitude)`` changes that RandAugment (``layers = 0``: none).

    Changes for small and grayscale images: one channel keeps brightness and contrast only
    (saturation, hue and grayscale do nothing to it; RandAugment's colour op leaves it
    unchanged). The blur's sigma range (0.1, 2.0) px is MoCo's at 224 px and is scaled with the
    image; at <= 32 px it would stay under 0.3 px, so it is dropped (as SimCLR does on
    CIFAR-10). RandAugment's shifts are relative to the image size already.
    """
    if aug not in AUGMENTATIONS:
        raise ValueError(f"pretrain_transform: `aug` must be one of {list(AUGMENTATIONS)}, "
                         f"got {aug!r}")
    jitter = 0.4 if aug == "aug-plus" else 0.8
    if channels == 3:
        colour = [v2.RandomApply([v2.ColorJitter(jitter, jitter, jitter, jitter / 4)], p=0.8),
                  v2.RandomGrayscale(p=0.2)]
    else:
        colour = [v2.RandomApply([v2.ColorJitter(jitter, jitter)], p=0.8)]
    scale = image_size / 224
    blur = [v2.RandomApply([GaussianBlur((0.1 * scale, 2.0 * scale))], p=0.5)] \
        if image_size > 32 else []
    fill = [round(255 * m) for m in mean]  # uint8 or PIL images: the mean in pixel values
    ops, magnitude = rand_augment
    if not (ops >= 0 and 0 <= magnitude <= 30):
        raise ValueError("pretrain_transform: `rand_augment` must be (ops >= 0, magnitude in "
                         f"0..30), got {rand_augment!r}")
    # InfoMin's RandAugment (timm's) applies each of its `ops` layers with probability 0.5:
    # one torchvision op per layer, each layer kept or skipped on its own.
    randaug = [v2.RandomApply([v2.RandAugment(num_ops=1, magnitude=magnitude, fill=fill)],
                              p=RAND_AUGMENT_P) for _ in range(ops)] if aug == "infomin" else []
    crop_scale = crop_scale or (AUGMENTATIONS[aug], 1.0)
    return v2.Compose([v2.RandomResizedCrop(image_size, scale=crop_scale), *colour, *blur,
                       *randaug, *([v2.RandomHorizontalFlip()] if flip else []),
                       *_to_input(mean, std)])


def eval_transform(mean: Sequence[float], std: Sequence[float],
                   image_size: Optional[int] = None) -> v2.Compose:
    """Normalized float32 tensor of the whole image; with ``image_size``, first resize the short
    side to ``image_size / 0.875`` and take the central crop (ImageNet practice)."""
    resize = [] if image_size is None else [v2.Resize(round(image_size / 0.875)),
                                            v2.CenterCrop(image_size)]
    return v2.Compose([*resize, *_to_input(mean, std)])


def _to_input(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std),
            v2.ToPureTensor()]


# ---------------------------------------------------------------------------- factory

def build_datasets(name: str = "digits", root: Optional[PathLike] = None, *,
                   image_size: Optional[int] = None,
                   crop_scale: Optional[tuple[float, float]] = None, aug: str = "aug-plus",
                   rand_augment: tuple[int, int] = RAND_AUGMENT,
                   ) -> tuple[Transformed, Transformed, Transformed, DatasetInfo]:
    """``(train, train_eval, test, info)`` for one of :data:`DATASETS` (see the module doc).

    Args:
        name: ``"digits"`` (default), ``"fashion-mnist"``, ``"cifar10"`` or ``"imagefolder"``.
        root: data folder; required for cifar10 and imagefolder, defaults to the Debian
            package's folder for fashion-mnist, unused for digits.
        image_size: network input side; default 32 (digits, cifar10), 28 (fashion-mnist),
            224 (imagefolder). In-memory datasets are resized once at load time.
        crop_scale: area range of RandomResizedCrop (default: the views', 0.2-1 for MoCo's).
        aug: the pre-training views, ``"aug-plus"`` (MoCo v2) or ``"infomin"``
            (:func:`pretrain_transform`).
        rand_augment: ``(ops, magnitude)`` of InfoMin Aug's RandAugment (default ``(2, 30)``).

    Horizontal flips are used everywhere except on digits: handwriting is never mirrored (a
    mirrored 2, 3, 7 or 9 is no digit), so flip invariance would be learned for nothing. Inputs are normalized with the training split's
    per-channel mean/std (ImageNet's for imagefolder). Inputs <= 64 px get the CIFAR stem
    (``info.small_images``): the ImageNet stem would leave layer4 a 1x1 or 2x2 map.
    """
    if name not in DATASETS:
        raise ValueError(f"build_datasets: unknown `name` {name!r}; expected one of {DATASETS}")
    if root is None and name in ("cifar10", "imagefolder"):
        raise ValueError(f"build_datasets: {name!r} needs `root`, the folder of its files")
    if name == "imagefolder":
        return _image_folders(Path(root), image_size or 224, crop_scale, aug, rand_augment)

    if name == "digits":
        size, classes = image_size or 32, tuple(str(i) for i in range(10))
        arrays = load_digits()
    elif name == "fashion-mnist":
        size, classes = image_size or 28, FASHION_MNIST_CLASSES
        arrays = load_idx_dir(root or FASHION_MNIST_ROOT)
    else:
        size, classes = image_size or 32, CIFAR10_CLASSES
        arrays = load_cifar10(root)
    train_x, train_y, test_x, test_y = arrays
    if min(train_y.min(), test_y.min()) < 0 or max(train_y.max(), test_y.max()) >= len(classes):
        raise ValueError(f"build_datasets: {name!r} labels outside 0..{len(classes) - 1}")
    train_x, test_x = _resize(train_x, size), _resize(test_x, size)
    channels = train_x.shape[1]
    mean, std = _mean_std(train_x)
    info = DatasetInfo(name, len(classes), channels, size, size <= 64, mean, std, classes)
    train_base = ArrayDataset(train_x, train_y)
    augment = pretrain_transform(size, channels, mean, std, flip=name != "digits",
                                 crop_scale=crop_scale, aug=aug, rand_augment=rand_augment)
    return (Transformed(train_base, TwoCrops(augment), with_index=True),
            Transformed(train_base, eval_transform(mean, std)),
            Transformed(ArrayDataset(test_x, test_y), eval_transform(mean, std)), info)


def _image_folders(root: Path, size: int, crop_scale: Optional[tuple[float, float]], aug: str,
                   rand_augment: tuple[int, int]) -> tuple[Transformed, Transformed, Transformed, DatasetInfo]:
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise FileNotFoundError(f"{root}: an image folder needs train/ and val/ (or test/)")
    train_base, test_base = datasets.ImageFolder(root / "train"), datasets.ImageFolder(test_dir)
    if train_base.classes != test_base.classes:
        raise ValueError(f"{root}: train/ and {test_dir.name}/ hold different class folders")
    info = DatasetInfo("imagefolder", len(train_base.classes), 3, size, size <= 64,
                       IMAGENET_MEAN, IMAGENET_STD, tuple(train_base.classes))
    augment = pretrain_transform(size, 3, IMAGENET_MEAN, IMAGENET_STD, crop_scale=crop_scale,
                                 aug=aug, rand_augment=rand_augment)
    evaluate = eval_transform(IMAGENET_MEAN, IMAGENET_STD, size)
    return (Transformed(train_base, TwoCrops(augment), with_index=True),
            Transformed(train_base, evaluate), Transformed(test_base, evaluate), info)
