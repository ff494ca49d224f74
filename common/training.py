"""One training loop for every experiment: `train(name, **overrides)` runs it and writes its folder.

Follow a run top to bottom: `train` resolves the config and device; `start_run` loads the data onto
the device and builds the model, optimiser and random generators (or restores them from a
checkpoint); `run_epochs` then, epoch by epoch, steps through a permutation of the training set
(`train_one_epoch`: augment, forward, backward, step) and `finish_epoch` evaluates on the test set
and rewrites the history files, run.json and checkpoint.
"""
import contextlib
import datetime
import math
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import data as cifar
from .config import Config, UserError
from .distributed import Cluster
from .experiments import REPO_ROOT, Experiment, get_experiment
from .history import (CHECKPOINT_FILE, HISTORY_FILES, WEIGHTS_FILE, RunFolderError, load_checkpoint,
                      read_run_info, run_lock, save_tensors, write_history, write_run_info)
from .models import count_parameters, model_from_config, model_options, multiply_adds

EVAL_BATCH_SIZE = 500

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


def train(experiment, out_dir=None, overwrite=False, resume=False, **overrides):
    """Train a registered experiment; `overrides` are Config fields (epochs=1, subset=500, ...).
    Writes the history files, run.json and checkpoint.pt into `out_dir` (default: the
    experiment's folder) after every epoch, model.pt at the end, and returns the Run. `resume`
    continues from the folder's checkpoint exactly where it stopped. Under torchrun, trains
    data-parallel and only rank 0 writes."""
    exp = get_experiment(experiment)
    config = exp.config.replace(**{k: v for k, v in overrides.items() if v is not None})
    folder = Path(out_dir) if out_dir is not None else exp.folder
    device = resolve_device(config.device)
    cluster = Cluster.from_environment(device.type)
    device = cluster.device(device)
    try:
        with run_lock(folder) if cluster.is_main else contextlib.nullcontext():
            return run_epochs(start_run(exp, config, folder, device, cluster, overwrite, resume))
    finally:
        cluster.close()


@dataclass
class TrainingRun:
    """Everything a run holds while it trains; a checkpoint is a snapshot of it."""
    exp: Experiment
    config: Config
    folder: Path
    cluster: Cluster
    model: torch.nn.Module  # the plain model: evaluated and saved
    train_model: torch.nn.Module  # the one stepped: the model, or its DistributedDataParallel
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    generators: dict  # "shuffle": the same on every rank; "augment": this rank's own
    data: cifar.Cifar10
    history: dict
    info: dict
    position: dict

    def write_files(self):
        if self.cluster.is_main:
            write_history(self.folder, self.history)
            write_run_info(self.folder, self.info)

    def save_checkpoint(self):
        if self.cluster.is_main:
            save_tensors(self.folder / CHECKPOINT_FILE, {
                "config": self.config.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "rng": rng_states(self.generators), "position": dict(self.position),
                "history": self.history, "info": self.info})

    def restore(self, checkpoint):
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.schedule.load_state_dict(checkpoint["schedule"])
        restore_rng_states(checkpoint["rng"], self.generators)
        device = self.data.train_images.device
        self.position = {k: v.to(device) if torch.is_tensor(v) else v
                         for k, v in checkpoint["position"].items()}
        self.history, self.info = checkpoint["history"], checkpoint["info"]
        self.info.update(status="running", git=git_commit())
        self.info["resumed"].append(now())


def start_run(exp, config, folder, device, cluster, overwrite, resume):
    """Load the data, build model, optimiser and generators, and either start afresh or restore
    the folder's checkpoint."""
    checkpoint = load_checkpoint(folder) if resume else None
    if checkpoint is not None:
        refuse_other_config(checkpoint["config"], config)
    data = cifar.load_cifar10(config.data_dir, allow_download=config.download)
    full_budget = (config.subset is None and config.epochs >= exp.config.epochs
                   and data.variant in cifar.FULL_VARIANTS)
    if checkpoint is None:
        refuse_to_replace_full_run(folder, full_budget, overwrite)
    if config.subset is not None:
        data = data.select_train(cifar.stratified_subset(data.train_labels, config.subset, config.seed))
    data = data.to(device)

    torch.manual_seed(config.seed)
    model = model_from_config(config).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    train_model, model = cluster.wrap(model, config.sync_batchnorm)
    optimizer = make_optimizer(model, config)
    run = TrainingRun(exp, config, folder, cluster, model, train_model, optimizer,
                      make_schedule(optimizer, config), make_generators(config.seed, cluster.rank, device),
                      data, {key: [] for key in HISTORY_FILES}, {}, epoch_start_position(0))
    if checkpoint is None:
        run.info = describe_run(run, device, full_budget)
    else:
        run.restore(checkpoint)
    run.write_files()
    return run


