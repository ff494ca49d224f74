"""One training loop for every experiment: `train(name, **overrides)` runs it and writes its folder.

Follow a run top to bottom: resolve the config and device, load the data onto the device, build the
model and optimiser, then per epoch: augment and step through a permutation of the training set,
evaluate on the test set, append to the history and rewrite the history files and run.json.
"""
import datetime
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import data as cifar
from .config import Config, UserError
from .experiments import REPO_ROOT, get_experiment
from .history import HISTORY_FILES, RunFolderError, read_run_info, write_history, write_run_info
from .models import count_parameters, model_from_config, model_options, multiply_adds

EVAL_BATCH_SIZE = 500
WEIGHTS_FILE = "model.pt"

OPTIMIZERS = {
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum,
                                             weight_decay=c.weight_decay),
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
    "adadelta": lambda params, c: torch.optim.Adadelta(params, lr=c.lr, weight_decay=c.weight_decay),
    "rmsprop": lambda params, c: torch.optim.RMSprop(params, lr=c.lr, momentum=c.momentum,
                                                     weight_decay=c.weight_decay),
    "adagrad": lambda params, c: torch.optim.Adagrad(params, lr=c.lr, weight_decay=c.weight_decay),
}

SCHEDULES = {
    # multiplier of the base learning rate for epoch e of E (0-based), as CosineAnnealingLR(T_max=E)
    "cosine": lambda e, epochs: 0.5 * (1 + math.cos(math.pi * e / epochs)),
    "constant": lambda e, epochs: 1.0,
}


class TrainingError(UserError):
    """The run cannot go on (for example a non-finite loss); its folder keeps the epochs before."""


def make_optimizer(model, config):
    if config.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {config.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[config.optimizer](model.parameters(), config)


def make_schedule(optimizer, config):
    if config.schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {config.schedule!r}; choose from {', '.join(SCHEDULES)}")
    multiplier = SCHEDULES[config.schedule]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: multiplier(e, config.epochs))


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model}, {torch.get_num_threads()} threads"


def git_commit():
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


@dataclass
class Run:
    """A finished run: its config, folder, history and run.json contents."""
    config: Config
    folder: Path
    history: dict
    info: dict

    def summary(self):
        acc = self.history["test_acc"]
        if not acc:
            return f"{self.info['experiment']}: no finished epoch"
        best = max(range(len(acc)), key=acc.__getitem__)
        return (f"{self.info['experiment']}: final test accuracy {100 * acc[-1]:.2f}% after "
                f"{len(acc)} epoch(s), best {100 * acc[best]:.2f}% at epoch {best + 1}; "
                f"{self.info['data']['variant']} data, {self.info['device']['name']}, "
                f"{self.info['wall_seconds']:.0f} s -> {self.folder}")


def batched_logits(model, images, config, autocast, tta=False):
    """Float logits (N, 10) for uint8 images, in eval mode, EVAL_BATCH_SIZE at a time; with `tta`,
    the mean over the views of data.tta_views."""
    model.eval()
    outputs = []
    with torch.no_grad(), autocast:
        for start in range(0, len(images), EVAL_BATCH_SIZE):
            x = cifar.normalize(images[start:start + EVAL_BATCH_SIZE], config.mean, config.std)
            views = cifar.tta_views(x) if tta else [x]
            outputs.append(torch.stack([model(prepare(v)).float() for v in views]).mean(0))
    return torch.cat(outputs)


def evaluate(model, images, labels, config, autocast):
    """Mean loss and accuracy per image over the whole set (no augmentation)."""
    output = batched_logits(model, images, config, autocast)
    loss = F.cross_entropy(output, labels, reduction="sum").item() / len(images)
    return loss, (output.argmax(1) == labels).sum().item() / len(images)


