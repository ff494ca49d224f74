"""`python -m common report`: the summary table, the charts and `Project Report.pdf`, rebuilt from
the run folders that exist, so the report can never disagree with the runs.

Every measured number is read from a run's history files and run.json (speeds from the records
`bench --record` keeps), every parameter and multiply-add count from the models themselves. An
experiment without a run says "not run", and a smoke run (a reduced budget, or a run that has not
finished) is listed apart from the results, never among them. The only numbers typed here are
PUBLIC_ANCHORS: published figures of others, quoted and attributed as such.
"""
import csv
import dataclasses
import io
import itertools
import re
from pathlib import Path
from xml.sax.saxutils import escape

import torch
from matplotlib.figure import Figure
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import cm
from reportlab.lib.utils import ImageReader
from reportlab.platypus import Image, KeepTogether, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle
from torch import nn

from .bench import MODES, load_records
from .charts import (ARCHITECTURES, BEYOND, EQUAL_EPOCHS, README, RESULTS_DIR, TRAIN_VS_TEST,
                     collect_checks, collect_groups, equal_epochs_runs, group_members, make_charts,
                     markdown_table, representative_runs, save, short_device_name)
from .config import Config
from .data import FULL_VARIANTS
from .experiments import EXPERIMENTS, REPO_ROOT, TRAINING_DIR
from .history import replace_atomically, write_atomic
from .models import PARAMETER_BUDGET, model_options
from .summary import (IMAGE_SIZE, Row, cost_cells, end_of_run, meta_model, model_costs, percent,
                      published_text, settings_changed, summary_rows_by_budget, wall_time)

REPORT_FILE = "Project Report.pdf"

# Published figures of others under the same 5M budget (the study notes' public anchors): quoted
# with their attribution, never measured here. (model, trainable parameters, test %, recipe)
PUBLIC_ANCHORS = [
    ("CIFAR-style ResNet (3x3 stride-1 stem)", "under 5M", "95-96",
     "SGD momentum 0.9, weight decay 5e-4, cosine, 200 epochs"),
    ("squeeze-excitation ResNet", "4.7M", "96.04", "an instance of the row above"),
    ("PyramidNet-164", "3.8M", "96.04", ""),
    ("Shake-Shake 26 2x32d", "2.9M", "97.0 / 97.5", "with cutout / with AutoAugment"),
    ("airbench94 (fastest known CIFAR-10 training)", "2.0M", "94", "9.9 epochs, 0.36 PFLOP of training"),
    ("airbench", "4.6M", "95", "15 epochs"),
]

# The data variants run.json names (see README, "Data"): what each is, and whether a run on it counts.
DATA_VARIANTS = {
    "official": "the official CIFAR-10 download",
    "exact-offline": "the project's offline copy of the official images, same pixels and order: "
                     "results on it are official CIFAR-10 results",
    "exact-small": "a small subset of the offline copy, for quick checks of the code",
    "jpeg75": "a lossy JPEG copy (quality 75) of all images: it costs accuracy, so results on it "
              "are not official CIFAR-10 results and sit below what the same recipe reaches on the "
              "official images",
}

# The report's figures in order, by the file name make_charts (or this module) writes:
# (what it shows, the experiments it draws).
FIGURES = {
    "model_acc.png": ("Test accuracy of the five architectures against epoch", ARCHITECTURES),
    "model_loss.png": ("Test loss of the five architectures against epoch", ARCHITECTURES),
    "train_vs_test.png": ("Train and test accuracy against epoch", TRAIN_VS_TEST),
    "accuracy_vs_params.png": ("Best test accuracy (mean and standard deviation over seeds) against "
                               "trainable parameters; smoke runs hollow", list(EXPERIMENTS)),
    "beyond.png": ("fast94 and best_5m: test accuracy against epoch", BEYOND),
    "fast94_vs_res_512_d.png": ("fast94 against res_512_d (a check run of as many epochs, same data and "
                                "device): test accuracy against epoch", list(EQUAL_EPOCHS)),
    "activations.png": ("Activation sweep: test accuracy against epoch",
                        group_members("changing_activations")),
    "optimisers.png": ("Optimiser sweep: test accuracy against epoch", group_members("changing_optimisers")),
}
# What fast94 and best_5m set out to reach (issue 3): test %, within how many epochs, as a mean
# over how many seeds.
TARGETS = {"fast94": (94.0, 10, 3), "best_5m": (96.5, 200, 3)}
SWEEP_FIGURES = {"changing_activations": "activations.png", "changing_optimisers": "optimisers.png"}


# ---------------------------------------------------------------- what the code says about the models

def stages_text(model):
    """'64x3, 128x6/2, 512x1/2': output channels x blocks per stage, /2 where it starts with stride 2."""
    stages = []  # [channels, blocks, first stride]
    for block in model.blocks:
        conv = block.body[0]
        if stages and stages[-1][0] == conv.out_channels and conv.stride[0] == 1:
            stages[-1][1] += 1
        else:
            stages.append([conv.out_channels, 1, conv.stride[0]])
    return ", ".join(f"{c}×{n}" + (f"/{s}" if s > 1 else "") for c, n, s in stages)


