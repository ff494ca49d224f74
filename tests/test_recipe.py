"""The CIFAR-style family and the recipe options behind fast94 and best_5m, on tiny data."""
import json
import math

import pytest
import torch
from torch import nn

from common import data as cifar
from common.charts import load_run, plot_run
from common.config import Config, UserError
from common.experiments import EXPERIMENTS
from common.history import read_history, write_seeds_summary
from common.models import (PARAMETER_BUDGET, PatchWhitening, build_model, count_parameters,
                           model_from_config, training_flops)
from common.muon import orthogonalise
from common.recipe import SCHEDULES, WeightAverage, make_optimizer, make_schedule, parameter_groups
from common.training import evaluate, forward_backward, train, train_seeds
from conftest import crop_offsets, random_images

# Small widths keep a CPU run of the fast94/best_5m recipes to seconds.
TINY_NET = dict(widths=(8, 16, 16))


# ---------------------------------------------------------------- the architecture family

@pytest.mark.parametrize("name, params", [("fast94", 3_188_440), ("best_5m", 4_660_358)])
def test_new_experiments_have_their_exact_parameter_counts(name, params):
    model = model_from_config(EXPERIMENTS[name].config)
    assert count_parameters(model) == params < PARAMETER_BUDGET
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("options", [dict(), dict(whiten=False), dict(squeeze_excitation=True),
                                     dict(preact=True), dict(blocks=(0, 2, 1)), dict(dropout=0.2),
                                     dict(block_convs=1), dict(block_convs=1, preact=True, dropout=0.2)])
def test_every_variant_of_the_family_gives_ten_logits(options):
    model = build_model("cifar_resnet", **{**TINY_NET, **options}).eval()
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_options_change_the_network_as_named():
    plain = build_model("cifar_resnet", **TINY_NET)
    assert count_parameters(build_model("cifar_resnet", **TINY_NET, squeeze_excitation=True)) > \
        count_parameters(plain)
    assert count_parameters(build_model("cifar_resnet", **TINY_NET, blocks=(2, 2, 2))) > count_parameters(plain)
    assert not isinstance(build_model("cifar_resnet", **TINY_NET, whiten=False).stem[0], PatchWhitening)


def test_one_conv_blocks_halve_the_block_convs_and_cost_what_airbench94_costs():
    config = EXPERIMENTS["fast94"].config.replace(block_convs=1)
    model = model_from_config(config)
    block_convs = [m for block in model.modules() if type(block).__name__ == "CifarBlock"
                   for m in block.body if isinstance(m, nn.Conv2d)]
    assert len(block_convs) == 3 and count_parameters(model) == 1_971_352
    # 10 epochs of 50,000 images: 0.354 PFLOP, under airbench94's 0.36
    assert training_flops(model) * 50_000 * 10 == 353_888_544_000_000
    with pytest.raises(UserError, match="block_convs is 1 or 2, got 3"):
        build_model("cifar_resnet", **TINY_NET, block_convs=3)


def test_dropout_follows_the_first_activation_of_a_block_as_before():
    post = build_model("cifar_resnet", **TINY_NET, dropout=0.2).stages[0][4].body
    pre = build_model("cifar_resnet", **TINY_NET, dropout=0.2, preact=True).stages[0][4].body
    assert [type(m).__name__ for m in post] == ["Conv2d", "BatchNorm2d", "GELU", "Dropout", "Conv2d",
                                                "BatchNorm2d", "GELU"]
    assert [type(m).__name__ for m in pre] == ["BatchNorm2d", "GELU", "Dropout", "Conv2d", "BatchNorm2d",
                                               "GELU", "Conv2d"]


def test_the_registry_refuses_a_family_member_over_budget():
    with pytest.raises(UserError, match="over the 5,000,000 budget"):
        build_model("cifar_resnet", widths=(128, 512, 512))


def test_an_option_the_architecture_lacks_is_refused():
    with pytest.raises(UserError, match="res_512 has no option widths"):
        model_from_config(Config(architecture="res_512", widths=(8, 8, 8)))


