import json

from PIL import Image

from common.charts import (TRAIN_VS_TEST, collect_groups, make_charts, representative_runs, results_markdown,
                           summary_rows, summary_table, train_vs_test_chart)
from common.experiments import EXPERIMENTS
from common.models import count_parameters, model_from_config
from common.history import HISTORY_FILES, write_history, write_run_info


def fake_run(folder, test_acc, budget="full", variant="exact-offline", status="complete"):
    n = len(test_acc)
    write_history(folder, {"train_loss": [1.0] * n, "train_acc": [0.5] * n,
                           "test_loss": [1.0] * n, "test_acc": test_acc})
    write_run_info(folder, {"experiment": folder.name, "seed": 0, "budget": budget, "status": status,
                            "trainable_parameters": 4_961_610, "planned_epochs": n,
                            "data": {"variant": variant},
                            "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}})


def test_charts_from_the_runs_that_exist(tmp_path, capsys):
    training = tmp_path / "training"
    fake_run(training / "res_512_d", [0.5, 0.8, 0.75])
    fake_run(training / "changing_optimisers/adam", [0.3], budget="smoke", variant="exact-small")
    (training / "res_512").mkdir(parents=True)
    (training / "res_512" / "test_acc_history.txt").write_text("0.5\n")  # the other three missing
    paths = make_charts(training, tmp_path / "top", tmp_path / "results")
    assert sorted(p.name for p in paths) == sorted([
        "model_acc.png", "model_loss.png", "activations.png", "optimisers.png",
        "train_vs_test.png", "beyond.png", "fast94_vs_res_512_d.png", "model_summary.png"])
    for path in paths:
        assert Image.open(path).size[0] > 300
    out = capsys.readouterr().out
    assert out.count("skipped") == 1 and "res_512" in out and "missing" in out

    rows = {row[0]: row for row in summary_rows(collect_groups(training))}
    assert rows["res_512_d"][6:8] == ["80.00", "75.00"]  # best and final, from the history file
    assert rows["res_512_d"][2] == "3/200 ep" and rows["res_512_d"][4] == "H100 80GB HBM3"
    assert rows["changing_optimisers/adam"][2].endswith("smoke")
    assert rows["res_512"][2] == "not run" and rows["og_resnet"][6] == "-"
    assert rows["og_resnet"][8] == "85.13/84.96"  # the original study's figures beside ours
    assert len(rows) == len(EXPERIMENTS)


def test_an_unfinished_full_budget_run_is_no_result_and_stays_out_of_its_seeds_mean(tmp_path):
    fake_run(tmp_path / "fast94" / "seed0", [0.90] * 10)
    fake_run(tmp_path / "fast94" / "seed1", [0.50] * 4, status="interrupted")  # resumable
    fake_run(tmp_path / "res_512", [0.40] * 3, status="running")
    groups = collect_groups(tmp_path)
    rows = {row[0]: row for row in summary_rows(groups)}
    assert rows["fast94"][5:7] == ["0", "90.00"]  # seed 1 is not in the mean
    assert rows["res_512"][2] == "3/200 ep smoke"
    assert "50.00" not in results_markdown(groups, []) and "res_512 |" not in results_markdown(groups, [])


def test_a_run_resumed_on_another_device_names_both(tmp_path):
    fake_run(tmp_path / "res_512", [0.4, 0.6])
    info = json.loads((tmp_path / "res_512" / "run.json").read_text())
    resumes = [{"at": "2026-11-27T04:37:03+00:00", "device": "NVIDIA H100 80GB HBM3"},
               {"at": "2026-11-28T09:00:00+00:00", "device": "CPU: Intel(R) Xeon(R) Processor @ 2.50GHz, 2 threads"}]
    write_run_info(tmp_path / "res_512", {**info, "resumed": resumes, "wall_seconds": 600.0})
    rows = {row[0]: row for row in summary_rows(collect_groups(tmp_path))}
    assert rows["res_512"][4] == "H100 80GB HBM3 + CPU: Intel Xeon @ 2.50GHz, 2 threads"  # vendor marks left out
    assert rows["res_512"][10] == "10.0 min (in 3 parts)"  # the sum of them: not what it needs alone


def test_a_long_provenance_stays_above_its_own_chart(tmp_path):
    for name in TRAIN_VS_TEST:
        fake_run(tmp_path / name, [0.4, 0.6])
        info = json.loads((tmp_path / name / "run.json").read_text())
        resumes = [{"at": "2026-12-06T21:55:50+00:00", "device": "CPU: AMD EPYC (AVX2), 2 threads"}]
        write_run_info(tmp_path / name, {**info, "resumed": resumes, "git": {"commit": "0" * 40, "dirty": True}})
    fig = train_vs_test_chart(representative_runs(collect_groups(tmp_path)), TRAIN_VS_TEST, tmp_path / "t.png")
    for ax in fig.axes:
        assert "AVX2" in ax.get_title() and "uncommitted code" in ax.get_title()
        assert ax.title.get_window_extent().width <= ax.get_window_extent().width, ax.get_title()


def test_an_experiment_without_a_run_shows_its_twins_unchanged_run_labelled_as_such(tmp_path):
    fake_run(tmp_path / "changing_activations/relu", [0.5, 0.84])  # the same settings as sgd's
    fake_run(tmp_path / "changing_activations/gelu", [0.6])  # other settings: lent to no one
    groups = collect_groups(tmp_path)
    assert [run.same_run_as for run in groups["changing_optimisers/sgd"]] == ["changing_activations/relu"]
    assert groups["changing_optimisers/adam"] == [] and groups["changing_activations/relu"][0].same_run_as is None
    rows = {row[0]: row for row in summary_rows(groups)}
    assert rows["changing_optimisers/sgd (same run as changing_activations/relu)"][6:8] == ["84.00", "84.00"]
    assert "same run as changing_activations/relu" in groups["changing_optimisers/sgd"][0].provenance
    fig = summary_table(groups, tmp_path / "model_summary.png")
    for cell in fig.axes[0].tables[0].get_celld().values():
        assert cell.get_text().get_window_extent().width < cell.get_window_extent().width, cell.get_text()

    info = json.loads((tmp_path / "changing_activations/relu/run.json").read_text())
    write_run_info(tmp_path / "changing_activations/relu", {**info, "config": {"lr": 0.05}})
    assert collect_groups(tmp_path)["changing_optimisers/sgd"] == []  # a changed recipe is not the twin's
    write_run_info(tmp_path / "changing_activations/relu", info)
    fake_run(tmp_path / "changing_optimisers/sgd", [0.7])
    assert [run.same_run_as for run in collect_groups(tmp_path)["changing_optimisers/sgd"]] == [None]


def test_a_run_of_changed_recipe_settings_is_labelled_with_them_but_not_for_how_it_executed(tmp_path):
    fake_run(tmp_path / "res_512", [0.4, 0.6])
    fake_run(tmp_path / "res_block", [0.4, 0.6])
    for name, config in [("res_512", {"lr": 0.05, "compile": True}),
                         ("res_block", {"compile": True, "compile_mode": "reduce-overhead", "device": "cuda"})]:
        info = json.loads((tmp_path / name / "run.json").read_text())
        write_run_info(tmp_path / name, {**info, "config": config})
    labels = [row[0] for row in summary_rows(collect_groups(tmp_path))]
    assert "res_512 (settings changed: lr=0.05)" in labels and "res_block" in labels


def test_model_summary_cells_hold_their_whole_text(tmp_path):
    training = tmp_path / "training"
    folder = training / "changing_activations/leakyrelu"  # the longest name, on a full row
    fake_run(folder, [0.5, 0.8])
    info = json.loads((folder / "run.json").read_text())
    write_run_info(folder, {**info, "device": {"type": "cpu", "name": "CPU: AMD EPYC, 2 threads"}})
    fig = summary_table(collect_groups(training), tmp_path / "model_summary.png")
    cells = fig.axes[0].tables[0].get_celld().values()
    assert len(cells) == 11 * (1 + len(EXPERIMENTS))
    for cell in cells:
        assert cell.get_text().get_window_extent().width < cell.get_window_extent().width, cell.get_text()


def test_charts_are_deterministic(tmp_path):
    fake_run(tmp_path / "training" / "res_512", [0.4, 0.6])
    first = [p.read_bytes() for p in make_charts(tmp_path / "training", tmp_path / "a", tmp_path / "a")]
    second = [p.read_bytes() for p in make_charts(tmp_path / "training", tmp_path / "b", tmp_path / "b")]
    assert first == second


def test_no_runs_means_everything_not_run(tmp_path):
    rows = summary_rows(collect_groups(tmp_path))
    assert all(row[2] == "not run" and row[6] == "-" for row in rows)
    assert json.dumps(rows)  # plain values only
    # what is not measured but counted by the code is still given: the parameters
    assert [row[1] for row in rows] == [f"{count_parameters(model_from_config(e.config)):,}"
                                        for e in EXPERIMENTS.values()]


def test_readme_results_hold_full_runs_and_labelled_checks(tmp_path):
    from common.charts import collect_checks, results_markdown
    fake_run(tmp_path / "training" / "res_512", [0.5, 0.9])
    fake_run(tmp_path / "training" / "res_block", [0.2], budget="smoke")
    check = tmp_path / "checks" / "cpu-1-epoch"
    fake_run(check, [0.41], budget="smoke")
    info = json.loads((check / "run.json").read_text())
    (check / "run.json").write_text(json.dumps({**info, "experiment": "res_512_d",
                                                "train_images_per_second": [480.4]}))
    dirty = tmp_path / "checks" / "cpu-dirty"
    fake_run(dirty, [0.42], budget="smoke")
    info = json.loads((dirty / "run.json").read_text())
    (dirty / "run.json").write_text(json.dumps({**info, "experiment": "res_512_d", "git": {"dirty": False},
                                                "resumed": [{"git": {"dirty": True}}]}))
    text = results_markdown(collect_groups(tmp_path / "training"), collect_checks(tmp_path / "checks"))
    assert "| res_512 | 4,961,610 | 2/200 ep | exact-offline | H100 80GB HBM3 | 0 | 90.00 | 90.00 | 86.12/86.07 | - | - |" in text
    assert "res_block" not in text  # a smoke run is no result
    assert "| cpu-1-epoch | res_512_d | none | 1/200 ep | exact-offline | H100 80GB HBM3 | 0 | 480 | 41.00 | - |" in text
    assert "| cpu-dirty (uncommitted code) | res_512_d |" in text  # resumed on code with uncommitted changes


def test_equal_epochs_pairs_the_fast94_run_that_shares_the_check_s_data_and_device(tmp_path):
    from common.charts import collect_checks, equal_epochs_runs
    from common.experiments import FAST94
    from common.summary import model_costs
    training, checks = tmp_path / "training", tmp_path / "checks"
    for seed in (0, 1):  # a GPU seed group hides the fast94 folder's own run from the tables...
        fake_run(training / "fast94" / f"seed{seed}", [0.9, 0.94])
    fake_run(training / "fast94", [0.8, 0.93])
    check = checks / "cpu-res_512_d-2-epochs"
    fake_run(check, [0.4, 0.55], budget="smoke")
    for folder in (training / "fast94", check):  # ...but that run and the check share the CPU
        info = json.loads((folder / "run.json").read_text())
        info.update(experiment=folder.name if folder == training / "fast94" else "res_512_d",
                    device={"type": "cpu", "name": "CPU: AMD EPYC, 2 threads"})
        (folder / "run.json").write_text(json.dumps(info))
    shown = equal_epochs_runs(training, collect_checks(checks))
    assert [(label, run.history["test_acc"]) for label, run in shown] == [
        ("fast94", [0.8, 0.93]), ("res_512_d (cpu-res_512_d-2-epochs)", [0.4, 0.55])]
    (check / "run.json").write_text(json.dumps({**info, "device": {"type": "cuda", "name": "other"}}))
    assert equal_epochs_runs(training, collect_checks(checks)) == []

    # A fast94 check (a changed setting, e.g. micro_batch on the CPU) pairs with it as well.
    (check / "run.json").write_text(json.dumps(info))
    (checks / "cpu-fast94").mkdir()
    for name in ("run.json", *HISTORY_FILES.values()):
        (training / "fast94" / name).rename(checks / "cpu-fast94" / name)
    # Of several, the registry's model first: here both change one setting, the other the model.
    info = json.loads((checks / "cpu-fast94" / "run.json").read_text())
    (checks / "cpu-fast94" / "run.json").write_text(json.dumps(
        {**info, "config": {"micro_batch": 512}, "trainable_parameters": model_costs(FAST94)[0]}))
    fake_run(checks / "a-fast94-1conv", [0.7, 0.92])
    (checks / "a-fast94-1conv" / "run.json").write_text(json.dumps({**info, "config": {"block_convs": 1}}))
    assert [label for label, _ in equal_epochs_runs(training, collect_checks(checks))] == [
        "fast94 (cpu-fast94)", "res_512_d (cpu-res_512_d-2-epochs)"]


def test_readme_results_give_a_seed_group_as_mean_and_std_of_its_full_runs(tmp_path):
    from common.charts import results_markdown
    training = tmp_path / "training"
    for seed, acc, budget in [(0, [0.5, 0.9], "full"), (1, [0.6, 0.8], "full"), (2, [0.3], "smoke")]:
        folder = training / "best_5m" / f"seed{seed}"
        fake_run(folder, acc, budget=budget)
        info = json.loads((folder / "run.json").read_text())
        (folder / "run.json").write_text(json.dumps({**info, "seed": seed, "wall_seconds": 100.0 + 40 * seed,
                                                    "final_evaluation": {"test_acc": acc[-1] + 0.01, "tta": True}}))
    text = results_markdown(collect_groups(training), [])
    assert "| best_5m | 4,961,610 | 2/200 ep | exact-offline | H100 80GB HBM3 | 0, 1 | 85.00 ± 7.07 | " \
           "85.00 ± 7.07 | - | 86.00 ± 7.07 (TTA) | 2.0 min |" in text  # wall time: mean of 100 s and 140 s
