"""The architectures, built from three pieces: a stem, residual blocks and a head.

Two families: `SeedResNet`, the original study's five networks (ImageNet-style stem), and
`CifarResNet`, a modern CIFAR-style family (3x3 convs at full resolution, optional frozen
patch-whitening stem, squeeze-excitation, pre-activation) behind `fast94` and `best_5m`.
Every architecture is a function in `ARCHITECTURES`; all take activation, dropout and
softmax_output, and a family's own options (widths, blocks, ...) where it has them. `build_model`
is the only way the rest of the package makes a model, and it refuses one over the parameter
budget.
"""
import copy
import inspect
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .config import UserError, one_line

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


class PatchWhitening(nn.Module):
    """A frozen 2x2 convolution whose filters whiten the training images' 2x2 patches (the
    eigenvectors of their covariance, scaled by 1/sqrt(eigenvalue), each also negated so a
    following activation keeps both signs); only its bias trains. Before `fit` its filters are
    PyTorch's random init: a model loaded from saved weights needs no data."""

    def __init__(self, channels=3, patch=2):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels * patch * patch, patch, padding=0)
        self.conv.weight.requires_grad_(False)
        self.out_channels = self.conv.out_channels

    @torch.no_grad()
    def fit(self, images, eps=5e-4):
        """`images`: normalised float (N, C, H, W) training images."""
        c, k = self.conv.in_channels, self.conv.kernel_size[0]
        patches = images.double().unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
        patches = patches - patches.mean(0)
        eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (eigenvectors.T / (eigenvalues + eps).sqrt()[:, None]).reshape(-1, c, k, k)
        self.conv.weight.copy_(torch.cat([filters, -filters]).to(self.conv.weight))

    def forward(self, x):
        return self.conv(x)


class SqueezeExcitation(nn.Module):
    """Channel gates from the globally pooled features (reduction 16, at least 8 hidden)."""

    def __init__(self, channels, activation):
        super().__init__()
        hidden = max(8, channels // 16)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1),
                                  activation_layer(activation), nn.Conv2d(hidden, channels, 1),
                                  nn.Sigmoid())

    def forward(self, x):
        return x * self.gate(x)


def norm(channels):
    """BatchNorm with a bias but no trainable scale (the following conv or ReLU-like unit makes
    the scale redundant), fast-moving running statistics (momentum 0.4) for short runs."""
    layer = nn.BatchNorm2d(channels, momentum=0.4, eps=1e-12)
    layer.weight.requires_grad_(False)
    return layer


