import csv
import os
import pickle

import numpy as np
import pytest
import torch

from common.config import CIFAR10_MEAN, CIFAR10_STD_SEED, UserError
from common.data import load_cifar10
from common.models import build_model
from common.predict import predict, read_pickled_images
from common.training import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fake_data):
    """A tiny res_block run (trained with a softmax output, so predict must undo it)."""
    folder = tmp_path_factory.mktemp("run")
    run = train("res_block", out_dir=folder, epochs=1, data_dir=str(fake_data), download=False,
                device="cpu", batch_size=64)
    return run


@pytest.fixture(scope="module")
def test_images(fake_data):
    data = load_cifar10(fake_data, allow_download=False)
    return data.test_images.numpy(), data.test_labels.numpy()


def write_pickle(path, content, protocol=4):
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=protocol)
    return path


def read_csv(path):
    with open(path) as f:
        return list(csv.reader(f))


def test_labelled_batch_gives_the_runs_own_test_accuracy(trained, fake_data, tmp_path):
    result = predict([trained.folder], fake_data / "cifar-10-batches-py" / "test_batch",
                     out=tmp_path / "p.csv", device="cpu")
    assert result.accuracy == trained.history["test_acc"][-1]
    rows = read_csv(tmp_path / "p.csv")
    assert rows[0] == ["ID", "Labels"] and [r[0] for r in rows[1:]] == [str(i) for i in range(50)]


def test_planar_rows_and_height_width_channel_arrays_give_identical_predictions(trained, test_images, tmp_path):
    images, _ = test_images
    planar = write_pickle(tmp_path / "planar.pkl", {b"data": images.reshape(len(images), 3072)})
    hwc = write_pickle(tmp_path / "hwc.pkl", {b"data": images.transpose(0, 2, 3, 1).copy()})
    a = predict([trained.folder], planar, device="cpu").probabilities
    b = predict([trained.folder], hwc, device="cpu").probabilities
    assert torch.equal(a, b)


def test_known_orientation_image_is_read_the_right_way_round(tmp_path):
    hwc = np.zeros((1, 32, 32, 3), np.uint8)
    hwc[0, :16, :, 0] = 255  # red top half
    hwc[0, :, :16, 1] = 200  # green left half
    planar = hwc.transpose(0, 3, 1, 2).reshape(1, 3072)  # the official R, G, B planes
    for data in (hwc, planar):
        image = read_pickled_images(write_pickle(tmp_path / "x.pkl", {b"data": data})).images[0]
        assert image[0, :16].min() == 255 and image[0, 16:].max() == 0
        assert image[1, :, :16].min() == 200 and image[1, :, 16:].max() == 0
        assert image[2].max() == 0


def test_ids_keep_their_order(trained, test_images, tmp_path):
    images, _ = test_images
    ids = [int(i) for i in np.random.default_rng(0).permutation(10_000)[:len(images)]]
    path = write_pickle(tmp_path / "x.pkl", {b"data": images.reshape(-1, 3072), b"ids": np.array(ids)})
    predict([trained.folder], path, out=tmp_path / "p.csv", device="cpu")
    assert [int(r[0]) for r in read_csv(tmp_path / "p.csv")[1:]] == ids


def logits_by_hand(folder, images, flips_and_shifts=False):
    """The run's logits for uint8 `images`, computed apart from predict: res_block rebuilt without
    its softmax and model.pt loaded; with `flips_and_shifts`, the weighted mean over the image and
    its mirror (1/2 for the pair) and both pairs shifted by one pixel, reflect-padded (1/4 each)."""
    model = build_model("res_block", softmax_output=False).eval()
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (CIFAR10_MEAN, CIFAR10_STD_SEED))
    x = (torch.from_numpy(images).float() / 255 - mean) / std
    with torch.no_grad():
        if not flips_and_shifts:
            return model(x)
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        pairs = [(1 / 2, x), (1 / 4, padded[..., :32, :32]), (1 / 4, padded[..., 2:, 2:])]
        return sum(w * (model(v) + model(v.flip(-1))) / 2 for w, v in pairs)


def test_ensemble_of_one_is_that_run_and_probabilities_are_written(trained, test_images, tmp_path):
    images, _ = test_images
    path = write_pickle(tmp_path / "x.pkl", {b"data": images.reshape(-1, 3072)})
    one = predict([trained.folder], path, probs=tmp_path / "probs.csv", device="cpu")
    two = predict([trained.folder, trained.folder], path, device="cpu")
    # res_block trained with a softmax output: predict must take it off before its own softmax.
    expected = logits_by_hand(trained.folder, images).softmax(1)
    assert torch.allclose(one.probabilities, expected, atol=1e-5)
    assert torch.equal(one.labels, expected.argmax(1)) and torch.allclose(one.probabilities, two.probabilities)
    rows = read_csv(tmp_path / "probs.csv")
    assert rows[0][:3] == ["ID", "airplane", "automobile"] and len(rows[1]) == 11
    assert abs(sum(float(v) for v in rows[1][1:]) - 1) < 1e-4
    assert [float(v) for v in rows[1][1:]] == pytest.approx(expected[0].tolist(), abs=1e-5)


