"""Every setting of a run in one place: the original study's recipe is the default.

An experiment is a `Config` with a few fields changed (see experiments.py); a user changes more
with keyword arguments, `--epochs` style flags, or `--set key=value`.
"""
import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD_SEED = (0.2023, 0.1994, 0.2010)  # the widely copied values the original study used


class UserError(Exception):
    """A problem with the user's input: reported in one line, without a traceback."""


def one_line(exc):
    """The telling line of an exception's message (torch.load's refusals span many lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    telling = [line for line in lines if "error:" in line.lower()]
    return (telling or lines or [type(exc).__name__])[0]


@dataclass(frozen=True)
class Config:
    # model
    architecture: str = "res_512"
    activation: Optional[str] = None  # None: the architecture's own
    dropout: Optional[float] = None  # None: the architecture's own
    softmax_output: bool = False
    # optimisation
    epochs: int = 200
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine annealing over the run's epochs, stepped once per epoch
    # augmentation, applied on the training device
    crop_padding: int = 4
    flip: bool = True
    rotation_degrees: float = 20.0
    mean: tuple = CIFAR10_MEAN
    std: tuple = CIFAR10_STD_SEED
    # data and run
    subset: Optional[int] = None  # N stratified training images: a smoke run
    seed: int = 0
    data_dir: Optional[str] = None  # None: <repository>/data
    download: bool = True
    device: str = "auto"
    sync_batchnorm: bool = False  # under torchrun on GPUs: batch statistics over all ranks

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.subset is None or self.subset >= 10,
             f"subset must be at least 10 images (one per class), got {self.subset}"),
            (self.crop_padding >= 0, f"crop_padding must not be negative, got {self.crop_padding}"),
            (len(self.mean) == 3 and len(self.std) == 3, "mean and std need three values each"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def replace(self, **overrides):
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise UserError(f"unknown setting {', '.join(unknown)}; settings are "
                            f"{', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self):
        return dataclasses.asdict(self)


def parse_setting(config, text):
    """'key=value' -> (key, value), the value read as JSON where it parses (numbers, true, null,
    lists) and as a string otherwise, then checked against the field's current type."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise UserError(f"--set expects key=value, got {text!r}")
    if not hasattr(config, key):
        config.replace(**{key: None})  # raises the unknown-setting message
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    current = getattr(config, key)
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if current is not None and value is not None and type(value) is not type(current):
        raise UserError(f"{key} expects a {type(current).__name__}, got {raw!r}")
    return key, value
