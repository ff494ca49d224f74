"""Runs that survive: exact resume, signals, bad numbers, tampered checkpoints, locks."""
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from common import data as cifar
from common import training
from common.config import UserError
from common.history import HISTORY_FILES, load_checkpoint, run_lock
from common.training import RunInterrupted, train
from conftest import REPO, wait_for_epochs


def histories_and_weights(folder):
    texts = {name: (folder / name).read_text() for name in HISTORY_FILES.values()}
    return texts, torch.load(folder / "model.pt", weights_only=True)


def interrupt_at_step(monkeypatch, step, signal_number=signal.SIGINT):
    """Deliver a signal during the `step`-th training step (1-based, counted over the run)."""
    calls = {"n": 0}
    augment = cifar.augment

    def augment_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            signal.raise_signal(signal_number)
        return augment(*args, **kwargs)
    monkeypatch.setattr(cifar, "augment", augment_then_signal)


# fast94 adds what a resume must also restore: lookahead averaging across epochs, alternating
# flips, a per-step schedule, the whitening fitted to the data; best_5m an EMA of the weights,
# TrivialAugment, cutout and warm-up, here with micro-batches too; Muon its momentum buffers; fp16
# its loss scaler.
@pytest.mark.parametrize("experiment, extra", [("res_512_d", {}), ("fast94", {"widths": (8, 16, 16)}),
                                               ("best_5m", {"widths": (8, 16, 16), "micro_batch": 32}),
                                               ("fast94", {"widths": (8, 16, 16), "optimizer": "muon"}),
                                               ("fast94", {"widths": (8, 16, 16), "fp16": True})],
                         ids=["res_512_d", "fast94", "best_5m", "fast94-muon", "fast94-fp16"])
@pytest.mark.parametrize("stop_step", [6, 8], ids=["mid-epoch", "end-of-epoch-2"])
def test_interrupted_then_resumed_run_is_bit_identical(tmp_path, tiny, monkeypatch, stop_step, experiment,
                                                       extra):
    settings = dict(epochs=4, seed=3, **tiny, **extra)  # 200 images / batch 64: 4 steps an epoch
    train(experiment, out_dir=tmp_path / "straight", **settings)

    with monkeypatch.context() as patch:
        interrupt_at_step(patch, stop_step)
        with pytest.raises(RunInterrupted, match="stopped by SIGINT at epoch 2.*--resume") as caught:
            train(experiment, out_dir=tmp_path / "resumed", **settings)
    assert caught.value.exit_code == 130
    info = json.loads((tmp_path / "resumed" / "run.json").read_text())
    assert info["status"] == "interrupted" and info["epochs_done"] == 1
    assert not (tmp_path / "resumed" / "run.lock").exists()

    monkeypatch.setattr(training, "git_commit", lambda: {"commit": "f" * 40, "dirty": False})
    run = train(experiment, out_dir=tmp_path / "resumed", resume=True, **settings)
    assert run.info["status"] == "complete" and run.info["git"] == info["git"]  # the code it started with
    assert [resume["git"]["commit"] for resume in run.info["resumed"]] == ["f" * 40]  # and resumed with
    assert run.info["resumed"][0]["device"] == run.info["device"]["name"]
    assert run.info["resumed"][0]["precision"] == run.info["device"]["precision"]
    assert run.info["resumed"][0]["compile"] is False
    scalers = [load_checkpoint(tmp_path / d)["scaler"] for d in ("straight", "resumed")]
    assert scalers[0] == scalers[1]  # fp16's counts its steps since the scale last changed
    straight, resumed = (histories_and_weights(tmp_path / d) for d in ("straight", "resumed"))
    assert straight[0] == resumed[0]
    assert straight[1].keys() == resumed[1].keys()
    assert all(torch.equal(straight[1][k], resumed[1][k]) for k in straight[1])


def test_a_stop_mid_epoch_keeps_the_partial_epoch_in_the_wall_time_a_resume_counts_on_from(tmp_path, tiny, monkeypatch):
    augment = cifar.augment

    def slow_then_stop(*args, **kwargs):  # steps 5 and 6 of 4 an epoch: a second, then SIGINT
        slow_then_stop.calls += 1
        if slow_then_stop.calls == 5:
            time.sleep(1.0)
        if slow_then_stop.calls == 6:
            signal.raise_signal(signal.SIGINT)
        return augment(*args, **kwargs)
    slow_then_stop.calls = 0
    monkeypatch.setattr(cifar, "augment", slow_then_stop)
    with pytest.raises(RunInterrupted):
        train("res_512", out_dir=tmp_path, epochs=2, **tiny)
    saved = load_checkpoint(tmp_path)
    partial = saved["position"]["seconds"]
    assert partial >= 1.0
    assert saved["info"]["wall_seconds"] >= sum(saved["info"]["epoch_seconds"]) + partial


