"""python -m common study: run many experiments to completion, several processes at a time.

Each experiment is one `python -m common train` process writing its own folder (its output goes to
train.log there, a resumed run's after its earlier output). A complete run of the same settings on
the same images is skipped, an unfinished one with a checkpoint resumed, any other started afresh
(as `train` would: a smoke study, or one with other settings, refuses to replace a full-budget
run), one whose folder another run holds left alone, and a failure is reported without stopping
the others. An experiment whose registry settings equal
an earlier one's in the same study (changing_optimisers/sgd's are changing_activations/relu's) is
skipped when both are asked unchanged: the tables show that run for both. One progress bar counts
the epochs of them all. On a GPU, before any run starts, it measures which way of executing each
model (eager, torch.compile, CUDA graphs) trains its runs soonest (compile_arguments).
SIGINT, SIGTERM or SIGHUP to the study (Ctrl+C, a closed terminal; Ctrl+Break on Windows) stops
every run it started, each after saving its checkpoint, so that the same command resumes them all.
The runs are in process groups of their own, so a Ctrl+C at the terminal reaches the study alone.
"""
import collections
import functools
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .bench import compile_costs
from .config import COMPILE_WAYS, differing_settings
from .data import load_cifar10
from .devices import resolve_device
from .experiments import EXPERIMENTS, REPO_ROOT, TRAINING_DIR, twins
from .models import model_options
from .summary import duration
from .history import CHECKPOINT_FILE, LOCK_FILE, RunFolderError, lock_holder, read_run_info
from .training import RunInterrupted, StopSignals, same_complete_run

LOG_FILE = "train.log"
WINDOWS = os.name == "nt"
COMPLETE, SKIPPED = "complete", "skipped"


def read_status(folder):
    """run.json, or {} where it is unreadable: such a folder holds no complete run, so its run is
    resumed where it has a checkpoint, else run afresh, as `train` would."""
    try:
        return read_run_info(folder)
    except RunFolderError:
        return {}