def conv3x3(cin, cout):
    """A 3x3 conv whose first min(cin, cout) filters start as the identity (Dirac), so a deep
    stack begins close to passing its input through."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(cin, cout)])
    return conv


class CifarBlock(nn.Module):
    """x + body(x), the body `convs` 3x3 convs (2: the basic block), each post-activation
    conv-BN-act or with `preact` BN-act-conv; optional dropout after the first activation and
    squeeze-excitation at the end of the body."""

    def __init__(self, channels, activation, dropout, squeeze_excitation, preact, convs=2):
        super().__init__()
        layers = []
        for _ in range(convs):
            unit = [norm(channels), activation_layer(activation), conv3x3(channels, channels)] if preact \
                else [conv3x3(channels, channels), norm(channels), activation_layer(activation)]
            layers += unit
        if dropout:  # right after the first activation
            layers.insert(2 if preact else 3, nn.Dropout(dropout))
        if squeeze_excitation:
            layers.append(SqueezeExcitation(channels, activation))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.body(x)


class CifarResNet(nn.Module):
    """CIFAR-style residual network: a stem at full resolution (frozen 2x2 patch whitening, or a
    3x3 conv-BN-act), then per stage a 3x3 conv, 2x2 max-pool, BN, activation and `blocks[i]`
    residual blocks of width `widths[i]` and `block_convs` convs each; global max-pool, a bias-free
    linear layer whose logits are scaled by `logit_scale` (small logits early make the start of
    training stable)."""

    def __init__(self, widths, blocks, whiten=True, squeeze_excitation=False, preact=False,
                 activation="gelu", dropout=0.0, softmax_output=False, block_convs=2,
                 logit_scale=1 / 9, num_classes=10):
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise UserError(f"widths and blocks need one entry per stage, got {list(widths)} and "
                            f"{list(blocks)}")
        if block_convs not in (1, 2):
            raise UserError(f"block_convs is 1 or 2, got {block_convs}")
        if min(widths) < 1 or min(blocks) < 0:
            raise UserError(f"widths must be at least 1 and blocks at least 0, got {list(widths)} and "
                            f"{list(blocks)}")
        if whiten:
            self.stem = nn.Sequential(PatchWhitening(), activation_layer(activation))
            cin = self.stem[0].out_channels
        else:
            self.stem = nn.Sequential(conv3x3(3, widths[0]), norm(widths[0]), activation_layer(activation))
            cin = widths[0]
        stages = []
        for width, count in zip(widths, blocks):
            stages.append(nn.Sequential(
                conv3x3(cin, width), nn.MaxPool2d(2), norm(width), activation_layer(activation),
                *(CifarBlock(width, activation, dropout, squeeze_excitation, preact, block_convs)
                  for _ in range(count))))
            cin = width
        self.stages = nn.Sequential(*stages)
        tail = [norm(cin), activation_layer(activation)] if preact else []
        self.head = nn.Sequential(*tail, nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                                  nn.Linear(cin, num_classes, bias=False))
        self.logit_scale = logit_scale
        self.softmax_output = softmax_output

    def fit_to_images(self, images):
        """Initialisation that needs the training data: the whitening filters."""
        if isinstance(self.stem[0], PatchWhitening):
            self.stem[0].fit(images)

    def forward(self, x):
        logits = self.head(self.stages(self.stem(x))) * self.logit_scale
        return logits.softmax(dim=1) if self.softmax_output else logits


def cifar_resnet(widths=(64, 256, 256), blocks=(1, 1, 1), whiten=True, squeeze_excitation=False,
                 preact=False, activation="gelu", dropout=0.0, softmax_output=False, block_convs=2):
    return CifarResNet(tuple(widths), tuple(blocks), whiten, squeeze_excitation, preact, activation,
                       dropout, softmax_output, block_convs)


ARCHITECTURES = {f.__name__: f for f in (og_resnet, og_64_resnet, res_512, res_512_d, res_block,
                                         cifar_resnet)}


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


MODEL_OPTIONS = ("activation", "dropout", "softmax_output", "widths", "blocks", "whiten",
                 "squeeze_excitation", "preact", "block_convs")


def model_options(config):
    """The options a config's model is built with: its own values, the architecture's defaults
    where it leaves them None (res_512_d's default activation is LeakyReLU, say). Setting an
    option the architecture does not have is an error."""
    if config.architecture not in ARCHITECTURES:
        raise UserError(f"unknown architecture {config.architecture!r}; choose from {', '.join(ARCHITECTURES)}")
    defaults = inspect.signature(ARCHITECTURES[config.architecture]).parameters
    foreign = [k for k in MODEL_OPTIONS if k not in defaults and getattr(config, k) is not None]
    if foreign:
        raise UserError(f"{config.architecture} has no option {', '.join(foreign)}")
    return {k: defaults[k].default if getattr(config, k) is None else getattr(config, k)
            for k in MODEL_OPTIONS if k in defaults}


def model_from_config(config):
    return build_model(config.architecture, **model_options(config))


def meta_model(config):
    """A config's model on the meta device: shapes only, no weights allocated or initialised, in
    milliseconds. Building it and passing a batch of shapes through it check every model option,
    the parameter budget and that a 32x32 image fits (five max-pools shrink it to nothing)."""
    with torch.device("meta"):
        model = model_from_config(config)
        try:
            model(torch.empty(2, 3, 32, 32))
        except RuntimeError as e:
            raise UserError(f"{config.architecture} with these settings cannot take a 32x32 image: "
                            f"{one_line(e)}") from None
    return model


def summary(config, batch_size=None):
    """The torchinfo table of a config's model: output shapes, parameters, multiply-adds."""
    from torchinfo import summary as torchinfo_summary
    batch_size = batch_size or config.batch_size
    return torchinfo_summary(model_from_config(config), input_size=(batch_size, 3, 32, 32),
                             col_names=("output_size", "num_params", "mult_adds"), depth=2,
                             device="cpu", verbose=0)


def training_flops(model, batch=2):
    """FLOPs of one training step's forward and backward pass per image, counted by torch's FLOP
    counter on a copy of the model in training mode (its BatchNorm statistics stay untouched); the
    random batch draws from torch's global generator."""
    from torch.utils.flop_counter import FlopCounterMode
    clone = copy.deepcopy(model).train()
    x = torch.randn(batch, 3, 32, 32, device=next(clone.parameters()).device)
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(clone(x).float(), torch.zeros(batch, dtype=torch.long, device=x.device)).backward()
    return counter.get_total_flops() // batch


def multiply_adds(model, input_size=(1, 3, 32, 32)):
    """Multiply-accumulates of one forward pass per image, counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    was_training = model.training
    with counter, torch.no_grad():
        model.eval()(torch.zeros(input_size, device=next(model.parameters()).device))
    model.train(was_training)
    return counter.get_total_flops() // 2 // input_size[0]
