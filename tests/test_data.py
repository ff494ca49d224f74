import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch

from common import data as cifar
from common.config import UserError
from conftest import TEST_IMAGES, TRAIN_PER_BATCH, crop_offsets, random_images, write_batch


def test_reader_loads_the_official_layout(fake_data):
    d = cifar.load_cifar10(fake_data, allow_download=False)
    assert d.train_images.shape == (5 * TRAIN_PER_BATCH, 3, 32, 32)
    assert d.train_images.dtype == torch.uint8
    assert d.test_images.shape == (TEST_IMAGES, 3, 32, 32)
    assert d.train_labels.dtype == torch.int64 and set(d.train_labels.tolist()) == set(range(10))
    assert d.variant == "unknown"  # neither the official names nor the offline copies'


def test_rows_are_red_green_blue_planes(tmp_path):
    image = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)]).astype(np.uint8)
    write_batch(tmp_path / "b", image[None], [3])
    images, labels, _ = cifar.read_batch(tmp_path / "b")
    assert images[0, :, 5, 7].tolist() == [10, 20, 30] and labels.tolist() == [3]


def test_data_dir_may_name_the_batches_folder_itself(fake_data):
    d = cifar.load_cifar10(fake_data / "cifar-10-batches-py", allow_download=False)
    assert len(d.test_labels) == TEST_IMAGES


OFFICIAL, OTHER = cifar.OFFICIAL_DIGEST, "0" * 64
REAL_NAME = "leptodactylus_pentadactylus_s_000004.png"


@pytest.mark.parametrize("names, counts, digest, variant", [
    (["train_00000.png"], (50000, 10000), OFFICIAL, "exact-offline"),
    ([REAL_NAME], (50000, 10000), OFFICIAL, "official"),
    ([REAL_NAME], (50000, 10000), OTHER, "unknown"),  # official names and sizes, other pictures
    (["train_00000.png"], (50000, 10000), OTHER, "unknown"),
    (["train_00000.png"], (4000, 1000), OTHER, "exact-small"),
    (["train/frog/0000.jpg"], (50000, 10000), OTHER, "jpeg75"),
    ([REAL_NAME], (100, 10), OTHER, "unknown"),
])
def test_only_the_official_content_is_official(names, counts, digest, variant):
    assert cifar.detect_variant(names, *counts, digest) == variant


def test_the_content_digest_sees_every_pixel_and_label(fake_data):
    d = cifar.load_cifar10(fake_data, allow_download=False)
    arrays = [t.numpy().copy() for t in (d.train_images, d.train_labels, d.test_images, d.test_labels)]
    assert cifar.content_digest(*arrays) == d.digest
    for which, index in [(0, (7, 2, 31, 0)), (1, 3), (2, (0, 0, 0, 0)), (3, 49)]:
        changed = [a.copy() for a in arrays]
        changed[which][index] = (changed[which][index] + 1) % 10
        assert cifar.content_digest(*changed) != d.digest



@pytest.mark.parametrize("callable_", [os.system, eval])
def test_pickle_carrying_code_is_refused_and_never_run(tmp_path, callable_):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return callable_, (f"open({str(marker)!r}, 'w')" if callable_ is eval else f"touch {marker}",)

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Payload(), b"labels": [0]}, protocol=2))
    with pytest.raises(UserError, match="data_batch_1: not a CIFAR-10 batch.*refused"):
        cifar.read_batch(path)
    assert not marker.exists()


def test_truncated_file_is_refused_naming_it(tmp_path, fake_data):
    source = (fake_data / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    path = tmp_path / "data_batch_1"
    path.write_bytes(source[: len(source) // 2])
    with pytest.raises(UserError, match="data_batch_1: truncated or corrupt"):
        cifar.read_batch(path)


@pytest.mark.parametrize("data, labels, message", [
    (np.zeros((2, 3000), np.uint8), [0, 1], "must be uint8 images as N x 3072"),
    (np.zeros((2, 3072), np.float32), [0, 1], "must be uint8 images as N x 3072"),
    (np.zeros((2, 32, 3, 32), np.uint8), [0, 1], r"got \(2, 32, 3, 32\)"),
    (np.zeros((2, 3072), np.uint8), [0], "2 images but labels"),
    (np.zeros((2, 3072), np.uint8), [0, 10], "labels must be 0..9"),
    (np.zeros((2, 3072), np.uint8), ["a", "b"], "list of integers"),
])
def test_malformed_batches_are_refused(tmp_path, data, labels, message):
    path = tmp_path / "test_batch"
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"labels": labels}, f, protocol=2)
    with pytest.raises(UserError, match=message):
        cifar.read_batch(path)


def test_missing_file_in_folder_is_named(tmp_path, fake_data):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in cifar.TRAIN_FILES[:3]:
        (folder / name).write_bytes((fake_data / "cifar-10-batches-py" / name).read_bytes())
    with pytest.raises(UserError, match="data_batch_4: missing"):
        cifar.load_cifar10(tmp_path, allow_download=False)


def test_missing_folder_without_download_says_where(tmp_path):
    with pytest.raises(UserError, match=f"no CIFAR-10 at {tmp_path}.*--no-download"):
        cifar.load_cifar10(tmp_path, allow_download=False)


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UserError, match="could not download CIFAR-10") as caught:
        cifar.load_cifar10(tmp_path, allow_download=True)
    assert "\n" not in str(caught.value)


