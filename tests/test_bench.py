"""`bench` runs on a tiny setting and prints a well-formed table; `study` runs tiny experiments in
parallel. Benchmarks are commands: no test here asserts a speed."""
import json
import os
import re
import signal
import subprocess
import sys

from common.bench import record, table
from common.study import outcome
from conftest import REPO, wait_for_epochs
from test_cli import cli, in_process


def test_bench_prints_a_table_and_writes_json(tmp_path, fake_data):
    result = cli("bench", "--experiment", "res_512", "--device", "cpu", "--batch-size", "8", "--steps", "2",
                 "--repeats", "1", "--data-dir", fake_data, "--no-download", "--json", tmp_path / "b.json")
    assert result.returncode == 0, result.stderr
    for mode in ("limit", "ours", "seed-style", "matmul"):
        assert re.search(rf"^{mode} +[\d,.]+", result.stdout, re.M), result.stdout
    assert re.search(r"^ours/limit: \d+\.\d\d$", result.stdout, re.M)
    assert re.search(r"^ours/seed-style: \d+\.\d\d$", result.stdout, re.M)
    saved = json.loads((tmp_path / "b.json").read_text())
    assert set(saved["images_per_second"]) == {"limit", "ours", "seed-style"}
    assert all(rate > 0 for rate in saved["images_per_second"].values())
    assert saved["training_flops_per_image"] > 3 * 50_000_000  # forward + backward of res_512

    md = record(saved, "python -m common bench ...", tmp_path / "bench")
    assert md.name == "bench.md" and re.search(r"^## cpu_\w+-res_512-b8$", md.read_text(), re.M)
    assert table(saved) in md.read_text()
    kept = json.loads(next((tmp_path / "bench").glob("cpu_*-res_512-b8.json")).read_text())
    assert len(kept["git"]["commit"]) == 40 and kept["recorded"].startswith("20")  # which code, when
    assert f"code {kept['git']['commit'][:7]}" in md.read_text()


def test_bench_settings_reach_limit_and_ours_alike_and_name_the_record(tmp_path, fake_data, monkeypatch):
    import torch
    from common.bench import bench
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode: modes.append(mode) or model)
    result = bench("res_512", "cpu", 8, str(fake_data), steps=2, repeats=1, modes=("limit", "ours"),
                   download=False, settings={"compile": True, "compile_mode": "reduce-overhead"})
    assert modes == ["reduce-overhead", "reduce-overhead"]  # the limit's step, then the training loop
    assert result["settings"] == {"compile": True, "compile_mode": "reduce-overhead"}
    assert "res_512, batch 8, compile=True, compile_mode=reduce-overhead, CPU" in table(result)
    record({**result, "device": "CPU: AMD EPYC, 2 threads"}, "python -m common bench ...", tmp_path / "bench")
    record({**result, "device": "NVIDIA H200"}, "python -m common bench ...", tmp_path / "bench")
    assert sorted(p.name for p in (tmp_path / "bench").glob("*.json")) == [  # two devices, two records
        "cpu_amd_epyc_2_threads-res_512-b8-compile-True-compile_mode-reduce-overhead.json",
        "nvidia_h200-res_512-b8-compile-True-compile_mode-reduce-overhead.json"]
    assert "compile_mode=reduce-overhead, H200, torch" in (tmp_path / "bench.md").read_text()  # no vendor mark


def test_bench_takes_any_field_in_settings_its_flags_win_and_the_limit_steps_as_the_loop(fake_data, monkeypatch):
    from common import bench
    batches, forward_backward = [], bench.forward_backward
    monkeypatch.setattr(bench, "forward_backward", lambda model, x, y, config, autocast, scaler: batches.append(
        (len(x), config.micro_batch)) or forward_backward(model, x, y, config, autocast, scaler))
    result = bench.bench("res_512", batch_size=8, data_dir=str(fake_data), steps=1, repeats=1, modes=("limit",),
                         settings={"device": "cpu", "download": False, "batch_size": 4, "micro_batch": 4})
    assert result["batch_size"] == 8 and result["device_type"] == "cpu"
    assert set(batches) == {(8, 4)}  # in micro-batches, as the training loop steps


