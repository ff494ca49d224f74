"""Run by tests/test_distributed.py under torchrun: trains a tiny run and records, per rank, the
training indices each step used, a checksum of the weights after each step, and how many times the
ranks agreed on whether to stop."""
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
seen, checksums, stop_checks = [], [], []
shard, any_rank = distributed.Cluster.shard, distributed.Cluster.any


def recording_shard(self, index):
    part = shard(self, index)
    seen.append(part.tolist())
    return part


def counting_any(self, flag):
    stop_checks.append(flag)
    return any_rank(self, flag)


distributed.Cluster.shard, distributed.Cluster.any = recording_shard, counting_any
run = training.start_run(experiment, config, out, torch.device("cpu"), cluster, overwrite=False, resume=False)
step = run.optimizer.step


def recording_step(*args, **kwargs):
    result = step(*args, **kwargs)
    checksums.append(sum(p.double().sum().item() for p in run.model.parameters()))
    return result


run.optimizer.step = recording_step
training.run_epochs(run)
(out / f"rank{cluster.rank}.json").write_text(json.dumps({"seen": seen, "checksums": checksums,
                                                         "stop_checks": len(stop_checks)}))
cluster.close()
