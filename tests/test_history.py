import errno
import fcntl
import multiprocessing
import os
import subprocess
import sys

import pytest

from common import history as run_folder
from common.config import UserError
from common.history import (HISTORY_FILES, RunFolderError, experiment_state, lock_holder, read_history,
                            read_run_info, replace_atomically, run_lock, write_atomic, write_history,
                            write_run_info)


def history(n=3):
    return {key: [0.1 * (i + 1) + j / 3 for i in range(n)] for j, key in enumerate(HISTORY_FILES)}


def test_history_round_trips_exactly_one_float_per_line(tmp_path):
    written = history()
    write_history(tmp_path, written)
    assert read_history(tmp_path) == written
    lines = (tmp_path / "test_acc_history.txt").read_text().splitlines()
    assert len(lines) == 3 and all(float(line) == v for line, v in zip(lines, written["test_acc"]))


def test_atomic_write_needs_no_fchmod(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "fchmod")  # as on Windows before Python 3.13
    write_atomic(tmp_path / "a.txt", "0.5\n")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"] and (tmp_path / "a.txt").read_text() == "0.5\n"


def test_atomic_write_leaves_only_the_file(tmp_path):
    write_atomic(tmp_path / "a.txt", "one\n")
    write_atomic(tmp_path / "a.txt", "two\n")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "two\n"
    (tmp_path / "b.txt").write_text("")  # the permissions any new file gets here (umask)
    assert (tmp_path / "a.txt").stat().st_mode == (tmp_path / "b.txt").stat().st_mode  # not mkstemp's 0600


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    write_atomic(tmp_path / "a.txt", "complete\n")

    def dies_mid_write(f):
        f.write(b"half a fi")
        raise RuntimeError("killed mid-write")
    with pytest.raises(RuntimeError, match="killed mid-write"):
        replace_atomically(tmp_path / "a.txt", dies_mid_write)
    assert (tmp_path / "a.txt").read_text() == "complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_full_disk_or_a_file_in_the_way_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    write_atomic(tmp_path / "a.txt", "complete\n")
    with pytest.raises(UserError, match=r"a.txt/b.txt: cannot be written \(File exists\)"):
        write_atomic(tmp_path / "a.txt" / "b.txt", "x")

    def full_disk(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(UserError, match=r"a.txt: cannot be written \(No space left on device\)"):
        write_atomic(tmp_path / "a.txt", "new\n")
    assert (tmp_path / "a.txt").read_text() == "complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.mark.parametrize("name, text, message", [
    ("test_acc_history.txt", "0.5\nabc\n", "not one number per line"),
    ("test_loss_history.txt", "nan\n0.1\n0.1\n", "non-finite"),
    ("train_acc_history.txt", "0.5\n", "different lengths"),
])
def test_malformed_history_is_refused(tmp_path, name, text, message):
    write_history(tmp_path, history())
    (tmp_path / name).write_text(text)
    with pytest.raises(RunFolderError, match=message):
        read_history(tmp_path)


def test_missing_history_file_is_named(tmp_path):
    write_history(tmp_path, history())
    (tmp_path / "train_loss_history.txt").unlink()
    with pytest.raises(RunFolderError, match="train_loss_history.txt: missing"):
        read_history(tmp_path)


def test_run_info_must_be_a_json_object(tmp_path):
    assert read_run_info(tmp_path) == {}
    for broken in (b"{broken", b"{\"a\": \"\xff\"}"):  # half a file; bytes that are not UTF-8
        (tmp_path / "run.json").write_bytes(broken)
        with pytest.raises(RunFolderError, match="not valid JSON"):
            read_run_info(tmp_path)


def test_the_state_of_each_run_folder_says_whether_it_is_done_going_or_resumable(tmp_path):
    def run(folder, status, done, budget="full", checkpoint=False):
        write_run_info(folder, {"status": status, "epochs_done": done, "planned_epochs": 50, "budget": budget})
        if checkpoint:
            (folder / "checkpoint.pt").write_bytes(b"")
        return experiment_state(folder)

    assert experiment_state(tmp_path / "never") == "-"
    assert run(tmp_path / "a", "complete", 50) == "complete"
    assert run(tmp_path / "b", "interrupted", 30, checkpoint=True) == "interrupted 30/50, resumable"
    with run_lock(tmp_path / "c"):
        assert run(tmp_path / "c", "running", 3, checkpoint=True) == "running 3/50"
    # run.json still says running, but no live process holds the folder: SIGKILL, power loss
    assert run(tmp_path / "d", "running", 3, checkpoint=True) == "killed 3/50, resumable"
    # nor does the live process its lock file names (a pid reused after a reboot): no lock is held
    (tmp_path / "d" / "run.lock").write_text(f"{os.getpid()}\n")
    assert experiment_state(tmp_path / "d") == "killed 3/50, resumable"
    assert run(tmp_path / "e", "failed", 2, budget="smoke") == "failed 2/50 (smoke)"
    assert run(tmp_path / "e", "failed", 2, checkpoint=True) == "failed 2/50, resumable"  # --resume or --overwrite
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "run.json").write_text("[")
    assert experiment_state(tmp_path / "f") == "unreadable run.json"
    (tmp_path / "f" / "checkpoint.pt").touch()
    assert experiment_state(tmp_path / "f") == "unreadable run.json, resumable"
    (tmp_path / "f" / "run.json").unlink()
    assert experiment_state(tmp_path / "f") == "no run.json, resumable"
    run(tmp_path / "g" / "seed0", "complete", 50)
    run(tmp_path / "g" / "seed1", "interrupted", 7)
    assert experiment_state(tmp_path / "g") == "seed0 complete; seed1 interrupted 7/50"