def test_whitening_decorrelates_the_patches_it_was_fitted_to_and_stays_frozen():
    images = torch.randn(64, 3, 32, 32) @ torch.eye(32) + torch.randn(64, 3, 1, 1)
    images[:, 1] = 0.8 * images[:, 0] + 0.2 * images[:, 1]  # strongly correlated channels
    layer = PatchWhitening()
    layer.fit(images)
    out = layer(images)[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    covariance = torch.cov(out.T)
    assert torch.allclose(covariance, torch.eye(12, dtype=torch.double), atol=0.05)
    assert not layer.conv.weight.requires_grad and layer.conv.bias.requires_grad


# ---------------------------------------------------------------- optimiser and schedules

def test_parameter_groups_scale_norm_lr_and_spare_norm_and_bias_from_decay():
    model = build_model("cifar_resnet", **TINY_NET)
    config = Config(architecture="cifar_resnet", lr=0.1, weight_decay=1e-3, norm_lr_scale=8.0)
    norm, bias, weights = parameter_groups(model, config)
    assert (norm["lr"], norm["weight_decay"]) == (0.8, pytest.approx(1e-3 / 8))
    assert (bias["lr"], bias["weight_decay"], weights["lr"], weights["weight_decay"]) == (0.1, 1e-3, 0.1, 1e-3)
    assert all(p.ndim == 1 for p in norm["params"] + bias["params"])
    _, bias, _ = parameter_groups(model, config.replace(bias_lr_scale=4.0))
    assert (bias["lr"], bias["weight_decay"]) == (0.4, pytest.approx(1e-3 / 4))
    spared = parameter_groups(model, config.replace(decay_norm_and_bias=False))
    assert [g["weight_decay"] for g in spared] == [0.0, 0.0, 1e-3]
    trainable = sum(p.numel() for g in spared for p in g["params"])
    assert trainable == count_parameters(model)  # every trainable parameter, frozen ones left out


def test_learning_rate_scales_with_the_batch_size():
    assert Config(lr=0.1, lr_batch_size=128, batch_size=512).scaled_lr == pytest.approx(0.4)
    assert Config(lr=0.1, batch_size=512).scaled_lr == 0.1
    optimizer = make_optimizer(nn.Linear(2, 2), Config(lr=1.5, lr_batch_size=1024, batch_size=256))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.375)


@pytest.mark.parametrize("shape", [(16, 144), (144, 16)], ids=["wide", "tall"])
def test_orthogonalise_evens_the_singular_values_and_keeps_the_singular_vectors(shape):
    torch.manual_seed(0)
    k = min(shape)
    left, right = torch.linalg.qr(torch.randn(shape[0], k))[0], torch.linalg.qr(torch.randn(shape[1], k))[0]
    matrix = 7 * left @ torch.diag(torch.logspace(0, -1, k)) @ right.T  # singular values from 7 to 0.7
    out = orthogonalise(matrix)
    singular_values = torch.linalg.svdvals(out)
    assert out.shape == shape and out.dtype == matrix.dtype
    assert singular_values.min() > 0.5 and singular_values.max() < 1.5  # Newton-Schulz's band, not exactly 1
    core = left.T @ out @ right  # diagonal when the singular vectors are kept
    assert (core - torch.diag(core.diagonal())).abs().max() < 0.05 * core.diagonal().min()


