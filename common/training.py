"""One training loop for every experiment: `train(name, **overrides)` runs it and writes its folder.

Follow a run top to bottom: `train` resolves the config and device; `start_run` loads the data onto
the device and builds the model, optimiser and random generators (or restores them from a
checkpoint); `run_epochs` then, epoch by epoch, steps through a permutation of the training set
(`train_one_epoch`: augment, forward, backward, step) and `finish_epoch` evaluates on the test set
and rewrites the history files, run.json and checkpoint. The optimisers, schedules and weight
averaging it calls are in recipe.py; the device, precision and memory layout in devices.py.
"""
import contextlib
import datetime
import math
import platform
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import data as cifar
from .config import NULLABLE, Config, UserError, differing_settings, train_arguments
from .devices import autocast_for, device_name, loss_scaler, precision, prepare, resolve_device
from .distributed import Cluster
from .experiments import REPO_ROOT, Experiment, get_experiment
from .history import (CHECKPOINT_FILE, SEEDS_FILE, WEIGHTS_FILE, RunFolderError, evaluated_set,
                      final_test_acc, load_checkpoint, read_run_info, remove_run_files, run_lock, save_tensors,
                      write_history, write_run_info, write_seeds_summary)
from .models import (count_parameters, meta_model, model_from_config, model_options, multiply_adds,
                     training_flops)
from .recipe import SCHEDULES, WeightAverage, check_recipe, make_optimizer, make_schedule

EVAL_BATCH_SIZE = 500


class TrainingError(UserError):
    """The run cannot go on (for example a non-finite loss); its folder keeps the epochs before."""


# What a run executes. Uncommitted changes elsewhere (history files, results/bench.md written by
# an earlier run of the same session) do not make the code that measured something "dirty".
CODE_PATHS = ("common", "requirements.txt", "pyproject.toml")


def git_commit():
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


@dataclass
class Run:
    """A finished run: its config, folder, history and run.json contents."""
    config: Config
    folder: Path
    history: dict
    info: dict

    @property
    def final_test_acc(self):
        """The test accuracy the run ends with (history.final_test_acc)."""
        return final_test_acc(self.info, self.history)

    def summary(self):
        evaluated = evaluated_set(self.history)
        acc = self.history[f"{evaluated}_acc"]
        if not acc:
            return f"{self.info['experiment']}: no finished epoch"
        best = max(range(len(acc)), key=acc.__getitem__)
        text = (f"{self.info['experiment']}: final {evaluated} accuracy {100 * acc[-1]:.2f}% after "
                f"{len(acc)} epoch(s), best {100 * acc[best]:.2f}% at epoch {best + 1}")
        final = self.info.get("final_evaluation")
        if final:
            text += (f"; test accuracy {100 * final['test_acc']:.2f}%"
                     f"{' with test-time augmentation' if final['tta'] else ''} ({final['weights']} weights)")
        seen = len(acc) * self.info["data"]["train_images"]
        return (f"{text}; {self.info['training_flops_per_image'] * seen / 1e15:.3f} PFLOP of training; "
                f"{self.info['data']['variant']} data, {self.info['device']['name']}, "
                f"{self.info['wall_seconds']:.0f} s -> {self.folder}")


def batched_logits(model, images, config, autocast, tta=False):
    """Float logits (N, 10) for uint8 images, in eval mode, EVAL_BATCH_SIZE at a time; with `tta`,
    the weighted mean over the views of data.tta_views."""
    model.eval()
    outputs = []
    with torch.no_grad(), autocast:
        for start in range(0, len(images), EVAL_BATCH_SIZE):
            x = cifar.normalize(images[start:start + EVAL_BATCH_SIZE], config.mean, config.std)
            views = cifar.tta_views(x) if tta else [(1.0, x)]
            outputs.append(sum(w * model(prepare(v, config)).float() for w, v in views))
    return torch.cat(outputs)


def evaluate(model, images, labels, config, autocast, tta=False):
    """Mean loss and accuracy per image over the whole set (no augmentation but `tta`'s views)."""
    output = batched_logits(model, images, config, autocast, tta)
    loss = F.cross_entropy(output, labels, reduction="sum").item() / len(images)
    return loss, (output.argmax(1) == labels).sum().item() / len(images)


