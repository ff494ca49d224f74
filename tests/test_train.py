import dataclasses
import json
import math
import subprocess

import pytest
import torch
from torch import nn

from common import data as cifar
from common import devices, training
from common.experiments import get_experiment
from common.config import Config, UserError
from common.devices import resolve_device
from common.history import HISTORY_FILES, load_checkpoint, read_history
from common.muon import Muon
from common.recipe import OPTIMIZERS, make_optimizer, make_schedule
from common.training import evaluate, train

RUN_JSON_KEYS = {"experiment", "config", "seed", "model", "trainable_parameters", "data", "device",
                 "torch", "git", "epoch_seconds", "wall_seconds", "status", "budget"}


def test_one_epoch_writes_four_one_line_histories_and_run_json(tmp_path, tiny):
    run = train("res_512_d", out_dir=tmp_path, epochs=1, subset=100, **tiny)
    for name in HISTORY_FILES.values():
        lines = (tmp_path / name).read_text().splitlines()
        assert len(lines) == 1 and math.isfinite(float(lines[0]))
    for name in ("train_acc_history.txt", "test_acc_history.txt"):
        assert 0.0 <= float((tmp_path / name).read_text()) <= 1.0
    info = json.loads((tmp_path / "run.json").read_text())
    assert RUN_JSON_KEYS <= set(info)
    assert info["experiment"] == "res_512_d" and info["status"] == "complete"
    assert info["trainable_parameters"] == 4_961_610
    assert info["model"] == {"activation": "leakyrelu", "dropout": 0.1, "softmax_output": False}
    assert info["data"]["train_images"] == 100 and info["data"]["test_images"] == 50
    assert info["budget"] == "smoke" and len(info["epoch_seconds"]) == 1
    assert info["config"]["subset"] == 100 and info["device"]["type"] == "cpu"
    assert run.history == read_history(tmp_path)


def test_final_weights_reload_to_the_same_test_accuracy(tmp_path, tiny, fake_data):
    from common.data import load_cifar10
    from common.models import model_from_config
    run = train("res_block", out_dir=tmp_path, epochs=1, **tiny)
    model = model_from_config(run.config)
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    data = load_cifar10(fake_data, allow_download=False)
    loss, acc = evaluate(model, data.test_images, data.test_labels, run.config,
                         torch.autocast("cpu", enabled=False))
    assert (loss, acc) == (run.history["test_loss"][-1], run.history["test_acc"][-1])


def test_seeded_cpu_runs_are_identical_and_the_seed_matters(tmp_path, tiny):
    histories = [train("res_512", out_dir=tmp_path / str(i), epochs=2, seed=seed, **tiny).history
                 for i, seed in enumerate((7, 7, 8))]
    assert histories[0] == histories[1]
    assert histories[0] != histories[2]


def test_training_learns_the_fake_classes(tmp_path, tiny):
    run = train("res_512", out_dir=tmp_path, epochs=4, **{**tiny, "batch_size": 32})
    assert run.history["train_loss"][-1] < run.history["train_loss"][0]
    assert run.history["test_acc"][-1] >= 0.2  # twice chance: each fake class has its own colour


class ConstantClass(nn.Module):
    """Always predicts class 0, whatever the input."""
    def forward(self, x):
        return torch.zeros(len(x), 10).index_fill_(1, torch.tensor([0]), 1.0)


def test_accuracy_is_counted_per_image_not_per_batch():
    labels = torch.tensor([0] * 3 + [1] * 998)  # 1001 images: 3 batches of 500 and one of 1
    images = torch.zeros(len(labels), 3, 32, 32, dtype=torch.uint8)
    loss, acc = evaluate(ConstantClass(), images, labels, Config(), torch.autocast("cpu", enabled=False))
    assert acc == 3 / 1001  # a mean of per-batch means would give (3/500 + 0 + 0) / 3
    expected = torch.nn.functional.cross_entropy(ConstantClass()(images), labels).item()
    assert loss == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adadelta", torch.optim.Adadelta),
                                       ("rmsprop", torch.optim.RMSprop),
                                       ("adagrad", torch.optim.Adagrad), ("adamw", torch.optim.AdamW),
                                       ("muon", Muon)])
