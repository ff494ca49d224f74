"""python -m common bench: how close the training loop comes to what the model itself can do.

Three ways of feeding the same model, batch size and device, each warmed up, then timed in turns
(one timing of each a round, so that a machine whose speed drifts slows all three alike), each
figure the median of its rounds:
- limit: forward, backward and optimiser step on random tensors already on the device;
- ours: the project's training loop (`train_one_epoch`: on-device augmentation, bookkeeping,
  progress bar) on real images;
- seed-style: the original study's pipeline, PIL transforms per image (crop, flip, rotation,
  to-tensor, normalise) in a DataLoader with 2 workers. torchvision's CIFAR10 class reads the
  official pickles with plain `pickle` and refuses the offline copy, so the same per-image work is
  done here on the arrays our safe reader returns.
Plus the model's training FLOPs per image (torch.utils.flop_counter) and a dense matrix-multiply
rate on the same device, timed in the same turns, for reference (not a bound: convolutions can beat
it per FLOP).
"""
import contextlib
import json
import re
import statistics
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .charts import short_device_name
from .config import COMPILE_WAYS, one_line
from .distributed import Cluster
from .experiments import REPO_ROOT, get_experiment
from .history import write_atomic
from .models import model_from_config, training_flops
from .devices import AUTOCAST_DTYPES, autocast_for, device_name, loss_scaler, precision, prepare, resolve_device
from .recipe import make_optimizer
from .training import (check_settings, epoch_start_position, forward_backward, git_commit, now, start_run,
                       train_one_epoch)

BENCH_DIR = REPO_ROOT / "results" / "bench"
MODES = ("limit", "ours", "seed-style")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(device, work):
    """Wall seconds of `work()`, with the device's queued work finished at both ends."""
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_seconds(timers, repeats):
    """The median seconds of each timer ({name: a function doing its work once and returning the
    seconds it took}) over `repeats` rounds, each timer timed once a round, in turns: where the
    machine's speed drifts (a shared host, a clock ramping), every timer is timed across the drift
    alike, instead of the last one measured paying for it all."""
    times = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            times[name].append(timer())
    return {name: statistics.median(values) for name, values in times.items()}


def model_and_step(config, device):
    """A fresh model on the device and a function doing one training step on (x, y) as the
    training loop does (through torch.compile where the config asks for it, in micro-batches, with
    its loss), without the loop's augmentation and weight averaging."""
    torch.manual_seed(config.seed)
    model = prepare(model_from_config(config).to(device), config)
    optimizer = make_optimizer(model, config)
    autocast, scaler = autocast_for(device, config), loss_scaler(device, config)
    train_model = torch.compile(model, mode=config.compile_mode) if config.compile else model

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        forward_backward(train_model, prepare(x, config), y, config, autocast, scaler)
        scaler.step(optimizer)
        scaler.update()
    return model.train(), step


def limit_timer(config, device, steps):
    _, step = model_and_step(config, device)
    x = torch.randn(config.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (config.batch_size,), device=device)

    def run_steps(count=steps):
        for _ in range(count):
            step(x, y)
    run_steps(3)  # warm-up: allocator, cuDNN autotuning
    return lambda: seconds(device, run_steps)


def ours_timer(experiment, config, device, steps, repeats, resources):
    """The real loop on a stratified subset of exactly `steps` batches, one epoch per timing. Its
    run folder and progress bar live as long as `resources` (a contextlib.ExitStack)."""
    config = config.replace(subset=steps * config.batch_size, epochs=repeats + 1)
    folder = resources.enter_context(tempfile.TemporaryDirectory())
    run = start_run(get_experiment(experiment), config, Path(folder), device, Cluster(),
                    overwrite=True, resume=False)
    autocast = autocast_for(device, config)
    progress = resources.enter_context(tqdm(total=(repeats + 1) * steps, desc=f"bench {experiment} (ours)",
                                            leave=False))
    no_stop = types.SimpleNamespace(signal=None)

    def one_epoch():
        run.position = epoch_start_position(run.position["epoch"] + 1)
        return seconds(device, lambda: train_one_epoch(run, autocast, progress, no_stop))
    train_one_epoch(run, autocast, progress, no_stop)  # warm-up
    return one_epoch