def holds_then_ends(folder):
    """A run holding `folder` is named by its lock and refuses a second run; its end frees it."""
    lock = folder / "run.lock"
    with run_lock(folder):
        assert lock_holder(lock) == os.getpid()
        with pytest.raises(UserError, match=f"in use by another run \\(pid {os.getpid()}, see "):
            with run_lock(folder):
                pass
    assert not lock.exists() and lock_holder(lock) is None


def test_a_run_lock_is_the_kernels_and_names_its_holder(tmp_path):
    lock = tmp_path / "run.lock"
    holds_then_ends(tmp_path)
    # a run that has taken the lock but not yet written its pid already holds the folder
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert lock_holder(lock) == 0
        with pytest.raises(UserError, match="in use by another run"):
            with run_lock(tmp_path):
                pass


def contend(folder, start, answered):
    start.wait()
    try:
        with run_lock(folder):
            answered.wait()  # hold it until every contender has been answered
    except UserError:
        answered.wait()
        os._exit(3)


def test_of_runs_starting_at_once_on_a_folder_exactly_one_takes_it(tmp_path):
    (tmp_path / "run.lock").write_text(f"{os.getpid()}\n")  # left by a killed run: taken by one
    fork = multiprocessing.get_context("fork")
    start, answered = fork.Barrier(4, timeout=30), fork.Barrier(4, timeout=30)
    runs = [fork.Process(target=contend, args=(tmp_path, start, answered)) for _ in range(3)]
    for run in runs:
        run.start()
    start.wait()
    answered.wait()
    for run in runs:
        run.join(10)
    assert sorted(run.exitcode for run in runs) == [0, 3, 3]


def no_flock(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")


@pytest.mark.parametrize("without", ["fcntl", "flock"])
def test_without_flock_a_lock_is_held_while_the_pid_it_names_lives(tmp_path, monkeypatch, without):
    if without == "fcntl":
        monkeypatch.setattr(run_folder, "fcntl", None)  # and no Windows locks either
        monkeypatch.setattr(run_folder, "msvcrt", None)
    else:
        monkeypatch.setattr(fcntl, "flock", no_flock)  # as on a file system without locks
    (tmp_path / "run.lock").write_text(f"{os.getppid()}\n")  # our parent: alive
    with pytest.raises(UserError, match=f"in use by another run \\(pid {os.getppid()}"):
        with run_lock(tmp_path):
            pass
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True)
    (tmp_path / "run.lock").write_text(ended.stdout)
    with run_lock(tmp_path):
        assert lock_holder(tmp_path / "run.lock") == os.getpid()
    assert not (tmp_path / "run.lock").exists()


class FlockAsMsvcrt:
    """Windows's msvcrt.locking acted by flock: an exclusive lock that fails at once with an OSError
    where another open file holds it; notes where each call's byte range starts."""
    LK_UNLCK, LK_NBLCK = 0, 2

    def __init__(self):
        self.offsets = set()

    def locking(self, fd, mode, nbytes):
        self.offsets.add(os.lseek(fd, 0, os.SEEK_CUR))
        if mode == self.LK_UNLCK:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PermissionError(errno.EACCES, "Permission denied") from None


def test_on_windows_a_run_lock_is_a_byte_range_lock_past_the_pid(tmp_path, monkeypatch):
    windows = FlockAsMsvcrt()
    monkeypatch.setattr(run_folder, "fcntl", None)
    monkeypatch.setattr(run_folder, "msvcrt", windows)
    lock = tmp_path / "run.lock"
    holds_then_ends(tmp_path)
    assert windows.offsets == {run_folder.WINDOWS_LOCK_OFFSET}  # the pid's bytes stay readable
    # the pid a killed run's lock file names, alive or not, holds nothing: only the lock does
    lock.write_text(f"{os.getppid()}\n")
    with run_lock(tmp_path):
        assert lock_holder(lock) == os.getpid()
