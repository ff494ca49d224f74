"""A run folder on disk: the original study's four history files, run.json, the final weights
(model.pt), the checkpoint a run resumes from (checkpoint.pt), and the lock of the run writing it.

History files hold one float per line (accuracy as a fraction), one line per finished epoch, as the
original wrote them. Every file is replaced atomically (temporary file, fsync, rename), so a run
killed mid-write leaves the previous complete version, never half a file.
"""
import json
import math
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import UserError, differing_settings, one_line

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt  # Windows: its byte-range locks, like flock, end with their process
except ImportError:
    msvcrt = None

HISTORY_FILES = {
    "train_loss": "train_loss_history.txt",
    "train_acc": "train_acc_history.txt",
    "test_loss": "test_loss_history.txt",
    "test_acc": "test_acc_history.txt",
}
# With --val, the held-out images are evaluated each epoch in place of the test set.
VALIDATION_FILES = {"val_loss": "val_loss_history.txt", "val_acc": "val_acc_history.txt"}
RUN_FILE = "run.json"
WEIGHTS_FILE = "model.pt"
CHECKPOINT_FILE = "checkpoint.pt"
SEEDS_FILE = "seeds.json"  # a multi-seed group's summary, beside its seed<N>/ folders
LOCK_FILE = "run.lock"


def umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Windows's locks are mandatory (a locked byte cannot be read), so a lock there takes one byte far
# past the pid the file names, which others still read.
WINDOWS_LOCK_OFFSET = 1 << 30


# What open() would give a new file; mkstemp's temporary files are private (0600) until chmod-ed.
FILE_MODE = 0o666 & ~umask()


def replace_atomically(path, write):
    """Call write(binary file) on a temporary file beside `path`, fsync it, then rename it over
    `path`; on any failure the temporary file goes and `path` keeps its previous content (an
    OSError, such as a full disk, becomes a one-line UserError)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # a file where a folder should be, no permission, a read-only disk
        raise UserError(f"{path}: cannot be written ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # not on Windows before Python 3.13, where modes barely apply
                os.fchmod(f.fileno(), FILE_MODE)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):  # a full disk, say
            raise UserError(f"{path}: cannot be written ({e.strerror or e})") from None
        raise


def write_atomic(path, text):
    replace_atomically(path, lambda f: f.write(text.encode()))


def save_tensors(path, obj):
    """torch.save, atomically; what it writes loads with torch.load(..., weights_only=True)."""
    replace_atomically(path, lambda f: torch.save(obj, f))


def load_checkpoint(folder):
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        raise UserError(f"{folder}: no {CHECKPOINT_FILE} to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, tampered or foreign files fail in many ways; all mean the same
        raise UserError(f"{path}: refused, truncated or not a checkpoint of this project "
                        f"({one_line(e)})") from None


@contextmanager
def run_lock(folder):
    """Hold `folder` for one run: a second run pointed at it is refused while the first lives.
    The hold is the kernel's lock (flock; on Windows a byte-range lock) on run.lock, a file that
    also names the holder's pid. The kernel drops the lock however its process ends, so a killed
    run never blocks the next one, even where its pid has since gone to another process, and two
    runs starting at once cannot both take it."""
    path = Path(folder) / LOCK_FILE
    patience = time.monotonic() + 1  # `list` looking at a lock holds it shared for an instant
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_RDWR)
        except OSError as e:  # a file where the folder should be, no permission, a read-only disk
            raise UserError(f"{folder}: cannot be the run folder ({e.strerror})") from None
        if try_lock(fd, exclusive=True):
            if still_at(fd, path):
                break
        elif time.monotonic() > patience:
            holder = pid_in(fd)
            os.close(fd)
            raise UserError(f"{folder} is in use by another run (pid {holder}, see {path}); "
                            f"wait for it, or pass another --out")
        else:
            time.sleep(0.02)
        unlock_and_close(fd)  # held, or removed by the run that just ended: try the file there now
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        release(fd, path)


def lock_holder(path):
    """The pid of the live run holding the lock at `path` (0 for the instant before it writes its
    pid), else None: no lock file, or one left by a run that has ended."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return None if try_lock(fd, exclusive=False) else pid_in(fd)
    finally:
        unlock_and_close(fd)  # a lock taken only to look


def try_lock(fd, exclusive):
    """Take the kernel's lock on the open file `fd` without waiting; False if a run holds it.
    Where the file system has no locks (some network mounts) a lock is the pid in the file, held
    while that process lives."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError:  # ENOLCK, EOPNOTSUPP: some network mounts
            pass
    elif msvcrt is not None:  # no shared locks there: a look holds it for an instant (run_lock waits)
        try:
            windows_lock(fd, msvcrt.LK_NBLCK)
            return True
        except OSError:
            return False
    pid = pid_in(fd)
    return not (pid and pid_alive(pid))


def release(fd, path):
    if fcntl is None:
        unlock_and_close(fd)  # Windows cannot remove an open file
        try:
            path.unlink(missing_ok=True)
        except PermissionError:  # another run has just opened it (Windows): left there, unlocked
            pass
    else:
        path.unlink(missing_ok=True)  # before the lock ends, so no one takes a file on its way out
        os.close(fd)


def unlock_and_close(fd):
    """Close `fd`, ending any lock this process holds on it (flock's end with the file; Windows
    asks for its byte-range locks to be undone first)."""
    if fcntl is None and msvcrt is not None:
        try:
            windows_lock(fd, msvcrt.LK_UNLCK)
        except OSError:  # not held by us
            pass
    os.close(fd)


def windows_lock(fd, mode):
    """msvcrt.locking with `mode` (take without waiting, or undo) on the lock's one byte."""
    os.lseek(fd, WINDOWS_LOCK_OFFSET, os.SEEK_SET)
    msvcrt.locking(fd, mode, 1)