def architecture_rows():
    """One row per architecture, every cell read off its model."""
    rows = []
    for name in ARCHITECTURES:
        config = EXPERIMENTS[name].config
        model, options = meta_model(config), model_options(config)
        stem, pool = model.stem[0], model.stem[-1]
        entering = model.stem(torch.empty(1, *IMAGE_SIZE, device="meta")).shape[-2:]
        rows.append([name, f"{stem.out_channels} wide, {stem.kernel_size[0]}×{stem.kernel_size[1]} "
                           f"conv stride {stem.stride[0]}, max-pool stride {pool.stride}",
                     stages_text(model), sum(isinstance(m, nn.Conv2d) for m in model.blocks[0].body),
                     "×".join(map(str, entering)), f"{options['activation']}, dropout {options['dropout']}",
                     *cost_cells(*model_costs(config))])
    return rows


def config_changes(config):
    """The fields where a config differs from Config's defaults, as 'key=value'."""
    default = Config()
    return ", ".join(f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(Config)
                     if getattr(config, f.name) != getattr(default, f.name))


# ---------------------------------------------------------------- the summary files

def number(value):
    return "" if value is None else f"{value:.2f}"


CSV_COLUMNS = ["experiment", "budget", "architecture", "trainable_parameters", "multiply_adds_per_image",
               "epochs", "optimiser", "activation", "data", "device", "seeds",
               "best_test_pct", "best_test_pct_std", "final_test_pct", "final_test_pct_std",
               "wall_seconds_per_run", "original_best_pct", "original_final_pct",
               "end_of_run_test_pct", "end_of_run_test_pct_std", "end_of_run_tta", "training_pflops_per_run",
               "same_run_as"]


def csv_values(row):
    published = (EXPERIMENTS[row.experiment].published or ()) + (None, None)
    return [row.experiment, row.budget, row.setting("architecture"), row.parameters, row.multiply_adds,
            row.epochs, row.setting("optimizer"), row.activation, row.data, row.device, row.seeds,
            *map(number, [*(row.best or (None, None)), *(row.final or (None, None)), row.wall_seconds,
                          *published[:2], *(row.final_evaluation or (None, None))]),
            "yes" if row.tta else "", "" if row.training_pflops is None else f"{row.training_pflops:.4f}",
            row.same_run_as or ""]


def summary_csv(rows):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(csv_values(row) for row in rows)
    return out.getvalue()


MARKDOWN_COLUMNS = ["experiment", "architecture", "trainable params", "multiply-adds / image", "epochs",
                    "optimiser", "activation", "data", "device", "seeds", "best test %", "final test %",
                    "end-of-run test %", "wall time / run", "original study %"]


def markdown_values(row):
    return [row.label, row.setting("architecture"), *cost_cells(row.parameters, row.multiply_adds),
            row.epochs, row.setting("optimizer"), row.activation,
            row.data, row.device, row.seeds, percent(row.best), percent(row.final), end_of_run(row),
            wall_time(row), published_text(EXPERIMENTS[row.experiment])]


def summary_markdown(headline, smoke):
    return "\n\n".join([
        "# Summary of the runs",
        "Written by `python -m common report` from the run folders under `training/` (a multi-seed "
        "group: its `seed<N>/` subfolders, shown as mean ± standard deviation over seeds). Best test % "
        "is the highest test accuracy of any epoch, final test % the last epoch's, end-of-run test % "
        "the one evaluation after training where a run makes one (with test-time augmentation, TTA); "
        "original study % is the best/final test accuracy the original study published; wall time "
        "is the sum of a run's parts where it was stopped and resumed (\"in N parts\"). Runs "
        "with --val (tuning runs, evaluated on held-out training images each epoch) are left out.",
        "## Results: full-budget runs, one row per experiment",
        markdown_table(MARKDOWN_COLUMNS, [markdown_values(row) for row in headline]),
        "## Smoke runs (reduced budgets, or runs not finished: not results)",
        markdown_table(MARKDOWN_COLUMNS, [markdown_values(row) for row in smoke]) if smoke else "None.",
    ]) + "\n"


