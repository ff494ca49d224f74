"""Charts drawn from whatever run folders exist under training/; an experiment without history is
shown as "not run", never invented. Every label carries where its numbers came from.

Chart files are drawn on bare `Figure`s, so making them never touches pyplot's backend or state
(a notebook keeps its inline plots); `plot_run` is the one pyplot figure, meant for display.
"""
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .experiments import EXPERIMENTS, REPO_ROOT, TRAINING_DIR, twins
from .history import (HISTORY_FILES, RunFolderError, evaluated_set, read_history, read_run_info,
                      replace_atomically, seed_folders, write_atomic)
from .summary import (SUMMARY_COLUMNS, Row, end_of_run, model_costs, recipe_changes, settings_changed,
                      summary_rows)

RESULTS_DIR = REPO_ROOT / "results"
README = REPO_ROOT / "README.md"
README_MARKERS = ("<!-- results:start (written by `python -m common charts`) -->", "<!-- results:end -->")


def group_members(group):
    """The experiments of one registry group ("architectures", "changing_activations", ...)."""
    return [name for name, e in EXPERIMENTS.items() if e.group == group]


ARCHITECTURES = group_members("architectures")
BEYOND = group_members("beyond")
TRAIN_VS_TEST = ["res_512", "res_512_d"]  # the original study's train-vs-test pair
EQUAL_EPOCHS = ("fast94", "res_512_d")  # fast94 against the original's best at its epochs


@dataclass
class RunRecord:
    name: str
    history: dict
    info: dict
    same_run_as: str = None  # the experiment whose folder holds it, when lent to a twin (share_twin_runs)

    @property
    def variant(self):
        return self.info.get("data", {}).get("variant", "unknown data")

    @property
    def device(self):
        """The device the run started on, then each other one it was resumed on ('A + B'): its
        epochs and wall time came from all of them."""
        names = [self.info.get("device", {}).get("name", "unknown device")]
        names += [resume.get("device", "unknown device") for resume in self.info.get("resumed", [])]
        return " + ".join(dict.fromkeys(map(short_device_name, names)))

    @property
    def smoke(self):
        """Not a result: a reduced budget, or a full-budget run still going, stopped or failed."""
        return self.info.get("budget") != "full" or self.info.get("status", "complete") != "complete"

    @property
    def epochs(self):
        """'200 ep', or '3/200 ep' for a run that stopped short of its experiment's epochs."""
        done, planned = len(self.history["test_acc"]), EXPERIMENTS[self.name].config.epochs
        return f"{done}/{planned} ep" if done < planned else f"{done} ep"

    @property
    def uncommitted(self):
        """Whether the code it ran (at its start or a resume) had uncommitted changes."""
        gits = [self.info.get("git") or {}] + [resume.get("git") or {} for resume in self.info.get("resumed", [])]
        return any(git.get("dirty") for git in gits)

    @property
    def provenance(self):
        """e.g. 'exact-offline, 200 ep, seed 0, H100 80GB HBM3', with ', SMOKE' for a smoke run and
        ', uncommitted code' for a run of code with uncommitted changes."""
        text = f"{self.variant}, {self.epochs}, seed {self.info.get('seed', '?')}, {self.device}"
        return (text + (", SMOKE" if self.smoke else "") + (", uncommitted code" if self.uncommitted else "")
                + (f", same run as {self.same_run_as}" if self.same_run_as else ""))


def short_device_name(name):
    """A recorded device name as the tables print it, without vendor marks: 'CPU: Intel(R) Xeon(R)
    Processor @ 2.50GHz, 2 threads' is 'CPU: Intel Xeon @ 2.50GHz, 2 threads'."""
    for mark in ("NVIDIA ", "(R)", "(TM)", " Processor"):
        name = name.replace(mark, "")
    return name


