"""The notebooks, written from the registry so all of them stay thin and alike.

`python -m common notebooks` rewrites training/<experiment>/<leaf>.ipynb for every experiment and
training/predict/predict.ipynb; `--check` only reports the notebooks that differ from what this
module writes (the tests run it).
"""
import json

from .experiments import EXPERIMENTS, TRAINING_DIR
from .history import write_atomic

PARAMETERS = '''\
epochs = None  # None: the experiment's own ({epochs})
batch_size = None  # None: the experiment's own ({batch_size})
data_dir = None  # None: <repository>/data, downloaded there if missing
out_dir = None  # None: this notebook's folder
device = "auto"  # auto, cpu, cuda, cuda:N
subset = None  # N stratified training images: a smoke run, kept out of results
seed = 0
resume = False  # True: continue the interrupted run in out_dir from its checkpoint
overwrite = False  # True: start afresh over an unfinished run, or replace a full one with other settings
settings = {{}}  # any other Config field, e.g. {{"lr": 0.05, "micro_batch": 256}}'''

TRAIN = '''\
import common

run = common.train("{name}", epochs=epochs, batch_size=batch_size, data_dir=data_dir,
                   out_dir=out_dir, device=device, subset=subset, seed=seed, resume=resume,
                   overwrite=overwrite, **settings)'''

SUMMARY = '''\
print(run.summary())
common.model_summary(run.config)'''

PLOT = '''\
common.plot_run(run.folder);'''

PREDICT_INTRO = """# predict

Classify an image set with trained runs and write a submission CSV (`ID,Labels`, one row per id,
in the input's order). `images` may be a CIFAR-style pickle (`b'data'` as rows of 3072 in R/G/B
planes or as N x 32 x 32 x 3, optional `b'ids'`), a `cifar-10-batches-py` batch file (then the
accuracy is printed too) or a folder of PNG/JPEG images. Several run folders average their softmax
outputs (a seed ensemble); `tta` averages flipped and shifted views.

The same without Jupyter: `python -m common predict ../res_512_d --images IMAGES --out predictions.csv`."""

PREDICT_PARAMETERS = '''\
run_dirs = ["../res_512_d"]  # run folders holding run.json and model.pt
images = "../../data/cifar-10-batches-py/test_batch"
out = "predictions.csv"
probs = None  # a second CSV of class probabilities
tta = False
device = "auto"'''

PREDICT = '''\
import common

result = common.predict(run_dirs, images, out=out, probs=probs, tta=tta, device=device)
print(result.summary())'''

PREDICT_GRID = '''\
common.show_predictions(result, count=16);'''


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


def cell(kind, source, cell_id, tags=()):
    c = {"cell_type": kind, "id": cell_id, "metadata": {}, "source": source.splitlines(keepends=True)}
    if tags:
        c["metadata"]["tags"] = list(tags)
    if kind == "code":
        c.update(execution_count=None, outputs=[])
    return c


def notebook(name, intro_text, parameters, *code):
    """A markdown introduction, a `parameters` cell (papermill overrides it) and code cells."""
    slug = name.replace("/", "-")
    cells = [cell("markdown", intro_text, f"{slug}-0"), cell("code", parameters, f"{slug}-1", ("parameters",))]
    cells += [cell("code", source, f"{slug}-{i}") for i, source in enumerate(code, start=2)]
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def notebook_path(exp):
    return exp.folder / f"{exp.leaf}.ipynb"


PREDICT_NOTEBOOK = TRAINING_DIR / "predict" / "predict.ipynb"


def all_notebooks():
    """(path, notebook) for every notebook this module writes."""
    for exp in EXPERIMENTS.values():
        parameters = PARAMETERS.format(epochs=exp.config.epochs, batch_size=exp.config.batch_size)
        yield notebook_path(exp), notebook(exp.name, intro(exp), parameters, TRAIN.format(name=exp.name),
                                           SUMMARY, PLOT)
    yield PREDICT_NOTEBOOK, notebook("predict", PREDICT_INTRO, PREDICT_PARAMETERS, PREDICT, PREDICT_GRID)


def write_notebooks(check=False):
    """Write (or with check=True, only list) the notebooks that differ from what this module writes."""
    stale = []
    for path, content in all_notebooks():
        text = json.dumps(content, indent=1) + "\n"
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(path)
        if not check:
            write_atomic(path, text)
    return stale
