"""CIFAR-10: a safe reader for the official python layout, and batched augmentation on the device.

The whole dataset lives on the training device as uint8 (184 MB); every batch is augmented there in
a few batched tensor operations (one `grid_sample` for crop, flip and rotation where there is a
rotation), so no per-image PIL pipeline and no DataLoader workers feed the model.
"""
import dataclasses
import functools
import hashlib
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import UserError
from .experiments import REPO_ROOT

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_DATA_DIR = REPO_ROOT / "data"
OFFLINE_HINT = ("extract cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
                "there, or pass --data-dir (the README's Data section has offline options)")

try:  # numpy 2 moved the modules the official pickles name; both names resolve to the same functions
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer


class RefusedPickle(pickle.UnpicklingError):
    """The file asks to call something a CIFAR-10 batch never needs."""


def _latin1_bytes(text, encoding="latin1"):
    """What Python 3 pickles at protocol 2 call to make bytes; only the latin1 form is allowed."""
    if encoding != "latin1":
        raise RefusedPickle(f"refused to decode bytes with {encoding!r}")
    return text.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10 batches contain: dicts, lists, bytes, ints and numpy arrays,
    as written by Python 2 (the official files) or Python 3 at any protocol. Any other global
    (os.system, builtins.eval, ...) is refused before it can be called."""

    ALLOWED = {
        **{(f"numpy.{core}.multiarray", "_reconstruct"): _reconstruct for core in ("core", "_core")},
        **{(f"numpy.{core}.numeric", "_frombuffer"): _frombuffer for core in ("core", "_core")},
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_bytes,
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise RefusedPickle(f"refused to load {module}.{name}, which CIFAR-10 never uses")
        return self.ALLOWED[(module, name)]


def unpickle(path, what="a CIFAR-10 batch"):
    """A pickle file read with the allow-listed unpickler; every failure is one UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing")
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="bytes").load()
    except RefusedPickle as e:
        raise UserError(f"{path}: not {what}: {e}; nothing in it was run") from None
    except Exception as e:  # truncated or garbled files raise EOFError, ValueError, KeyError, ...
        raise UserError(f"{path}: truncated or corrupt ({type(e).__name__}: {e})") from None


def images_from_array(path, data):
    """uint8 images as (N, 3, 32, 32) from the layouts CIFAR-10 files come in: rows of 3072
    (the official R, G, B planes), N x 32 x 32 x 3 (height, width, channel) or N x 3 x 32 x 32."""
    if isinstance(data, np.ndarray) and data.dtype == np.uint8:
        if data.ndim == 2 and data.shape[1] == 3072:
            return data.reshape(-1, 3, 32, 32)
        if data.ndim == 4 and data.shape[1:] == (32, 32, 3):
            return np.ascontiguousarray(data.transpose(0, 3, 1, 2))
        if data.ndim == 4 and data.shape[1:] == (3, 32, 32):
            return data
    raise UserError(f"{path}: b'data' must be uint8 images as N x 3072 (R, G, B planes), "
                    f"N x 32 x 32 x 3 or N x 3 x 32 x 32; got {getattr(data, 'shape', None)} "
                    f"{getattr(data, 'dtype', type(data).__name__)}")


def checked_labels(path, labels, count):
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise UserError(f"{path}: b'labels' must be a list of integers") from None
    if labels.shape != (count,):
        raise UserError(f"{path}: {count} images but labels of shape {labels.shape}")
    if count and (labels.min() < 0 or labels.max() > 9):
        raise UserError(f"{path}: labels must be 0..9, found {labels.min()}..{labels.max()}")
    return labels


def read_batch(path):
    """One batch file -> (images uint8 (N, 3, 32, 32), labels int64 (N,), filenames list[str])."""
    batch = unpickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise UserError(f"{path}: not a CIFAR-10 batch (expected a dict with b'data' and b'labels')")
    images = images_from_array(path, batch[b"data"])
    labels = checked_labels(path, batch[b"labels"], len(images))
    filenames = [f.decode(errors="replace") if isinstance(f, bytes) else str(f)
                 for f in batch.get(b"filenames", [])]
    return images, labels, filenames


FULL_VARIANTS = ("official", "exact-offline", "jpeg75")  # all 60,000 images: a run on them is a result