def load_run(folder, name):
    """The run in `folder`, or None when it holds no history; a malformed one, or a --val run
    (a tuning run: its per-epoch figures are not test figures), is reported in one line and skipped."""
    folder = Path(folder)
    if not any((folder / f).exists() for f in HISTORY_FILES.values()):
        return None
    try:
        history, info = read_history(folder), read_run_info(folder)
    except RunFolderError as e:
        print(f"skipped {name}: {e}")
        return None
    if evaluated_set(history) == "val":
        print(f"skipped {name}: {folder} is a --val run (validation each epoch, the test set once: "
              f"see its run.json), not a result")
        return None
    return RunRecord(name, history, info) if history["test_acc"] else None


def collect_groups(training_dir=TRAINING_DIR):
    """Every experiment's runs, by seed: one per seed<N>/ subfolder of a multi-seed group, else
    the run in the experiment's own folder; an empty list where there is none."""
    groups = {}
    for name in EXPERIMENTS:
        folder = Path(training_dir) / name
        runs = [load_run(f, name) for f in seed_folders(folder)] or [load_run(folder, name)]
        groups[name] = [run for run in runs if run is not None]
    return share_twin_runs(groups)


def share_twin_runs(groups):
    """An experiment without a full-budget run of its own takes those of its twin, an experiment
    with the very same settings (the original study trained changing_optimisers/sgd exactly as
    changing_activations/relu), where the twin's runs recorded no change to them; every label
    then says "same run as <twin>"."""
    shared = dict(groups)
    for name, runs in groups.items():
        if any(not run.smoke for run in runs):
            continue
        for twin in twins(name):
            lent = [replace(run, name=name, same_run_as=twin) for run in groups.get(twin, []) if not run.smoke]
            if lent and not recipe_changes(Row(name, "full", lent)):
                shared[name] = runs + lent
                break
    return shared


def representative_runs(groups):
    """One run per experiment for the curve charts and the README (a group's lowest seed of full
    budget, else its lowest seed; its provenance names the seed), or None."""
    return {name: min(runs, key=lambda run: run.smoke) if runs else None for name, runs in groups.items()}


def curves_chart(runs, names, key, ylabel, title, path):
    fig = Figure(figsize=(9, 5.5))
    ax = fig.subplots()
    scale = 100 if key.endswith("acc") else 1
    for name in names:
        run = runs.get(name)
        if run is None:
            ax.plot([], [], linestyle=":", color="grey", label=f"{name}: not run")
            continue
        values = [scale * v for v in run.history[key]]
        ax.plot(range(1, len(values) + 1), values, label=f"{name} ({run.provenance})")
    if not any(runs.get(n) for n in names):
        ax.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=ax.transAxes,
                fontsize=14, color="grey")
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    save(fig, path)


def train_vs_test_chart(runs, names, path):
    fig = Figure(figsize=(6 * len(names), 4.5))
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names):
        run = runs.get(name)
        if run is None:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, color="grey")
        else:
            plot_accuracy(ax, run.history)
            ax.legend(fontsize=8)
        # A run resumed on other devices has a long provenance: wrapped, it stays above its own axes.
        ax.set_title(f"{name}" + (f"\n{textwrap.fill(run.provenance, 60)}" if run else ""), fontsize=10)
    save(fig, path)
    return fig


def every_run(training_dir, name):
    """Every run of an experiment: its seed<N>/ runs, then the run in its own folder (which a
    seed group hides from the tables, e.g. an earlier run on another device)."""
    folder = Path(training_dir) / name
    runs = [load_run(f, name) for f in seed_folders(folder)] + [load_run(folder, name)]
    return [run for run in runs if run is not None]


def equal_epochs_runs(training_dir, checks):
    """(label, run) for the first fast94 run (of its experiment's folder, then of the checks, those
    closest to the registry's first) that has res_512_d checks of as many epochs on the same data
    and device, then those checks; empty unless such a pair exists."""
    fast, baseline = EQUAL_EPOCHS
    fast_checks = sorted(((name, check) for name, check in checks if check.name == fast),
                         key=lambda item: distance_from_registry(item[1]))
    candidates = [(fast, run) for run in every_run(training_dir, fast)]
    candidates += [(f"{fast} ({name})", check) for name, check in fast_checks]
    for label, run in candidates:
        matched = [(f"{baseline} ({name})", check) for name, check in checks if check.name == baseline
                   and len(check.history["test_acc"]) == len(run.history["test_acc"])
                   and (check.variant, check.device) == (run.variant, run.device)]
        if matched:
            return [(label, run)] + matched
    return []


