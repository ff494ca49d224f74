"""What a group of runs amounts to: one `Row` per experiment and budget (full or smoke), a seed
group as mean ± std over its seeds, and how its numbers are written. The README's results,
model_summary.png and the report all read their figures through it, so they cannot disagree.
"""
import functools
import json
import statistics
from dataclasses import dataclass

from . import models
from .config import EXECUTION_SETTINGS
from .experiments import EXPERIMENTS
from .models import count_parameters, model_options, multiply_adds

IMAGE_SIZE = (3, 32, 32)  # one CIFAR-10 image, channels first


def mean_std(values):
    """(mean, sample standard deviation or None for a single value), or None for no values."""
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def percent(stat):
    """'86.67', or '86.67 ± 0.12' over seeds, or '-' when not run."""
    if stat is None:
        return "-"
    mean, std = stat
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def duration(seconds):
    """'4.7 s' or '4.2 min'; '-' where unknown."""
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def wall_time(row):
    """The row's mean wall time per run, '(in N parts)' where a run was stopped and resumed:
    the sum of its parts, each on whatever else the machine ran then."""
    parts = max((1 + len(run.info.get("resumed", [])) for run in row.runs), default=1)
    if row.wall_seconds is None or parts == 1:
        return duration(row.wall_seconds)
    return f"{duration(row.wall_seconds)} (in {parts} parts)"


def published_text(exp):
    """The original study's best/final test % of an experiment, e.g. '86.67/86.55', or '-'."""
    return "/".join(f"{v:.2f}" for v in exp.published) if exp.published else "-"


def cost_cells(params, macs):
    """Trainable parameters and multiply-adds per image, as tables show them."""
    return [f"{params:,}", f"{macs / 1e6:.1f}M"]


# models.meta_model once per config: the report asks for the same few registry models many times
meta_model = functools.lru_cache(maxsize=None)(models.meta_model)


@functools.lru_cache(maxsize=None)
def model_costs(config):
    """(trainable parameters, multiply-adds per image) of a config's model, counted by the code."""
    model = meta_model(config)
    return count_parameters(model), multiply_adds(model, (1, *IMAGE_SIZE))


@dataclass
class Row:
    """One line of the summary: an experiment's runs of one budget ("full" or "smoke"), ordered by
    seed, or the experiment without a full-budget run ("not run", no runs); or the runs of one
    folder under results/checks/ ("check")."""
    experiment: str
    budget: str
    runs: list

    @property
    def config(self):
        return EXPERIMENTS[self.experiment].config

    @property
    def same_run_as(self):
        """The twin experiment whose runs these are (charts.share_twin_runs), or None."""
        return next((run.same_run_as for run in self.runs if run.same_run_as), None)

    @property
    def label(self):
        """The experiment's name, saying so where its runs are its twin's, and naming the recipe
        settings they changed from the registry's (`train --set lr=0.05` into the experiment's
        folder is then not taken for the experiment itself)."""
        changed = settings_changed(self)
        return (self.experiment + (f" (same run as {self.same_run_as})" if self.same_run_as else "")
                + (f" (settings changed: {changed})" if changed else ""))

    def from_runs(self, value, default):
        """The distinct values of value(run) over the runs, joined; `default` when there is no run."""
        return "; ".join(dict.fromkeys(str(value(run)) for run in self.runs)) or str(default)

    def setting(self, key):
        """A Config field as the runs recorded it, else as the registry defines it."""
        planned = getattr(self.config, key)
        return self.from_runs(lambda run: run.info.get("config", {}).get(key, planned), planned)

    def recorded(self, key, counted):
        """A number the run recorded in run.json, else the code's count for the registry's config."""
        return self.runs[0].info[key] if self.runs and key in self.runs[0].info else counted()

    @property
    def parameters(self):
        return self.recorded("trainable_parameters", lambda: model_costs(self.config)[0])

    @property
    def multiply_adds(self):
        return self.recorded("multiply_adds_per_image", lambda: model_costs(self.config)[1])

    @property
    def activation(self):
        planned = model_options(self.config)["activation"]
        return self.from_runs(lambda run: run.info.get("model", {}).get("activation", planned), planned)

    @property
    def epochs(self):
        return self.from_runs(lambda run: run.epochs, f"{self.config.epochs} ep planned")

    @property
    def data(self):
        return self.from_runs(lambda run: run.variant, "-")

    @property
    def device(self):
        return self.from_runs(lambda run: run.device, "-")

    @property
    def seeds(self):
        return ", ".join(str(run.info.get("seed", "?")) for run in self.runs) or "-"

    @property
    def best(self):
        return mean_std([100 * max(run.history["test_acc"]) for run in self.runs])

    @property
    def final(self):
        return mean_std([100 * run.history["test_acc"][-1] for run in self.runs])

    @property
    def final_evaluation(self):
        """The test % of the runs' final evaluation (with test-time augmentation), over the runs
        that made one."""
        finals = [run.info["final_evaluation"] for run in self.runs if run.info.get("final_evaluation")]
        return mean_std([100 * f["test_acc"] for f in finals])

    @property
    def tta(self):
        return any((run.info.get("final_evaluation") or {}).get("tta") for run in self.runs)

    @property
    def training_pflops(self):
        """Training FLOPs per run (one batch's forward and backward, counted, times images seen)."""
        counted = [run.info["training_flops_per_image"] * run.info["data"]["train_images"]
                   * len(run.history["test_acc"]) for run in self.runs if "training_flops_per_image" in run.info]
        return statistics.fmean(counted) / 1e15 if counted else None

    @property
    def wall_seconds(self):
        """Mean wall time per run, over the runs whose run.json records it; None where none does."""
        times = [run.info["wall_seconds"] for run in self.runs if "wall_seconds" in run.info]
        return statistics.fmean(times) if times else None

    @property
    def provenance(self):
        """e.g. 'exact-offline, 200 ep, seeds 0, 1, 2, H100 80GB HBM3', with ', SMOKE' for smoke runs
        and ', uncommitted code' where a run's code had uncommitted changes."""
        seeds = "seeds" if len(self.runs) > 1 else "seed"
        text = f"{self.data}, {self.epochs}, {seeds} {self.seeds}, {self.device}"
        return (text + (", SMOKE" if self.budget == "smoke" else "")
                + (", uncommitted code" if any(run.uncommitted for run in self.runs) else "")
                + (f", same run as {self.same_run_as}" if self.same_run_as else ""))


