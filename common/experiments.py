"""The registry of named experiments: each one is a Config, a folder and what it is for.

A name is also the experiment's folder under training/ (its notebook and history files live there).
`published` holds the original study's test accuracy (best epoch, last epoch; %) from its notes
(SEED.md, kept beside this repository, not in it) where it reported one, so charts and tables can
set our runs beside it.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import CIFAR10_STD, Config, UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINING_DIR = REPO_ROOT / "training"


@dataclass(frozen=True)
class Experiment:
    name: str
    config: Config
    description: str
    published: Optional[tuple] = None  # (best epoch %, last epoch %) or (best epoch %,)
    beyond: bool = False  # not of the original study: fast94, best_5m

    @property
    def folder(self):
        return TRAINING_DIR / self.name

    @property
    def leaf(self):
        return self.name.rsplit("/", 1)[-1]

    @property
    def group(self):
        if self.beyond:
            return "beyond"
        return self.name.rsplit("/", 1)[0] if "/" in self.name else "architectures"


def _architectures():
    described = {
        "og_resnet": ("13 basic blocks, stem width 32", (85.13, 84.96)),
        "og_64_resnet": ("11 basic blocks, stem width 64", (85.88, 85.81)),
        "res_512": ("10 basic blocks ending in one 512-channel block", (86.12, 86.07)),
        "res_512_d": ("res_512 with dropout 0.1 after the first BN of every block and LeakyReLU",
                      (86.67, 86.55)),
        "res_block": ("9 three-conv blocks; softmax before the cross-entropy, as the original did",
                      (83.23, 83.03)),
    }
    for name, (text, published) in described.items():
        config = Config(architecture=name, epochs=200, softmax_output=name == "res_block")
        yield Experiment(name, config, f"{text}; seed recipe, 200 epochs.", published)


def _activation_sweep():
    published = {"relu": 84.62, "leakyrelu": 85.11, "gelu": 84.73, "tanh": 78.75}
    for activation, best in published.items():
        note = " (the same run as changing_optimisers/sgd)" if activation == "relu" else ""
        yield Experiment(
            f"changing_activations/{activation}",
            Config(architecture="res_512_d", activation=activation, epochs=50),
            f"res_512_d with {activation} everywhere{note}; SGD lr 0.1, 50 epochs.", (best,))


def _optimiser_sweep():
    published = {"sgd": 84.62, "adam": 80.84, "adadelta": 82.85, "rmsprop": 78.01, "adagrad": None}
    for optimizer, best in published.items():
        note = (" The original's Adagrad notebook built Adam and left no results; this one uses "
                "Adagrad." if optimizer == "adagrad" else "")
        yield Experiment(
            f"changing_optimisers/{optimizer}",
            Config(architecture="res_512_d", activation="relu", optimizer=optimizer, epochs=50),
            f"res_512_d with ReLU, {optimizer} at lr 0.1, 50 epochs.{note}",
            (best,) if best is not None else None)


# fast94: airbench94's recipe (Keller Jordan, 2024) on a residual network: a frozen whitening stem,
# three stages of conv, pool and one residual block. Its hyperparameters translated to PyTorch's
# conventions for a mean loss: lr 11.5 per 1024 images with momentum 0.85 becomes 1.5; the decoupled
# weight decay 0.0153 becomes 1.33e-3 coupled; BatchNorm biases learn 64x faster.
FAST94 = Config(
    architecture="cifar_resnet", widths=(64, 256, 256), blocks=(1, 1, 1), whiten=True,
    epochs=10, batch_size=1024, lr=1.5, lr_batch_size=1024, momentum=0.85, nesterov=True,
    weight_decay=1.33e-3, norm_lr_scale=64.0, label_smoothing=0.2, schedule="triangle",
    warmup=0.23, averaging="lookahead", ema_decay=0.95, crop_padding=2, pad_mode="reflect",
    alternating_flip=True, rotation_degrees=0.0, std=CIFAR10_STD, tta=True)

# best_5m: the same family wider, with squeeze-excitation, for 200 epochs: a standard long recipe
# (SGD 0.1 per 128 images, Nesterov, decay 5e-4 on weights only, warm-up then cosine, EMA) with
# strong augmentation (TrivialAugment, cutout) and label smoothing.
BEST_5M = Config(
    architecture="cifar_resnet", widths=(96, 256, 352), blocks=(1, 1, 1), whiten=True,
    squeeze_excitation=True, epochs=200, batch_size=512, lr=0.1, lr_batch_size=128, momentum=0.9,
    nesterov=True, weight_decay=5e-4, decay_norm_and_bias=False, label_smoothing=0.1,
    schedule="warmup_cosine", warmup=0.025, averaging="ema", ema_decay=0.9995, crop_padding=4,
    pad_mode="reflect", rotation_degrees=0.0, cutout=12, trivial_augment=True, std=CIFAR10_STD,
    tta=True)

_BEYOND = (
    Experiment("fast94", FAST94, "CIFAR-style ResNet (3.19M) with airbench94's recipe: 94% in "
               "10 epochs is the target.", beyond=True),
    Experiment("best_5m", BEST_5M, "CIFAR-style ResNet with squeeze-excitation (4.66M), 200 epochs "
               "of a long recipe with strong augmentation: 96.5% is the target.", beyond=True),
)

_SEED_STUDY = (*_architectures(), *_activation_sweep(), *_optimiser_sweep())
SEED_STUDY = [e.name for e in _SEED_STUDY]  # the original study's fourteen experiments
EXPERIMENTS = {e.name: e for e in (*_SEED_STUDY, *_BEYOND)}


def twins(name):
    """The other experiments with exactly `name`'s settings: the original study trained
    changing_optimisers/sgd as changing_activations/relu, so one run stands for both."""
    config = EXPERIMENTS[name].config
    return [other for other, exp in EXPERIMENTS.items() if other != name and exp.config == config]


def get_experiment(name):
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; `python -m common list` shows them all")
    return EXPERIMENTS[name]