def test_muon_orthogonalises_the_bias_free_conv_filters_and_steps_the_rest_as_sgd():
    config = Config(architecture="cifar_resnet", optimizer="muon", lr=0.1, momentum=0.9, nesterov=True,
                    weight_decay=1e-3, norm_lr_scale=8.0, muon_lr=0.05, muon_momentum=0.5)
    torch.manual_seed(0)
    model = build_model("cifar_resnet", squeeze_excitation=True, **TINY_NET)
    optimizer = make_optimizer(model, config)
    filters, = [g for g in optimizer.param_groups if g["orthogonalise"]]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad]
    assert {id(p) for p in filters["params"]} == {id(m.weight) for m in convs if m.bias is None}
    assert any(m.bias is not None for m in convs)  # the squeeze-excitation gates stay with SGD
    assert (filters["lr"], filters["momentum"], filters["weight_decay"]) == (0.05, 0.5, 0.0)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == count_parameters(model)

    # A twin stepped by torch's SGD in the same groups, its filters copied from the model each step
    twin = build_model("cifar_resnet", squeeze_excitation=True, **TINY_NET)
    twin.load_state_dict(model.state_dict())
    name_of = {id(p): n for n, p in model.named_parameters()}
    twins = dict(twin.named_parameters())
    sgd = torch.optim.SGD([{**g, "params": [twins[name_of[id(p)]] for p in g["params"]]}
                           for g in optimizer.param_groups if not g["orthogonalise"]], momentum=0.9, nesterov=True)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    for _ in range(3):
        before = [p.detach().clone() for p in filters["params"]]
        for net, opt in ((model, optimizer), (twin, sgd)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        for old, new in zip(before, filters["params"]):
            step = (old * (len(old) ** 0.5 / old.norm()) - new).reshape(len(new), -1) / 0.05
            assert torch.linalg.svdvals(step).max() < 1.5 and step.norm() > 0.3 * min(step.shape) ** 0.5
        with torch.no_grad():
            for p in filters["params"]:
                twins[name_of[id(p)]].copy_(p)
    assert all(torch.allclose(p, twins[n]) for n, p in model.named_parameters())


def test_nesterov_reaches_the_optimizer_and_needs_momentum():
    assert make_optimizer(nn.Linear(2, 2), Config(momentum=0.9, nesterov=True)).param_groups[0]["nesterov"]
    with pytest.raises(UserError, match="nesterov needs a positive momentum"):
        Config(nesterov=True)


@pytest.mark.parametrize("name, points", [
    ("triangle", [(0, 0.2), (0.1, 0.6), (0.2, 1.0), (0.6, 1 - 0.93 / 2), (1.0, 0.07)]),
    ("warmup_cosine", [(0, 0.0), (0.1, 0.5), (0.2, 1.0), (0.6, 0.5), (1.0, 0.0)]),
    ("cosine", [(0, 1.0), (0.5, 0.5), (1.0, 0.0)]),
    ("linear", [(0, 0.0), (0.1, 0.5), (0.2, 1.0), (0.6, 0.5), (1.0, 0.0)]),
])
def test_schedule_shapes(name, points):
    multiplier = SCHEDULES[name][1]
    for t, expected in points:
        assert multiplier(t, 0.2) == pytest.approx(expected)


def test_per_step_schedules_step_per_batch_and_reach_their_end_at_the_last_step():
    optimizer = make_optimizer(nn.Linear(2, 2), Config(lr=1.0))
    schedule = make_schedule(optimizer, Config(lr=1.0, epochs=2, schedule="triangle", warmup=0.25),
                             steps_per_epoch=10)
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen[0] == pytest.approx(0.2) and seen[5] == pytest.approx(1.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.07)


# ---------------------------------------------------------------- augmentation

def test_reflect_crop_is_a_shift_of_the_reflect_padded_image():
    images = random_images()
    out = cifar.augment(images, torch.Generator().manual_seed(0), 2, False, 0.0, "reflect")
    offsets = crop_offsets(out, torch.nn.functional.pad(images.float() / 255, (2,) * 4, mode="reflect"))
    assert None not in offsets and len(set(offsets)) > 4  # crops of their own sources, at varied shifts


def test_alternating_flip_flips_each_image_in_exactly_one_of_two_epochs():
    mirror = cifar.alternating_mirror(seed=0, size=64, device="cpu")
    assert 16 < mirror.sum() < 48
    images = random_images(64)
    even = cifar.augment(images, torch.Generator().manual_seed(0), 0, True, 0.0, mirror=mirror)
    odd = cifar.augment(images, torch.Generator().manual_seed(0), 0, True, 0.0, mirror=~mirror)
    source = images.float() / 255
    for e, o, s, m in zip(even, odd, source, mirror):
        assert torch.equal(e, s.flip(-1) if m else s) and torch.equal(o, s if m else s.flip(-1))


def test_cutout_zeroes_one_square_per_image_and_keeps_the_rest():
    x = torch.ones(32, 3, 32, 32)
    out = cifar.cutout(x, torch.Generator().manual_seed(0), 8)
    zeros = (out == 0).all(1).sum((1, 2))
    assert ((zeros > 0) & (zeros <= 64)).all() and (zeros == 64).any()
    assert torch.equal(out[out != 0], x[out != 0])
    assert ((out == 0).all(1) == (out == 0).any(1)).all()  # the same square in every channel


def test_trivial_augment_keeps_images_apart_valid_and_seeded():
    x = random_images(64).float() / 255
    out = cifar.trivial_augment(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, cifar.trivial_augment(x, torch.Generator().manual_seed(1)))
    changed = x.clone()
    changed[5] = 1 - changed[5]
    again = cifar.trivial_augment(changed, torch.Generator().manual_seed(1))
    others = [i for i in range(64) if i != 5]
    assert torch.equal(again[others], out[others])  # image i's output depends on image i alone


@pytest.mark.parametrize("op", list(cifar.POLICY_OPS))
def test_every_policy_op_keeps_the_shape_and_changes_the_image(op):
    x = random_images(8).float() / 255 * 0.5 + 0.25  # low contrast, so that autocontrast has work
    out = cifar.POLICY_OPS[op](x, torch.linspace(-1, 1, 8)).clamp(0, 1)  # as trivial_augment clamps it
    assert out.shape == x.shape and torch.isfinite(out).all()
    if op != "identity":
        assert not torch.equal(out, x)


def test_autocontrast_stretches_each_channel_to_the_full_range():
    x = random_images(8).float() / 255 * 0.5 + 0.25
    out = cifar.POLICY_OPS["autocontrast"](x, torch.zeros(8))
    assert torch.allclose(out.amin((2, 3)), torch.zeros(8, 3)) and torch.allclose(out.amax((2, 3)), torch.ones(8, 3))


@pytest.mark.parametrize("name", ["res_512_d", "fast94", "best_5m"])
def test_a_training_epoch_never_makes_the_host_wait_for_the_device(name, tmp_path, tiny, monkeypatch):
    """Between progress reports no op reads a value back from the device (boolean indexing's
    nonzero, .item()) and no tensor is made from Python values (torch.tensor's lift_fresh: on a
    GPU, a copy from pageable host memory that waits for the device): each would stall the queue
    of work."""
    import types

    from torch.profiler import profile
    from tqdm import tqdm

    from common import devices, training
    from common.distributed import Cluster
    exp = EXPERIMENTS[name]
    small = TINY_NET if exp.config.architecture == "cifar_resnet" else {}
    config = exp.config.replace(**small, **tiny, epochs=2)
    run = training.start_run(exp, config, tmp_path, torch.device("cpu"), Cluster(), overwrite=True,
                             resume=False)
    monkeypatch.setattr(training, "report_progress", lambda progress, position: None)
    no_stop = types.SimpleNamespace(signal=None)
    training.train_one_epoch(run, devices.autocast_for("cpu", run.config), tqdm(disable=True), no_stop)
    run.position.update(training.epoch_start_position(1))  # the second epoch: what every epoch does
    with profile() as prof:
        training.train_one_epoch(run, devices.autocast_for("cpu", run.config), tqdm(disable=True), no_stop)
    waits = {"aten::nonzero", "aten::item", "aten::_local_scalar_dense", "aten::lift_fresh"}
    assert waits.isdisjoint(e.name for e in prof.events())


# ---------------------------------------------------------------- evaluation: TTA, averaging

def test_tta_views_weigh_to_one_and_change_a_position_sensitive_model():
    views = cifar.tta_views(torch.randn(4, 3, 32, 32))
    assert len(views) == 6 and sum(w for w, _ in views) == pytest.approx(1.0)
    images, labels = random_images(40), torch.arange(40) % 10
    config = Config()
    invariant = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))
    sensitive = nn.Sequential(nn.Flatten(), nn.Linear(3072, 10))
    autocast = torch.autocast("cpu", enabled=False)
    plain, tta = (evaluate(invariant, images, labels, config, autocast, tta=t) for t in (False, True))
    assert plain[0] == pytest.approx(tta[0], abs=1e-2)  # reflect shifts barely move a global mean
    assert evaluate(sensitive, images, labels, config, autocast)[0] != \
        evaluate(sensitive, images, labels, config, autocast, tta=True)[0]