def study(configs, parallel=1, devices=("auto",), extra_args=(), out_root=None, poll_seconds=0.5,
          compile_choice="auto"):
    """Run the experiments named by `configs` ({name: the Config that `extra_args`, passed to each
    `train`, make of it}) with `parallel` processes on each of `devices`, each executing its model
    the way `compile_choice` says (compile_arguments); returns {name: outcome}."""
    started = time.monotonic()
    extra_args = list(extra_args)
    root = Path(out_root) if out_root else TRAINING_DIR
    outcomes, queue = {}, []
    # Read only where a complete run's images must be told from these (a smoke run on the small data).
    images = functools.cache(lambda data_dir: load_cifar10(data_dir, allow_download=False))
    for name, config in configs.items():
        folder = root / name
        status = read_status(folder)
        complete = status.get("status") == "complete"
        resume = not complete and (folder / CHECKPOINT_FILE).is_file()
        if (holder := lock_holder(folder / LOCK_FILE)) is not None:  # its train.log is that run's
            outcomes[name] = f"not started: its folder is in use by another run (pid {holder})"
        elif complete and same_complete_run(status, config, images(config.data_dir)):
            outcomes[name] = f"{SKIPPED} (complete)"
        elif not resume and (twin := twin_in_study(name, configs)):
            outcomes[name] = f"{SKIPPED} ({twin} has the same settings: its run stands for both)"
        else:
            queue.append((name, folder, config.epochs, resume))
        if name in outcomes:
            tqdm.write(f"{name}: {outcomes[name]}")
    # Epochs resumed runs already did count as done, not as done in this session's first second.
    done_epochs = {name: read_status(folder).get("epochs_done", 0)
                   for name, folder, _, resume in queue if resume}
    epochs_left = {name: epochs - done_epochs.get(name, 0) for name, _, epochs, _ in queue}
    compile_args = compile_arguments({name: configs[name] for name in epochs_left}, epochs_left, devices[0],
                                     compile_choice)
    slots = list(itertools.chain.from_iterable([d] * parallel for d in devices))
    running = {}  # device slot index -> (name, folder, process)
    progress = tqdm(total=sum(epochs for _, _, epochs, _ in queue), initial=sum(done_epochs.values()),
                    desc="study", unit="epoch")
    stop = StopSignals()
    try:
        with stop:
            while (queue or running) and stop.signal is None:
                for slot, device in enumerate(slots):
                    if slot not in running and queue:
                        name, folder, _, resume = queue.pop(0)
                        try:
                            running[slot] = (name, folder, launch(name, folder, device,
                                                                  extra_args + compile_args[name], resume))
                        except OSError as e:  # a file where its folder should be, a read-only disk
                            outcomes[name] = f"not started: {folder} cannot be its run folder ({e.strerror})"
                            tqdm.write(f"{name}: {outcomes[name]}")
                            continue
                        tqdm.write(f"started {name} on {device}" + (" (resuming)" if resume else ""))
                time.sleep(poll_seconds)
                for slot, (name, folder, process) in list(running.items()):
                    done_epochs[name] = read_status(folder).get("epochs_done", 0)
                    if process.poll() is not None:
                        del running[slot]
                        outcomes[name] = outcome(process.returncode, folder)
                        tqdm.write(f"{name}: {outcomes[name]}")
                done = sum(done_epochs.values())
                if done != progress.n:  # redrawn once an epoch, not each poll
                    progress.update(done - progress.n)
    finally:
        for _, _, process in running.values():
            ask_to_stop(process)
        for name, folder, process in running.values():
            outcomes[name] = outcome(process.wait(), folder)
            tqdm.write(f"{name}: {outcomes[name]}")
        progress.close()
        tally = collections.Counter(COMPLETE if o == COMPLETE else SKIPPED if o.startswith(SKIPPED) else "not complete"
                                    for o in outcomes.values())
        tqdm.write(f"study: {', '.join(f'{n} {what}' for what, n in tally.items())} in "
                   f"{duration(time.monotonic() - started)} ({parallel} at a time on {', '.join(devices)})")
    if stop.signal is not None:
        raise RunInterrupted(stop.signal, f"study stopped by {stop.signal.name}; the same command "
                                          "resumes every unfinished run")
    return outcomes


def compile_arguments(configs, epochs_left, device, choice):
    """{name: the `train` arguments that set how its run executes its model}: the way `choice`
    names for every run, or with "auto" on a GPU the fastest way for each model and batch
    (compiled_shape), as compile_costs measures it on the first such run's settings for the steps
    left in all of them; eager elsewhere, as on a CPU compiling took minutes and its step measured
    no faster (README, `study`)."""
    ways = dict.fromkeys(configs, "eager" if choice == "auto" else choice)
    if choice == "auto" and configs and (device := resolve_device(device)).type == "cuda":
        first = next(iter(configs.values()))  # a study's runs share their data folder and subset
        images = first.subset or len(load_cifar10(first.data_dir, allow_download=False).train_labels)
        steps_left = {name: epochs_left[name] * math.ceil((images - config.val) / config.batch_size)
                      for name, config in configs.items()}
        groups = {}
        for name, config in configs.items():
            groups.setdefault(compiled_shape(config), []).append(name)
        for names in groups.values():
            way = fastest_way(configs[names[0]], names, sum(steps_left[name] for name in names), device)
            ways.update(dict.fromkeys(names, way))
    return {name: [value for key, setting in COMPILE_WAYS[way].items()
                   for value in ("--set", f"{key}={json.dumps(setting)}")]
            for name, way in ways.items()}


def compiled_shape(config):
    """What decides whether compiling a run's model pays: the model but for its activation, the
    batch, the precision and the layout. (The activation and the optimiser, never compiled, hardly
    change the number of kernels compiling saves launching.)"""
    options = tuple(sorted((k, v) for k, v in model_options(config).items() if k != "activation"))
    return (config.architecture, options, config.batch_size, config.micro_batch, config.bf16, config.fp16,
            config.channels_last)