class SeedStyleImages(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does per item: a PIL image from the array, then the transforms."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


SEED_STYLE_WORKERS, SEED_STYLE_PREFETCH = 2, 2  # the study's 2 workers; DataLoader's default prefetch


def seed_style_timer(config, device, data, steps):
    from torchvision import transforms
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=config.crop_padding),
        *([transforms.RandomHorizontalFlip()] if config.flip else []),
        transforms.RandomRotation(config.rotation_degrees), transforms.ToTensor(),
        transforms.Normalize(config.mean, config.std)])
    images = np.ascontiguousarray(data.train_images.permute(0, 2, 3, 1).numpy())
    loader = torch.utils.data.DataLoader(SeedStyleImages(images, data.train_labels.numpy(), transform),
                                         batch_size=config.batch_size, shuffle=True, drop_last=True,
                                         num_workers=SEED_STYLE_WORKERS, prefetch_factor=SEED_STYLE_PREFETCH,
                                         persistent_workers=True)
    _, step = model_and_step(config, device)
    batches = iter(())

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    def run_steps():
        for _ in range(steps):
            x, y = next_batch()
            step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))

    def timed_steps():
        # The workers went on preparing batches while the other modes were timed: take those
        # first, untimed, so that this timing starts with none in hand, as a steady pipeline does.
        for _ in range(SEED_STYLE_WORKERS * SEED_STYLE_PREFETCH):
            next_batch()
        return seconds(device, run_steps)
    run_steps()  # warm-up: starts the workers
    return timed_steps


def compile_costs(config, device, runs, steps, timed_steps=20, repeats=3, ways=tuple(COMPILE_WAYS)):
    """What each way costs `runs` processes training `steps` steps in all of `config`'s model on
    `device`: each way set up and warmed up, timed (its compile is in it, and each process pays it),
    then its steps timed in turns on random tensors as the limit mode does. Returns {way: {"step":
    seconds a step, "setup": seconds, "total": runs * setup + steps * step}}, or {way: {"error":
    why}} for a way that fails here (torch.compile needs a C compiler, and Triton on a GPU)."""
    costs, timers = {}, {}
    for way in ways:
        start = time.perf_counter()
        try:
            timer = limit_timer(config.replace(**COMPILE_WAYS[way]), device, timed_steps)
            synchronize(device)
        except Exception as e:  # whatever fails in the compiler stack rules this way out, not the study
            costs[way] = {"error": one_line(e)}
            continue
        costs[way], timers[way] = {"setup": time.perf_counter() - start}, timer
    for way, median in interleaved_seconds(timers, repeats).items():
        step = median / timed_steps
        costs[way].update(step=step, total=runs * costs[way]["setup"] + steps * step)
    # The models, compiled code and CUDA graphs' memory go: the runs this measures are to have the device.
    timers.clear()
    torch.compiler.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return costs