def test_each_optimizer_is_what_it_says_at_the_seed_learning_rate(name, cls):
    optimizer = make_optimizer(nn.Linear(2, 2), Config(optimizer=name))
    assert type(optimizer) is cls and optimizer.param_groups[0]["lr"] == 0.1
    assert set(OPTIMIZERS) == {"sgd", "adam", "adadelta", "rmsprop", "adagrad", "adamw", "muon"}


def test_seed_sgd_has_no_momentum_and_no_weight_decay():
    group = make_optimizer(nn.Linear(2, 2), Config()).param_groups[0]
    assert group["momentum"] == 0 and group["weight_decay"] == 0


def test_cosine_schedule_matches_cosine_annealing_over_the_run():
    ours = make_optimizer(nn.Linear(2, 2), Config())
    theirs = make_optimizer(nn.Linear(2, 2), Config())
    schedule = make_schedule(ours, Config(epochs=10), steps_per_epoch=7)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(theirs, T_max=10)
    for _ in range(10):
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], abs=1e-12)
        ours.step(), theirs.step(), schedule.step(), reference.step()


class NaNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 10)

    def forward(self, x):
        return self.linear(x.mean((2, 3))) * float("nan")


def test_non_finite_loss_stops_the_run_without_writing_nan(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(training, "model_from_config", lambda config: NaNModel())
    with pytest.raises(training.TrainingError, match="training loss became non-finite in epoch 1, step 1;"):
        train("res_512", out_dir=tmp_path, epochs=2, **tiny)
    assert all(v == [] for v in read_history(tmp_path).values())
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "failed"


def test_a_non_finite_evaluation_loss_stops_the_run(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(training, "evaluate", lambda *args, **kwargs: (float("nan"), 0.1))
    with pytest.raises(training.TrainingError, match="evaluation loss became nan in epoch 1"):
        train("res_512", out_dir=tmp_path, epochs=2, **tiny)
    assert read_history(tmp_path)["test_loss"] == []


def test_a_run_is_full_budget_only_with_all_its_epochs_no_subset_and_full_data(tmp_path, tiny, monkeypatch):
    import dataclasses
    from common import data
    from common.experiments import EXPERIMENTS
    fast94 = EXPERIMENTS["fast94"]  # made an experiment of 2 epochs of a tiny net: seconds a run
    monkeypatch.setitem(EXPERIMENTS, "fast94", dataclasses.replace(fast94, config=fast94.config.replace(
        epochs=2, widths=(8, 8, 8))))
    assert train("fast94", out_dir=tmp_path / "a", **tiny).info["budget"] == "smoke"  # fake data
    monkeypatch.setattr(data, "FULL_VARIANTS", {*data.FULL_VARIANTS, "unknown"})  # as if it were CIFAR-10
    assert train("fast94", out_dir=tmp_path / "b", **tiny).info["budget"] == "full"
    assert train("fast94", out_dir=tmp_path / "c", epochs=1, **tiny).info["budget"] == "smoke"
    assert train("fast94", out_dir=tmp_path / "d", subset=100, **tiny).info["budget"] == "smoke"


def test_a_resume_on_other_images_is_refused(tmp_path, tiny):
    from conftest import write_fake_cifar
    train("res_512", out_dir=tmp_path / "run", epochs=1, **tiny)
    other = write_fake_cifar(tmp_path / "other", seed=1)
    with pytest.raises(UserError, match="holds other images than the run trained on"):
        train("res_512", out_dir=tmp_path / "run", epochs=1, resume=True, **{**tiny, "data_dir": str(other)})


def test_a_fresh_start_leaves_none_of_the_last_runs_files(tmp_path, tiny):
    train("res_512", out_dir=tmp_path, epochs=1, val=50, **tiny)
    assert (tmp_path / "val_acc_history.txt").is_file() and (tmp_path / "model.pt").is_file()
    run = train("res_512", out_dir=tmp_path, epochs=1, **tiny)
    assert not list(tmp_path.glob("val_*")) and read_history(tmp_path) == run.history


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 0}, "batch_size must be at least 1"), ({"lr": 0}, "lr must be positive"),
    ({"micro_batch": 0}, "micro_batch must be at least 1"), ({"crop_padding": -1}, "crop_padding must be in"),
    ({"ema_decay": 1.0}, "ema_decay must be in"), ({"label_smoothing": 1.0}, "label_smoothing must be in"),
    ({"warmup": 1.0}, "warmup must be a fraction"), ({"lr_batch_size": 0}, "lr_batch_size must be at least 1"),
    ({"mean": (0.5, 0.5)}, "mean and std need three values"), ({"epochs": 2.5}, "epochs expects an int"),
    ({"muon_lr": 0}, "muon_lr must be positive"), ({"muon_momentum": 1.0}, "muon_momentum must be in"),
    ({"bias_lr_scale": 0}, "bias_lr_scale must be positive"),
])
def test_each_config_check_refuses_its_value(overrides, message):
    with pytest.raises(UserError, match=message):
        Config(**overrides)


