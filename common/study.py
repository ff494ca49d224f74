"""python -m common study: run many experiments to completion, several processes at a time.

Each experiment is one `python -m common train` process writing its own folder (its output goes to
train.log there, a resumed run's after its earlier output). A complete run of the same settings is
skipped, an unfinished one with a checkpoint resumed, any other started afresh (as `train` would: a
smoke study refuses to replace a full-budget run), one whose folder another run holds left alone,
and a failure is reported without stopping the others. An experiment whose registry settings equal
an earlier one's in the same study (changing_optimisers/sgd's are changing_activations/relu's) is
skipped when both are asked unchanged: the tables show that run for both. One progress bar counts
the epochs of them all.
SIGINT, SIGTERM or SIGHUP to the study (Ctrl+C, a closed terminal; Ctrl+Break on Windows) stops
every run it started, each after saving its checkpoint, so that the same command resumes them all.
The runs are in process groups of their own, so a Ctrl+C at the terminal reaches the study alone.
"""
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .config import differing_settings
from .experiments import EXPERIMENTS, REPO_ROOT, TRAINING_DIR, twins
from .history import CHECKPOINT_FILE, LOCK_FILE, RunFolderError, lock_holder, read_run_info
from .training import RunInterrupted, StopSignals

LOG_FILE = "train.log"
WINDOWS = os.name == "nt"
COMPLETE, SKIPPED = "complete", "skipped"


def read_status(folder):
    """run.json, or {} where it is unreadable: such a folder is run afresh, as `train` would."""
    try:
        return read_run_info(folder)
    except RunFolderError:
        return {}


def study(configs, parallel=1, devices=("auto",), extra_args=(), out_root=None, poll_seconds=0.5):
    """Run the experiments named by `configs` ({name: the Config that `extra_args`, passed to each
    `train`, make of it}) with `parallel` processes on each of `devices`; returns {name: outcome}."""
    extra_args = list(extra_args)
    root = Path(out_root) if out_root else TRAINING_DIR
    outcomes, queue = {}, []
    for name, config in configs.items():
        folder = root / name
        status = read_status(folder)
        complete = status.get("status") == "complete"
        resume = not complete and (folder / CHECKPOINT_FILE).is_file()
        if (holder := lock_holder(folder / LOCK_FILE)) is not None:  # its train.log is that run's
            outcomes[name] = f"not started: its folder is in use by another run (pid {holder})"
        elif complete and not differing_settings(status.get("config", {}), config):
            outcomes[name] = f"{SKIPPED} (complete)"
        elif not resume and (twin := twin_in_study(name, configs)):
            outcomes[name] = f"{SKIPPED} ({twin} has the same settings: its run stands for both)"
        else:
            queue.append((name, folder, config.epochs, resume))
        if name in outcomes:
            tqdm.write(f"{name}: {outcomes[name]}")
    slots = list(itertools.chain.from_iterable([d] * parallel for d in devices))
    running = {}  # device slot index -> (name, folder, process)
    # Epochs resumed runs already did count as done, not as done in this session's first second.
    done_epochs = {name: read_status(folder).get("epochs_done", 0)
                   for name, folder, _, resume in queue if resume}
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
                            running[slot] = (name, folder, launch(name, folder, device, extra_args, resume))
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
    if stop.signal is not None:
        raise RunInterrupted(stop.signal, f"study stopped by {stop.signal.name}; the same command "
                                          "resumes every unfinished run")
    return outcomes


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
