"""Data-parallel training through torchrun, on CPU with the gloo backend (2 processes)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from common.distributed import STOP_CHECK_STEPS, Cluster
from common.history import HISTORY_FILES
from conftest import REPO


def test_ranks_take_disjoint_shards_that_cover_the_batch():
    batch = torch.randperm(77)
    shards = [Cluster(rank, rank, 3).shard(batch) for rank in range(3)]
    assert torch.equal(torch.cat(shards), batch)
    assert torch.equal(Cluster().shard(batch), batch)


def test_a_last_batch_smaller_than_the_number_of_processes_is_refused_before_training(tmp_path, tiny):
    from common import training
    from common.config import UserError
    from common.experiments import EXPERIMENTS
    config = EXPERIMENTS["res_512"].config.replace(**{**tiny, "batch_size": 199})  # 200 images: 199 + 1
    with pytest.raises(UserError, match="last batch holds 1 image\\(s\\), fewer than the 2 processes"):
        training.start_run(EXPERIMENTS["res_512"], config, tmp_path, torch.device("cpu"), Cluster(0, 0, 2),
                           overwrite=False, resume=False)


def test_torchrun_trains_data_parallel_and_only_rank_0_writes(tmp_path, fake_data):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "common", "train", "res_512", "--epochs", "2", "--data-dir", str(fake_data), "--out",
         str(out), "--device", "cpu", "--no-download", "--batch-size", "32"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("final test accuracy") == 1  # one summary: rank 0's
    info = json.loads((out / "run.json").read_text())
    assert info["world_size"] == 2 and info["status"] == "complete" and info["epochs_done"] == 2
    assert info["data"]["train_images"] == 200
    for key, name in HISTORY_FILES.items():
        values = [float(v) for v in (out / name).read_text().split()]
        assert len(values) == 2
        if key == "train_acc":  # counted per image over both ranks' shards: k / 200
            assert all(abs(v * 200 - round(v * 200)) < 1e-9 for v in values)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*HISTORY_FILES.values(), "run.json", "checkpoint.pt", "model.pt"])


def run_worker(out, fake_data, processes):
    launcher = (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
                if processes > 1 else [])
    result = subprocess.run(
        [sys.executable, *launcher, str(REPO / "tests" / "ddp_worker.py"), str(fake_data), str(out)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def test_each_image_once_per_epoch_identical_weights_and_metrics_near_one_process(tmp_path, fake_data):
    ranks = run_worker(tmp_path / "two", fake_data, 2)
    steps = 7  # 200 images in global batches of 32
    for epoch in range(2):
        used = [i for rank in ranks for part in rank["seen"][epoch * steps:(epoch + 1) * steps] for i in part]
        assert sorted(used) == list(range(200))
    assert ranks[0]["checksums"] == ranks[1]["checksums"] and len(ranks[0]["checksums"]) == 14
    # Ranks agree on stopping at the first step of each STOP_CHECK_STEPS and at the end of an epoch,
    # not at every step (on GPUs each agreement waits for the device).
    assert ranks[0]["stop_checks"] == ranks[1]["stop_checks"] == 2 * (math.ceil(steps / STOP_CHECK_STEPS) + 1)

    # BatchNorm statistics are per rank, so not bit-equal; the training loss of each epoch (the
    # mean over all 200 images) stays close. Accuracies of 2 epochs on 200 images are too noisy.
    run_worker(tmp_path / "one", fake_data, 1)
    two, one = ([float(v) for v in (tmp_path / d / "train_loss_history.txt").read_text().split()]
                for d in ("two", "one"))
    assert len(two) == len(one) == 2 and all(abs(a - b) < 0.2 * b for a, b in zip(two, one)), (two, one)
