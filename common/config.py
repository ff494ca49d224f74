"""Every setting of a run in one place: the original study's recipe is the default.

An experiment is a `Config` with a few fields changed (see experiments.py); a user changes more
with keyword arguments, `--epochs` style flags, or `--set key=value`.
"""
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass
from typing import Optional

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD_SEED = (0.2023, 0.1994, 0.2010)  # the widely copied values the original study used
CIFAR10_STD = (0.2470, 0.2435, 0.2616)  # the training set's per-channel standard deviation
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The ways a run can execute its model, as the fields each sets (`study --compile`)
COMPILE_WAYS = {
    "eager": {"compile": False},
    "compile": {"compile": True, "compile_mode": "default"},  # torch.compile: fused kernels
    "cuda-graphs": {"compile": True, "compile_mode": "reduce-overhead"},  # the same, launched as CUDA graphs
}


class UserError(Exception):
    """A problem with the user's input: reported in one line, without a traceback."""


# torch.load's advice around the reason it refused a file
TORCH_LOAD_ADVICE = ("Weights only load failed", "Check the documentation of torch.load")


def one_line(exc):
    """The telling line of an exception's message (torch.load's refusals span many lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(TORCH_LOAD_ADVICE)] or lines
    for i, line in enumerate(lines):
        at = line.lower().rfind("error:")
        if at >= 0:  # what follows "error:", on its line or the next ("WeightsUnpickler error:\n\nUnsupported ...")
            return line[at + len("error:"):].strip() or (lines[i + 1:] or [line])[0]
    return (lines or [type(exc).__name__])[0]


@dataclass(frozen=True)
class Config:
    # model
    architecture: str = "res_512"
    activation: Optional[str] = None  # None: the architecture's own
    dropout: Optional[float] = None  # None: the architecture's own
    softmax_output: bool = False
    # model options of the CIFAR-style family (models.cifar_resnet); None: the architecture's own
    widths: Optional[tuple[int, ...]] = None  # channels per stage
    blocks: Optional[tuple[int, ...]] = None  # residual blocks per stage
    whiten: Optional[bool] = None  # frozen 2x2 patch-whitening stem
    squeeze_excitation: Optional[bool] = None
    preact: Optional[bool] = None  # pre-activation residual blocks
    block_convs: Optional[int] = None  # 3x3 convs in a residual block's body: 2 (basic block) or 1
    # optimisation
    epochs: int = 200
    batch_size: int = 128
    micro_batch: Optional[int] = None  # forward/backward in chunks of this size, gradients summed
    optimizer: str = "sgd"  # sgd, adam, adamw, adadelta, rmsprop, adagrad or muon (recipe.OPTIMIZERS)
    lr: float = 0.1
    lr_batch_size: Optional[int] = None  # lr is the rate at this batch size, scaled linearly to batch_size
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    decay_norm_and_bias: bool = True  # False: no weight decay on BatchNorm and bias parameters
    norm_lr_scale: float = 1.0  # BatchNorm parameters learn this much faster (same decay per step)
    bias_lr_scale: float = 1.0  # other biases (the whitening stem's) learn this much faster, likewise
    muon_lr: float = 0.24  # optimizer=muon: the conv filters' step size, as given (lr_batch_size scales lr only)
    muon_momentum: float = 0.6  # optimizer=muon: the conv filters' momentum (the rest uses momentum)
    label_smoothing: float = 0.0
    schedule: str = "cosine"  # see recipe.SCHEDULES
    warmup: float = 0.0  # fraction of the run spent warming up (warmup_cosine, triangle and linear schedules)
    averaging: str = "none"  # none, ema or lookahead: the weights evaluated and saved (recipe.WeightAverage)
    ema_decay: float = 0.999  # per step
    compile: bool = False  # torch.compile the training model
    compile_mode: str = "default"  # torch.compile's mode: default, reduce-overhead (CUDA graphs), max-autotune
    channels_last: bool = True  # images and weights in the channels-last layout (devices.prepare)
    bf16: Optional[bool] = None  # bf16 autocast (devices.precision); None: on a GPU with native bf16, else off
    fp16: bool = False  # float16 autocast with loss scaling: for GPUs without native bf16 (T4, V100, RTX 20xx)
    # augmentation, applied on the training device
    crop_padding: int = 4
    pad_mode: str = "zeros"  # zeros or reflect: what the crop's padding holds
    flip: bool = True
    alternating_flip: bool = False  # flip each image in every other epoch instead of at random
    rotation_degrees: float = 20.0
    cutout: int = 0  # side of a random square set to the mean colour; 0: none
    trivial_augment: bool = False  # one random op of random magnitude per image
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD_SEED
    # evaluation
    tta: bool = False  # the final test evaluation averages flipped and shifted views
    val: int = 0  # hold out N stratified training images to evaluate each epoch; test only at the end
    # data and run
    subset: Optional[int] = None  # N stratified training images: a smoke run
    seed: int = 0
    data_dir: Optional[str] = None  # None: <repository>/data
    download: bool = True
    device: str = "auto"
    sync_batchnorm: bool = False  # under torchrun on GPUs: batch statistics over all ranks

    def __post_init__(self):
        for field in dataclasses.fields(self):  # frozen: object.__setattr__ stores the converted value
            object.__setattr__(self, field.name, checked(field.name, field.type, getattr(self, field.name)))
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.micro_batch is None or self.micro_batch >= 1,
             f"micro_batch must be at least 1, got {self.micro_batch}"),
            (self.subset is None or self.subset >= 10,
             f"subset must be at least 10 images (one per class), got {self.subset}"),
            (0 <= self.crop_padding < 32, f"crop_padding must be in [0, 32) pixels, got {self.crop_padding}"),
            (self.pad_mode in ("zeros", "reflect"), f"pad_mode is zeros or reflect, got {self.pad_mode!r}"),
            (0 <= self.cutout <= 32, f"cutout is a square's side in [0, 32] pixels, got {self.cutout}"),
            (self.averaging in ("none", "ema", "lookahead"),
             f"averaging is none, ema or lookahead, got {self.averaging!r}"),
            (0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (not (self.bf16 and self.fp16), "bf16 and fp16 exclude each other; set one"),
            (self.compile_mode in COMPILE_MODES,
             f"compile_mode is {', '.join(COMPILE_MODES)}; got {self.compile_mode!r}"),
            (0.0 <= self.label_smoothing < 1.0,
             f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.warmup < 1, f"warmup must be a fraction of the run in [0, 1), got {self.warmup}"),
            (self.momentum >= 0, f"momentum must not be negative, got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must not be negative, got {self.weight_decay}"),
            (not self.nesterov or self.momentum > 0, "nesterov needs a positive momentum"),
            (self.muon_lr > 0, f"muon_lr must be positive, got {self.muon_lr}"),
            (0 <= self.muon_momentum < 1, f"muon_momentum must be in [0, 1), got {self.muon_momentum}"),
            (self.norm_lr_scale > 0, f"norm_lr_scale must be positive, got {self.norm_lr_scale}"),
            (self.bias_lr_scale > 0, f"bias_lr_scale must be positive, got {self.bias_lr_scale}"),
            (self.lr_batch_size is None or self.lr_batch_size >= 1,
             f"lr_batch_size must be at least 1, got {self.lr_batch_size}"),
            (self.val >= 0, f"val must not be negative, got {self.val}"),
            (0 <= self.seed < 2 ** 32, f"seed must be in [0, 2**32), got {self.seed}"),
            (len(self.mean) == 3 and len(self.std) == 3, "mean and std need three values each"),
            (all(s > 0 for s in self.std), f"std must be positive, got {list(self.std)}"),
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

    @property
    def scaled_lr(self):
        """The learning rate at this run's batch size."""
        return self.lr * self.batch_size / self.lr_batch_size if self.lr_batch_size else self.lr


