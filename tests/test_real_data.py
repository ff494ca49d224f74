"""The one real-data check: res_512_d, seed recipe, one epoch on all 50,000 training images, CPU.

Runs only where CIFAR10_DATA_DIR names a full CIFAR-10 folder (.ci/run builds one when the offline
copy is present); about 3 minutes on 2 cores. The original study reached 48% after its first epoch.
"""
import os

import pytest

from common.training import train

DATA_DIR = os.environ.get("CIFAR10_DATA_DIR")


@pytest.mark.skipif(not DATA_DIR, reason="set CIFAR10_DATA_DIR to a full CIFAR-10 folder")
def test_res_512_d_one_epoch_on_real_data_reaches_35_percent(tmp_path):
    run = train("res_512_d", out_dir=tmp_path, epochs=1, data_dir=DATA_DIR, download=False, device="cpu")
    assert run.info["data"]["train_images"] == 50_000 and run.info["data"]["test_images"] == 10_000
    # the official pixels and labels, recognised by their digest (common.data.OFFICIAL_DIGEST)
    assert run.info["data"]["variant"] in ("official", "exact-offline")
    print(run.summary(), f"{run.info['train_images_per_second'][0]:.0f} training images/s")
    assert run.history["test_acc"][0] >= 0.35
