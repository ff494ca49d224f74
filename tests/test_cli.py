import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest

from common.cli import main
from common.config import Config, UserError, differing_settings, parse_settings, train_arguments
from common.experiments import EXPERIMENTS
from conftest import REPO


def cli(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "common", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def in_process(*args):
    """`main` as `python -m common` runs it, in this process (no interpreter and torch to start):
    (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([str(a) for a in args])
        except SystemExit as e:  # argparse's errors
            status = e.code
    return status, out.getvalue(), err.getvalue()


def test_list_shows_every_experiment_with_its_parameters():
    result = cli("list")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 1 + len(EXPERIMENTS)
    assert any(line.startswith("og_resnet ") and " 4,997,802 " in line for line in lines)
    assert any(line.startswith("res_block ") and " 4,979,498 " in line for line in lines)
    assert lines[0].endswith("run in its folder")  # each row's state: history.experiment_state


def test_the_only_twins_in_the_registry_are_the_original_studys_relu_and_sgd():
    from common.experiments import twins
    relu, sgd = "changing_activations/relu", "changing_optimisers/sgd"
    assert twins(sgd) == [relu] and twins(relu) == [sgd]
    assert not any(twins(name) for name in EXPERIMENTS if name not in (relu, sgd))


def test_train_writes_the_run_folder(tmp_path, fake_data):
    result = cli("train", "changing_optimisers/adagrad", "--epochs", "1", "--subset", "50",
                 "--data-dir", fake_data, "--out", tmp_path, "--device", "cpu", "--no-download",
                 "--batch-size", "32", "--set", "lr=0.05", "--set", "activation=null")
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["config"]["optimizer"] == "adagrad" and info["config"]["lr"] == 0.05
    # null restores the architecture's own activation over the experiment's ReLU
    assert info["config"]["activation"] is None and info["model"]["activation"] == "leakyrelu"
    assert info["data"]["train_images"] == 50
    assert "final test accuracy" in result.stdout


def test_train_seeds_writes_sibling_folders_and_their_summary(tmp_path, fake_data):
    result = cli("train", "fast94", "--seeds", "2", "--seed", "7", "--epochs", "1", "--data-dir", fake_data,
                 "--out", tmp_path, "--device", "cpu", "--no-download", "--batch-size", "64",
                 "--set", "widths=[8,16,16]")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "seeds.json").read_text())
    assert summary["seeds"] == [7, 8] and (tmp_path / "seed8" / "model.pt").is_file()
    assert "fast94 over 2 seed(s): test accuracy at the end (end-of-run evaluation, else last epoch)" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "resnet_9000"], "unknown experiment"),
    (["train", "res_512_d", "--epochs", "-2"], "epochs must be at least 1"),
    (["train", "res_512_d", "--epochs", "two"], "invalid int value"),
    (["train", "res_512_d", "--device", "quantum"], "unknown device"),
    (["train", "res_512_d", "--device", "cuda:3"], "CUDA|visible"),
    (["train", "res_512_d", "--data-dir", "{tmp}", "--no-download"], "no CIFAR-10 at"),
    (["train", "res_512_d", "--data-dir", "{corrupt}", "--no-download"], "truncated or corrupt"),
    (["train", "res_512_d", "--set", "lr"], "expects key=value"),
    (["train", "res_512_d", "--set", "lr=fast"], "lr expects a float"),
    (["train", "res_512_d", "--set", "compile_mode=fastest"], "compile_mode is default, reduce-overhead"),
    (["bench", "--set", "compile=maybe"], "compile expects a bool"),
    (["train", "fast94", "--set", "bf16=true", "--set", "fp16=true"], "bf16 and fp16 exclude each other"),
    (["train", "fast94", "--set", "micro_batch=abc"], "micro_batch expects an int or null, got 'abc'"),
    (["train", "fast94", "--set", "micro_batch=2.5"], "micro_batch expects an int or null, got 2.5"),
    (["train", "res_512_d", "--set", "dropout=abc"], "dropout expects a float or null"),
    (["train", "fast94", "--set", 'widths=[8,"a",8]'], "widths expects a list of ints or null"),
    (["study", "res_512", "--set", "subset=abc"], "subset expects an int or null"),
    (["frobnicate"], "invalid choice"),
    (["train", "res_512_d", "--seeds", "0"], "seeds must be at least 1"),
    (["train", "res_512_d", "--val", "-5"], "val must not be negative"),
    (["train", "res_512_d", "--set", "widths=[8,8]"], "res_512_d has no option widths"),
    (["train", "fast94", "--set", "averaging=swa"], "averaging is none, ema or lookahead"),
    (["train", "fast94", "--set", "pad_mode=wrap"], "pad_mode is zeros or reflect"),
    (["train", "fast94", "--set", "widths=[0,8,8]"], "widths must be at least 1 and blocks at least 0"),
    (["train", "fast94", "--set", "blocks=[-1,1,1]"], "widths must be at least 1 and blocks at least 0"),
    (["train", "fast94", "--set", "widths=[2000,2000,2000]"], "over the 5,000,000 budget"),
    (["bench", "--experiment", "fast94", "--set", "widths=[0,8,8]"], "widths must be at least 1"),
    (["study", "fast94", "--set", "widths=[0,8,8]"], "widths must be at least 1"),
    (["train", "fast94", "--set", "cutout=33"], "cutout is a square's side in \\[0, 32\\] pixels"),
    (["train", "fast94", "--set", "widths=[8,8,8,8,8]", "--set", "blocks=[0,0,0,0,0]"],
     "cifar_resnet with these settings cannot take a 32x32 image"),
    (["train", "res_512_d", "--set", "momentum=-1"], "momentum must not be negative"),
    (["train", "res_512_d", "--set", "weight_decay=-1"], "weight_decay must not be negative"),
    (["train", "res_512_d", "--set", "std=[0,0,0]"], "std must be positive"),
    (["train", "res_512_d", "--out", "{file}"], "cannot be the run folder \\(File exists\\)"),
    (["train", "res_512_d", "--seed", "-1"], "seed must be in \\[0, 2\\*\\*32\\), got -1"),
    (["study", "res_512", "--devices", "cpu,"], "unknown device ''"),
    (["study", "res_512", "--parallel", "0"], "argument --parallel: must be at least 1, got 0"),
    (["bench", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["bench", "--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
])
def test_bad_input_is_one_line_without_traceback(tmp_path, fake_data, args, message):
    corrupt = tmp_path / "corrupt" / "cifar-10-batches-py"
    corrupt.mkdir(parents=True)
    for name in os.listdir(fake_data / "cifar-10-batches-py"):
        (corrupt / name).write_bytes((fake_data / "cifar-10-batches-py" / name).read_bytes()[:100])
    (tmp_path / "file").write_text("not a folder")
    args = [a.format(tmp=tmp_path / "empty", corrupt=corrupt.parent, file=tmp_path / "file") for a in args]
    if args[0] in ("train", "bench", "study") and "--data-dir" not in args:
        # no data anywhere: a check made after loading would fail with "no CIFAR-10 at" instead,
        # whether or not the repository holds data (CI's checkout does not)
        args += ["--data-dir", tmp_path / "empty", "--no-download"]
    if args[0] == "train" and "--out" not in args:
        # not the experiment's own folder, which a developer's run may hold (refused before the data)
        args += ["--out", tmp_path / "run"]
    status, _, stderr = in_process(*args)  # a traceback would fail the test
    assert status == 2
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert re.search(message, stderr), stderr


def test_a_corrupt_run_json_in_a_seed_folder_is_one_line(tmp_path):
    (tmp_path / "seed0").mkdir()
    (tmp_path / "seed0" / "run.json").write_text("{half a fi")
    result = cli("train", "res_512", "--seeds", "1", "--resume", "--out", tmp_path, "--data-dir",
                 tmp_path / "empty", "--no-download")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"{tmp_path / 'seed0' / 'run.json'}: not valid JSON" in result.stderr


def test_settings_are_read_as_json_and_converted_to_their_fields_types():
    config = Config()
    parsed = parse_settings(config, ["lr=1", "widths=[8,16,16]", "mean=[0,0,1]", "dropout=null", "compile=true"])
    assert parsed == {"lr": 1.0, "widths": (8, 16, 16), "mean": (0.0, 0.0, 1.0), "dropout": None, "compile": True}
    assert type(parsed["lr"]) is float and type(parsed["mean"][0]) is float
    # Each value is checked alone, so the order of --set never passes through an invalid combination.
    assert config.replace(**parse_settings(config, ["nesterov=true", "momentum=0.9"])).nesterov
    assert Config(widths=[8, 8, 8]).widths == (8, 8, 8)  # from Python too: a list becomes a tuple
    assert Config(data_dir=REPO / "data").data_dir == str(REPO / "data")  # and a folder's Path a str
    with pytest.raises(UserError, match="epochs expects an int, got True"):
        Config(epochs=True)


@pytest.mark.parametrize("text, message", [
    ("replace=1", "unknown setting replace"),  # a method of Config, not a setting
    ("scaled_lr=1", "unknown setting scaled_lr"),
    ("lr=NaN", "lr expects finite numbers, got nan"),
    ("mean=[0.5,Infinity,0.5]", "mean expects finite numbers"),
    ("crop_padding=32", "crop_padding must be in \\[0, 32\\) pixels"),
])
def test_bad_settings_are_refused_by_name(text, message):
    with pytest.raises(UserError, match=message):
        Config().replace(**parse_settings(Config(), [text]))


def test_charts_command(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start (written by `python -m common charts`) -->\nold\n"
                      "<!-- results:end -->\nrest\n")
    result = cli("charts", "--training-dir", tmp_path / "none", "--top-dir", tmp_path,
                 "--results-dir", tmp_path / "results", "--readme", readme)
    assert result.returncode == 0, result.stderr
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("-->\nrest\n") and "old" not in text
    assert "No full-budget run yet" in text
    assert (tmp_path / "model_summary.png").is_file() and (tmp_path / "results" / "optimisers.png").is_file()


def test_committed_notebooks_match_the_registry():
    result = cli("notebooks", "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_train_arguments_give_back_every_changed_setting(monkeypatch):
    from common import training
    base = EXPERIMENTS["fast94"].config
    config = base.replace(seed=3, epochs=2, subset=500, val=100, lr=0.05, widths=(8, 16, 16), activation=None,
                          schedule="constant", warmup=0.0, data_dir="/data dir", device="cpu", compile=True)
    given = {}
    monkeypatch.setattr(training, "train", lambda experiment, **kwargs: given.update(kwargs))
    assert in_process("train", "fast94", *train_arguments(base, config))[0] == 0
    rebuilt = base.replace(**{k: v for k, v in given.items() if k not in ("out_dir", "overwrite", "resume")})
    assert rebuilt.data_dir == "/data dir" and not differing_settings(config.to_dict(), rebuilt)
    assert train_arguments(base, base) == []


def test_ctrl_c_outside_a_run_says_only_interrupted(monkeypatch):
    import common.report
    def stopped(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(common.report, "build_report", stopped)
    status, _, stderr = in_process("report")
    assert status == 130 and stderr.strip() == "interrupted"  # no run folder to speak of