@contextlib.contextmanager
def sighup_handled_by(handler):
    previous = signal.signal(signal.SIGHUP, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX only")
def test_a_closed_terminal_sighup_stops_the_run_with_its_checkpoint_like_sigterm(tmp_path, tiny, monkeypatch):
    unhandled = []  # were SIGHUP not the run's, this handler would get it (not the default: ending pytest)
    with sighup_handled_by(lambda number, frame: unhandled.append(number)):
        interrupt_at_step(monkeypatch, 6, signal.SIGHUP)  # 4 steps an epoch: in epoch 2
        with pytest.raises(RunInterrupted, match="stopped by SIGHUP at epoch 2.*--resume") as caught:
            train("res_512", out_dir=tmp_path, epochs=2, **tiny)
    assert not unhandled and caught.value.exit_code == 128 + signal.SIGHUP
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "interrupted"
    assert load_checkpoint(tmp_path)["position"]["epoch"] == 1


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX only")
def test_under_nohup_a_sighup_stays_ignored_and_the_run_goes_on(tmp_path, tiny, monkeypatch):
    with sighup_handled_by(signal.SIG_IGN):
        interrupt_at_step(monkeypatch, 6, signal.SIGHUP)
        run = train("res_512", out_dir=tmp_path, epochs=2, **tiny)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    assert run.info["status"] == "complete" and run.info["epochs_done"] == 2


def test_resume_with_other_settings_is_refused_naming_them(tmp_path, tiny):
    train("res_512", out_dir=tmp_path, epochs=1, **tiny)
    with pytest.raises(UserError, match=r"other settings \(epochs, lr\)"):
        train("res_512", out_dir=tmp_path, resume=True, epochs=2, lr=0.05, **tiny)


def test_a_compiled_runs_checkpoint_resumes_eager_and_says_so(tmp_path, tiny, monkeypatch):
    path, checkpoint = checkpoint_mid_epoch_2(tmp_path, tiny, monkeypatch)
    for config in (checkpoint["config"], checkpoint["info"]["config"]):  # as a study on a GPU started it
        config.update(compile=True, compile_mode="reduce-overhead")
    torch.save(checkpoint, path)
    run = train("res_512", out_dir=tmp_path, epochs=2, resume=True, **tiny)  # not compiled: allowed
    assert run.info["status"] == "complete" and run.info["config"]["compile"] is True
    assert run.info["resumed"][0]["compile"] is False


def checkpoint_mid_epoch_2(folder, tiny, monkeypatch):
    """(path, contents) of the checkpoint of a 2-epoch res_512 run stopped at its sixth step."""
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 6)
        with pytest.raises(RunInterrupted):
            train("res_512", out_dir=folder, epochs=2, **tiny)
    return folder / "checkpoint.pt", torch.load(folder / "checkpoint.pt", weights_only=True)


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_its_default(tmp_path, tiny, monkeypatch):
    path, checkpoint = checkpoint_mid_epoch_2(tmp_path, tiny, monkeypatch)
    for newer in ("cutout", "averaging", "tta"):  # as an older version of the code saved it
        del checkpoint["config"][newer]
    torch.save(checkpoint, path)
    run = train("res_512", out_dir=tmp_path, epochs=2, resume=True, **tiny)
    assert run.info["status"] == "complete" and len(run.history["test_acc"]) == 2


def test_a_checkpoint_from_a_gpu_resumes_on_the_cpu_with_new_data_streams(tmp_path, tiny, monkeypatch, capsys):
    path, checkpoint = checkpoint_mid_epoch_2(tmp_path, tiny, monkeypatch)
    cuda_state = torch.zeros(16, dtype=torch.uint8)  # what a CUDA generator's state is: seed, offset
    checkpoint["rng"].update(shuffle=cuda_state, augment=cuda_state, cuda=[cuda_state] * 2)
    torch.save(checkpoint, path)
    run = train("res_512", out_dir=tmp_path, epochs=2, resume=True, **tiny)
    assert run.info["status"] == "complete" and len(run.history["test_acc"]) == 2
    assert run.info["resumed"][0]["reseeded"] == ["shuffle", "augment"]
    assert "will not be bit-identical" in capsys.readouterr().err


def test_resume_needs_a_checkpoint(tmp_path, tiny):
    with pytest.raises(UserError, match="no checkpoint.pt to resume from"):
        train("res_512", out_dir=tmp_path, resume=True, **tiny)