def test_a_smoke_run_does_not_replace_a_full_run(tmp_path, tiny):
    train("res_512", out_dir=tmp_path, epochs=1, **tiny)
    info = json.loads((tmp_path / "run.json").read_text())
    (tmp_path / "run.json").write_text(json.dumps({**info, "budget": "full"}))
    with pytest.raises(UserError, match="holds a full-budget run"):
        train("res_512", out_dir=tmp_path, epochs=1, **tiny)
    train("res_512", out_dir=tmp_path, epochs=1, overwrite=True, **tiny)


def test_a_full_run_with_other_settings_does_not_replace_a_full_run(tmp_path, tiny):
    run = train("res_512", out_dir=tmp_path, epochs=1, **tiny)
    info = json.loads((tmp_path / "run.json").read_text())
    (tmp_path / "run.json").write_text(json.dumps({**info, "budget": "full"}))
    other = run.config.replace(lr=0.05, seed=3, device="auto")
    with pytest.raises(UserError, match=r"holds a full-budget run \(1 epochs\); a run with other settings "
                                        r"\(lr, seed\) would replace it: pass another --out \(a study: "
                                        r"--out-root\), or --overwrite"):
        training.refuse_to_replace(tmp_path, other, full_budget=True, overwrite=False)
    # The same run again (where it runs aside) replaces it, as rerunning a notebook should.
    training.refuse_to_replace(tmp_path, run.config.replace(device="auto"), full_budget=True, overwrite=False)
    training.refuse_to_replace(tmp_path, other, full_budget=True, overwrite=True)


def test_a_complete_run_is_the_same_run_again_only_with_the_same_settings_on_the_same_images(fake_data):
    data = cifar.load_cifar10(fake_data, allow_download=False)
    config = get_experiment("res_512").config
    info = {"status": "complete", "config": config.to_dict(), "data": {"variant": data.variant, "sha256": data.digest}}
    assert training.same_complete_run(info, config.replace(device="cpu", data_dir=str(fake_data)), data)
    assert not training.same_complete_run({**info, "status": "interrupted"}, config, data)
    assert not training.same_complete_run(info, config.replace(lr=0.05), data)
    # a smoke run on the small data is no complete run on these images, for study or --seeds --resume
    assert not training.same_complete_run({**info, "data": {"variant": "exact-small", "sha256": "0" * 64}},
                                          config, data)
    # a run recorded before the digest: told by its variant, the official pixels under either name
    official = dataclasses.replace(data, variant="official")
    assert training.same_complete_run({**info, "data": {"variant": "exact-offline"}}, config, official)
    assert not training.same_complete_run({**info, "data": {"variant": "exact-small"}}, config, official)


