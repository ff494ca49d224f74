"""Classify any image set with trained runs: an `ID,Labels` CSV (the course's Kaggle format).

The architecture and normalisation come from each run's run.json and the weights from its
model.pt, so any registered experiment predicts without a code edit. Several run folders make a
seed ensemble (their softmax outputs are averaged); `tta` averages each model's logits over the
views of data.tta_views. Input with labels (a test batch) also reports accuracy.
"""
import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import data as cifar
from .config import Config, UserError, one_line
from .history import RUN_FILE, WEIGHTS_FILE, RunFolderError, read_run_info, seed_folders, write_atomic
from .models import build_model, model_options
from .devices import autocast_for, prepare, resolve_device
from .training import batched_logits

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, 3, 32, 32)
    ids: list
    labels: Optional[torch.Tensor]  # int64 (N,) where the input has them


@dataclass
class Predictions:
    ids: list
    probabilities: torch.Tensor  # (N, 10), averaged over the runs
    images: torch.Tensor
    true_labels: Optional[torch.Tensor]

    @property
    def labels(self):
        return self.probabilities.argmax(1)

    @property
    def accuracy(self):
        if self.true_labels is None:
            return None
        return (self.labels == self.true_labels).sum().item() / len(self.ids)

    def histogram(self):
        counts = torch.bincount(self.labels, minlength=len(cifar.CLASSES)).tolist()
        return dict(zip(cifar.CLASSES, counts))

    def summary(self):
        lines = [f"{len(self.ids)} images; predicted classes:"]
        lines += [f"  {name:10} {count:6}" for name, count in self.histogram().items()]
        if self.true_labels is not None:
            correct = (self.labels == self.true_labels).sum().item()
            lines.append(f"accuracy {100 * self.accuracy:.2f}% ({correct}/{len(self.ids)})")
        return "\n".join(lines)


def read_pickled_images(path):
    """A CIFAR-style pickle: b'data' in any layout data.images_from_array knows, optional b'ids'
    (else 0..N-1) and optional b'labels'. A whole batch file (data_batch_N, test_batch) works too."""
    content = cifar.unpickle(path, what="a pickle of CIFAR-style images")
    if not isinstance(content, dict) or b"data" not in content:
        raise UserError(f"{path}: expected a dict with b'data' (and optionally b'ids', b'labels')")
    images = cifar.images_from_array(path, content[b"data"])
    if not len(images):
        raise UserError(f"{path}: holds no images")
    try:
        ids = [i.item() if isinstance(i, np.generic) else i for i in content.get(b"ids", range(len(images)))]
    except TypeError:
        raise UserError(f"{path}: b'ids' must be a list of ids") from None
    ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
    if len(ids) != len(images):
        raise UserError(f"{path}: {len(images)} images but {len(ids)} ids")
    labels = content.get(b"labels")
    if labels is not None:
        labels = torch.from_numpy(cifar.checked_labels(path, labels, len(images)))
    return ImageSet(torch.from_numpy(images), ids, labels)


def read_image_folder(folder):
    """PNG/JPEG files sorted by name (numerically where all names are numbers); id = file stem.
    Images that are not 32x32 are resized, with a warning."""
    from PIL import Image, UnidentifiedImageError
    files = [p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise UserError(f"{folder}: no .png or .jpg images in it")
    numeric = all(p.stem.isdigit() for p in files)
    files.sort(key=lambda p: (int(p.stem), p.name) if numeric else (0, p.name))
    images, resized = [], 0
    for path in files:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (32, 32):
                    im, resized = im.resize((32, 32), Image.BILINEAR), resized + 1
                images.append(np.asarray(im).transpose(2, 0, 1))
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"{path}: not a readable image ({e})") from None
    if resized:
        print(f"warning: {resized} of {len(files)} images were not 32x32 and were resized")
    ids = [int(p.stem) if numeric else p.stem for p in files]
    return ImageSet(torch.from_numpy(np.stack(images)), ids, None)


def read_images(path):
    path = Path(path)
    if path.is_dir():
        return read_image_folder(path)
    return read_pickled_images(path)


def load_trained_model(run_dir, device):
    """A run folder's final model, built from its run.json and loaded with weights_only=True.
    It returns logits even where the run trained with a softmax output (res_block)."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file() and (seeds := seed_folders(run_dir)):
        raise UserError(f"{run_dir} holds a multi-seed group, not a run: pass its seed folders for their "
                        f"ensemble ({' '.join(str(f) for f in seeds)}), or one of them")
    try:
        info = read_run_info(run_dir)
    except RunFolderError as e:
        raise UserError(str(e)) from None
    if "config" not in info:
        raise UserError(f"{run_dir}: no run.json with a config; is it a run folder?")
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in info["config"].items()}
    config = Config().replace(**saved)
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{run_dir}: no {WEIGHTS_FILE}; runs save it when they finish")
    model = build_model(config.architecture, **{**model_options(config), "softmax_output": False})
    try:
        model.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
    except Exception as e:  # truncated, tampered or foreign files fail in many ways; all mean the same
        raise UserError(f"{weights}: not loadable weights of {config.architecture} "
                        f"({one_line(e)})") from None
    return prepare(model.to(device), config), config


def predict(run_dirs, images, out=None, probs=None, tta=False, device="auto"):
    """Predict the classes of `images` (a pickle, a batch file or a folder) with the runs in
    `run_dirs`; write `ID,Labels` rows to `out` (and class probabilities to `probs`) when given."""
    run_dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    if not run_dirs:
        raise UserError("give at least one run folder")
    device = resolve_device(device)
    image_set = read_images(images)
    on_device = image_set.images.to(device)
    probabilities = torch.zeros(len(image_set.ids), len(cifar.CLASSES))
    for run_dir in run_dirs:
        model, config = load_trained_model(run_dir, device)
        logits = batched_logits(model, on_device, config, autocast_for(device, config), tta=tta)
        probabilities += logits.softmax(1).cpu() / len(run_dirs)
    result = Predictions(image_set.ids, probabilities, image_set.images, image_set.labels)
    if out is not None:
        write_csv(out, ["ID", "Labels"], zip(result.ids, result.labels.tolist()))
    if probs is not None:
        write_csv(probs, ["ID", *cifar.CLASSES],
                  ([i, *(f"{p:.6f}" for p in row)] for i, row in zip(result.ids, probabilities.tolist())))
    return result


def write_csv(path, header, rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


def show_predictions(result, count=16, columns=8):
    """A grid of the first `count` images with their predicted (and true) classes."""
    import matplotlib.pyplot as plt
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:min(count, len(result.ids))]):
        ax.imshow(result.images[i].permute(1, 2, 0).numpy())
        title = cifar.CLASSES[result.labels[i]]
        if result.true_labels is not None and result.true_labels[i] != result.labels[i]:
            title += f"\n(true: {cifar.CLASSES[result.true_labels[i]]})"
        ax.set_title(f"{result.ids[i]}: {title}", fontsize=8)
    fig.tight_layout()
    return fig
