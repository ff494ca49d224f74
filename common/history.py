"""A run folder on disk: the original study's four history files, plus run.json.

History files hold one float per line (accuracy as a fraction), one line per finished epoch, as the
original wrote them. Every file is replaced atomically (temporary file, fsync, rename), so a run
killed mid-write leaves the previous complete version, never half a file.
"""
import json
import math
import os
import tempfile
from pathlib import Path

HISTORY_FILES = {
    "train_loss": "train_loss_history.txt",
    "train_acc": "train_acc_history.txt",
    "test_loss": "test_loss_history.txt",
    "test_acc": "test_acc_history.txt",
}
RUN_FILE = "run.json"


def write_atomic(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_history(folder, history):
    for key, name in HISTORY_FILES.items():
        write_atomic(Path(folder) / name, "".join(f"{float(v)!r}\n" for v in history[key]))


def write_run_info(folder, info):
    write_atomic(Path(folder) / RUN_FILE, json.dumps(info, indent=2) + "\n")


class RunFolderError(ValueError):
    """A run folder whose files are missing or malformed."""


def read_history(folder):
    """The four series of a run folder, checked to be finite numbers of equal length."""
    folder = Path(folder)
    history = {}
    for key, name in HISTORY_FILES.items():
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


def read_run_info(folder):
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise RunFolderError(f"{path}: expected a JSON object")
    return info