def test_a_fresh_start_does_not_wipe_an_unfinished_run_that_its_checkpoint_continues(tmp_path, tiny):
    train("res_512", out_dir=tmp_path, epochs=1, **tiny)
    info = json.loads((tmp_path / "run.json").read_text())
    (tmp_path / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    (tmp_path / "checkpoint.pt").touch(exist_ok=True)
    with pytest.raises(UserError, match=r"holds an unfinished run \(1/1 epochs\) and its checkpoint: pass --resume"):
        train("res_512", out_dir=tmp_path, epochs=1, **tiny)
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "interrupted"  # untouched
    # A checkpoint resumes without run.json, so one beside a broken or missing run.json is kept too.
    for run_json in ("[", None):
        if run_json is None:
            (tmp_path / "run.json").unlink()
        else:
            (tmp_path / "run.json").write_text(run_json)
        with pytest.raises(UserError, match=r"holds an unfinished run \(\?/\? epochs\) and its checkpoint"):
            train("res_512", out_dir=tmp_path, epochs=1, **tiny)
        assert (tmp_path / "checkpoint.pt").exists()
    train("res_512", out_dir=tmp_path, epochs=1, overwrite=True, **tiny)
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("name, message", [("tpu", "unknown device"), ("cuda:7", "CUDA|visible"),
                                           ("mps", "not supported")])
def test_bad_devices(name, message):
    if name == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(UserError, match=message):
        resolve_device(name)


@pytest.mark.parametrize("gpu", [False, True])
def test_auto_device_is_the_gpu_where_there_is_one_else_the_cpu(gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert resolve_device("auto") == torch.device("cuda" if gpu else "cpu")


def test_a_cpu_is_named_with_its_model_and_vector_instructions(monkeypatch):
    class Cpuinfo:  # two processors; the first one's entries count
        def __init__(self, path):
            pass

        def read_text(self):
            return ("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    monkeypatch.setattr(devices, "Path", Cpuinfo)
    assert devices.device_name(torch.device("cpu")) == (
        f"CPU: AMD EPYC ({torch.backends.cpu.get_cpu_capability()}, AVX512-BF16), "
        f"{torch.get_num_threads()} threads")


@pytest.mark.parametrize("overrides, message", [
    ({"epochs": 0}, "epochs must be at least 1"),
    ({"epochs": -3}, "epochs must be at least 1"),
    ({"subset": 5}, "subset must be at least 10"),
    ({"optimizer": "lbfgs2"}, "unknown optimizer"),
    ({"optimizer": "adam", "momentum": 0.9}, "optimizer adam takes no momentum \\(sgd, rmsprop, muon do\\)"),
    ({"optimizer": "rmsprop", "momentum": 0.9, "nesterov": True}, "optimizer rmsprop takes no nesterov"),
    ({"warmup": 0.1}, "schedule cosine has no warm-up \\(warmup_cosine, triangle, linear do\\)"),
    ({"warp_speed": 9}, "unknown setting warp_speed"),
])
def test_bad_settings_are_refused_before_training(tmp_path, tiny, overrides, message):
    with pytest.raises(UserError, match=message):
        train("res_512", out_dir=tmp_path, **{**tiny, **overrides, "data_dir": str(tmp_path / "none")})


def test_the_memory_layout_is_a_setting_that_leaves_the_outputs_alone():
    from common.models import build_model
    model = build_model("cifar_resnet", widths=(8, 16, 16)).eval()
    x = torch.randn(4, 3, 32, 32)
    default, plain = Config(), Config(channels_last=False)
    reordered = devices.prepare(build_model("cifar_resnet", widths=(8, 16, 16)).eval(), default)
    reordered.load_state_dict(model.state_dict())
    assert reordered.stages[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert devices.prepare(x, default).is_contiguous(memory_format=torch.channels_last)
    assert devices.prepare(x, plain) is x and devices.prepare(model, plain) is model
    assert torch.allclose(reordered(devices.prepare(x, default)), model(x), atol=1e-5)


@pytest.mark.parametrize("bf16, dtype", [(None, torch.float32), (True, torch.bfloat16), (False, torch.float32)])
def test_on_a_cpu_bf16_autocast_is_off_unless_asked_for(bf16, dtype):
    conv = nn.Conv2d(3, 4, 3)
    with devices.autocast_for("cpu", Config(bf16=bf16)):
        assert conv(torch.randn(1, 3, 8, 8)).dtype == dtype


@pytest.mark.parametrize("precision, flags, warned", [
    ("bf16", "fpu avx2", 1), ("bf16", "fpu avx2 avx512_bf16", 0), ("bf16", "fpu avx2 avx512_fp16", 1),
    ("fp16", "fpu avx2", 1), ("fp16", "fpu avx2 avx512_bf16", 1), ("fp16", "fpu avx512_bf16 avx512_fp16", 0),
    ("bf16", "", 0), ("fp16", "", 0)])
def test_bf16_or_fp16_on_a_cpu_without_instructions_for_it_warns_once(precision, flags, warned, monkeypatch,
                                                                      capsys):
    monkeypatch.setattr(devices, "cpu_info", lambda: {"flags": flags} if flags else {})
    devices.warn_if_emulated.cache_clear()
    for _ in range(2):
        devices.autocast_for("cpu", Config(**{precision: True}))
    devices.autocast_for("cpu", Config())
    devices.warn_if_emulated.cache_clear()
    err = capsys.readouterr().err
    assert err.count(f"no {precision} instructions") == warned and err.count("warning") == warned
    assert f"--set {precision}=false avoids it" in err or not warned


@pytest.mark.parametrize("capability, settings, computes_in, warned", [
    ((9, 0), {}, "bf16", 0), ((8, 0), {}, "bf16", 0), ((7, 5), {}, "float32", 0),
    ((7, 5), {"bf16": False}, "float32", 0), ((7, 5), {"bf16": True}, "bf16", 1),
    ((8, 6), {"bf16": False}, "float32", 0), ((7, 5), {"fp16": True}, "fp16", 0), ((9, 0), {"fp16": True}, "fp16", 0),
])
def test_on_a_gpu_bf16_is_the_default_only_where_it_is_native(capability, settings, computes_in, warned,
                                                              monkeypatch, capsys):
    """An H100 or A100 trains in bf16 by default; a T4 (compute capability 7.5) in float32, and
    warns when bf16 is asked for, as it is emulated there; fp16 is there for it."""
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    devices.warn_if_emulated.cache_clear()
    assert devices.precision(gpu, Config(**settings)) == computes_in
    if computes_in != "float32":
        devices.warn_if_emulated(gpu, computes_in)
    devices.warn_if_emulated.cache_clear()
    assert capsys.readouterr().err.count("Tesla T4 (compute capability 7.5) has no native bf16") == warned


def test_an_fp16_run_scales_its_loss_and_keeps_float32_weights(tmp_path, tiny):
    run = train("fast94", out_dir=tmp_path, epochs=1, fp16=True, widths=[8, 16, 16], **tiny)
    assert run.info["device"]["precision"] == "fp16" and all(math.isfinite(v) for v in run.history["train_loss"])
    assert load_checkpoint(tmp_path)["scaler"]["scale"] > 1  # the loss scaled up for backward
    weights = torch.load(tmp_path / "model.pt", weights_only=True)
    assert {w.dtype for w in weights.values() if w.is_floating_point()} == {torch.float32}


def test_a_bf16_cpu_run_trains_in_bf16_and_keeps_float32_weights(tmp_path, tiny):
    plain, bf16 = (train("fast94", out_dir=tmp_path / str(b), epochs=1, bf16=b, widths=[8, 16, 16], **tiny)
                   for b in (None, True))
    assert bf16.history != plain.history and all(math.isfinite(v) for v in bf16.history["train_loss"])
    assert bf16.info["device"]["precision"] == "bf16" and plain.info["device"]["precision"] == "float32"
    weights = torch.load(tmp_path / "True" / "model.pt", weights_only=True)
    assert {w.dtype for w in weights.values() if w.is_floating_point()} == {torch.float32}


def test_only_uncommitted_code_marks_a_run_dirty(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "models.py").write_text("A = 1\n")
    (tmp_path / "results.md").write_text("first\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    monkeypatch.setattr(training, "REPO_ROOT", tmp_path)
    assert training.git_commit()["dirty"] is False
    (tmp_path / "results.md").write_text("a history file or bench.md rewritten by a run\n")
    assert training.git_commit()["dirty"] is False
    (tmp_path / "common" / "models.py").write_text("A = 2\n")
    assert training.git_commit()["dirty"] is True