def test_ema_follows_the_weights_and_lookahead_pulls_them_back():
    live = nn.Linear(2, 2)
    average = WeightAverage(live, "ema", 0.5, total_steps=10)
    start = live.weight.detach().clone()
    with torch.no_grad():
        live.weight.add_(1.0)
    average.update(steps_done=100)  # decay min(0.5, 101/110) = 0.5
    assert torch.allclose(average.model.weight, start + 0.5)
    assert torch.allclose(live.weight, start + 1.0)

    lookahead = WeightAverage(live, "lookahead", 0.9, total_steps=10)
    with torch.no_grad():
        live.weight.add_(1.0)
    lookahead.update(steps_done=3)  # not a multiple of 5: nothing happens
    assert torch.allclose(live.weight, start + 2.0)
    lookahead.update(steps_done=10)  # decay 0.9**5 at the end of the run
    expected = start + 1.0 + (1 - 0.9 ** 5) * 1.0
    assert torch.allclose(lookahead.model.weight, expected) and torch.allclose(live.weight, expected)


def test_micro_batches_give_the_full_batch_gradient():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3072, 10))
    x, y = torch.randn(12, 3, 32, 32), torch.arange(12) % 10
    autocast, no_scaling = torch.autocast("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=False)
    grads = []
    for micro in (None, 5):
        model.zero_grad()
        output, loss = forward_backward(model, x, y, Config(micro_batch=micro, label_smoothing=0.1), autocast,
                                       no_scaling)
        grads.append((model[1].weight.grad.clone(), loss, output))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1]) and torch.allclose(grads[0][2], grads[1][2])


