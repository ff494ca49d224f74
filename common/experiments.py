"""The registry of named experiments: each one is a Config, a folder and what it is for.

A name is also the experiment's folder under training/ (its notebook and history files live there).
`published` holds the original study's test accuracy (best epoch, last epoch; %) from SEED.md where
it reported one, so charts and tables can set our runs beside it.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import Config, UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINING_DIR = REPO_ROOT / "training"


@dataclass(frozen=True)
class Experiment:
    name: str
    config: Config
    description: str
    published: Optional[tuple] = None  # (best epoch %, last epoch %) or (best epoch %,)

    @property
    def folder(self):
        return TRAINING_DIR / self.name

    @property
    def leaf(self):
        return self.name.rsplit("/", 1)[-1]

    @property
    def group(self):
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


_SEED_STUDY = (*_architectures(), *_activation_sweep(), *_optimiser_sweep())
SEED_STUDY = [e.name for e in _SEED_STUDY]  # the original study's fourteen experiments
EXPERIMENTS = {e.name: e for e in _SEED_STUDY}


def get_experiment(name):
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; `python -m common list` shows them all")
    return EXPERIMENTS[name]