def checked(name, annotation, value):
    """`value` converted to the type its field is annotated with (Optional[int], tuple[float, ...]
    and so on): a list becomes a tuple, an int a float, a Path a str; a value of another type (a
    string or a bool for a number, say) is refused."""
    kinds = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Union else (annotation,)
    kinds = [None if k is type(None) else k for k in kinds]
    if value is None and None in kinds:
        return None
    kind = next(k for k in kinds if k is not None)
    item = typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else None
    base = typing.get_origin(kind) or kind
    if not is_a(value, base) or (item is not None and not all(is_a(v, item) for v in value)):
        expected = f"a list of {item.__name__}s" if item else f"{article(base.__name__)} {base.__name__}"
        raise UserError(f"{name} expects {expected}{' or null' if None in kinds else ''}, got {value!r}")
    if not all(math.isfinite(v) for v in (value if item is not None else [value]) if isinstance(v, float)):
        raise UserError(f"{name} expects finite numbers, got {value!r}")
    if item is not None:
        return tuple(item(v) for v in value)
    return base(value)


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def is_a(value, kind):
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    if kind is tuple:
        return isinstance(value, (tuple, list))
    if kind is str:  # a folder given as a Path
        return isinstance(value, (str, os.PathLike))
    return isinstance(value, kind)


FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Config)}
NULLABLE = {name for name, kind in FIELD_TYPES.items() if type(None) in typing.get_args(kind)}


def parse_settings(config, texts):
    """{key: value} from several 'key=value' texts (parse_setting each)."""
    return dict(parse_setting(config, text) for text in texts)


def parse_setting(config, text):
    """'key=value' -> (key, value), the value read as JSON where it parses (numbers, true, null,
    lists) and as a string otherwise, then checked against the field's type."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise UserError(f"--set expects key=value, got {text!r}")
    if key not in FIELD_TYPES:  # not a method's or property's name either
        config.replace(**{key: None})  # raises the unknown-setting message
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, checked(key, FIELD_TYPES[key], value)


# Where a run's data come from, its device, and whether its model is compiled (which changes the
# arithmetic by rounding only) may differ between its start and its resume, and between two runs of
# the same settings.
EXECUTION_SETTINGS = {"data_dir", "download", "device", "compile", "compile_mode"}


def differing_settings(saved, config):
    """The settings, but for where and how the run ran (EXECUTION_SETTINGS), in which a saved config (a
    checkpoint's or run.json's dict) differs from `config`."""
    saved = {**Config().to_dict(), **saved}  # a field newer than the saved config had its default then
    current = config.to_dict()
    return sorted(k for k in set(saved) | set(current)
                  if k not in EXECUTION_SETTINGS and normalise(saved.get(k)) != normalise(current.get(k)))


def normalise(value):
    return list(value) if isinstance(value, tuple) else value


# `train`'s own flags for Config fields; any other field goes through --set.
TRAIN_FLAGS = {"epochs": "--epochs", "batch_size": "--batch-size", "subset": "--subset", "seed": "--seed",
               "val": "--val", "data_dir": "--data-dir"}


def train_arguments(base, config):
    """The `train` arguments that make `config` of an experiment's `base` config, where it runs
    aside but for its data folder (parse_setting's inverse): what a resume must be given again."""
    keys = set(differing_settings(base.to_dict(), config)) | ({"data_dir"} if config.data_dir else set())
    arguments = []
    for key in sorted(keys):
        value = getattr(config, key)
        if key in TRAIN_FLAGS and value is not None:
            arguments += [TRAIN_FLAGS[key], str(value)]
        else:
            arguments += ["--set", f"{key}={setting_text(value)}"]
    return arguments


def setting_text(value):
    """A value as --set reads it back: JSON, but a string that is not JSON as itself."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            return value
    return json.dumps(normalise(value), separators=(",", ":"))