def matmul_timer(device, dtype, count=5):
    """A dense square matrix multiply in the precision the model trains in, a rate to read the rest
    by: a timer doing it `count` times, the FLOPs of that, and what was multiplied."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up

    def multiply():
        for _ in range(count):
            a @ b
    kind = f"{str(dtype).removeprefix('torch.')} {n}x{n}"
    return lambda: seconds(device, multiply), count * 2 * n ** 3, kind


def bench(experiment="res_512_d", device=None, batch_size=None, data_dir=None, steps=20, repeats=3,
          modes=MODES, download=None, settings=None):
    """Measure and return a JSON-able dict: the rates, FLOP rates and the two ratios. `settings`
    changes Config fields (the arguments, where given, win over the same fields in it)."""
    from .data import load_cifar10
    exp = get_experiment(experiment)
    settings = dict(settings or {})
    overrides = {"data_dir": data_dir, "download": download, "device": device, "batch_size": batch_size}
    config = exp.config.replace(**{**settings, **{k: v for k, v in overrides.items() if v is not None}})
    check_settings(config)
    device = resolve_device(config.device)
    data = load_cifar10(config.data_dir, allow_download=config.download)
    flops = training_flops(model_and_step(config.replace(compile=False), device)[0])
    with contextlib.ExitStack() as resources:
        make_timer = {
            "limit": lambda: limit_timer(config, device, steps),
            "ours": lambda: ours_timer(experiment, config, device, steps, repeats, resources),
            "seed-style": lambda: seed_style_timer(config, device, data, steps),
        }
        timers = {mode: make_timer[mode]() for mode in modes}  # each built and warmed up once
        timers["matmul"], matmul_flops, matmul_kind = matmul_timer(
            device, AUTOCAST_DTYPES.get(precision(device, config), torch.float32))
        median_seconds = interleaved_seconds(timers, repeats)
    matmul = matmul_flops / median_seconds.pop("matmul")
    rates = {mode: steps * config.batch_size / median for mode, median in median_seconds.items()}
    result = {
        "experiment": experiment, "batch_size": config.batch_size, "settings": settings,
        "steps": steps, "repeats": repeats,
        "device": device_name(device), "device_type": device.type, "torch": str(torch.__version__),
        "data_variant": data.variant, "training_flops_per_image": flops,
        "matmul": {"kind": matmul_kind, "flops_per_second": matmul},
        "images_per_second": rates,
        "ratios": {},
    }
    if "ours" in rates and "limit" in rates:
        result["ratios"]["ours/limit"] = rates["ours"] / rates["limit"]
    if "ours" in rates and "seed-style" in rates:
        result["ratios"]["ours/seed-style"] = rates["ours"] / rates["seed-style"]
    return result


def table(result):
    """The result as the text table `bench` prints (and results/bench.md holds)."""
    flops, matmul = result["training_flops_per_image"], result["matmul"]["flops_per_second"]
    settings = "".join(f", {key}={value}" for key, value in result.get("settings", {}).items())
    lines = [f"{result['experiment']}, batch {result['batch_size']}{settings}, "
             f"{short_device_name(result['device'])}, torch "
             f"{result['torch']}, {result['data_variant']} data; median of {result['repeats']} x "
             f"{result['steps']} steps",
             f"training FLOPs per image: {flops / 1e6:,.1f} M",
             "",
             f"{'mode':12} {'images/s':>10} {'GFLOP/s':>9} {'of matmul':>10}"]
    for mode, rate in result["images_per_second"].items():
        lines.append(f"{mode:12} {rate:10,.1f} {rate * flops / 1e9:9,.1f} {rate * flops / matmul:10.1%}")
    lines.append(f"{'matmul':12} {'':>10} {matmul / 1e9:9,.1f} ({result['matmul']['kind']})")
    lines.append("")
    lines += [f"{name}: {value:.2f}" for name, value in result["ratios"].items()]
    return "\n".join(lines)


def record_name(result):
    """'cpu_amd_epyc_avx2_2_threads-res_512_d-b128': the device's name (so that records of two CPU or
    GPU models live side by side), the experiment, the batch size and any settings."""
    settings = "".join(f"-{key}-{value}" for key, value in result.get("settings", {}).items())
    device = re.sub(r"[^a-z0-9]+", "_", result["device"].lower()).strip("_")
    return re.sub(r"[^\w.-]", "_", f"{device}-{result['experiment'].replace('/', '-')}"
                                    f"-b{result['batch_size']}{settings}")


def record(result, command, bench_dir=BENCH_DIR):
    """Keep the result as results/bench/<record_name>.json and regenerate results/bench.md."""
    bench_dir = Path(bench_dir)
    kept = {**result, "command": command, "git": git_commit(), "recorded": now()}
    write_atomic(bench_dir / f"{record_name(result)}.json", json.dumps(kept, indent=2) + "\n")
    return write_markdown(bench_dir)


def code_and_date(recorded):
    """'code 08d0ab2, recorded 2026-11-26T07:20:00+00:00': which code measured a record, and when."""
    if "git" not in recorded:
        return "code and date not recorded (an earlier version of bench)"
    commit = (recorded["git"]["commit"] or "unknown")[:7]
    dirty = " with uncommitted changes" if recorded["git"]["dirty"] else ""
    return f"code {commit}{dirty}, recorded {recorded['recorded']}"


def load_records(bench_dir=BENCH_DIR):
    """{record name: record} of every configuration kept in `bench_dir` (also those measured on
    other machines and copied in), in name order."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(Path(bench_dir).glob("*.json"))}


def write_markdown(bench_dir=BENCH_DIR):
    """results/bench.md from every configuration recorded in `bench_dir`."""
    bench_dir = Path(bench_dir)
    sections = ["# Benchmarks\n\nGenerated by `python -m common bench ... --record` from "
                "`results/bench/*.json`; each section is one configuration, measured in one process "
                "(see `common/bench.py` for what limit, ours and seed-style mean).\n"]
    for name, recorded in load_records(bench_dir).items():
        sections.append(f"## {name}\n\n`{recorded['command']}`\n\n{code_and_date(recorded)}\n\n"
                        f"```\n{table(recorded)}\n```\n")
    write_atomic(bench_dir.parent / "bench.md", "\n".join(sections))
    return bench_dir.parent / "bench.md"