def make_generators(seed, rank, device):
    """The shuffle stream, shared by all ranks, and an augmentation stream of this rank's own;
    SeedSequence makes the two independent even though both derive from one seed."""
    augment_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    return {"shuffle": torch.Generator(device=device).manual_seed(seed),
            "augment": torch.Generator(device=device).manual_seed(augment_seed)}


def run_epochs(run):
    """Train from the run's position to its last epoch; after each, evaluate, then save the
    checkpoint, history and run.json. SIGINT/SIGTERM end the current step, save a checkpoint,
    and stop the run with RunInterrupted."""
    config, info, position = run.config, run.info, run.position
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.data.train_images.is_cuda)
    steps_per_epoch = math.ceil(len(run.data.train_labels) / config.batch_size)
    progress = tqdm(total=config.epochs * steps_per_epoch,
                    initial=position["epoch"] * steps_per_epoch + position["step"], desc=run.exp.name,
                    unit="step", dynamic_ncols=True, mininterval=1.0, file=sys.stderr,
                    disable=not run.cluster.is_main)
    session_start = time.perf_counter() - info["wall_seconds"]
    try:
        with StopSignals() as stop:
            while position["epoch"] < config.epochs:
                epoch_start = time.perf_counter() - position["seconds"]
                finished = train_one_epoch(run, autocast, progress, stop)
                position["seconds"] = time.perf_counter() - epoch_start
                if not finished:
                    info["status"] = "interrupted"
                    run.save_checkpoint()
                    raise RunInterrupted(stop.signal, f"stopped by {stop.signal.name} at epoch "
                                         f"{position['epoch'] + 1}, step {position['step']}; checkpoint "
                                         f"saved; resume with: python -m common train {run.exp.name} "
                                         f"--out {run.folder} --resume")
                finish_epoch(run, autocast, epoch_start, session_start, progress)
    except BaseException as e:
        if info["status"] == "running":
            info["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        raise
    else:
        info["status"] = "complete"
        if run.cluster.is_main:
            save_tensors(run.folder / WEIGHTS_FILE, run.model.state_dict())
    finally:
        progress.close()
        info["finished"] = now()
        info["wall_seconds"] = round(time.perf_counter() - session_start, 3)
        run.write_files()
    result = Run(config, run.folder, run.history, info)
    if run.cluster.is_main:
        print(result.summary())
    return result


def finish_epoch(run, autocast, epoch_start, session_start, progress):
    """Sum the epoch's training figures over ranks, evaluate, and record it all."""
    position, info, history = run.position, run.info, run.history
    train_seconds = position["seconds"]
    seen = run.cluster.sum(torch.tensor([position["seen"]], device=position["loss_sum"].device))
    train_loss = run.cluster.sum(position["loss_sum"].clone()).item() / seen.item()
    train_acc = run.cluster.sum(position["correct"].clone()).item() / seen.item()
    test_loss, test_acc = evaluate(run.model, run.data.test_images, run.data.test_labels, run.config,
                                   autocast)
    if not math.isfinite(test_loss):
        raise TrainingError(f"test loss became {test_loss} in epoch {position['epoch'] + 1}; "
                            f"{run.folder} keeps the {position['epoch']} epoch(s) before")
    run.schedule.step()
    for key, value in zip(HISTORY_FILES, (train_loss, train_acc, test_loss, test_acc)):
        history[key].append(value)
    info["epochs_done"] = len(history["test_acc"])
    info["epoch_seconds"].append(round(time.perf_counter() - epoch_start, 3))
    info["train_images_per_second"].append(round(len(run.data.train_labels) / train_seconds, 1))
    info["wall_seconds"] = round(time.perf_counter() - session_start, 3)
    position.update(epoch_start_position(position["epoch"] + 1))
    run.save_checkpoint()
    run.write_files()
    progress.set_postfix_str(f"test acc {100 * test_acc:.2f}%", refresh=False)
    if run.cluster.is_main:
        progress.write(f"{run.exp.name} epoch {info['epochs_done']}/{run.config.epochs}: train loss "
                       f"{train_loss:.4f} acc {100 * train_acc:.2f}% | test loss {test_loss:.4f} "
                       f"acc {100 * test_acc:.2f}% | {info['epoch_seconds'][-1]:.1f} s")


def describe_run(run, device, full_budget):
    """run.json at the start of a run: what runs, on what, from which code."""
    config = run.config
    return {
        "experiment": run.exp.name,
        "config": config.to_dict(),
        "seed": config.seed,
        "model": model_options(config),
        "trainable_parameters": count_parameters(run.model),
        "multiply_adds_per_image": multiply_adds(run.model),
        "budget": "full" if full_budget else "smoke",
        "data": {"folder": str(run.data.folder), "variant": run.data.variant,
                 "train_images": len(run.data.train_labels), "test_images": len(run.data.test_labels)},
        "device": {"type": device.type, "name": device_name(device)},
        "world_size": run.cluster.world_size,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "git": git_commit(),
        "started": now(),
        "resumed": [],
        "finished": None,
        "status": "running",
        "planned_epochs": config.epochs,
        "epochs_done": 0,
        "epoch_seconds": [],
        "train_images_per_second": [],
        "wall_seconds": 0.0,
    }


def epoch_start_position(epoch):
    """Where a run stands: the next epoch and step, that epoch's permutation (drawn at its first
    step) and running sums, and the seconds spent in it so far. Checkpoints save it whole, so a
    run stopped mid-epoch resumes at the very next step."""
    return {"epoch": epoch, "step": 0, "order": None, "loss_sum": None, "correct": None, "seen": 0,
            "seconds": 0.0, "first_bad_step": None}


def train_one_epoch(run, autocast, progress, stop):
    """Steps from the run's position to the end of its epoch, updating the position after each;
    returns False if a stop was requested first. Loss and accuracy are summed per image on the
    device and read back only when the progress bar redraws, so the GPU never waits on the CPU."""
    config, position, generators = run.config, run.position, run.generators
    images, labels = run.data.train_images, run.data.train_labels
    device = images.device
    run.train_model.train()
    if position["order"] is None:
        position.update(order=torch.randperm(len(labels), generator=generators["shuffle"], device=device),
                        loss_sum=torch.zeros((), device=device),
                        correct=torch.zeros((), device=device, dtype=torch.long),
                        first_bad_step=torch.full((), -1, device=device))
    order, steps = position["order"], math.ceil(len(labels) / config.batch_size)
    last_report = time.monotonic()
    for step in range(position["step"], steps):
        if run.cluster.any(stop.signal is not None):
            return False
        index = run.cluster.shard(order[step * config.batch_size:(step + 1) * config.batch_size])
        x = cifar.augment(images[index], generators["augment"], config.crop_padding, config.flip,
                          config.rotation_degrees)
        x = prepare(cifar.normalize(x, config.mean, config.std))
        y = labels[index]
        with autocast:
            output = run.train_model(x)
            loss = F.cross_entropy(output.float(), y)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        loss = loss.detach()
        position["first_bad_step"] = torch.where((position["first_bad_step"] < 0) & ~loss.isfinite(),
                                                 step, position["first_bad_step"])
        position["loss_sum"] += loss * len(index)
        position["correct"] += (output.detach().argmax(1) == y).sum()
        position["seen"] += len(index)
        position["step"] = step + 1
        progress.update(1)
        if time.monotonic() - last_report > 1.0 or step + 1 == steps:
            last_report = time.monotonic()
            report_progress(progress, position)
    return not run.cluster.any(stop.signal is not None)


def report_progress(progress, position):
    bad = position["first_bad_step"].item()
    if bad >= 0:
        raise TrainingError(f"training loss became non-finite in epoch {position['epoch'] + 1}, step "
                            f"{bad + 1}; the run folder keeps the {position['epoch']} finished "
                            f"epoch(s) and their checkpoint")
    progress.set_postfix_str(f"epoch {position['epoch'] + 1} loss "
                             f"{position['loss_sum'].item() / position['seen']:.4f} acc "
                             f"{100 * position['correct'].item() / position['seen']:.2f}%", refresh=False)


class RunInterrupted(UserError):
    """A run stopped by a signal after saving its checkpoint; exits with 128 + the signal number."""

    def __init__(self, signal_number, message):
        super().__init__(message)
        self.exit_code = 128 + int(signal_number)


class StopSignals:
    """While active, SIGINT and SIGTERM only set `signal`: the loop finishes its step, saves and
    stops, instead of dying mid-write. Signals can only be caught in the main thread; elsewhere
    this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signal, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self.previous[number] = signal.signal(number, self.request)
        return self

    def request(self, number, frame):
        self.signal = signal.Signals(number)

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def rng_states(generators):
    """Every random state a run touches: its data generators, torch's CPU and CUDA generators
    (dropout, initialisation), and Python's and NumPy's for completeness. NumPy's array becomes a
    list so that the checkpoint loads with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {**{name: g.get_state() for name, g in generators.items()},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}


def restore_rng_states(states, generators):
    for name, generator in generators.items():
        generator.set_state(states[name])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in states["python"]))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# Where a run's data and device may differ between its start and its resume.
LOCATION_SETTINGS = {"data_dir", "download", "device"}


def refuse_other_config(saved, config):
    current = config.to_dict()
    differing = sorted(k for k in set(saved) | set(current)
                       if k not in LOCATION_SETTINGS and normalise(saved.get(k)) != normalise(current.get(k)))
    if differing:
        raise UserError(f"the checkpoint was made with other settings ({', '.join(differing)}); "
                        f"resume with the same ones, or start afresh in another --out")


def normalise(value):
    return list(value) if isinstance(value, tuple) else value


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