def test_training_flops_are_about_three_forward_passes():
    from common.models import multiply_adds
    model = build_model("cifar_resnet", **TINY_NET)
    forward = 2 * multiply_adds(model)
    assert 2.5 * forward < training_flops(model) < 3.5 * forward


# ---------------------------------------------------------------- whole runs on the fake data

def tiny_recipe(tiny, **more):
    return dict(tiny, **TINY_NET, **more)


def test_a_fast94_style_run_evaluates_the_average_with_tta_and_saves_it(tmp_path, tiny):
    run = train("fast94", out_dir=tmp_path, epochs=2, **tiny_recipe(tiny))
    info = json.loads((tmp_path / "run.json").read_text())
    final = info["final_evaluation"]
    assert final["tta"] and final["weights"] == "averaged (lookahead)" and final["test_images"] == 50
    assert run.final_test_acc == final["test_acc"]
    assert info["training_flops_per_image"] > 0 and "PFLOP of training" in run.summary()
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(saved[k], checkpoint["average"][k]) for k in saved)


def test_best_5m_style_run_with_every_augmentation(tmp_path, tiny):
    run = train("best_5m", out_dir=tmp_path, epochs=2, **tiny_recipe(tiny))
    assert run.info["status"] == "complete" and all(math.isfinite(v) for v in run.history["train_loss"])


def test_val_holds_out_images_and_tests_once_at_the_end(tmp_path, tiny, capsys):
    folder = tmp_path / "seed0"
    run = train("res_512", out_dir=folder, epochs=2, val=50, **tiny)
    assert sorted(p.name for p in folder.glob("*_history.txt")) == [
        "train_acc_history.txt", "train_loss_history.txt", "val_acc_history.txt", "val_loss_history.txt"]
    assert run.info["data"]["train_images"] == 150 and run.info["data"]["val_images"] == 50
    final = run.info["final_evaluation"]
    assert final["test_images"] == 50 and not final["tta"]
    assert "final val accuracy" in run.summary() and "test accuracy" in run.summary()
    # What reads run folders reads a --val run too: its seeds' summary, the notebook's plot...
    assert read_history(folder) == run.history
    assert write_seeds_summary(tmp_path)["final_test_acc"] == [final["test_acc"]]
    assert [line.get_label() for line in plot_run(folder).axes[1].get_lines()] == ["train", "val"]
    # ...and the tables leave it out, saying why: its per-epoch figures are not test figures.
    assert load_run(folder, "res_512") is None and "is a --val run" in capsys.readouterr().out