def test_bench_times_the_modes_in_turns_so_a_drifting_machine_slows_them_alike():
    from common.bench import interleaved_seconds
    calls = []

    def timer(mode):  # a machine slowing down: each timing takes a second longer than the last
        return lambda: calls.append(mode) or float(len(calls))
    medians = interleaved_seconds({mode: timer(mode) for mode in ("limit", "ours")}, repeats=3)
    assert calls == ["limit", "ours"] * 3
    assert medians == {"limit": 3.0, "ours": 4.0}  # of 1, 3, 5 and 2, 4, 6 seconds


def test_bench_refuses_an_unknown_mode():
    result = cli("bench", "--modes", "ours,warp")
    assert result.returncode == 2 and "unknown bench mode warp" in result.stderr


def test_study_runs_in_parallel_skips_complete_runs_and_reports_failures(tmp_path, fake_data):
    args = ["study", "res_512", "changing_optimisers/adam", "res_512", "--parallel", "2", "--devices", "cpu",
            "--out-root", tmp_path, "--epochs", "1", "--batch-size", "64", "--data-dir", fake_data,
            "--no-download"]
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("started res_512 on cpu") == 1  # a name given twice runs once
    for name in ("res_512", "changing_optimisers/adam"):
        assert json.loads((tmp_path / name / "run.json").read_text())["status"] == "complete"
        assert f"started {name} on cpu" in first.stdout and f"{name}: complete" in first.stdout
    # two at a time: both started before either completed
    assert max(first.stdout.index(f"started {n} on cpu") for n in ("res_512", "changing_optimisers/adam")) \
        < first.stdout.index(": complete")
    assert re.search(r"^study: 2 complete in \d+\.\d s \(2 at a time on cpu\)$", first.stdout, re.M)
    again = cli(*args)
    assert again.returncode == 0 and "started" not in again.stdout  # both complete: skipped
    longer = cli("study", "res_512", "--devices", "cpu", "--out-root", tmp_path, "--epochs", "2",
                 "--batch-size", "64", "--data-dir", fake_data, "--no-download")
    assert longer.returncode == 0, longer.stdout  # complete with other settings: started afresh, not resumed
    assert "started res_512 on cpu\n" in longer.stdout
    assert json.loads((tmp_path / "res_512" / "run.json").read_text())["epochs_done"] == 2

    broken = cli("study", "res_512", "res_block", "--devices", "cpu", "--out-root", tmp_path / "b",
                 "--epochs", "1", "--subset", "5000", "--data-dir", fake_data, "--no-download")
    assert broken.returncode == 2  # each run fails on its own (200 images here), and both are tried
    assert "res_block: failed (exit 2): error: subset of 5000 images" in broken.stdout
    assert "2 of 2 experiment(s) did not complete: res_512, res_block" in broken.stderr
    assert re.search(r"^study: 2 not complete in ", broken.stdout, re.M)
    nowhere = cli("study", "res_512", "res_block", "--devices", "cpu", "--out-root", tmp_path / "c",
                  "--data-dir", tmp_path / "nowhere", "--no-download")
    assert nowhere.returncode == 2 and "no CIFAR-10 at" in nowhere.stderr  # found out once, up front
    assert "started" not in nowhere.stdout


def test_study_skips_an_experiment_whose_twin_earlier_in_it_runs_the_same_settings(tmp_path, fake_data):
    from common.data import load_cifar10
    from common.experiments import EXPERIMENTS
    from common.study import finished, study, twin_in_study
    relu, sgd = "changing_activations/relu", "changing_optimisers/sgd"
    configs = {name: EXPERIMENTS[name].config.replace(data_dir=str(fake_data)) for name in (relu, sgd)}
    assert twin_in_study(sgd, configs) == relu and twin_in_study(relu, configs) is None
    assert twin_in_study(sgd, {name: config.replace(epochs=1) for name, config in configs.items()}) is None
    assert twin_in_study(sgd, {sgd: configs[sgd]}) is None
    (tmp_path / relu).mkdir(parents=True)  # relu complete: nothing to launch
    (tmp_path / relu / "run.json").write_text(json.dumps(
        {"status": "complete", "config": json.loads(json.dumps(configs[relu].to_dict())),
         "data": {"sha256": load_cifar10(fake_data, allow_download=False).digest}}))
    outcomes = study(configs, out_root=tmp_path)
    assert outcomes == {relu: "skipped (complete)",
                        sgd: f"skipped ({relu} has the same settings: its run stands for both)"}
    assert all(map(finished, outcomes.values())) and not (tmp_path / sgd).exists()