PLACE_AND_BUDGET = EXECUTION_SETTINGS | {"seed", "epochs", "subset"}  # not recipe changes


def recipe_changes(row):
    """{setting: value} for the recipe settings the row's runs recorded that differ from the registry's."""
    planned = json.loads(json.dumps(row.config.to_dict()))  # tuples as the lists run.json holds
    return {k: v for run in row.runs for k, v in run.info.get("config", {}).items()
            if k in planned and k not in PLACE_AND_BUDGET and v != planned[k]}


def settings_changed(row):
    """'micro_batch=512': recipe_changes as text."""
    return ", ".join(f"{k}={v}" for k, v in sorted(recipe_changes(row).items()))


def end_of_run(row):
    """'94.12 (TTA)': the final evaluation's test %, or '-' where the runs made none."""
    return "-" if row.final_evaluation is None else percent(row.final_evaluation) + (" (TTA)" if row.tta else "")


def summary_rows_by_budget(groups):
    """Headline rows, one per experiment (its full-budget runs, or "not run"), and smoke rows,
    one per experiment that has smoke runs."""
    headline, smoke = [], []
    for name, runs in groups.items():
        full = [run for run in runs if not run.smoke]
        headline.append(Row(name, "full" if full else "not run", full))
        reduced = [run for run in runs if run.smoke]
        if reduced:
            smoke.append(Row(name, "smoke", reduced))
    return headline, smoke


def headline_row(name, runs):
    """The row an experiment is known by: its full-budget runs, else its smoke runs, else not run."""
    full = [run for run in runs if not run.smoke]
    if full:
        return Row(name, "full", full)
    return Row(name, "smoke", runs) if runs else Row(name, "not run", [])


SUMMARY_COLUMNS = ["experiment", "trainable params", "epochs", "data", "device", "seeds",
                   "best test %", "final test %", "original study %", "end-of-run test %", "wall time / run"]


def summary_rows(groups):
    """One row of SUMMARY_COLUMNS per experiment, plain strings: what was measured beside what
    the original study published."""
    rows = []
    for name, exp in EXPERIMENTS.items():
        row = headline_row(name, groups.get(name) or [])
        epochs = {"full": row.epochs, "smoke": f"{row.epochs} smoke"}.get(row.budget, "not run")
        rows.append([row.label, f"{row.parameters:,}", epochs, row.data, row.device, row.seeds,
                     percent(row.best), percent(row.final), published_text(exp), end_of_run(row),
                     wall_time(row)])
    return rows