def fastest_way(config, names, steps, device):
    """The way of COMPILE_WAYS that trains the runs `names`, `steps` steps in all, soonest on
    `device`, measured on `config` (the first one's); what was measured is written out."""
    tqdm.write(f"timing {', '.join(COMPILE_WAYS)} for {', '.join(names)} on {device}, each compiled first ...")
    costs = compile_costs(config, device, len(names), steps)
    fastest = min((way for way in costs if "total" in costs[way]), key=lambda way: costs[way]["total"],
                  default="eager")  # where even eager fails, so will the runs, each reporting why
    measured = "; ".join(f"{way} failed ({cost['error']})" if "error" in cost else
                         f"{way} {1e3 * cost['step']:.2f} ms a step, set up in {cost['setup']:.0f} s: "
                         f"{cost['total'] / 60:.1f} min" for way, cost in costs.items())
    tqdm.write(f"{', '.join(names)} (batch {config.batch_size}, {steps:,} steps on {device}): {measured}; "
               f"fastest: {fastest}")
    return fastest


def twin_in_study(name, configs):
    """The experiment before `name` in this study whose run stands for `name`'s in the tables
    (charts.share_twin_runs): the same registry settings, both asked unchanged; or None."""
    if differing_settings(EXPERIMENTS[name].config.to_dict(), configs[name]):
        return None
    earlier = itertools.takewhile(lambda other: other != name, configs)
    return next((other for other in earlier if other in twins(name) and configs[other] == configs[name]), None)


def finished(outcome):
    """Whether a run's outcome needs nothing more: complete, or skipped."""
    return outcome == COMPLETE or outcome.startswith(SKIPPED)


def launch(name, folder, device, extra_args, resume):
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "common", "train", name, "--out", str(folder), "--device", device,
               *extra_args, *(["--resume"] if resume else [])]
    # The caller's working directory, so relative --data-dir and --out-root mean the same to both.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                     os.environ.get("PYTHONPATH")]))}
    # Each run in its own process group: a Ctrl+C at the terminal then reaches the study alone,
    # which asks each run to stop once (ask_to_stop). Were the runs in the study's group, they
    # would get the SIGINT too and might end, restoring the default handlers, just as the study's
    # SIGTERM arrives and kills them mid-exit. On Windows the group can be sent Ctrl+Break.
    group = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if WINDOWS
             else {"start_new_session": True})
    with open(folder / LOG_FILE, "a" if resume else "w") as log:  # a resumed run's log keeps its start
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, **group)


def ask_to_stop(process):
    """Have a run finish its step, save its checkpoint and exit (StopSignals). POSIX: SIGTERM.
    Windows has no SIGTERM to send (terminate() kills at once): Ctrl+Break to the run's process
    group, which needs a console shared with it; without one the run can only be killed."""
    if WINDOWS:
        try:
            process.send_signal(signal.CTRL_BREAK_EVENT)
            return
        except OSError:
            pass
    process.terminate()


def outcome(returncode, folder):
    """What a run's exit status and last line say: complete, interrupted (with its checkpoint saved,
    or before it could save one), or failed."""
    if returncode == 0:
        return COMPLETE
    if returncode < 0:  # killed before it could save: SIGKILL, or a stop before its handlers were set
        saved = "its last checkpoint is older" if (folder / CHECKPOINT_FILE).is_file() else "no checkpoint"
        return f"failed (killed by {signal.Signals(-returncode).name}): {saved}"
    text = (folder / LOG_FILE).read_text(errors="replace")
    lines = [line for line in re.split(r"[\r\n]", text) if line.strip() and "step/s" not in line]
    last = lines[-1].strip() if lines else "no output"
    if returncode - 128 in StopSignals.SIGNALS:  # RunInterrupted says it saved; a stop before the loop did not
        return "interrupted, checkpoint saved" if "checkpoint saved" in last else f"interrupted ({last})"
    return f"failed (exit {returncode}): {last}"