def still_at(fd, path):
    """Whether the open file `fd` is still the one at `path`, not one its last holder removed."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def pid_in(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return int(os.read(fd, 32).decode().strip())
    except (UnicodeDecodeError, ValueError):
        return 0


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except PermissionError:  # alive, but another user's
        return True
    except OSError:
        return False
    return True


def remove_run_files(folder):
    """Delete a run's files from `folder` (history, run.json, weights, checkpoint), leaving whatever
    else it holds (a notebook, a lock): a run starting afresh there leaves none of the last one's."""
    for name in [*HISTORY_FILES.values(), *VALIDATION_FILES.values(), RUN_FILE, WEIGHTS_FILE, CHECKPOINT_FILE]:
        (Path(folder) / name).unlink(missing_ok=True)


def write_history(folder, history):
    names = {**HISTORY_FILES, **VALIDATION_FILES}
    for key, values in history.items():
        write_atomic(Path(folder) / names[key], "".join(f"{float(v)!r}\n" for v in values))


def write_run_info(folder, info):
    write_atomic(Path(folder) / RUN_FILE, json.dumps(info, indent=2) + "\n")


class RunFolderError(UserError):
    """A run folder whose files are missing or malformed."""


def read_history(folder):
    """The four series of a run folder (test_* or, for a --val run, val_* beside train_*), checked
    to be finite numbers of equal length."""
    folder = Path(folder)
    files = dict(HISTORY_FILES)
    if (folder / VALIDATION_FILES["val_acc"]).is_file():
        files = {k: v for k, v in files.items() if k.startswith("train")} | VALIDATION_FILES
    history = {}
    for key, name in files.items():
        path = folder / name
        if not path.is_file():
            raise RunFolderError(f"{path}: missing")
        try:
            values = [float(line) for line in path.read_text().split()]
        except ValueError:
            raise RunFolderError(f"{path}: not one number per line") from None
        if not all(math.isfinite(v) for v in values):
            raise RunFolderError(f"{path}: holds a non-finite value")
        history[key] = values
    lengths = {len(v) for v in history.values()}
    if len(lengths) != 1:
        raise RunFolderError(f"{folder}: history files of different lengths {sorted(lengths)}")
    return history


def evaluated_set(history):
    """'test', or 'val' for a --val run: the set a run evaluated after every epoch."""
    return "val" if "val_acc" in history else "test"


def seed_folders(folder):
    """The seed<N>/ subfolders of an experiment folder, by N: each is one run of a multi-seed group."""
    found = [f for f in Path(folder).glob("seed*/") if f.name[len("seed"):].isdigit()]
    return sorted(found, key=lambda f: int(f.name[len("seed"):]))


def run_state(folder):
    """What a run folder holds, in a few words: 'complete', 'interrupted 30/50, resumable',
    'running 3/200' (a live process holds the folder), 'killed 3/200' (run.json says running but
    no process holds it), 'failed 2/50', ', resumable' where an unfinished run has a checkpoint
    (a fresh start there is refused), ' (smoke)' after a reduced budget; 'unreadable run.json' or
    'no run.json' beside a checkpoint; '-' where there is no run."""
    checkpoint = (Path(folder) / CHECKPOINT_FILE).is_file()
    try:
        info = read_run_info(folder)
    except RunFolderError:
        return "unreadable run.json" + (", resumable" if checkpoint else "")
    if not info:
        return "no run.json, resumable" if checkpoint else "-"
    status = info.get("status", "unknown")
    if status == "running" and lock_holder(Path(folder) / LOCK_FILE) is None:
        status = "killed"
    text = status
    if status != "complete":
        text += f" {info.get('epochs_done', 0)}/{info.get('planned_epochs', '?')}"
    if status not in ("complete", "running") and checkpoint:
        text += ", resumable"
    return text + ("" if info.get("budget") == "full" else " (smoke)")


def experiment_state(folder):
    """run_state of an experiment folder, or of each of its seed<N>/ runs."""
    seeds = seed_folders(folder)
    return "; ".join(f"{f.name} {run_state(f)}" for f in seeds) if seeds else run_state(folder)


def final_test_acc(info, history):
    """The test accuracy a run ends with: its end-of-run evaluation's (with test-time augmentation,
    or the only test evaluation of a --val run) where run.json has one, else the last epoch's."""
    final = info.get("final_evaluation")
    return final["test_acc"] if final else history["test_acc"][-1]


def write_seeds_summary(folder, config=None):
    """Write SEEDS_FILE for the multi-seed group in `folder` from every complete seed<N>/ run in it
    (also those of earlier commands) trained with `config`'s settings but for the seed (all, without
    a config): each one's final test accuracy (its end-of-run evaluation where it has one), their
    mean and sample standard deviation (null for one seed). Returns the summary."""
    runs = [(f, read_run_info(f)) for f in seed_folders(folder)]
    runs = [(f, info) for f, info in runs if info.get("status") == "complete" and (
        config is None or not differing_settings(info.get("config", {}), config.replace(seed=info["seed"])))]
    if not runs:
        raise UserError(f"{folder} holds no complete seed<N>/ run{' of these settings' if config else ''} "
                        f"to summarise")
    accuracies = [final_test_acc(info, read_history(f)) for f, info in runs]
    summary = {"experiment": runs[0][1]["experiment"], "seeds": [info["seed"] for _, info in runs],
               "final_test_acc": accuracies, "mean": statistics.fmean(accuracies),
               "std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
               "folders": [f.name for f, _ in runs]}
    write_atomic(Path(folder) / SEEDS_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def read_run_info(folder):
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not text
        raise RunFolderError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise RunFolderError(f"{path}: expected a JSON object")
    return info