def same_complete_run(info, config, data):
    """Whether run.json `info` is a complete run of `config`'s settings (where it ran aside) on
    `data`'s images: the same run again, which `study` and `--seeds --resume` keep."""
    return (info.get("status") == "complete" and cifar.same_images(info.get("data", {}), data)
            and not differing_settings(info.get("config", {}), config))


def check_settings(config):
    """Refuse, in milliseconds, a bad model option, an over-budget model, a model a 32x32 image
    does not fit, and a bad optimiser or schedule setting: train, bench and study call it before
    anything slow (the data) starts."""
    meta_model(config)
    check_recipe(config)


def train(experiment, out_dir=None, overwrite=False, resume=False, **overrides):
    """Train a registered experiment; `overrides` are Config fields (epochs=1, subset=500, ...),
    None meaning "not given" for a field that cannot be None (a notebook's epochs=None) and itself
    for one that can (activation=None: the architecture's own). Writes the history files, run.json
    and checkpoint.pt into `out_dir` (default: the experiment's folder) after every epoch, model.pt
    at the end, and returns the Run. `resume` continues from the folder's checkpoint exactly where
    it stopped. Under torchrun, trains data-parallel and only rank 0 writes."""
    exp = get_experiment(experiment)
    config = configured(exp, overrides)
    check_settings(config)
    folder = Path(out_dir) if out_dir is not None else exp.folder
    device = resolve_device(config.device)
    cluster = Cluster.from_environment(device.type)
    device = cluster.device(device)
    try:
        with run_lock(folder) if cluster.is_main else contextlib.nullcontext():
            return run_epochs(start_run(exp, config, folder, device, cluster, overwrite, resume))
    finally:
        cluster.close()


def configured(exp, overrides):
    """The experiment's config with `overrides`, None meaning "not given" but for fields that can
    be None."""
    return exp.config.replace(**{k: v for k, v in overrides.items() if v is not None or k in NULLABLE})