def test_an_ensemble_averages_its_runs_softmax_outputs(trained, fake_data, tmp_path):
    other = train("res_block", out_dir=tmp_path / "other", epochs=1, seed=1, data_dir=str(fake_data),
                  download=False, device="cpu", batch_size=64)
    batch = fake_data / "cifar-10-batches-py" / "test_batch"
    a, b = (predict([run.folder], batch, device="cpu").probabilities for run in (trained, other))
    assert not torch.allclose(a, b)  # two different models, so the average tells how they are combined
    both = predict([trained.folder, other.folder], batch, device="cpu").probabilities
    assert torch.allclose(both, (a + b) / 2, atol=1e-6)


def test_tta_averages_the_logits_of_flipped_and_shifted_views(trained, test_images, fake_data):
    images, _ = test_images
    batch = fake_data / "cifar-10-batches-py" / "test_batch"
    tta = predict([trained.folder], batch, tta=True, device="cpu")
    expected = logits_by_hand(trained.folder, images, flips_and_shifts=True).softmax(1)
    assert torch.allclose(tta.probabilities, expected, atol=1e-5)
    assert not torch.allclose(tta.probabilities, logits_by_hand(trained.folder, images).softmax(1), atol=1e-5)


def test_image_folder_matches_the_pickle(trained, test_images, tmp_path, capsys):
    from PIL import Image
    images, _ = test_images
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images[:12]):
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i}.png")
    Image.fromarray(images[0].transpose(1, 2, 0)).resize((64, 64)).save(folder / "12.png")
    from_folder = predict([trained.folder], folder, device="cpu")
    from_pickle = predict([trained.folder], write_pickle(tmp_path / "x.pkl", {b"data": images[:12]
                                                                             .reshape(-1, 3072)}), device="cpu")
    assert from_folder.ids == list(range(13))
    assert torch.equal(from_folder.images[:12], from_pickle.images)
    assert torch.equal(from_folder.labels[:12], from_pickle.labels)
    assert "1 of 13 images were not 32x32" in capsys.readouterr().out


class Payload:
    def __reduce__(self):
        return os.system, ("echo pwned > /dev/null",)


@pytest.mark.parametrize("content, message", [
    ({b"data": np.zeros((3, 32, 3, 32), np.uint8)}, "must be uint8 images"),
    ({b"data": np.zeros((3, 3072), np.float64)}, "must be uint8 images"),
    ({b"ids": [1, 2]}, "expected a dict with b'data'"),
    ({b"data": np.zeros((3, 3072), np.uint8), b"ids": [1, 2]}, "3 images but 2 ids"),
    ({b"data": Payload()}, "refused to load posix.system|refused to load os.system"),
    ({b"data": np.zeros((0, 3072), np.uint8)}, "holds no images"),
])
def test_malformed_pickles_are_refused_in_one_line(trained, tmp_path, content, message):
    path = write_pickle(tmp_path / "bad.pkl", content)
    with pytest.raises(UserError, match=message) as caught:
        predict([trained.folder], path, device="cpu")
    assert "\n" not in str(caught.value)


def test_tampered_weights_are_refused(trained, tmp_path, fake_data):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained.folder, run)
    (run / "model.pt").write_bytes((run / "model.pt").read_bytes()[:1000])
    with pytest.raises(UserError, match="model.pt: not loadable weights of res_block"):
        predict([run], fake_data / "cifar-10-batches-py" / "test_batch", device="cpu")
    (run / "model.pt").write_bytes(b"garbage")  # the reason, not torch's advice to file an issue
    with pytest.raises(UserError, match=r"model.pt: not loadable weights of res_block \(Unsupported operand 103\)$"):
        predict([run], fake_data / "cifar-10-batches-py" / "test_batch", device="cpu")
    torch.save({"x": Payload()}, run / "model.pt")
    with pytest.raises(UserError, match=r"(?i)model.pt: not loadable weights of res_block \(.*unsupported global"):
        predict([run], fake_data / "cifar-10-batches-py" / "test_batch", device="cpu")
    (run / "model.pt").unlink()
    with pytest.raises(UserError, match="no model.pt"):
        predict([run], fake_data / "cifar-10-batches-py" / "test_batch", device="cpu")


def test_a_multi_seed_groups_folder_is_refused_naming_its_seed_runs(trained, tmp_path, fake_data):
    import shutil
    for seed in (0, 1):
        shutil.copytree(trained.folder, tmp_path / "fast94" / f"seed{seed}")
    with pytest.raises(UserError, match=rf"holds a multi-seed group, not a run: pass its seed folders for their "
                                        rf"ensemble \({tmp_path}/fast94/seed0 {tmp_path}/fast94/seed1\)"):
        predict([tmp_path / "fast94"], fake_data / "cifar-10-batches-py" / "test_batch", device="cpu")


def test_predict_command(trained, fake_data, tmp_path):
    from test_cli import cli
    result = cli("predict", trained.folder, "--images", fake_data / "cifar-10-batches-py" / "test_batch",
                 "--out", tmp_path / "p.csv", "--device", "cpu", "--tta")
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout and "airplane" in result.stdout
    assert len(read_csv(tmp_path / "p.csv")) == 51
    bad = cli("predict", tmp_path, "--images", tmp_path / "nothing.pkl", "--out", tmp_path / "q.csv")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