def accuracy_vs_params_chart(rows, path):
    """Best test accuracy (mean ± std over seeds) of each measured row against its parameters."""
    fig = Figure(figsize=(9, 5.5))
    ax = fig.subplots()
    for row in rows:
        mean, std = row.best
        ax.errorbar(row.parameters / 1e6, mean, yerr=std or 0, fmt="o", capsize=3,
                    markerfacecolor="none" if row.budget == "smoke" else None,
                    label=f"{row.experiment} ({row.provenance})")
    if not rows:
        ax.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=ax.transAxes,
                fontsize=14, color="grey")
    ax.axvline(PARAMETER_BUDGET / 1e6, color="grey", linestyle="--",
               label=f"budget: {PARAMETER_BUDGET:,} parameters")
    ax.set(xlabel="trainable parameters (millions)", ylabel="best test accuracy (%)",
           title="Test accuracy against trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    save(fig, path)
    return Path(path)


# ---------------------------------------------------------------- the PDF

_BASE = getSampleStyleSheet()
STYLES = {
    "title": _BASE["Title"],
    "h1": ParagraphStyle("h1", parent=_BASE["Heading1"], keepWithNext=1),
    "h2": ParagraphStyle("h2", parent=_BASE["Heading2"], keepWithNext=1),
    "body": ParagraphStyle("body", parent=_BASE["BodyText"], spaceAfter=6, leading=13.5),
    "bullet": ParagraphStyle("bullet", parent=_BASE["BodyText"], leftIndent=12, bulletIndent=2,
                             spaceAfter=3),
    "cell": ParagraphStyle("cell", parent=_BASE["BodyText"], fontSize=7.5, leading=9),
    "head": ParagraphStyle("head", parent=_BASE["BodyText"], fontSize=7.5, leading=9,
                           fontName="Helvetica-Bold"),
    "code": ParagraphStyle("code", parent=_BASE["BodyText"], fontSize=7, leading=9, fontName="Courier"),
    "caption": ParagraphStyle("caption", parent=_BASE["Italic"], fontSize=8.5, leading=10.5,
                              spaceAfter=12),
}
FRAME_WIDTH = A4[0] - 4 * cm


def para(markup, style="body"):
    return Paragraph(markup, STYLES[style])


def code(text):
    return f'<font face="Courier">{escape(text)}</font>'


def bullets(items):
    return [Paragraph(item, STYLES["bullet"], bulletText="•") for item in items]


def table(tables, header, rows, caption, widths, code_columns=()):
    """Its caption, numbered by the counter `tables`, then a table of plain-text cells that wrap,
    its header repeated on every page; `widths` are relative column widths, `code_columns` the
    indices of columns set in Courier."""
    def cell(value, style):
        return Paragraph(escape(str(value)).replace("\n", "<br/>"), STYLES[style])
    body = [[cell(v, "code" if i in code_columns else "cell") for i, v in enumerate(row)] for row in rows]
    grid = Table([[cell(v, "head") for v in header]] + body, repeatRows=1, hAlign="LEFT",
                 colWidths=[w * FRAME_WIDTH / sum(widths) for w in widths])
    grid.setStyle(TableStyle([
        ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8e8e8")),
        ("GRID", (0, 0), (-1, -1), 0.25, colors.grey),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("TOPPADDING", (0, 0), (-1, -1), 2),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
        ("LEFTPADDING", (0, 0), (-1, -1), 3),
        ("RIGHTPADDING", (0, 0), (-1, -1), 3),
    ]))
    return [KeepTogether([para(f"<b>Table {next(tables)}.</b> {caption}", "caption"), grid]), Spacer(1, 10)]


def figure(path, caption):
    """The chart at full frame width, kept on one page with its caption."""
    width, height = ImageReader(str(path)).getSize()
    image = Image(str(path), FRAME_WIDTH, FRAME_WIDTH * height / width)
    return KeepTogether([image, para(caption, "caption")])


def figure_number(name):
    return list(FIGURES).index(name) + 1


def figure_block(name, figures, runs, rows, equal_epochs=()):
    """Figure `name` with a caption naming the provenance (data, epochs, seeds, device) of what it draws."""
    what, names = FIGURES[name]
    if name == "accuracy_vs_params.png":  # drawn from every seed of each group, not one run per experiment
        drawn = {row.experiment: row.provenance for row in rows if row.runs}
    elif name == "fast94_vs_res_512_d.png":  # fast94's run beside check runs of res_512_d
        drawn = {label: run.provenance for label, run in equal_epochs}
        names = [n for n in names if not any(label.startswith(n) for label in drawn)]
    else:
        drawn = {n: runs[n].provenance for n in names if runs.get(n)}
    text = f"<b>Figure {figure_number(name)}.</b> {escape(what)}. "
    if not drawn:  # an empty chart tells a reader nothing: say so instead of showing it
        return [para(f"{text}Not shown: none of {escape(', '.join(names))} has been run yet.", "caption")]
    text += "Drawn from: " + escape("; ".join(f"{n} ({where})" for n, where in drawn.items())) + "."
    missing = [n for n in names if not any(label.startswith(n) for label in drawn)]
    if missing:
        text += f" Not run: {escape(', '.join(missing))}."
    return [figure(figures[name], text)]


def title_page(headline):
    study_best, study_name = max((e.published[0], e.name) for e in EXPERIMENTS.values() if e.published)
    measured = [row for row in headline if row.runs]
    abstract = (
        f"How good can a ResNet with at most {PARAMETER_BUDGET:,} trainable parameters be on CIFAR-10? "
        f"This report sets the {len(EXPERIMENTS)} experiments of this repository, built to reproduce the "
        f"student study resnet5M (best published test accuracy {study_best:.2f}%, {study_name}), beside "
        f"that study and beside published results of others. It is written by "
        f"{code('python -m common report')} from the run folders under {code('training/')}: every "
        f"measured number is read from a run's "
        f"history files and run.json, every parameter and multiply-add count from the models themselves.")
    if not measured:
        abstract += (" <b>No experiment has a full-budget run yet, so this report holds no results of "
                     "ours</b>: its tables describe what each experiment will measure, and wherever a "
                     "result would stand it says \"not run\".")
    else:
        top = max(measured, key=lambda row: (row.final_evaluation or row.final)[0])
        abstract += (f" {len(measured)} of the {len(EXPERIMENTS)} experiments have full-budget runs. "
                     f"The best, {escape(top.experiment)}, ends at {percent(top.final)}% test accuracy")
        if top.final_evaluation is not None:
            abstract += (f", {percent(top.final_evaluation)}% in its end-of-run evaluation"
                         + (" with test-time augmentation" if top.tta else ""))
        abstract += f" ({escape(top.provenance)})."
    return [para("Small ResNets on CIFAR-10 under five million parameters", "title"),
            para("Reproducing resnet5M and going beyond it, generated from the runs", "h2"),
            para("Abstract", "h1"), para(abstract)]


def question_section():
    return [
        para("1. The question", "h1"),
        para("How good can a residual network be on CIFAR-10 when it may hold no more than "
             f"{PARAMETER_BUDGET:,} trainable parameters? The student study \"ResNet under 5M parameters to "
             "perform image classification on CIFAR-10\" (saikrishna-prathapaneni/resnet5M, NYU Deep "
             "Learning mini-project) trained five ResNet variants under that budget, then swept activations "
             "and optimisers over the best of them. This repository re-implements every one of its "
             "experiments as a named entry in one registry, trained by one loop; its models match the "
             "study's parameter counts exactly (the tests check each), and the model builder refuses any "
             "model over the budget."),
        para("The study's networks start with an ImageNet-style stem, a strided convolution and a max-pool, "
             "so the residual blocks see a small fraction of the image's resolution (Table 1), and its "
             "recipe is plain SGD without momentum or weight decay. The comparison in section 4 shows how "
             "far published networks of the same size go beyond it."),
    ]


def methods_section(tables):
    defaults = Config()
    shown = [f for f in dataclasses.fields(Config) if f.name not in ("data_dir", "download", "device")]
    return [
        para("2. Methods", "h1"),
        para("2.1 Architectures", "h2"),
        *table(tables, ["architecture", "stem", "stages (channels×blocks, /2: first block strides 2)",
                "convs per block", "blocks see", "activation, dropout", "trainable params",
                "multiply-adds per image"], architecture_rows(),
               "The five architectures, every cell read off the model the code builds "
               "(multiply-adds counted by torch's FLOP counter for one image).",
               widths=[2, 2.6, 3, 1, 1.2, 2, 1.7, 1.9]),
        para("2.2 Recipe", "h2"),
        para("Every experiment is the default configuration below with a few fields changed (Table 3). "
             "Augmentation runs on the training device; accuracy is counted per image over the whole test "
             "set after every epoch, and no model is selected on the test set. With bf16 and fp16 at their "
             "defaults, a run computes in bf16 autocast on a GPU with native bf16 (compute capability 8.0 or "
             "newer) and in float32 elsewhere; run.json records the precision of runs started from 2026-12-07 "
             "on (before, every GPU run computed in bf16 and every CPU run in float32 unless its settings "
             "say bf16=True)."),
        *table(tables, ["setting", "default"], [[f.name, getattr(defaults, f.name)] for f in shown],
               f"The defaults of {code('common/config.py')}'s Config: the original study's "
               "recipe. None means the architecture's own choice.", widths=[1, 3]),
        *table(tables, ["experiment", "changes to the defaults", "activation", "trainable params",
                        "multiply-adds per image"],
               [[name, config_changes(e.config), model_options(e.config)["activation"],
                 *cost_cells(*model_costs(e.config))] for name, e in EXPERIMENTS.items()],
               "Each experiment of the registry, its changes to the defaults, and its "
               "model's cost as the code counts it.", widths=[3.9, 6.2, 1.5, 1.6, 1.8]),
        para("2.3 Data", "h2"),
        para("CIFAR-10 in its official python layout. Each run's run.json names the copy it read; a run on "
             "the small copy, on a subset of the training set, or with fewer epochs than its experiment "
             "defines is a smoke run and is never counted as a result."),
        *table(tables, ["data variant", "what it is", "a result?"],
               [[v, text, "yes" if v in FULL_VARIANTS else "no: smoke runs only"]
                for v, text in DATA_VARIANTS.items()],
               "The copies of CIFAR-10 a run can name (README, \"Data\"). The JPEG-75 copy "
               "costs accuracy: a result on it is marked as such wherever it appears.", widths=[1.3, 5, 1.5]),
    ]


RESULT_COLUMNS = ["experiment", "epochs", "data", "device", "seeds", "best test %", "final test %",
                  "end-of-run test %", "wall time / run", "original study % (best/final)"]


def result_values(row):
    return [row.label, row.epochs, row.data, row.device, row.seeds, percent(row.best),
            percent(row.final), end_of_run(row), wall_time(row),
            published_text(EXPERIMENTS[row.experiment])]


# Points: each column holds its longest word (changing_activations/leakyrelu, exact-offline) unbroken.
RESULT_WIDTHS = [109, 34, 48, 50, 28, 44, 44, 44, 33, 48]


def results_section(headline, smoke, figures, runs, tables):
    measured = [row for row in headline if row.runs]
    not_run = [row.experiment for row in headline if not row.runs]
    story = [para("3. Results", "h1")]
    if measured:
        story += table(tables, RESULT_COLUMNS, [result_values(row) for row in measured],
                       "Full-budget runs: test accuracy of the best and of the last epoch "
                       "(mean ± standard deviation where there are several seeds), read from each run's "
                       "history files; data, device, epochs and seeds from its run.json. Every column of "
                       f"every experiment is in {code('results/summary.csv')}.", widths=RESULT_WIDTHS)
    else:
        story.append(para("<b>No experiment has a full-budget run yet: there are no results to report.</b> "
                          "The figures below draw only what exists, smoke runs marked SMOKE, and are left "
                          "out where nothing exists."))
    if measured and not_run:
        story.append(para(f"Not run at full budget yet: {escape(', '.join(not_run))}."))
    if smoke:
        story.append(para("Smoke runs (reduced budgets, or runs not finished: not results)", "h2"))
        story += table(tables, RESULT_COLUMNS, [result_values(row) for row in smoke],
                       "Smoke runs, kept apart from the results above: a subset, fewer epochs than the "
                       "experiment defines, the small data, or a run still going, stopped or failed "
                       "(its epochs column says how far it got).", widths=RESULT_WIDTHS)
    for name in ["model_acc.png", "model_loss.png", "train_vs_test.png", "accuracy_vs_params.png"]:
        story += figure_block(name, figures, runs, headline + smoke)
    return story


def ours(row):
    """Our best and final test % of a headline row and where they come from, or 'not run yet'."""
    if not row.runs:
        return ["not run yet", "-", "-"]
    return [percent(row.best), percent(row.final), row.provenance]


def comparison_section(headline, tables):
    rows = []
    for row in headline:
        published = EXPERIMENTS[row.experiment].published
        if published:
            best, final, provenance = ours(row)
            gap = f"{row.best[0] - published[0]:+.2f}" if row.runs else "-"
            rows.append([row.experiment, published_text(EXPERIMENTS[row.experiment]), best, final, gap,
                         provenance])
    return [
        para("4. Comparison", "h1"),
        para("4.1 With the original study", "h2"),
        *table(tables, ["experiment", "original study % (best/final)", "ours, best %", "ours, final %",
                "ours - original (best)", "our runs"], rows,
               "The original study's published test accuracy beside ours. The original "
               "selected its saved model on the test set and averaged per-batch accuracies; ours counts per "
               "image. Only full-budget runs are compared.", widths=[3.9, 2, 1.8, 1.8, 1.5, 6]),
        para("4.2 With published results of others", "h2"),
        para("The figures below were <b>published by others</b> for networks within the same parameter "
             "budget, as collected in this project's study notes. They were not measured here and are quoted "
             "only to show where the field stands; they used other architectures and recipes."),
        *table(tables, ["model", "trainable params", "published test %", "recipe"],
               [list(anchor) for anchor in PUBLIC_ANCHORS],
               "Public anchors: published figures of others, quoted, not our measurements.",
               widths=[4, 1.5, 1.5, 4]),
    ]


def check_rows(checks, experiments):
    """One row per folder under results/checks/ whose runs are of `experiments` (a seed group's
    runs together): what it changed and what that measured."""
    folders = {}
    for name, run in checks:
        if run.name in experiments:
            folders.setdefault(name.split("/")[0], []).append(run)
    rows = []
    for folder, folder_runs in folders.items():
        row = Row(folder_runs[0].name, "check", folder_runs)
        pflops = "-" if row.training_pflops is None else f"{row.training_pflops:.3f}"
        rows.append([folder, row.experiment, settings_changed(row) or "none", percent(row.final),
                     end_of_run(row), pflops, wall_time(row), row.provenance])
    return rows


def beyond_section(headline, figures, runs, equal_epochs, checks, tables):
    by_name = {row.experiment: row for row in headline}
    rows = []
    for name in BEYOND:
        row, (target, epochs, seeds) = by_name[name], TARGETS[name]
        verdict = "-"
        if row.runs:
            reached = (row.final_evaluation or row.final)[0]
            figure = f"{reached:.2f}%{' with TTA' if row.final_evaluation and row.tta else ''}"
            if len(row.runs) < seeds:
                verdict = f"not yet shown: {figure} over {len(row.runs)} of the {seeds} seeds it asks for"
            else:
                verdict = f"{'reached' if reached >= target else 'not reached'} ({figure})"
        pflops = "-" if row.training_pflops is None else f"{row.training_pflops:.3f}"
        rows.append([name, f"≥ {target:.1f}% in ≤ {epochs} epochs, mean of {seeds} seeds", *ours(row)[:2],
                     end_of_run(row), pflops, wall_time(row), verdict, ours(row)[2]])
    return [
        para("5. Beyond the original study", "h1"),
        para("The original study's networks shrink the image fourfold before the first residual block "
             "and train with plain SGD. The CIFAR-style family of " + code("common/models.py") + " keeps "
             "the full 32×32 resolution for its first convolution (a frozen 2×2 patch-whitening layer "
             "fitted to the training images, or a 3×3 convolution), then per stage a 3×3 convolution, "
             "2×2 max-pool, BatchNorm and residual blocks, optionally with squeeze-excitation or "
             "pre-activation. The recipes are options of the same training loop (Table 3 lists every "
             "change): fast94 follows airbench94 (Nesterov SGD at batch 1024, BatchNorm biases at 64× "
             "the learning rate, label smoothing 0.2, a triangular schedule stepped per batch, lookahead "
             "weight averaging, reflect-padded crops, alternating flips, flip-and-shift test-time "
             "augmentation); best_5m adds squeeze-excitation, TrivialAugment, cutout and an EMA of the "
             "weights over 200 epochs."),
        *table(tables, ["experiment", "target", "ours, best %", "ours, final %", "end-of-run test %",
                        "training PFLOP / run", "wall time / run", "status", "our runs"], rows,
               "The two targets and where full-budget runs stand. The end-of-run figure is the one "
               "evaluation of the final (averaged) weights with test-time augmentation; training FLOPs are "
               "one batch's forward and backward pass counted by torch's FLOP counter, times the images "
               "seen.", widths=[1.6, 2, 1.4, 1.4, 1.6, 1.4, 1.3, 2, 4]),
        *figure_block("beyond.png", figures, runs, headline),
        *figure_block("fast94_vs_res_512_d.png", figures, runs, headline, equal_epochs),
        *checks_block(checks, tables),
    ]


def checks_block(checks, tables):
    rows = check_rows(checks, BEYOND)
    if not rows:
        return []
    return [
        para("Changed settings, measured as checks", "h2"),
        para("Runs of fast94 or best_5m with settings changed by " + code("--set") + " (kept in "
             + code("results/checks/") + ", checks of the code, not results), for instance toward "
             "the training compute airbench94 publishes (section 4.2). The reference for the CPU rows "
             "is quoted from this project's fast94 issue, not re-run here: there, airbench94's "
             "published script, run in float32 on the exact data on a 2-thread CPU of this project's "
             "workplace (the issue does not name its model), reached 94.14% with test-time "
             "augmentation after its 9.9 epochs in 37 minutes."),
        *table(tables, ["check", "experiment", "changed settings", "final %", "end-of-run test %",
                        "training PFLOP / run", "wall time / run", "runs"], rows,
               "Checks of the two new experiments: what each changed and what it measured (mean ± std "
               "over a folder's seeds).", widths=[2.9, 1.4, 2.1, 1.1, 1.5, 1.1, 1.1, 2.9]),
    ]


def ablation_section(headline, figures, runs, tables):
    story = [para("6. Ablations", "h1")]
    by_name = {row.experiment: row for row in headline}
    groups = dict.fromkeys(e.group for e in EXPERIMENTS.values() if e.group not in ("architectures", "beyond"))
    for number, group in enumerate(groups, 1):
        rows = [by_name[name] for name in group_members(group)]
        story.append(para(f"6.{number} {escape(group.replace('_', ' '))}", "h2"))
        story += table(tables, ["experiment", "setting", "ours, best %", "ours, final %", "our runs",
                        "original study, best %"],
                       [[row.experiment, EXPERIMENTS[row.experiment].leaf, *ours(row),
                         published_text(EXPERIMENTS[row.experiment])] for row in rows],
                       f"The {escape(group.replace('_', ' '))} sweep: each experiment's setting, our "
                       "full-budget result and the original study's.",
                       widths=[3.9, 1.5, 1.8, 1.8, 6, 2])
        if not any(row.runs for row in rows):
            story.append(para("Not run yet: no experiment of this sweep has a full-budget run."))
        if group in SWEEP_FIGURES:
            story += figure_block(SWEEP_FIGURES[group], figures, runs, headline)
    return story


SPEED_RATIOS = ("ours/limit", "ours/seed-style")
SPEED_COLUMNS = ["experiment", "batch", "device", "data", *MODES, "ours / limit", "ours / seed-style"]
SPEED_WIDTHS = [109, 32, 56, 48, 36, 36, 38, 32, 38]


def speed_section(records, tables):
    """Each configuration `bench` recorded at its experiment's own settings (`records`: the
    bench records by name), GPUs first."""
    measured = sorted((r for r in records.values() if not r.get("settings")),
                      key=lambda r: (r["device_type"] == "cpu", r["device"], r["experiment"]))
    story = [
        para("7. Speed", "h1"),
        para(f"Training images per second, measured by {code('python -m common bench')}: one process feeds "
             "one model, batch size and device three ways, timed in turns, each figure the median of its "
             "rounds. <i>limit</i> steps on random tensors already on the device (the model's own cost), "
             "<i>ours</i> is this project's training loop on real images with its on-device augmentation, "
             "and <i>seed-style</i> the original study's per-image PIL transforms in a DataLoader with 2 "
             "workers. ours/limit says how much of the model's own speed the loop keeps, ours/seed-style "
             "what it gains over the original's input pipeline. Taken within one process, the ratios compare "
             "across machines; the speeds themselves vary with the machine and, on a shared one, with the "
             "hour. Rows are configurations at their experiment's own settings; those measured with a "
             "setting changed (memory layout, micro-batches, bf16, torch.compile) are in "
             f"{code('results/bench.md')}, each with its command and code."),
    ]
    if not measured:
        return story + [para(f"Not measured yet: {code('python -m common bench --record')} keeps a record.")]
    if any(CPU_BY_MODEL_ALONE.search(r["device"]) for r in measured):
        story.append(para("A CPU named by its model alone was recorded before names carried its vector and "
                          "bf16 instructions (section 8)."))
    rows = [[r["experiment"], r["batch_size"], short_device_name(r["device"]), r["data_variant"],
             *(f"{r['images_per_second'][m]:,.0f}" if m in r["images_per_second"] else "-" for m in MODES),
             *(f"{r['ratios'][k]:.2f}" if k in r["ratios"] else "-" for k in SPEED_RATIOS)]
            for r in measured]
    return story + table(tables, SPEED_COLUMNS, rows, "Training images per second of each experiment at its "
                         "own settings, fed three ways, by device; and the two ratios.", widths=SPEED_WIDTHS)


# A CPU as named before device names carried its instructions: 'CPU: AMD EPYC, 2 threads'.
CPU_BY_MODEL_ALONE = re.compile(r"CPU: [^(+]+, \d+ threads")


def limitations_section(headline, smoke):
    measured = [row for row in headline if row.runs]
    items = ["Runs without --val evaluate on the test set after every epoch, as the original study did: "
             "\"best\" is the highest test accuracy of any epoch and so flatters a run; the last epoch's "
             "accuracy (or the end-of-run evaluation) is the figure to quote. Choosing a recipe by its test "
             "figures is model selection on the test set; --val N holds out training images for that."]
    if not measured:
        items.append("Nothing has been run at full budget yet, so the report makes no claim about accuracy.")
    single = [row.experiment for row in measured if len(row.runs) == 1]
    if single:
        items.append(f"{escape(', '.join(single))} {'is' if len(single) == 1 else 'are'} single-seed: a "
                     f"difference smaller than the seed-to-seed spread (unmeasured for these models: the "
                     f"multi-seed results are of other models and recipes) is not evidence.")
    changed = [f"{row.experiment} ({changes})" for row in measured if (changes := settings_changed(row))]
    if changed:
        items.append("Some results ran with settings changed from their experiment's registry entry, "
                     f"as their run.json records: {escape('; '.join(changed))}.")
    jpeg = [row.experiment for row in measured if "jpeg75" in row.data]
    if jpeg:
        items.append(f"{escape(', '.join(jpeg))} ran on the lossy JPEG-75 copy: those numbers understate "
                     "what the same recipe reaches on the official images.")
    if smoke:
        items.append(f"Smoke runs of {len(smoke)} experiment(s) are listed apart (reduced budgets, or runs "
                     "not finished): they are not results.")
    unnamed = [row.experiment for row in measured if CPU_BY_MODEL_ALONE.search(row.device)]
    if unnamed:
        items.append(f"{escape(', '.join(unnamed))} name a CPU by its model alone, as recorded before "
                     "2026-12-06 21:55 UTC (later records add its vector and bf16 instructions): \"AMD "
                     "EPYC\" there stands for at least two CPUs of different speed (the README gives "
                     "res_512_d's figures), so their wall times compare only within one part of one run.")
    items += ["On CUDA, cuDNN autotuning makes runs close but not bit-identical; runs with the same seed "
              "on one CPU are identical.",
              "Wall times depend on the device named beside them; the original study's were measured on "
              "another GPU, so they are not compared. A run stopped and resumed shows the sum of its "
              "parts (\"in N parts\"), each timed on whatever else its machine ran then: "
              "not the time it needs alone."]
    return [para("8. Limitations", "h1"), *bullets(items)]


def train_commands(names):
    if names == list(EXPERIMENTS):  # `list` prints a header line, then one experiment per line
        return ("for name in $(python -m common list | tail -n +2 | cut -d' ' -f1); do "
                "python -m common train $name; done")
    return "\n".join(f"python -m common train {name}" for name in names)


# Figures whose runs need more than `train NAME`: the commands that made them (the CPU check's as run here).
FIGURE_COMMANDS = {
    "beyond.png": "python -m common train fast94 --seeds 3\npython -m common train best_5m --seeds 3",
    "fast94_vs_res_512_d.png": "python -m common train fast94 --device cpu --set micro_batch=512 "
                               "--out results/checks/cpu-fast94-mb512\n"
                               "python -m common train res_512_d --epochs 10 --device cpu "
                               "--out results/checks/cpu-res_512_d-10-epochs",
}


def reproduce_section(tables):
    rows = [["the results and comparison tables, results/summary.csv, results/summary.md",
             f"{train_commands(list(EXPERIMENTS))}\npython -m common report"]]
    rows += [[f"Figure {figure_number(name)}: {name}",
              f"{FIGURE_COMMANDS.get(name) or train_commands(names)}\npython -m common report"]
             for name, (_, names) in FIGURES.items()]
    rows.append(["the speed table (section 7) and results/bench.md",
                 "python -m common bench --experiment NAME --device DEVICE --record\npython -m common report"])
    return [
        para("9. How to reproduce", "h1"),
        para(f"Each figure and table is rebuilt by {code('python -m common report')} from the run folders "
             f"that exist; a run is made by {code('python -m common train NAME')}. A multi-seed group is one "
             f"folder per seed, {code('training/NAME/seedS')}: {code('python -m common train NAME --seeds K')} "
             f"trains seeds 0 to K-1 into them ({code('--seed S --seeds 1')} adds seed S to a group). "
             f"{code('python -m common study --seed-study --parallel K')} trains the original study's "
             f"experiments K at a time on a device, resuming unfinished runs and skipping complete ones; "
             f"on a GPU it first times eager, torch.compile and CUDA graphs for each model and runs it the "
             f"way that finishes soonest."),
        *table(tables, ["artefact", "commands"], rows, "The commands behind each artefact.",
               widths=[1.2, 4], code_columns=(1,)),
    ]


def footer(canvas, doc):
    canvas.saveState()
    canvas.setFont("Helvetica", 8)
    canvas.drawCentredString(A4[0] / 2, 1.2 * cm, f"{doc.page}")
    canvas.restoreState()


def write_pdf(path, headline, smoke, figures, runs, equal_epochs=(), checks=(), speeds=None):
    """The report, typeset and replaced atomically; `invariant` fixes the creation date and file
    id, so the same runs give the same bytes."""
    tables = itertools.count(1)
    story = [*title_page(headline), *question_section(), *methods_section(tables),
             *results_section(headline, smoke, figures, runs, tables),
             *comparison_section(headline, tables),
             *beyond_section(headline, figures, runs, equal_epochs, checks, tables),
             *ablation_section(headline, figures, runs, tables), *speed_section(speeds or {}, tables),
             *limitations_section(headline, smoke), *reproduce_section(tables)]

    def typeset(file):
        doc = SimpleDocTemplate(file, pagesize=A4, leftMargin=2 * cm, rightMargin=2 * cm,
                                topMargin=2 * cm, bottomMargin=2 * cm, invariant=1,
                                title="Small ResNets on CIFAR-10 under five million parameters",
                                author="python -m common report", creator="python -m common report")
        doc.build(story, onFirstPage=footer, onLaterPages=footer)
    replace_atomically(path, typeset)
    return Path(path)


def build_report(training_dir=TRAINING_DIR, top_dir=REPO_ROOT, results_dir=RESULTS_DIR, readme=README):
    """Rebuild every result artefact from the run folders under `training_dir`: the charts and the
    README's results block (make_charts), the accuracy-against-parameters chart,
    results/summary.csv and summary.md, and `Project Report.pdf` in `top_dir`. Returns the paths."""
    top_dir, results_dir = Path(top_dir), Path(results_dir)
    groups = collect_groups(training_dir)
    runs = representative_runs(groups)
    headline, smoke = summary_rows_by_budget(groups)
    paths = make_charts(training_dir, top_dir, results_dir, readme, groups=groups)
    drawn = [row for row in headline + smoke if row.runs and not row.same_run_as]  # a twin's: a second point
    paths.append(accuracy_vs_params_chart(drawn, results_dir / "accuracy_vs_params.png"))
    for name, text in [("summary.csv", summary_csv(headline + smoke)),
                       ("summary.md", summary_markdown(headline, smoke))]:
        write_atomic(results_dir / name, text)
        paths.append(results_dir / name)
    figures = {path.name: path for path in paths}
    checks = collect_checks(results_dir / "checks")
    paths.append(write_pdf(top_dir / REPORT_FILE, headline, smoke, figures, runs,
                           equal_epochs_runs(training_dir, checks), checks, load_records(results_dir / "bench")))
    return paths
