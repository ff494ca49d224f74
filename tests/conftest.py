import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TRAIN_PER_BATCH, TEST_IMAGES = 40, 50


def write_batch(path, data, labels, filenames=None):
    """A batch file in the official layout: a protocol-2 pickle of a dict with bytes keys."""
    filenames = filenames or [f"img_{i}.png" for i in range(len(labels))]
    batch = {b"batch_label": b"test batch", b"labels": [int(y) for y in labels], b"data": data,
             b"filenames": [f.encode() for f in filenames]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def write_fake_cifar(root, seed=0):
    """A tiny CIFAR-10 (200 training, 50 test images) in cifar-10-batches-py/, every class present.
    Each class has its own mean colour, so a model can learn something from it."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"

    def images(labels):
        base = (labels[:, None] * 25).astype(np.int64)
        return np.clip(base + rng.integers(0, 30, (len(labels), 3072)), 0, 255).astype(np.uint8)

    for b in range(1, 6):
        labels = np.arange(TRAIN_PER_BATCH) % 10
        rng.shuffle(labels)
        write_batch(folder / f"data_batch_{b}", images(labels), labels)
    labels = np.arange(TEST_IMAGES) % 10
    write_batch(folder / "test_batch", images(labels), labels)
    return Path(root)


def random_images(n=16, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def crop_offsets(crops, padded):
    """For each crop, the (y, x) at which it lies in its own padded source, or None."""
    size, room = crops.shape[-1], padded.shape[-1] - crops.shape[-1] + 1
    return [next(((y, x) for y in range(room) for x in range(room)
                  if torch.equal(crop, source[:, y:y + size, x:x + size])), None)
            for crop, source in zip(crops, padded)]


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory):
    return write_fake_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.fixture
def tiny(fake_data):
    """Overrides that make any experiment a CPU run of seconds on the fake data."""
    return dict(data_dir=str(fake_data), download=False, device="cpu", batch_size=64)


def wait_for_epochs(folder, epochs, process, timeout=120):
    """Return once `folder`'s run.json counts `epochs` finished epochs; fail if `process` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads((folder / "run.json").read_text())["epochs_done"] >= epochs:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no {epochs} epoch(s) in {folder}: {process.poll()}")