class Payload:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_truncated_or_tampered_checkpoint_is_refused(tmp_path, tiny):
    train("res_512", out_dir=tmp_path, epochs=1, **tiny)
    checkpoint = tmp_path / "checkpoint.pt"
    assert load_checkpoint(tmp_path)["position"]["epoch"] == 1
    original = checkpoint.read_bytes()
    checkpoint.write_bytes(original[: len(original) // 2])
    with pytest.raises(UserError, match="checkpoint.pt: refused"):
        train("res_512", out_dir=tmp_path, resume=True, epochs=1, **tiny)
    torch.save({"config": Payload()}, checkpoint)
    with pytest.raises(UserError, match="checkpoint.pt: refused"):
        load_checkpoint(tmp_path)


class NaNAfter(nn.Module):
    """Finite outputs for the first `good` training steps, NaN after."""

    def __init__(self, good):
        super().__init__()
        self.linear, self.good, self.calls = nn.Linear(3, 10), good, 0

    def forward(self, x):
        self.calls += self.training
        out = self.linear(x.mean((2, 3)))
        return out * float("nan") if self.calls > self.good else out


@pytest.mark.parametrize("stop_step", [None, 7], ids=["no-stop", "stopped-before-the-next-report"])
def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path, tiny, monkeypatch, stop_step):
    monkeypatch.setattr(training, "model_from_config", lambda config: NaNAfter(good=5))
    if stop_step:  # a stop must not save the NaN weights over the last good checkpoint
        interrupt_at_step(monkeypatch, stop_step)
    with pytest.raises(training.TrainingError, match="in epoch 2, step 2; the run folder keeps the 1"):
        train("res_512", out_dir=tmp_path, epochs=3, **tiny)
    assert len((tmp_path / "test_acc_history.txt").read_text().splitlines()) == 1
    assert load_checkpoint(tmp_path)["position"]["epoch"] == 1
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "failed"


def test_a_folder_held_by_a_live_run_is_refused_and_a_dead_runs_lock_taken(tmp_path, tiny):
    with run_lock(tmp_path):
        with pytest.raises(UserError, match=f"in use by another run \\(pid {os.getpid()}"):
            train("res_512", out_dir=tmp_path, epochs=1, **tiny)
    # the lock file of a killed run, naming a pid that has since gone to a live process (ours)
    (tmp_path / "run.lock").write_text(f"{os.getpid()}\n")
    train("res_512", out_dir=tmp_path, epochs=1, **tiny)
    assert not (tmp_path / "run.lock").exists()


def start_cli_run(folder, fake_data, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "common", "train", "res_512", "--data-dir", str(fake_data), "--out",
         str(folder), "--device", "cpu", "--no-download", "--batch-size", "16", *extra],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def test_sigterm_to_the_command_saves_a_checkpoint_and_the_resumed_run_is_exact(tmp_path, fake_data, tiny):
    settings = ["--epochs", "3", "--batch-size", "4", "--seed", "2",  # 50 steps an epoch
                "--set", "label_smoothing=0.1"]
    folder = tmp_path / "stopped"
    process = start_cli_run(folder, fake_data, *settings)
    wait_for_epochs(folder, 1, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143
    last = stderr.strip().splitlines()[-1]
    assert "stopped by SIGTERM at epoch" in last
    hint = shlex.split(last.partition("resume with: ")[2].partition(" (in a notebook")[0])
    assert hint[:4] == ["python", "-m", "common", "train"] and hint[hint.index("--out") + 1] == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*HISTORY_FILES.values(), "run.json", "checkpoint.pt"])  # no temporary files, no lock
    assert json.loads((folder / "run.json").read_text())["status"] == "interrupted"
    assert load_checkpoint(folder)["position"]["epoch"] >= 1

    # The command as printed: it gives every changed setting again, as a resume must.
    resumed = subprocess.run([sys.executable, *hint[1:]], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    train("res_512", out_dir=tmp_path / "straight", epochs=3, seed=2, label_smoothing=0.1,
          **{**tiny, "batch_size": 4})
    straight, stopped = (histories_and_weights(tmp_path / d) for d in ("straight", "stopped"))
    assert straight[0] == stopped[0]
    assert all(torch.equal(straight[1][k], stopped[1][k]) for k in straight[1])


@pytest.mark.parametrize("stop", ["sigterm", "ctrl-c"])
def test_a_stop_during_the_final_evaluation_leaves_the_run_resumable(tmp_path, tiny, monkeypatch, stop):
    final_evaluation = training.final_evaluation

    def stopped(run, autocast):
        if stop == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the run's signal handlers are set
        return final_evaluation(run, autocast)
    monkeypatch.setattr(training, "final_evaluation", stopped)
    expected = (KeyboardInterrupt, None) if stop == "ctrl-c" else (RunInterrupted, "during the end-of-run evaluation")
    with pytest.raises(expected[0], match=expected[1]):
        train("res_512", out_dir=tmp_path, epochs=1, tta=True, **tiny)
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "interrupted"
    assert not (tmp_path / "model.pt").exists()  # complete only once its weights are saved
    monkeypatch.setattr(training, "final_evaluation", final_evaluation)
    run = train("res_512", out_dir=tmp_path, epochs=1, tta=True, resume=True, **tiny)
    assert run.info["status"] == "complete" and run.info["final_evaluation"]["tta"]
    assert len(run.history["test_acc"]) == 1 and (tmp_path / "model.pt").is_file()  # no epoch trained twice


def test_two_runs_in_two_folders_at_once_do_not_interfere(tmp_path, fake_data):
    runs = [start_cli_run(tmp_path / name, fake_data, "--epochs", "2", "--seed", "5")
            for name in ("a", "b")]
    for process in runs:
        assert process.wait(timeout=180) == 0, process.stderr.read()
    a, b = ((tmp_path / n / "test_loss_history.txt").read_text() for n in ("a", "b"))
    assert a == b and len(a.splitlines()) == 2