def train_seeds(experiment, seeds, first_seed=0, out_dir=None, resume=False, overwrite=False, **overrides):
    """`train` once per seed first_seed, first_seed + 1, ... into seed<N>/ subfolders of the
    experiment's folder (or `out_dir`), then summarise in seeds.json every complete seed there
    trained with these settings, also by earlier commands (history.write_seeds_summary). With
    `resume`, a complete seed of these settings on these images is kept, a seed with a checkpoint
    continued from it (refused, naming them, where its settings differ) and one without a
    checkpoint started. Returns the runs trained."""
    if seeds < 1:
        raise UserError(f"seeds must be at least 1, got {seeds}")
    exp = get_experiment(experiment)
    config = configured(exp, overrides)
    folder = Path(out_dir) if out_dir is not None else exp.folder
    runs, data = [], None  # the data read here only to tell a complete seed's images from these
    for seed in range(first_seed, first_seed + seeds):
        seed_folder = folder / f"seed{seed}"
        info = read_run_info(seed_folder)
        if resume and info.get("status") == "complete":
            data = data or cifar.load_cifar10(config.data_dir, allow_download=config.download)
            if same_complete_run(info, config.replace(seed=seed), data):
                print(f"{seed_folder}: complete, kept")
                continue
        runs.append(train(experiment, out_dir=seed_folder, seed=seed, overwrite=overwrite,
                          resume=resume and (seed_folder / CHECKPOINT_FILE).is_file(), **overrides))
    summary = write_seeds_summary(folder, config)
    spread = (f"± {100 * summary['std']:.2f} (sample std; seeds {summary['seeds']})" if summary["std"] is not None
              else f"(seed {summary['seeds'][0]} alone: no spread)")
    print(f"{experiment} over {len(summary['seeds'])} seed(s): test accuracy at the end (end-of-run evaluation, "
          f"else last epoch) {100 * summary['mean']:.2f}% {spread} -> {folder / SEEDS_FILE}")
    return runs


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
    data: cifar.Cifar10  # with `val`, its test images are the held-out training images
    test: tuple  # (images, labels) of the test set proper
    history: dict
    info: dict
    position: dict
    average: WeightAverage = None
    mirror: torch.Tensor = None  # alternating flip: which images are flipped in even epochs
    scaler: torch.amp.GradScaler = None  # fp16's loss scaling (devices.loss_scaler)

    @property
    def steps_per_epoch(self):
        return math.ceil(len(self.data.train_labels) / self.config.batch_size)

    @property
    def eval_model(self):
        """The weights evaluated and saved: the average where there is one."""
        return self.average.model if self.average is not None else self.model

    def write_files(self):
        if self.cluster.is_main:
            write_history(self.folder, self.history)
            write_run_info(self.folder, self.info)

    def save_checkpoint(self):
        if self.cluster.is_main:
            save_tensors(self.folder / CHECKPOINT_FILE, {
                "config": self.config.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "average": self.average.model.state_dict() if self.average is not None else None,
                "scaler": self.scaler.state_dict(), "rng": rng_states(self.generators),
                "position": dict(self.position),
                "history": self.history, "info": self.info})

    def interrupted(self, signal_number, where):
        """The RunInterrupted to raise once the checkpoint is saved, saying how to resume."""
        command = shlex.join(["python", "-m", "common", "train", self.exp.name, "--out", str(self.folder),
                              "--resume", *train_arguments(self.exp.config, self.config)])
        return RunInterrupted(signal_number, f"stopped by {signal.Signals(signal_number).name} {where}; "
                              f"checkpoint saved; resume with: {command} (in a notebook: resume = True)")

    def restore(self, checkpoint):
        self.model.load_state_dict(checkpoint["model"])
        if self.average is not None:
            self.average.model.load_state_dict(checkpoint["average"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.schedule.load_state_dict(checkpoint["schedule"])
        if checkpoint.get("scaler"):  # fp16 runs' (checkpoints before fp16 have none)
            self.scaler.load_state_dict(checkpoint["scaler"])
        unfit = restore_rng_states(checkpoint["rng"], self.generators)
        device = self.data.train_images.device
        self.position = {k: v.to(device) if torch.is_tensor(v) else v
                         for k, v in checkpoint["position"].items()}
        self.history, self.info = checkpoint["history"], checkpoint["info"]
        self.info["status"] = "running"
        # info["git"] and info["device"] stay what the run started with; each resume records its own.
        resumed = {"at": now(), "git": git_commit(), "device": device_name(device),
                   "precision": precision(device, self.config),
                   "compile": self.config.compile_mode if self.config.compile else False}
        if unfit:
            # A generator's state cannot move between kinds of device: new streams, drawn from
            # the seed and the position, carry on; the run is then no longer an exact replay.
            at = [self.config.seed, self.cluster.rank, self.position["epoch"], self.position["step"]]
            for i, name in enumerate(unfit):
                self.generators[name].manual_seed(int(np.random.SeedSequence([*at, i]).generate_state(1)[0]))
            resumed["reseeded"] = unfit
            print(f"note: the checkpoint's {' and '.join(unfit)} random streams belong to another kind of "
                  f"device; new ones carry on from here, so this run will not be bit-identical to an "
                  f"uninterrupted one", file=sys.stderr)
        self.info["resumed"].append(resumed)


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
        refuse_to_replace(folder, config, full_budget, overwrite)
    elif checkpoint["info"]["data"].get("sha256", data.digest) != data.digest:
        trained_on = checkpoint["info"]["data"]
        raise UserError(f"{config.data_dir or 'the data folder'} holds other images than the run trained on "
                        f"({trained_on['variant']} data in {trained_on['folder']}); resume with the same data")
    if config.subset is not None:
        data = data.select_train(cifar.stratified_subset(data.train_labels, config.subset, config.seed))
    test = (data.test_images.to(device), data.test_labels.to(device))
    if config.val:
        data = hold_out(data, config.val, config.seed)
    last_batch = len(data.train_labels) % config.batch_size
    if 0 < last_batch < cluster.world_size:  # a rank with no image would step on a NaN loss
        raise UserError(f"each epoch's last batch holds {last_batch} image(s), fewer than the "
                        f"{cluster.world_size} processes; change the batch size (or subset, or val)")
    data = data.to(device)

    torch.manual_seed(config.seed)
    model = model_from_config(config).to(device)
    if hasattr(model, "fit_to_images"):
        model.fit_to_images(cifar.normalize(data.train_images[:5000], config.mean, config.std))
    model = prepare(model, config)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_model, model = cluster.wrap(model, config.sync_batchnorm)
    if config.compile:
        train_model = torch.compile(train_model, mode=config.compile_mode)
    optimizer = make_optimizer(model, config)
    steps_per_epoch = math.ceil(len(data.train_labels) / config.batch_size)
    run = TrainingRun(exp, config, folder, cluster, model, train_model, optimizer,
                      make_schedule(optimizer, config, steps_per_epoch),
                      make_generators(config.seed, cluster.rank, device),
                      data, test, empty_history(config), {}, epoch_start_position(0))
    if config.averaging != "none":
        run.average = WeightAverage(model, config.averaging, config.ema_decay,
                                    config.epochs * run.steps_per_epoch)
    if config.alternating_flip:
        run.mirror = cifar.alternating_mirror(config.seed, len(data.train_labels), device)
    run.scaler = loss_scaler(device, config)
    if checkpoint is None:
        run.info = describe_run(run, device, full_budget)
        if cluster.is_main:
            remove_run_files(folder)  # the previous run's, which refuse_to_replace let go
    else:
        run.restore(checkpoint)
    run.write_files()
    return run


def empty_history(config):
    evaluated = "val" if config.val else "test"
    return {key: [] for key in ("train_loss", "train_acc", f"{evaluated}_loss", f"{evaluated}_acc")}


def hold_out(data, count, seed):
    """The data with `count` stratified training images moved out of training into the set
    evaluated each epoch (in place of the test set)."""
    held = cifar.stratified_subset(data.train_labels, count, seed, what="val")
    keep = torch.ones(len(data.train_labels), dtype=torch.bool)
    keep[held] = False
    if not keep.any():
        raise UserError(f"val {count} leaves no training images")
    return dataclasses.replace(data, train_images=data.train_images[keep], train_labels=data.train_labels[keep],
                               test_images=data.train_images[held], test_labels=data.train_labels[held])


def make_generators(seed, rank, device):
    """The shuffle stream, shared by all ranks, and an augmentation stream of this rank's own;
    SeedSequence makes the two independent even though both derive from one seed."""
    augment_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    return {"shuffle": torch.Generator(device=device).manual_seed(seed),
            "augment": torch.Generator(device=device).manual_seed(augment_seed)}


def run_epochs(run):
    """Train from the run's position to its last epoch; after each, evaluate, then save the
    checkpoint, history and run.json. StopSignals (Ctrl-C, SIGTERM, SIGHUP) end the current step,
    save a checkpoint and stop the run with RunInterrupted."""
    config, info, position = run.config, run.info, run.position
    autocast = autocast_for(run.data.train_images.device, config)
    steps_per_epoch = run.steps_per_epoch
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
                    raise_if_non_finite(position)  # no NaN weights over the last good checkpoint
                    info["status"] = "interrupted"
                    # The partial epoch's time too: a resume counts on from the checkpoint's wall time.
                    info["wall_seconds"] = round(time.perf_counter() - session_start, 3)
                    run.save_checkpoint()
                    raise run.interrupted(stop.signal, f"at epoch {position['epoch'] + 1}, step {position['step']}")
                finish_epoch(run, autocast, epoch_start, session_start, progress)
            # Under the same signals: a stop here ends the run interrupted, resumable to this point
            # (the checkpoint of its last epoch); it is complete only once its weights are saved.
            info["final_evaluation"] = final_evaluation(run, autocast)
            if stop.signal is not None:
                info["status"] = "interrupted"
                raise run.interrupted(stop.signal, "during the end-of-run evaluation")
            if run.cluster.is_main:
                save_tensors(run.folder / WEIGHTS_FILE, run.eval_model.state_dict())
    except BaseException as e:
        if info["status"] == "running":
            info["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        raise
    else:
        info["status"] = "complete"
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
    test_loss, test_acc = evaluate(run.eval_model, run.data.test_images, run.data.test_labels,
                                   run.config, autocast)
    if not math.isfinite(test_loss):
        raise TrainingError(f"evaluation loss became {test_loss} in epoch {position['epoch'] + 1}; "
                            f"{run.folder} keeps the {position['epoch']} epoch(s) before")
    if SCHEDULES[run.config.schedule][0] == "epoch":
        run.schedule.step()
    for key, value in zip(history, (train_loss, train_acc, test_loss, test_acc)):
        history[key].append(value)
    info["epochs_done"] = len(history["train_loss"])
    info["epoch_seconds"].append(round(time.perf_counter() - epoch_start, 3))
    info["train_images_per_second"].append(round(len(run.data.train_labels) / train_seconds, 1))
    info["wall_seconds"] = round(time.perf_counter() - session_start, 3)
    position.update(epoch_start_position(position["epoch"] + 1))
    run.save_checkpoint()
    run.write_files()
    progress.set_postfix_str(f"test acc {100 * test_acc:.2f}%", refresh=False)
    if run.cluster.is_main:
        evaluated = "val" if run.config.val else "test"
        progress.write(f"{run.exp.name} epoch {info['epochs_done']}/{run.config.epochs}: train loss "
                       f"{train_loss:.4f} acc {100 * train_acc:.2f}% | {evaluated} loss {test_loss:.4f} "
                       f"acc {100 * test_acc:.2f}% | {info['epoch_seconds'][-1]:.1f} s")


def final_evaluation(run, autocast):
    """The test set once more with the final (or averaged) weights, where the per-epoch figures do
    not already say it all: after a --val run (the test set's only evaluation) or with tta."""
    config = run.config
    if not (config.val or config.tta):
        return None
    loss, acc = evaluate(run.eval_model, *run.test, config, autocast, tta=config.tta)
    weights = "averaged (" + config.averaging + ")" if run.average is not None else "final"
    return {"test_loss": loss, "test_acc": acc, "tta": config.tta, "weights": weights,
            "test_images": len(run.test[1])}


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
        "training_flops_per_image": training_flops(run.model),
        "evaluated_each_epoch": (f"validation: {config.val} held-out training images" if config.val
                                 else "test set"),
        "budget": "full" if full_budget else "smoke",
        "data": {"folder": str(run.data.folder), "variant": run.data.variant, "sha256": run.data.digest,
                 "train_images": len(run.data.train_labels), "test_images": len(run.test[1]),
                 "val_images": config.val},
        "device": {"type": device.type, "name": device_name(device), "precision": precision(device, config)},
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
    order, steps = position["order"], run.steps_per_epoch
    last_report = time.monotonic()
    for step in range(position["step"], steps):
        if run.cluster.stop_requested(stop.signal is not None, step):
            return False
        index = run.cluster.shard(order[step * config.batch_size:(step + 1) * config.batch_size])
        x = prepare(augmented_batch(run, images, index), config)
        y = labels[index]
        run.optimizer.zero_grad(set_to_none=True)
        output, loss = forward_backward(run.train_model, x, y, config, autocast, run.scaler)
        run.scaler.step(run.optimizer)  # optimizer.step() but for an fp16 step whose gradients overflowed
        run.scaler.update()
        if SCHEDULES[config.schedule][0] == "step":
            run.schedule.step()
        if run.average is not None:
            run.average.update(position["epoch"] * steps + step + 1)
        position["first_bad_step"] = torch.where((position["first_bad_step"] < 0) & ~loss.isfinite(),
                                                 step, position["first_bad_step"])
        position["loss_sum"] += loss * len(index)
        position["correct"] += (output.argmax(1) == y).sum()
        position["seen"] += len(index)
        position["step"] = step + 1
        progress.update(1)
        if time.monotonic() - last_report > 1.0 or step + 1 == steps:
            last_report = time.monotonic()
            report_progress(progress, position)
    return not run.cluster.any(stop.signal is not None)


def forward_backward(model, x, y, config, autocast, scaler):
    """Logits and mean loss of a batch, its gradients accumulated in the parameters. With
    `micro_batch`, in chunks (the same gradient but for BatchNorm, which sees each chunk's
    statistics): big batches can run faster that way where caches are small, as on CPUs."""
    outputs, total = [], 0.0
    for xc, yc in zip(x.split(config.micro_batch or len(x)), y.split(config.micro_batch or len(y))):
        with autocast:
            output = model(xc)
            loss = F.cross_entropy(output.float(), yc, label_smoothing=config.label_smoothing)
        scaler.scale(loss * (len(yc) / len(y))).backward()
        # A copy: under CUDA graphs (compile_mode=reduce-overhead) the next chunk's forward starts
        # a new generation, which may overwrite this output's memory.
        outputs.append(output.detach().clone())
        total = total + loss.detach() * (len(yc) / len(y))
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)), total  # one copy a chunk


def augmented_batch(run, images, index):
    """The training images at `index`, augmented as the config says and normalised."""
    config, generator = run.config, run.generators["augment"]
    mirror = None
    if run.mirror is not None:
        mirror = run.mirror[index] ^ bool(run.position["epoch"] % 2)
    x = cifar.augment(images[index], generator, config.crop_padding, config.flip,
                      config.rotation_degrees, config.pad_mode, mirror)
    if config.trivial_augment:
        x = cifar.trivial_augment(x, generator)
    x = cifar.normalize(x, config.mean, config.std)
    return cifar.cutout(x, generator, config.cutout) if config.cutout else x


def raise_if_non_finite(position):
    bad = position["first_bad_step"].item()
    if bad >= 0:
        raise TrainingError(f"training loss became non-finite in epoch {position['epoch'] + 1}, step "
                            f"{bad + 1}; the run folder keeps the {position['epoch']} finished "
                            f"epoch(s) and their checkpoint")


def report_progress(progress, position):
    raise_if_non_finite(position)
    progress.set_postfix_str(f"epoch {position['epoch'] + 1} loss "
                             f"{position['loss_sum'].item() / position['seen']:.4f} acc "
                             f"{100 * position['correct'].item() / position['seen']:.2f}%", refresh=False)


class RunInterrupted(UserError):
    """A run stopped by a signal after saving its checkpoint; exits with 128 + the signal number."""

    def __init__(self, signal_number, message):
        super().__init__(message)
        self.exit_code = 128 + int(signal_number)


class StopSignals:
    """While active, SIGINT and SIGTERM (and on POSIX SIGHUP, a closed terminal or ssh session,
    unless nohup ignores it; Windows's SIGBREAK, Ctrl+Break, which a study sends its runs there)
    only set `signal`: the loop finishes its step, saves and stops, instead of dying mid-write.
    Signals can only be caught in the main thread; elsewhere this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM,
               *(getattr(signal, name) for name in ("SIGHUP", "SIGBREAK") if hasattr(signal, name)))

    def __enter__(self):
        self.signal, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                if number == getattr(signal, "SIGHUP", None) and signal.getsignal(number) == signal.SIG_IGN:
                    continue  # started under nohup: the run goes on when the terminal closes, as asked
                self.previous[number] = signal.signal(number, self.request)
        return self

    def request(self, number, frame):
        if self.signal is None:  # the first request is the one that stopped the run
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
    """Put back what rng_states saved, as far as this machine allows: the GPUs it has, and the data
    generators whose state fits this device (a CPU generator's differs from a CUDA one's). Returns
    the names of the generators left as they were."""
    unfit = [name for name, g in generators.items() if states[name].shape != g.get_state().shape]
    for name, generator in generators.items():
        if name not in unfit:
            generator.set_state(states[name])
    torch.set_rng_state(states["torch"])
    for index, state in enumerate(states["cuda"][:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state, index)
    random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in states["python"]))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return unfit


def refuse_other_config(saved, config):
    differing = differing_settings(saved, config)
    if differing:
        raise UserError(f"the checkpoint was made with other settings ({', '.join(differing)}); "
                        f"resume with the same ones, or start afresh in another --out (a study: --out-root)")


def refuse_to_replace(folder, config, full_budget, overwrite):
    """A fresh start must not silently wipe what the folder holds: an unfinished run that its
    checkpoint can continue, or a full-budget run's history, unless the new run is the same
    full-budget run again (a rerun of the experiment, or of its notebook)."""
    if overwrite:
        return
    try:
        previous = read_run_info(folder)
    except RunFolderError:  # a checkpoint resumes without run.json, so it is kept all the same
        previous = {"status": "unknown"}
    done = previous.get("epochs_done")
    if previous.get("status") != "complete" and (Path(folder) / CHECKPOINT_FILE).is_file():
        progress = f"{'?' if done is None else done}/{previous.get('planned_epochs', '?')}"
        raise UserError(f"{folder} holds an unfinished run ({progress} epochs) and its checkpoint: pass --resume "
                        f"to continue it, or --overwrite to start afresh (in a notebook: resume = True or "
                        f"overwrite = True)")
    if previous.get("budget") == "full" and done:
        differing = differing_settings(previous.get("config", {}), config)
        if not full_budget or differing:
            replacement = (f"a run with other settings ({', '.join(differing)})" if full_budget
                           else "a smoke run")
            raise UserError(f"{folder} holds a full-budget run ({done} epochs); {replacement} would replace "
                            f"it: pass another --out (a study: --out-root), or --overwrite (in a notebook: "
                            f"out_dir, or overwrite = True)")


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