# sha256 of the official CIFAR-10 pixels and labels as load_cifar10 reads them (content_digest).
# The offline copy's build checks its pixels against the official md5 sums, so it has this
# digest too, and is told apart by the placeholder file names it writes.
OFFICIAL_DIGEST = "9048fcbac9c08a64d57a7c5a5a66750a974ad4eab380914df129f7e223d823df"


def content_digest(*arrays):
    """sha256 over the arrays' bytes (images uint8, labels little-endian int64), in order."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
    return digest.hexdigest()


def detect_variant(train_filenames, n_train, n_test, digest):
    """Which copy of CIFAR-10 a folder holds. Only the official pixels and labels make "official"
    or "exact-offline", whatever the files are called; other content in the same layout is
    "unknown" and never a result. The lossy JPEG copy and the small subset are told by their
    file names and row counts."""
    first = train_filenames[0] if train_filenames else ""
    placeholders = first.startswith("train_")  # written by shared/data/cifar10/build.py
    if digest == OFFICIAL_DIGEST:
        return "exact-offline" if placeholders else "official"
    if placeholders and (n_train, n_test) == (4000, 1000):
        return "exact-small"
    if first.endswith(".jpg") and (n_train, n_test) == (50000, 10000):
        return "jpeg75"
    return "unknown"


def same_images(recorded, data):
    """Whether a run's recorded data (run.json's "data") are `data`'s images: told by their sha256,
    or, for a run recorded before the digest, by the variant (the official pixels under either name)."""
    if "sha256" in recorded:
        return recorded["sha256"] == data.digest
    official = ("official", "exact-offline")
    return recorded.get("variant") == data.variant or (recorded.get("variant") in official and data.variant in official)


@dataclass
class Cifar10:
    train_images: torch.Tensor  # uint8 (N, 3, 32, 32)
    train_labels: torch.Tensor  # int64 (N,)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    folder: Path
    variant: str
    digest: str  # content_digest of the folder as read: which images and labels these are

    def select_train(self, index):
        return dataclasses.replace(self, train_images=self.train_images[index],
                                   train_labels=self.train_labels[index])

    def to(self, device):
        return dataclasses.replace(self, **{name: getattr(self, name).to(device) for name in
                                            ("train_images", "train_labels", "test_images", "test_labels")})


def batches_folder(data_dir):
    data_dir = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR).expanduser()
    return data_dir if data_dir.name == FOLDER else data_dir / FOLDER


def download(folder):
    """Fetch the official archive through torchvision into the folder's parent."""
    from torchvision.datasets import CIFAR10
    print(f"downloading CIFAR-10 into {folder.parent} ...")
    try:
        CIFAR10(root=str(folder.parent), train=True, download=True)
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise UserError(f"could not download CIFAR-10 into {folder.parent} "
                        f"({type(e).__name__}: {e}); {OFFLINE_HINT}") from None


def ensure_cifar10(data_dir=None, allow_download=True):
    """The batches folder of `data_dir`, downloaded first where it is missing and allowed."""
    folder = batches_folder(data_dir)
    if not folder.is_dir():
        if not allow_download:
            raise UserError(f"no CIFAR-10 at {folder}; drop --no-download to fetch it, or "
                            f"{OFFLINE_HINT}")
        download(folder)
    return folder


def load_cifar10(data_dir=None, allow_download=True):
    folder = ensure_cifar10(data_dir, allow_download)
    train = [read_batch(folder / name) for name in TRAIN_FILES]
    test_images, test_labels, _ = read_batch(folder / TEST_FILE)
    train_images = np.concatenate([images for images, _, _ in train])
    train_labels = np.concatenate([labels for _, labels, _ in train])
    digest = content_digest(train_images, train_labels, test_images, test_labels)
    variant = detect_variant(train[0][2], len(train_labels), len(test_labels), digest)
    return Cifar10(torch.from_numpy(train_images), torch.from_numpy(train_labels),
                   torch.from_numpy(test_images), torch.from_numpy(test_labels), folder, variant, digest)