def test_study_leaves_a_folder_held_by_another_run_alone(tmp_path):
    from common.experiments import EXPERIMENTS
    from common.history import run_lock
    from common.study import finished, study
    log = tmp_path / "res_512" / "train.log"
    with run_lock(log.parent):
        log.write_text("the other run's output\n")
        outcomes = study({"res_512": EXPERIMENTS["res_512"].config}, out_root=tmp_path)
    assert outcomes == {"res_512": f"not started: its folder is in use by another run (pid {os.getpid()})"}
    assert not finished(outcomes["res_512"]) and log.read_text() == "the other run's output\n"


def test_study_reports_a_run_whose_folder_cannot_be_made_as_not_started(tmp_path):
    from common.experiments import EXPERIMENTS
    from common.study import finished, study
    (tmp_path / "res_512").write_text("a file where the run folder should be")
    outcomes = study({"res_512": EXPERIMENTS["res_512"].config}, out_root=tmp_path)
    assert outcomes["res_512"].startswith(f"not started: {tmp_path / 'res_512'} cannot be its run folder (")
    assert not finished(outcomes["res_512"])


def test_study_passes_settings_to_every_run_and_checks_them_first(tmp_path, fake_data):
    args = ["study", "res_512", "--devices", "cpu", "--out-root", tmp_path, "--epochs", "1",
            "--batch-size", "64", "--data-dir", fake_data, "--no-download"]
    result = cli(*args, "--set", "lr=0.05")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "res_512" / "run.json").read_text())["config"]["lr"] == 0.05
    refused = cli(*args, "--set", "lr=-1")
    assert refused.returncode == 2 and "lr must be positive" in refused.stderr
    assert "started" not in refused.stdout
    status, out, err = in_process(*args, "--set", "warmup=0.1")  # the recipe too, before any run starts
    assert status == 2 and "schedule cosine has no warm-up" in err and "started" not in out
    status, out, err = in_process(*args, "--set", "compile=true")  # --compile says how, for every run
    assert status == 2 and "a study compiles with --compile (auto, eager, compile or cuda-graphs)" in err
    assert "started" not in out


def fake_compile_costs(monkeypatch, setups, steps, fails=()):
    """Have compile_costs time fake ways: `setups` and `steps` {way: seconds}, `fails` raising."""
    from common import bench
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(bench, "synchronize", lambda device: None)  # a "cuda" device on a CPU-only machine

    def fake_limit_timer(config, device, timed_steps):
        way = next(w for w, fields in bench.COMPILE_WAYS.items() if fields.items() <= config.to_dict().items())
        if way in fails:
            raise RuntimeError(f"{way} cannot here\n(its traceback)")
        clock[0] += setups[way]
        return lambda: steps[way] * timed_steps
    monkeypatch.setattr(bench, "limit_timer", fake_limit_timer)


def test_compile_costs_weigh_each_ways_compile_time_against_the_steps_it_saves(monkeypatch):
    import torch
    from common.bench import compile_costs
    from common.config import Config
    fake_compile_costs(monkeypatch, setups={"eager": 1.0, "compile": 40.0}, steps={"eager": 0.010, "compile": 0.004},
                       fails=("cuda-graphs",))
    costs = compile_costs(Config(), torch.device("cpu"), runs=2, steps=10_000)
    assert costs["eager"] == {"setup": 1.0, "step": 0.010, "total": 2 * 1.0 + 10_000 * 0.010}
    assert costs["compile"] == {"setup": 40.0, "step": 0.004, "total": 2 * 40.0 + 10_000 * 0.004}
    assert costs["cuda-graphs"] == {"error": "cuda-graphs cannot here"}


