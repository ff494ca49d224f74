"""Run by tests/test_distributed.py under torchrun: trains a tiny run and records, per rank, the
training indices each step used and a checksum of the weights after each step."""
import json
import sys
from pathlib import Path

import torch

from common import distributed, training
from common.experiments import get_experiment

data_dir, out = sys.argv[1], Path(sys.argv[2])
experiment = get_experiment("res_512")
config = experiment.config.replace(epochs=2, batch_size=32, data_dir=data_dir, download=False, device="cpu")
cluster = distributed.Cluster.from_environment("cpu")
seen, checksums = [], []
shard = distributed.Cluster.shard


def recording_shard(self, index):
    part = shard(self, index)
    seen.append(part.tolist())
    return part


distributed.Cluster.shard = recording_shard
run = training.start_run(experiment, config, out, torch.device("cpu"), cluster, overwrite=False, resume=False)
step = run.optimizer.step


def recording_step(*args, **kwargs):
    result = step(*args, **kwargs)
    checksums.append(sum(p.double().sum().item() for p in run.model.parameters()))
    return result


run.optimizer.step = recording_step
training.run_epochs(run)
(out / f"rank{cluster.rank}.json").write_text(json.dumps({"seen": seen, "checksums": checksums}))
cluster.close()
