"""Every experiment's notebook, executed headless with tiny parameters, as a user would with papermill."""
import hashlib
import json

import pytest

from common.experiments import EXPERIMENTS, TRAINING_DIR
from common.history import LOCK_FILE, lock_holder
from common.models import count_parameters, model_from_config
from common.notebooks import notebook_path
from conftest import REPO

papermill = pytest.importorskip("papermill")


def tree_digest(folder, skipped=frozenset()):
    """sha256 of every file under `folder` but for those under the `skipped` folders (relative)."""
    return {path: hashlib.sha256((folder / path).read_bytes()).hexdigest()
            for path in sorted(p.relative_to(folder) for p in folder.rglob("*"))
            if not inside(path, skipped) and (folder / path).is_file()}


def inside(path, folders):
    return bool(folders & {*path.parents})


def live_run_folders(folder):
    """The folders another process is training into now (a run.lock a live run holds)."""
    return {lock.parent.relative_to(folder) for lock in folder.rglob(LOCK_FILE)
            if lock_holder(lock) is not None}


@pytest.fixture(scope="module")
def committed_training_tree():
    """Fails if the notebook runs change any file under training/, but for the folders of runs
    going on beside the tests (a developer's background run writes there)."""
    live = live_run_folders(TRAINING_DIR)
    before = tree_digest(TRAINING_DIR, live)
    yield
    live |= live_run_folders(TRAINING_DIR)
    before = {path: sha for path, sha in before.items() if not inside(path, live)}
    assert tree_digest(TRAINING_DIR, live) == before, "a notebook run changed files under training/"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_notebook_runs_headless(name, tmp_path, fake_data, committed_training_tree, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the kernel imports common even without `pip install -e .`
    path = notebook_path(EXPERIMENTS[name])
    executed = tmp_path / "executed.ipynb"
    papermill.execute_notebook(
        str(path), str(executed), cwd=str(path.parent), kernel_name="python3", progress_bar=False,
        parameters={"epochs": 1, "batch_size": 64, "subset": None, "data_dir": str(fake_data),
                    "out_dir": str(tmp_path / "run"), "device": "cpu", "seed": 1})
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["experiment"] == name and info["status"] == "complete"
    assert len((tmp_path / "run" / "test_acc_history.txt").read_text().splitlines()) == 1
    outputs = json.loads(executed.read_text())["cells"]
    text = json.dumps([c.get("outputs", []) for c in outputs])
    trainable = count_parameters(model_from_config(EXPERIMENTS[name].config))
    assert f"Trainable params: {trainable:,}" in text  # the torchinfo summary
    assert "image/png" in text  # the curves


def test_predict_notebook_runs_headless(tmp_path, fake_data, committed_training_tree, monkeypatch):
    from common.notebooks import PREDICT_NOTEBOOK
    from common.training import train
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    run = train("res_512", out_dir=tmp_path / "run", epochs=1, data_dir=str(fake_data),
                download=False, device="cpu", batch_size=64)
    executed = tmp_path / "executed.ipynb"
    papermill.execute_notebook(
        str(PREDICT_NOTEBOOK), str(executed), cwd=str(PREDICT_NOTEBOOK.parent), kernel_name="python3",
        progress_bar=False,
        parameters={"run_dirs": [str(run.folder)], "out": str(tmp_path / "p.csv"), "device": "cpu",
                    "images": str(fake_data / "cifar-10-batches-py" / "test_batch")})
    assert (tmp_path / "p.csv").read_text().startswith("ID,Labels\n0,")
    text = json.dumps([c.get("outputs", []) for c in json.loads(executed.read_text())["cells"]])
    assert "accuracy" in text and "image/png" in text