def distance_from_registry(run):
    """A sort key: runs of the registry's model (its parameter count) first, then those with the
    fewest changed settings."""
    row = Row(run.name, "check", [run])
    return row.parameters != model_costs(row.config)[0], len(recipe_changes(row))


def equal_epochs_chart(shown, path):
    """fast94's test accuracy beside res_512_d's at equal training length, each with its own
    schedule: the modern recipe against the original one. `shown` is equal_epochs_runs'."""
    fast, baseline = EQUAL_EPOCHS
    fig = Figure(figsize=(9, 5.5))
    ax = fig.subplots()
    if not shown:
        ax.text(0.5, 0.5, f"needs a {fast} run and a {baseline} check of as many epochs\non the same "
                "data and device", ha="center", va="center", transform=ax.transAxes, color="grey")
    for label, run in shown:
        values = [100 * v for v in run.history["test_acc"]]
        ax.plot(range(1, len(values) + 1), values, marker="o", label=f"{label}: {run.provenance}")
    ax.set(xlabel="epoch", ylabel="test accuracy (%)",
           title=f"{fast} against {baseline} at equal epochs (each with its own schedule)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(fontsize=8, loc="lower right")
    save(fig, path)


def plot_accuracy(ax, history):
    epochs = range(1, len(history["train_acc"]) + 1)
    ax.plot(epochs, [100 * v for v in history["train_acc"]], label="train")
    evaluated = evaluated_set(history)
    ax.plot(epochs, [100 * v for v in history[f"{evaluated}_acc"]], label=evaluated)
    ax.set(xlabel="epoch", ylabel="accuracy (%)")
    ax.grid(alpha=0.3)


def collect_checks(checks_dir):
    """Run folders under results/checks/ (measurements of the code outside the experiments' own
    folders, e.g. a CPU check or a changed setting) and their seed<N>/ runs, each named by its
    folder ('check' or 'check/seed1'); run.json names the experiment."""
    checks = []
    for top in sorted(Path(checks_dir).glob("*/")):
        for folder in [top, *seed_folders(top)]:
            run = load_run(folder, folder.name)
            if run is not None and run.info.get("experiment") in EXPERIMENTS:
                name = str(folder.relative_to(checks_dir))
                checks.append((name, RunRecord(run.info["experiment"], run.history, run.info)))
    return checks


def markdown_table(columns, rows):
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                     + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def results_markdown(groups, checks):
    """The README's results: full-budget runs only (a multi-seed group as mean ± std over its
    seeds), then checks, each with its provenance."""
    full = {name: [run for run in runs if not run.smoke] for name, runs in groups.items()}
    rows = [row for row in summary_rows(full) if row[2] != "not run"]
    parts = [markdown_table(SUMMARY_COLUMNS, rows) if rows else
             "No full-budget run yet: every experiment is still to be run."]
    if checks:
        parts.append("Checks (reduced budgets or changed settings, in `results/checks/`: measurements "
                     "of the code, not results):")
        parts.append(markdown_table(
            ["check", "experiment", "changed settings", "epochs", "data", "device", "seed",
             "training images/s (last epoch)", "test %", "end-of-run test %"],
            [check_cells(name, run) for name, run in checks]))
    return "\n\n".join(parts)


def check_cells(name, run):
    row = Row(run.name, "check", [run])
    rates = run.info.get("train_images_per_second")
    return [name + (" (uncommitted code)" if run.uncommitted else ""), run.name,
            settings_changed(row) or "none", run.epochs, run.variant, run.device,
            run.info.get("seed", "?"), f"{rates[-1]:,.0f}" if rates else "-",
            f"{100 * run.history['test_acc'][-1]:.2f}", end_of_run(row)]


def update_readme(text, readme=README):
    """Replace what stands between the README's result markers; False if the markers are missing."""
    readme = Path(readme)
    content = readme.read_text() if readme.is_file() else ""
    start, end = README_MARKERS
    if start not in content or end not in content:
        return False
    head, rest = content.split(start, 1)
    write_atomic(readme, f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")
    return True


def summary_table(groups, path):
    columns = SUMMARY_COLUMNS
    rows = summary_rows(groups)
    fig = Figure(figsize=(13, 0.3 * len(rows) + 0.9))
    ax = fig.subplots()
    ax.axis("off")
    table = ax.table(cellText=rows, colLabels=columns, cellLoc="left", loc="upper center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.auto_set_column_width(list(range(len(columns))))
    for (row, _), cell in table.get_celld().items():
        cell.set_height(1 / (len(rows) + 1))
        if row == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#e8e8e8")
    # Every column as wide as its longest text: the figure widens to the table, never the reverse.
    fig.set_figwidth(table.get_window_extent().width / fig.dpi + 0.4)
    ax.set_title("Small ResNets on CIFAR-10: measured here vs the original study "
                 "(best/final test accuracy; 'smoke' = reduced budget or unfinished run, not a result)", fontsize=10)
    save(fig, path)
    return fig


def save(fig, path):
    """The figure as a PNG, replaced atomically; no version stamp: the same runs give the same file."""
    fig.tight_layout()
    replace_atomically(path, lambda f: fig.savefig(f, format="png", dpi=110, metadata={"Software": None}))


def make_charts(training_dir=TRAINING_DIR, top_dir=REPO_ROOT, results_dir=RESULTS_DIR, readme=None,
                groups=None):
    """Every chart of the original study, from the run folders that exist (or from `groups`, as
    collect_groups returns them, when the caller has read them already), and the README's results
    block when `readme` is given. Returns the paths written."""
    groups = collect_groups(training_dir) if groups is None else groups
    runs = representative_runs(groups)
    top_dir, results_dir = Path(top_dir), Path(results_dir)
    checks = collect_checks(results_dir / "checks")
    activations = group_members("changing_activations")
    optimisers = group_members("changing_optimisers")
    jobs = [
        (curves_chart, (runs, ARCHITECTURES, "test_acc", "test accuracy (%)",
                        "Test accuracy of the five architectures", top_dir / "model_acc.png")),
        (curves_chart, (runs, ARCHITECTURES, "test_loss", "test loss",
                        "Test loss of the five architectures", top_dir / "model_loss.png")),
        (curves_chart, (runs, activations, "test_acc", "test accuracy (%)",
                        "Activation sweep over res_512_d (SGD lr 0.1)", results_dir / "activations.png")),
        (curves_chart, (runs, optimisers, "test_acc", "test accuracy (%)",
                        "Optimiser sweep over res_512_d (ReLU, lr 0.1)", results_dir / "optimisers.png")),
        (train_vs_test_chart, (runs, TRAIN_VS_TEST, results_dir / "train_vs_test.png")),
        (curves_chart, (runs, BEYOND, "test_acc", "test accuracy (%)",
                        "Beyond the original study: fast94 and best_5m", results_dir / "beyond.png")),
        (equal_epochs_chart, (equal_epochs_runs(training_dir, checks),
                               results_dir / "fast94_vs_res_512_d.png")),
        (summary_table, (groups, top_dir / "model_summary.png")),
    ]
    for draw, args in jobs:
        draw(*args)
    paths = [args[-1] for _, args in jobs]
    if readme is not None and update_readme(results_markdown(groups, checks), readme):
        paths.append(Path(readme))
    return paths


def plot_run(folder):
    """Loss and accuracy of one run folder, train against test (or validation) (for notebooks)."""
    import matplotlib.pyplot as plt
    history = read_history(folder)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = range(1, len(history["train_loss"]) + 1)
    loss_ax.plot(epochs, history["train_loss"], label="train")
    evaluated = evaluated_set(history)
    loss_ax.plot(epochs, history[f"{evaluated}_loss"], label=evaluated)
    loss_ax.set(xlabel="epoch", ylabel="loss")
    loss_ax.grid(alpha=0.3)
    plot_accuracy(acc_ax, history)
    for ax in (loss_ax, acc_ax):
        ax.legend()
    fig.tight_layout()
    return fig