def prepare(x):
    """Channels-last on CUDA, where cuDNN's convolutions are fastest in that layout."""
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def train(experiment, out_dir=None, overwrite=False, **overrides):
    """Train a registered experiment; `overrides` are Config fields (epochs=1, subset=500, ...).
    Writes the history files and run.json into `out_dir` (default: the experiment's folder)
    after every epoch and returns the Run."""
    exp = get_experiment(experiment)
    config = exp.config.replace(**{k: v for k, v in overrides.items() if v is not None})
    folder = Path(out_dir) if out_dir is not None else exp.folder
    device = resolve_device(config.device)
    data = cifar.load_cifar10(config.data_dir, allow_download=config.download)
    full_budget = (config.subset is None and config.epochs >= exp.config.epochs
                   and data.variant in cifar.FULL_VARIANTS)
    refuse_to_replace_full_run(folder, full_budget, overwrite)

    torch.manual_seed(config.seed)
    model = model_from_config(config).to(device)
    info = {
        "experiment": exp.name,
        "config": config.to_dict(),
        "seed": config.seed,
        "model": model_options(config),
        "trainable_parameters": count_parameters(model),
        "multiply_adds_per_image": multiply_adds(model),
    }
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = make_optimizer(model, config)
    schedule = make_schedule(optimizer, config)

    if config.subset is not None:
        data = data.select_train(cifar.stratified_subset(data.train_labels, config.subset, config.seed))
    data = data.to(device)
    train_images, train_labels = data.train_images, data.train_labels
    test_images, test_labels = data.test_images, data.test_labels
    generator = torch.Generator(device=device).manual_seed(config.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    info.update({
        "budget": "full" if full_budget else "smoke",
        "data": {"folder": str(data.folder), "variant": data.variant,
                 "train_images": len(train_labels), "test_images": len(test_labels)},
        "device": {"type": device.type, "name": device_name(device)},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": git_commit(),
        "started": now(),
        "finished": None,
        "status": "running",
        "planned_epochs": config.epochs,
        "epochs_done": 0,
        "epoch_seconds": [],
        "train_images_per_second": [],
        "wall_seconds": 0.0,
    })
    history = {key: [] for key in HISTORY_FILES}
    write_history(folder, history)
    write_run_info(folder, info)

    steps_per_epoch = math.ceil(len(train_labels) / config.batch_size)
    progress = tqdm(total=config.epochs * steps_per_epoch, desc=exp.name, unit="step",
                    dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    run_start = time.perf_counter()
    try:
        for epoch in range(config.epochs):
            epoch_start = time.perf_counter()
            train_loss, train_acc = train_one_epoch(model, optimizer, train_images, train_labels,
                                                    config, generator, autocast, progress, epoch)
            train_seconds = time.perf_counter() - epoch_start
            test_loss, test_acc = evaluate(model, test_images, test_labels, config, autocast)
            schedule.step()
            if not math.isfinite(test_loss):
                raise TrainingError(f"test loss became {test_loss} in epoch {epoch + 1}; "
                                    f"{folder} keeps the {epoch} epoch(s) before")
            for key, value in zip(HISTORY_FILES, (train_loss, train_acc, test_loss, test_acc)):
                history[key].append(value)
            info["epochs_done"] = epoch + 1
            info["epoch_seconds"].append(round(time.perf_counter() - epoch_start, 3))
            info["train_images_per_second"].append(round(len(train_labels) / train_seconds, 1))
            info["wall_seconds"] = round(time.perf_counter() - run_start, 3)
            write_history(folder, history)
            write_run_info(folder, info)
            progress.set_postfix_str(f"test acc {100 * test_acc:.2f}%", refresh=False)
            progress.write(f"{exp.name} epoch {epoch + 1}/{config.epochs}: train loss {train_loss:.4f} "
                           f"acc {100 * train_acc:.2f}% | test loss {test_loss:.4f} acc "
                           f"{100 * test_acc:.2f}% | {info['epoch_seconds'][-1]:.1f} s")
    except BaseException as e:
        info["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        raise
    else:
        info["status"] = "complete"
    finally:
        progress.close()
        info["finished"] = now()
        write_run_info(folder, info)
    save_weights(model, folder / WEIGHTS_FILE)
    run = Run(config, folder, history, info)
    print(run.summary())
    return run


def train_one_epoch(model, optimizer, images, labels, config, generator, autocast, progress, epoch):
    """One pass over a fresh permutation; loss and accuracy counted per image, kept on the device
    and read back only when the progress bar redraws, so the GPU never waits on the CPU."""
    model.train()
    n = len(labels)
    order = torch.randperm(n, generator=generator, device=images.device)
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    seen, last_report = 0, 0.0
    for step, start in enumerate(range(0, n, config.batch_size)):
        index = order[start:start + config.batch_size]
        x = cifar.augment(images[index], generator, config.crop_padding, config.flip,
                          config.rotation_degrees)
        x = prepare(cifar.normalize(x, config.mean, config.std))
        y = labels[index]
        with autocast:
            output = model(x)
            loss = F.cross_entropy(output.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(index)
        correct += (output.detach().argmax(1) == y).sum()
        seen += len(index)
        progress.update(1)
        if time.monotonic() - last_report > 1.0 or seen == n:
            last_report = time.monotonic()
            mean_loss = loss_sum.item() / seen
            if not math.isfinite(mean_loss):
                raise TrainingError(f"training loss became {mean_loss} in epoch {epoch + 1}, step "
                                    f"{step + 1}; the run folder keeps the {epoch} epoch(s) before")
            progress.set_postfix_str(f"epoch {epoch + 1} loss {mean_loss:.4f} "
                                     f"acc {100 * correct.item() / seen:.2f}%", refresh=False)
    return loss_sum.item() / n, correct.item() / n


def save_weights(model, path):
    """The final weights (a state_dict; load with torch.load(path, weights_only=True)), written
    atomically. They stay out of git: history files and run.json are what the repository keeps."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)


def refuse_to_replace_full_run(folder, full_budget, overwrite):
    """A smoke run must not silently wipe a finished full-budget run's history."""
    try:
        previous = read_run_info(folder)
    except RunFolderError:
        return
    if previous.get("budget") == "full" and previous.get("epochs_done") and not full_budget \
            and not overwrite:
        raise UserError(f"{folder} holds a full-budget run ({previous['epochs_done']} epochs); "
                        f"a smoke run would replace it: pass another --out, or --overwrite")


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