def test_val_larger_than_the_training_set_is_refused(tmp_path, tiny):
    with pytest.raises(UserError, match="val of 400 images: the 200 training images hold too few"):
        train("res_512", out_dir=tmp_path, epochs=1, val=400, **tiny)


def test_seeds_run_into_sibling_folders_with_a_summary(tmp_path, tiny):
    runs = train_seeds("res_512", 2, first_seed=4, out_dir=tmp_path, epochs=1, **tiny)
    assert [r.folder.name for r in runs] == ["seed4", "seed5"]
    summary = json.loads((tmp_path / "seeds.json").read_text())
    accs = [r.history["test_acc"][-1] for r in runs]
    assert summary["seeds"] == [4, 5] and summary["final_test_acc"] == accs
    assert summary["mean"] == pytest.approx(sum(accs) / 2)


def test_seeds_resume_keeps_complete_seeds_continues_unfinished_and_starts_the_rest(tmp_path, tiny):
    train_seeds("res_512", 2, first_seed=0, out_dir=tmp_path, epochs=1, **tiny)
    kept = (tmp_path / "seed0" / "run.json").read_text()
    info = json.loads((tmp_path / "seed1" / "run.json").read_text())  # as if stopped after its epoch
    (tmp_path / "seed1" / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    runs = train_seeds("res_512", 3, first_seed=0, out_dir=tmp_path, epochs=1, resume=True, **tiny)
    assert [r.folder.name for r in runs] == ["seed1", "seed2"]
    assert (tmp_path / "seed0" / "run.json").read_text() == kept
    assert len(json.loads((tmp_path / "seed1" / "run.json").read_text())["resumed"]) == 1
    assert json.loads((tmp_path / "seeds.json").read_text())["seeds"] == [0, 1, 2]


def test_a_seed_trained_later_joins_the_summary_and_unfinished_ones_do_not(tmp_path, tiny):
    first, = train_seeds("res_512", 1, first_seed=4, out_dir=tmp_path, epochs=1, **tiny)
    (tmp_path / "seed9").mkdir()  # e.g. a run still going, or killed before its first epoch
    second, = train_seeds("res_512", 1, first_seed=5, out_dir=tmp_path, epochs=1, **tiny)
    summary = json.loads((tmp_path / "seeds.json").read_text())
    assert summary["seeds"] == [4, 5] and summary["folders"] == ["seed4", "seed5"]
    assert summary["final_test_acc"] == [first.final_test_acc, second.final_test_acc]


def test_a_seeds_summary_leaves_out_seeds_of_other_settings_and_gives_one_seed_no_spread(tmp_path, tiny, capsys):
    train_seeds("res_512", 2, first_seed=0, out_dir=tmp_path, epochs=1, **tiny)
    other, = train_seeds("res_512", 1, first_seed=2, out_dir=tmp_path, epochs=1, lr=0.05, **tiny)
    summary = json.loads((tmp_path / "seeds.json").read_text())
    assert summary["seeds"] == [2] and summary["final_test_acc"] == [other.final_test_acc]
    assert summary["std"] is None and "(seed 2 alone: no spread)" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"other settings \(lr\)"):  # seeds 0 and 1 kept, seed 2 not resumed
        train_seeds("res_512", 3, first_seed=0, out_dir=tmp_path, epochs=1, resume=True, **tiny)
    assert capsys.readouterr().out.count("complete, kept") == 2


def test_compile_wraps_the_training_model_and_the_wrapper_is_what_trains(tmp_path, tiny, monkeypatch):
    compiled, calls = [], []

    class Compiled(nn.Module):  # stands for torch.compile's wrapper: counts the batches through it
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            calls.append(len(x))
            return self.model(x)
    monkeypatch.setattr(torch, "compile", lambda model, mode: compiled.append(mode) or Compiled(model))
    train("res_512", out_dir=tmp_path, epochs=1, compile=True, compile_mode="reduce-overhead", **tiny)
    assert compiled == ["reduce-overhead"] and sum(calls) == 200  # every training image, once