def test_study_runs_each_model_the_way_measured_fastest_for_all_its_runs_on_a_gpu(tmp_path, monkeypatch, capsys):
    import torch
    from common import study as study_module
    from common.experiments import EXPERIMENTS
    fake_compile_costs(monkeypatch, setups={"eager": 1.0, "compile": 30.0, "cuda-graphs": 50.0},
                       steps={"eager": 0.010, "compile": 0.008, "cuda-graphs": 0.002})
    measured, launched = [], {}
    compile_costs = study_module.compile_costs
    monkeypatch.setattr(study_module, "compile_costs", lambda config, device, runs, steps: measured.append(
        (config.architecture, runs, steps)) or compile_costs(config, device, runs, steps))
    monkeypatch.setattr(study_module, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(study_module, "launch", lambda name, folder, device, args, resume: launched.update(
        {name: args}) or subprocess.Popen([sys.executable, "-c", ""]))
    relu, tanh = "changing_activations/relu", "changing_activations/tanh"
    configs = {name: EXPERIMENTS[name].config.replace(subset=1000, batch_size=100) for name in (relu, tanh, "res_512")}
    (tmp_path / tanh).mkdir(parents=True)  # tanh stopped after 10 of its 50 epochs: 40 left
    (tmp_path / tanh / "checkpoint.pt").write_bytes(b"")
    (tmp_path / tanh / "run.json").write_text(json.dumps({"status": "interrupted", "epochs_done": 10}))
    outcomes = study_module.study(configs, out_root=tmp_path)
    assert set(outcomes.values()) == {"complete"}
    # relu and tanh share a model but for the activation: measured once, for their 90 epochs of 10 steps
    assert measured == [("res_512_d", 2, 900), ("res_512", 1, 2000)]
    # 900 steps: eager 2 s + 9 s beats cuda-graphs 100 s + 1.8 s; 2000 steps of res_512: the same
    assert launched[relu] == launched[tanh] == launched["res_512"] == ["--set", "compile=false"]
    configs = {name: config.replace(epochs=config.epochs * 100) for name, config in configs.items()}
    launched.clear()
    study_module.study(configs, out_root=tmp_path / "longer")  # 100 times the steps: CUDA graphs pay
    assert launched[relu] == ["--set", "compile=true", "--set", 'compile_mode="reduce-overhead"']
    assert (f"{relu}, {tanh} (batch 100, 100,000 steps on cuda): eager 10.00 ms a step, set up in 1 s: "
            "16.7 min; compile 8.00 ms a step, set up in 30 s: 14.3 min; cuda-graphs 2.00 ms a step, "
            "set up in 50 s: 5.0 min; fastest: cuda-graphs") in capsys.readouterr().out


def test_study_runs_every_model_the_way_asked_and_eager_on_a_cpu_unless_asked(tmp_path, monkeypatch):
    from common import study as study_module
    from common.experiments import EXPERIMENTS
    assert study_module.compile_arguments({"res_512": EXPERIMENTS["res_512"].config}, {"res_512": 200}, "cpu",
                                          "auto") == {"res_512": ["--set", "compile=false"]}
    assert study_module.compile_arguments({"res_512": EXPERIMENTS["res_512"].config}, {"res_512": 200}, "cpu",
                                          "compile") == {
        "res_512": ["--set", "compile=true", "--set", 'compile_mode="default"']}


def test_ctrl_c_stops_the_study_which_stops_each_run_once_and_the_same_command_resumes_them(tmp_path,
                                                                                           fake_data):
    args = ["study", "res_512", "--devices", "cpu", "--out-root", tmp_path, "--epochs", "3",
            "--batch-size", "4", "--data-dir", fake_data, "--no-download"]  # 50 steps an epoch
    study = subprocess.Popen([sys.executable, "-m", "common", *map(str, args)], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    folder = tmp_path / "res_512"
    wait_for_epochs(folder, 1, study)
    os.killpg(study.pid, signal.SIGINT)  # as Ctrl+C at a terminal: to the study's whole process group
    stdout, stderr = study.communicate(timeout=60)
    assert study.returncode == 130
    assert "res_512: interrupted, checkpoint saved" in stdout
    assert "study stopped by SIGINT; the same command resumes" in stderr
    log = (folder / "train.log").read_text()
    assert "stopped by SIGTERM" in log and "SIGINT" not in log  # the study's one request, not the terminal's
    status = json.loads((folder / "run.json").read_text())  # final: the run ended with the study
    assert status["status"] == "interrupted" and status["epochs_done"] < 3

    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "started res_512 on cpu (resuming)" in resumed.stdout
    # The progress bar starts at the epochs already done, so its rate and ETA count this session's only.
    assert f"study:{round(100 * status['epochs_done'] / 3):4d}%" in resumed.stderr.split("|")[0]
    assert resumed.stderr.count("study:") <= 8  # drawn when an epoch ends (and at start/end), not each poll
    assert json.loads((folder / "run.json").read_text())["epochs_done"] == 3
    log = (folder / "train.log").read_text()  # one log for the run, both parts in order
    assert log.index("stopped by SIGTERM") < log.rindex("res_512: final test accuracy")


def test_a_run_killed_before_it_could_save_is_a_failure_not_a_saved_checkpoint(tmp_path):
    (tmp_path / "train.log").write_text("epoch 1\nerror: stopped by SIGTERM at epoch 2, step 5; checkpoint saved; "
                                        "resume with: ...\n")
    assert outcome(143, tmp_path) == "interrupted, checkpoint saved"  # RunInterrupted saves first
    (tmp_path / "train.log").write_text("epoch 1\n\ninterrupted: the run folder keeps every finished epoch\n")
    assert outcome(130, tmp_path) == "interrupted (interrupted: the run folder keeps every finished epoch)"
    (tmp_path / "train.log").write_text("epoch 1\n")
    assert outcome(-9, tmp_path) == "failed (killed by SIGKILL): no checkpoint"
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert outcome(-15, tmp_path) == "failed (killed by SIGTERM): its last checkpoint is older"
    assert outcome(2, tmp_path) == "failed (exit 2): epoch 1"


class FakeRun:
    """A run's process that records how it was asked to stop; `console=False` refuses Ctrl+Break,
    as Windows does when the study shares no console with the run."""

    def __init__(self, console=True):
        self.console, self.calls = console, []

    def send_signal(self, number):
        if not self.console:
            raise OSError("no console")
        self.calls.append(("send_signal", number))

    def terminate(self):
        self.calls.append(("terminate",))


def test_a_study_starts_each_run_in_its_own_group_and_stops_it_with_sigterm_or_ctrl_break(tmp_path,
                                                                                          monkeypatch):
    import common.study as study_module
    monkeypatch.setattr(study_module, "WINDOWS", True)
    monkeypatch.setattr(signal, "CTRL_BREAK_EVENT", 1, raising=False)
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200, raising=False)
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda command, **options: started.append(options))
    study_module.launch("res_512", tmp_path / "res_512", "cpu", [], resume=False)
    assert started[0]["creationflags"] == 0x200  # Ctrl+Break reaches a process group, not a process

    graceful, without_console = FakeRun(), FakeRun(console=False)
    study_module.ask_to_stop(graceful)
    study_module.ask_to_stop(without_console)
    assert graceful.calls == [("send_signal", 1)]  # terminate() would kill it mid-step there
    assert without_console.calls == [("terminate",)]

    monkeypatch.setattr(study_module, "WINDOWS", False)
    on_posix = FakeRun()
    study_module.ask_to_stop(on_posix)
    study_module.launch("res_512", tmp_path / "res_512", "cpu", [], resume=False)
    assert on_posix.calls == [("terminate",)]  # SIGTERM
    assert started[1] == {**started[1], "start_new_session": True} and "creationflags" not in started[1]


def test_a_folder_with_a_corrupt_run_json_is_run_afresh_beside_the_others(tmp_path, fake_data):
    (tmp_path / "res_512").mkdir()
    (tmp_path / "res_512" / "run.json").write_text("{half a fi")
    result = cli("study", "res_512", "res_block", "--devices", "cpu", "--out-root", tmp_path, "--epochs", "1",
                 "--batch-size", "64", "--data-dir", fake_data, "--no-download")
    assert result.returncode == 0, result.stderr
    assert "res_512: complete" in result.stdout and "res_block: complete" in result.stdout
    assert json.loads((tmp_path / "res_512" / "run.json").read_text())["status"] == "complete"