def test_stratified_subset_balances_classes_and_is_seeded():
    labels = torch.arange(1000) % 10
    subset = cifar.stratified_subset(labels, 105, seed=1)
    counts = torch.bincount(labels[subset], minlength=10)
    assert len(subset) == 105 and counts.min() == 10 and counts.max() == 11
    assert torch.equal(subset, cifar.stratified_subset(labels, 105, seed=1))
    assert not torch.equal(subset, cifar.stratified_subset(labels, 105, seed=2))
    with pytest.raises(UserError, match="subset of 2000 images: the 1000 training images hold too few"):
        cifar.stratified_subset(labels, 2000, seed=1)


def test_augment_without_transforms_is_exact_identity():
    images = random_images()
    out = cifar.augment(images, torch.Generator().manual_seed(0), 0, False, 0.0)
    assert torch.equal(out, images.float() / 255)


def test_crop_is_an_integer_shift_with_zero_padding():
    images = random_images()
    out = cifar.augment(images, torch.Generator().manual_seed(0), 4, False, 0.0)
    offsets = crop_offsets(out, torch.nn.functional.pad(images.float() / 255, (4, 4, 4, 4)))
    # each output one of the 81 crops of its own padded source, and not all at the same shift
    assert None not in offsets and len(set(offsets)) > 4


def test_flip_mirrors_about_half_the_images():
    images = random_images(64)
    out = cifar.augment(images, torch.Generator().manual_seed(0), 0, True, 0.0)
    source = images.float() / 255
    flipped = [torch.equal(o, s.flip(-1)) for o, s in zip(out, source)]
    kept = [torch.equal(o, s) for o, s in zip(out, source)]
    assert all(f or k for f, k in zip(flipped, kept)) and 16 < sum(flipped) < 48


def test_rotation_samples_source_pixels_or_black_and_is_seeded():
    images = random_images(8)
    out = cifar.augment(images, torch.Generator().manual_seed(3), 0, False, 20.0)
    source = images.float() / 255
    for o, s in zip(out, source):
        assert set(o.flatten().tolist()) <= set(s.flatten().tolist()) | {0.0}
    assert not torch.equal(out, source)
    again = cifar.augment(images, torch.Generator().manual_seed(3), 0, False, 20.0)
    assert torch.equal(out, again)


def test_normalize_uses_the_given_statistics():
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = cifar.normalize(images, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert out[0, :, 0, 0].tolist() == [2.0, 1.0, 0.5]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickles_of_any_protocol_are_read(tmp_path, protocol):
    data = np.arange(2 * 3072, dtype=np.uint64).astype(np.uint8).reshape(2, 3072)
    with open(tmp_path / "b", "wb") as f:
        pickle.dump({b"data": data, b"labels": [1, 2], b"filenames": [b"x.png", b"y.png"]}, f,
                    protocol=protocol)
    images, labels, names = cifar.read_batch(tmp_path / "b")
    assert np.array_equal(images.reshape(2, 3072), data) and labels.tolist() == [1, 2]
    assert names == ["x.png", "y.png"]


def test_the_python2_layout_of_the_official_files_is_read(tmp_path):
    """The opcodes Python 2's cPickle wrote: BINSTRING bytes and numpy.core.multiarray names."""
    body = np.full(3072, 7, np.uint8).tobytes()
    dtype = b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R(K\x01(K\x01M\x00\x0ct"
             + dtype + b"\x89T\x00\x0c\x00\x00" + body + b"tb")
    raw = b"\x80\x02}(U\x04data" + array + b"U\x06labels]K\x05au."
    (tmp_path / "b").write_bytes(raw)
    images, labels, _ = cifar.read_batch(tmp_path / "b")
    assert images.shape == (1, 3, 32, 32) and int(images.max()) == 7 and labels.tolist() == [5]
