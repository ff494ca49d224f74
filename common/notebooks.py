"""The experiments' notebooks, written from the registry so all fourteen stay thin and alike.

`python -m common notebooks` rewrites training/<experiment>/<leaf>.ipynb; `--check` only reports
the notebooks that differ from what the registry says (the tests run it).
"""
import json

from .experiments import EXPERIMENTS

PARAMETERS = '''\
epochs = None  # None: the experiment's own ({epochs})
batch_size = 128
data_dir = None  # None: <repository>/data, downloaded there if missing
out_dir = None  # None: this notebook's folder
device = "auto"  # auto, cpu, cuda, cuda:N
subset = None  # N stratified training images: a smoke run, kept out of results
seed = 0'''

TRAIN = '''\
import common

run = common.train("{name}", epochs=epochs, batch_size=batch_size, data_dir=data_dir,
                   out_dir=out_dir, device=device, subset=subset, seed=seed)'''

SUMMARY = '''\
print(run.summary())
common.model_summary(run.config)'''

PLOT = '''\
common.plot_run(run.folder);'''


def intro(exp):
    published = ""
    if exp.published:
        parts = ["best epoch", "last epoch"][:len(exp.published)]
        published = ("\n\nThe original study reported " + ", ".join(
            f"{v:.2f}% ({p})" for v, p in zip(exp.published, parts)) + " test accuracy.")
    return (f"# {exp.name}\n\n{exp.description}{published}\n\n"
            f"Training writes `train_loss_history.txt`, `train_acc_history.txt`, "
            f"`test_loss_history.txt`, `test_acc_history.txt` and `run.json` next to this notebook "
            f"(or into `out_dir`) after every epoch.\n\n"
            f"The same run without Jupyter: `python -m common train {exp.name}`. "
            f"Headless, with other parameters: "
            f"`papermill {exp.leaf}.ipynb /tmp/{exp.leaf}-out.ipynb -p epochs 1 -p subset 1000`.")


def cell(kind, source, index, name, tags=()):
    c = {"cell_type": kind, "id": f"{name.replace('/', '-')}-{index}", "metadata": {},
         "source": source.splitlines(keepends=True)}
    if tags:
        c["metadata"]["tags"] = list(tags)
    if kind == "code":
        c.update(execution_count=None, outputs=[])
    return c


def notebook(exp):
    sources = [
        ("markdown", intro(exp), ()),
        ("code", PARAMETERS.format(epochs=exp.config.epochs), ("parameters",)),
        ("code", TRAIN.format(name=exp.name), ()),
        ("code", SUMMARY, ()),
        ("code", PLOT, ()),
    ]
    return {
        "cells": [cell(kind, source, i, exp.name, tags) for i, (kind, source, tags) in enumerate(sources)],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def notebook_path(exp):
    return exp.folder / f"{exp.leaf}.ipynb"


def notebook_text(exp):
    return json.dumps(notebook(exp), indent=1) + "\n"


def write_notebooks(check=False):
    """Write (or with check=True, only list) the notebooks that differ from the registry's."""
    stale = []
    for exp in EXPERIMENTS.values():
        path, text = notebook_path(exp), notebook_text(exp)
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(path)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return stale