def stratified_subset(labels, size, seed, what="subset"):
    """Indices of `size` images with the classes as evenly represented as the labels allow;
    `what` names the option that asked for them in the error where there are too few."""
    generator = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    quota = [size // len(classes) + (i < size % len(classes)) for i in range(len(classes))]
    if any(q > len(idx) for q, idx in zip(quota, per_class)):
        raise UserError(f"{what} of {size} images: the {len(labels)} training images hold too few of some class")
    picked = [idx[torch.randperm(len(idx), generator=generator)[:q]] for q, idx in zip(quota, per_class)]
    return torch.cat(picked).sort().values


def normalize(images, mean, std):
    """uint8 or [0, 1] float images -> normalised float32."""
    images = images.float() / 255 if images.dtype == torch.uint8 else images
    mean, std = channel_constants(tuple(mean), tuple(std), images.device)
    return (images - mean) / std


@functools.lru_cache(maxsize=None)
def channel_constants(mean, std, device):
    """Per-channel mean and std as (1, 3, 1, 1) tensors on `device`, made once: making them anew
    for every batch would copy from host memory, which on a GPU waits for all queued work."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (mean, std))


def augment(images, generator, crop_padding, flip, rotation_degrees, pad_mode="zeros", mirror=None):
    """A batch of uint8 images -> float [0, 1], each with its own random crop (`crop_padding`
    pixels of zeros or reflected image), horizontal flip and rotation (nearest; the corners it
    uncovers filled as the padding is), in the original's order. `mirror`, one bool per image,
    decides the flips instead of the generator (the alternating flip).

    Without rotation it is an integer translation (`translate`). With it, the three are one
    affine map per image, so a single grid_sample does them: rotating the flipped crop samples
    the source at F R^-1 q + t for output position q (F the flip, R the rotation, t the crop
    offset, integer pixels).
    """
    n, device = len(images), images.device
    if not rotation_degrees:
        x = translate(images.float() / 255, generator, crop_padding, pad_mode)
        if mirror is None and flip:
            mirror = torch.rand(n, generator=generator, device=device) < 0.5
        return x if mirror is None else torch.where(mirror.view(-1, 1, 1, 1), x.flip(-1), x)
    size = images.shape[-1]

    def uniform(low, high):
        return torch.rand(n, generator=generator, device=device) * (high - low) + low

    angle = uniform(-rotation_degrees, rotation_degrees) * (math.pi / 180)
    cos, sin = angle.cos(), angle.sin()
    if mirror is None:
        mirror = torch.ones(n, device=device)
        if flip:
            mirror = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -mirror, mirror)
    else:
        mirror = 1 - 2 * mirror.float()
    shift = torch.randint(-crop_padding, crop_padding + 1, (2, n), generator=generator,
                          device=device).float() * (2 / size)
    theta = torch.stack([
        torch.stack([mirror * cos, mirror * sin, shift[0]], 1),
        torch.stack([-sin, cos, shift[1]], 1),
    ], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images.float() / 255, grid, mode="nearest",
                         padding_mode="reflection" if pad_mode == "reflect" else "zeros",
                         align_corners=False)


def translate(x, generator, padding, pad_mode="zeros"):
    """Each image of a float batch shifted by its own random whole number of pixels in
    [-padding, padding] along each axis: a random crop of the padded image."""
    if not padding:
        return x
    n, size, device = len(x), x.shape[-1], x.device
    padded = F.pad(x, (padding,) * 4, mode="reflect" if pad_mode == "reflect" else "constant")
    dy, dx = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=generator, device=device)
    span = torch.arange(size, device=device)
    rows, cols = (dy + span)[:, None, :, None], (dx + span)[:, None, None, :]
    return padded[torch.arange(n, device=device)[:, None, None, None],
                  torch.arange(x.shape[1], device=device)[None, :, None, None], rows, cols]


def alternating_mirror(seed, size, device):
    """Per training image, whether it is flipped in even epochs; odd epochs flip the others. Over
    two epochs every image is seen both ways, which random flips only do on average."""
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    return torch.rand(size, generator=generator, device=device) < 0.5


def cutout(x, generator, size):
    """Each image of a normalised batch gets one `size` x `size` square (centre anywhere in the
    image, so it may be clipped at the border) set to 0, the mean colour."""
    n, height, device = len(x), x.shape[-1], x.device
    centre = torch.randint(0, height, (2, n, 1), generator=generator, device=device)
    span = torch.arange(height, device=device)
    start = centre - size // 2
    inside = (span >= start) & (span < start + size)  # (2, n, height)
    square = inside[0][:, :, None] & inside[1][:, None, :]
    return x.masked_fill(square[:, None], 0.0)


def _blend(x, other, factor):
    return (other + factor.view(-1, 1, 1, 1) * (x - other)).clamp(0, 1)


def _grayscale(x):
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _affine(x, matrix):
    grid = F.affine_grid(matrix, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _affine_op(make):
    """An op from a function of the signed magnitude giving the rows of a 2x3 affine matrix."""
    def op(x, m):
        one, zero = torch.ones_like(m), torch.zeros_like(m)
        rows = make(m, one, zero)
        return _affine(x, torch.stack([torch.stack(rows[:3], 1), torch.stack(rows[3:], 1)], 1))
    return op


def _sharpen(x, m):
    # PIL's smoothing kernel, ones with a 5 at the centre over 13: the 3x3 sum plus 4 times the
    # centre, with no kernel tensor to build on the device for every batch.
    box_sum = 9 * F.avg_pool2d(F.pad(x, (1,) * 4, mode="replicate"), 3, stride=1)
    return _blend(x, (box_sum + 4 * x) / 13, 1 + 0.9 * m)


def _posterize(x, m):
    step = 2.0 ** (4 * m.abs()).round().view(-1, 1, 1, 1)  # keep 8 down to 4 bits
    return (x * 255 / step).floor() * step / 255


def _autocontrast(x, m):
    low = x.amin((2, 3), keepdim=True)
    high = x.amax((2, 3), keepdim=True)
    return torch.where(high > low, (x - low) / (high - low).clamp_min(1e-6), x)


# TrivialAugment's ops on float [0, 1] batches; m is each image's signed magnitude in [-1, 1].
# Ranges are those of RandAugment/TrivialAugment (standard, not "wide") for 32x32 images.
POLICY_OPS = {
    "identity": lambda x, m: x,
    "brightness": lambda x, m: _blend(x, torch.zeros_like(x), 1 + 0.9 * m),
    "color": lambda x, m: _blend(x, _grayscale(x), 1 + 0.9 * m),
    "contrast": lambda x, m: _blend(x, _grayscale(x).mean((1, 2, 3), keepdim=True), 1 + 0.9 * m),
    "sharpness": _sharpen,
    "posterize": _posterize,
    "solarize": lambda x, m: torch.where(x >= 1 - m.abs().view(-1, 1, 1, 1), 1 - x, x),
    "autocontrast": _autocontrast,
    "rotate": _affine_op(lambda m, one, zero: (
        torch.cos(m * math.pi / 6), -torch.sin(m * math.pi / 6), zero,
        torch.sin(m * math.pi / 6), torch.cos(m * math.pi / 6), zero)),
    "shear_x": _affine_op(lambda m, one, zero: (one, 0.3 * m, zero, zero, one, zero)),
    "shear_y": _affine_op(lambda m, one, zero: (one, zero, zero, 0.3 * m, one, zero)),
    "translate_x": _affine_op(lambda m, one, zero: (one, zero, 0.6 * m, zero, one, zero)),
    "translate_y": _affine_op(lambda m, one, zero: (one, zero, zero, zero, one, 0.6 * m)),
}


def trivial_augment(x, generator):
    """TrivialAugment for a float [0, 1] batch: every image gets one op of POLICY_OPS at a
    magnitude drawn uniformly, with a random sign. Each op runs on the whole batch and each image
    keeps its own op's result: more arithmetic than picking each op's images, but no boolean
    indexing, whose unknown result size makes a GPU wait for the CPU (13 times per batch)."""
    n, device = len(x), x.device
    op = torch.randint(0, len(POLICY_OPS), (n,), generator=generator, device=device).view(-1, 1, 1, 1)
    magnitude = torch.rand(n, generator=generator, device=device)
    sign = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0)
    signed = magnitude * sign
    out = x
    for k, apply in enumerate(POLICY_OPS.values()):
        out = torch.where(op == k, apply(x, signed).clamp(0, 1), out)
    return out


# Test-time views and their weights: the image and its mirror count for half, the pair shifted
# one pixel up-left and the pair shifted down-right (reflect padding) for a quarter each.
TTA_SHIFTS = ((0, 0.5), (-1, 0.25), (1, 0.25))


def tta_views(x):
    """(weight, view) pairs for a normalised batch; the weights sum to 1."""
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    size = x.shape[-1]
    views = []
    for d, weight in TTA_SHIFTS:
        shifted = padded[..., 1 + d:1 + d + size, 1 + d:1 + d + size]
        views += [(weight / 2, shifted), (weight / 2, shifted.flip(-1))]
    return views
