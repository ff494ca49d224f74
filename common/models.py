"""The architectures, built from three pieces: a stem, residual blocks and a head.

Every architecture is a function in `ARCHITECTURES` taking the same keyword arguments
(activation, dropout, softmax_output), so experiments can swap any of them; `build_model` is the
only way the rest of the package makes a model, and it refuses one over the parameter budget.
"""
import inspect
from functools import partial

import torch
from torch import nn

from .config import UserError

PARAMETER_BUDGET = 5_000_000

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leakyrelu": partial(nn.LeakyReLU, 0.01),
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "elu": nn.ELU,
}


def activation_layer(name):
    if name not in ACTIVATIONS:
        raise UserError(f"unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def conv_bn(cin, cout, kernel, stride=1):
    return [nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class ResidualBlock(nn.Module):
    """`convs` 3x3 conv-BN layers (2: "basic", 3: "three-conv") with the activation between them;
    dropout right after the first BN; a 1x1 conv-BN shortcut where the shape changes."""

    def __init__(self, cin, cout, stride, convs, activation, dropout):
        super().__init__()
        layers = conv_bn(cin, cout, 3, stride)
        if dropout:
            layers.append(nn.Dropout(dropout))
        for _ in range(convs - 1):
            layers += [activation_layer(activation), *conv_bn(cout, cout, 3)]
        self.body = nn.Sequential(*layers)
        self.shortcut = (nn.Sequential(*conv_bn(cin, cout, 1, stride))
                         if stride != 1 or cin != cout else nn.Identity())
        self.out_activation = activation_layer(activation)

    def forward(self, x):
        return self.out_activation(self.body(x) + self.shortcut(x))


class SeedResNet(nn.Module):
    """The original study's network: ImageNet-style stem (7x7/2 conv, 3x3/2 max-pool), a chain of
    residual blocks, global average pool, linear classifier.

    `blocks` lists (out_channels, stride) per block. `softmax_output` returns probabilities instead
    of logits: the original res_block fed those to cross-entropy, which this keeps as an option.
    """

    def __init__(self, stem_width, blocks, convs_per_block=2, activation="relu", dropout=0.0,
                 softmax_output=False, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, stem_width, 7, 2), activation_layer(activation),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], stem_width
        for cout, stride in blocks:
            layers.append(ResidualBlock(cin, cout, stride, convs_per_block, activation, dropout))
            cin = cout
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
        self.softmax_output = softmax_output

    def forward(self, x):
        logits = self.head(self.blocks(self.stem(x)))
        return logits.softmax(dim=1) if self.softmax_output else logits


def stage(channels, count, first_stride=1):
    """`count` blocks of `channels` outputs; only the first may downsample."""
    return [(channels, first_stride)] + [(channels, 1)] * (count - 1)


def og_resnet(activation="relu", dropout=0.0, softmax_output=False):
    return SeedResNet(32, stage(32, 1) + stage(64, 4) + stage(128, 5, 2) + stage(256, 3, 2),
                      activation=activation, dropout=dropout, softmax_output=softmax_output)


def og_64_resnet(activation="relu", dropout=0.0, softmax_output=False):
    return SeedResNet(64, stage(64, 3) + stage(128, 5, 2) + stage(256, 3, 2),
                      activation=activation, dropout=dropout, softmax_output=softmax_output)


def res_512(activation="relu", dropout=0.0, softmax_output=False):
    return SeedResNet(64, stage(64, 3) + stage(128, 6, 2) + stage(512, 1, 2),
                      activation=activation, dropout=dropout, softmax_output=softmax_output)


def res_512_d(activation="leakyrelu", dropout=0.1, softmax_output=False):
    """res_512 with dropout after the first BN of every block and LeakyReLU everywhere."""
    return res_512(activation=activation, dropout=dropout, softmax_output=softmax_output)


def res_block(activation="relu", dropout=0.0, softmax_output=False):
    return SeedResNet(32, stage(64, 4) + stage(128, 3, 2) + stage(256, 2, 2), convs_per_block=3,
                      activation=activation, dropout=dropout, softmax_output=softmax_output)


ARCHITECTURES = {f.__name__: f for f in (og_resnet, og_64_resnet, res_512, res_512_d, res_block)}


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(architecture, **options):
    """The named architecture; `options` (activation, dropout, softmax_output) left out or None
    take the architecture's own defaults."""
    if architecture not in ARCHITECTURES:
        raise UserError(f"unknown architecture {architecture!r}; choose from {', '.join(ARCHITECTURES)}")
    options = {k: v for k, v in options.items() if v is not None}
    if not 0.0 <= options.get("dropout", 0.0) < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {options['dropout']}")
    model = ARCHITECTURES[architecture](**options)
    params = count_parameters(model)
    if params > PARAMETER_BUDGET:
        raise UserError(f"{architecture} has {params:,} trainable parameters, over the "
                        f"{PARAMETER_BUDGET:,} budget")
    return model


MODEL_OPTIONS = ("activation", "dropout", "softmax_output")


def model_options(config):
    """The options a config's model is built with: its own values, the architecture's defaults
    where it leaves them None (res_512_d's default activation is LeakyReLU, say)."""
    if config.architecture not in ARCHITECTURES:
        raise UserError(f"unknown architecture {config.architecture!r}; choose from {', '.join(ARCHITECTURES)}")
    defaults = inspect.signature(ARCHITECTURES[config.architecture]).parameters
    return {k: defaults[k].default if getattr(config, k) is None else getattr(config, k)
            for k in MODEL_OPTIONS}


def model_from_config(config):
    return build_model(config.architecture, **model_options(config))


def summary(config, batch_size=None):
    """The torchinfo table of a config's model: output shapes, parameters, multiply-adds."""
    from torchinfo import summary as torchinfo_summary
    batch_size = batch_size or config.batch_size
    return torchinfo_summary(model_from_config(config), input_size=(batch_size, 3, 32, 32),
                             col_names=("output_size", "num_params", "mult_adds"), depth=2,
                             device="cpu", verbose=0)


def multiply_adds(model, input_size=(1, 3, 32, 32)):
    """Multiply-accumulates of one forward pass per image, counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    was_training = model.training
    with counter, torch.no_grad():
        model.eval()(torch.zeros(input_size, device=next(model.parameters()).device))
    model.train(was_training)
    return counter.get_total_flops() // 2 // input_size[0]
