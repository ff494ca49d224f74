"""The recipe's parts the training loop calls: optimisers and their parameter groups, learning-rate
schedules, and the moving average of the weights that is evaluated and saved."""
import copy
import math

import torch

from .config import UserError
from .muon import Muon, muon_groups

# Each takes parameter groups that carry their own lr and weight_decay (see parameter_groups).
OPTIMIZERS = {
    "sgd": lambda groups, c: torch.optim.SGD(groups, momentum=c.momentum, nesterov=c.nesterov),
    "adam": lambda groups, c: torch.optim.Adam(groups),
    "adamw": lambda groups, c: torch.optim.AdamW(groups),
    "adadelta": lambda groups, c: torch.optim.Adadelta(groups),
    "rmsprop": lambda groups, c: torch.optim.RMSprop(groups, momentum=c.momentum),
    "adagrad": lambda groups, c: torch.optim.Adagrad(groups),
    "muon": lambda groups, c: Muon(groups, momentum=c.momentum, nesterov=c.nesterov),  # see muon.py
}


def cosine(t, warmup):
    return 0.5 * (1 + math.cos(math.pi * t))


def warmup_cosine(t, warmup):
    if t < warmup:
        return t / warmup
    return 0.5 * (1 + math.cos(math.pi * (t - warmup) / (1 - warmup)))


def triangle(t, warmup, start=0.2, end=0.07):
    """Linear from `start` up to 1 at the end of the warm-up, then linear down to `end`."""
    if t < warmup:
        return start + (1 - start) * t / warmup
    return 1 - (1 - end) * (t - warmup) / (1 - warmup)


def linear(t, warmup):
    """Linear up from 0 to 1 at the end of the warm-up (none by default), then linear down to 0."""
    if t < warmup:
        return t / warmup
    return (1 - t) / (1 - warmup)


# name: (stepped once per "epoch" or per "step", multiplier of the learning rate at the fraction t
# of the run done, given the warm-up's fraction of the run). The seed's cosine is stepped per epoch,
# as CosineAnnealingLR(T_max=epochs) was.
SCHEDULES = {
    "cosine": ("epoch", cosine),
    "constant": ("epoch", lambda t, warmup: 1.0),
    "warmup_cosine": ("step", warmup_cosine),
    "triangle": ("step", triangle),
    "linear": ("step", linear),
}
WARMING_UP = ("warmup_cosine", "triangle", "linear")  # the schedules that read `warmup`


def parameter_groups(model, config):
    """The trainable parameters in three groups: BatchNorm parameters (learning `norm_lr_scale`
    times faster, their weight decay divided by as much so that the decay per step is unchanged),
    other biases (likewise `bias_lr_scale`), and weights; BatchNorm and biases are not decayed
    unless `decay_norm_and_bias`."""
    norm_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    lr, decay = config.scaled_lr, config.weight_decay
    small_decay = decay if config.decay_norm_and_bias else 0.0
    groups = [
        {"params": [p for p in trainable if id(p) in norm_ids], "lr": lr * config.norm_lr_scale,
         "weight_decay": small_decay / config.norm_lr_scale},
        {"params": [p for p in trainable if id(p) not in norm_ids and p.ndim <= 1],
         "lr": lr * config.bias_lr_scale, "weight_decay": small_decay / config.bias_lr_scale},
        {"params": [p for p in trainable if id(p) not in norm_ids and p.ndim > 1], "lr": lr,
         "weight_decay": decay},
    ]
    return [g for g in groups if g["params"]]


# Those of OPTIMIZERS that take `momentum`, and `nesterov`: the others would ignore them.
WITH_MOMENTUM, WITH_NESTEROV = ("sgd", "rmsprop", "muon"), ("sgd", "muon")


def check_recipe(config):
    """Refuse an optimiser or schedule that does not exist, and a setting the chosen ones would
    ignore; cheap, so `training.check_settings` runs it before any data loads."""
    if config.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {config.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    for setting, takers in (("momentum", WITH_MOMENTUM), ("nesterov", WITH_NESTEROV)):
        if getattr(config, setting) and config.optimizer not in takers:
            raise UserError(f"optimizer {config.optimizer} takes no {setting} ({', '.join(takers)} do); "
                            f"leave {setting} at its default")
    if config.schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {config.schedule!r}; choose from {', '.join(SCHEDULES)}")
    if config.warmup and config.schedule not in WARMING_UP:
        raise UserError(f"schedule {config.schedule} has no warm-up ({', '.join(WARMING_UP)} do); "
                        f"leave warmup at 0")


def make_optimizer(model, config):
    check_recipe(config)
    groups = parameter_groups(model, config)
    if config.optimizer == "muon":
        groups = muon_groups(model, groups, config)
    return OPTIMIZERS[config.optimizer](groups, config)


def make_schedule(optimizer, config, steps_per_epoch):
    """A LambdaLR stepped once per epoch or once per training step, as SCHEDULES says."""
    check_recipe(config)
    unit, multiplier = SCHEDULES[config.schedule]
    total = config.epochs * (steps_per_epoch if unit == "step" else 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: multiplier(min(i / total, 1.0), config.warmup))


class WeightAverage:
    """A moving average of the model's floating-point state (weights and BatchNorm statistics),
    the copy that is evaluated and saved.

    "ema": updated after every step with decay min(ema_decay, (1 + n) / (10 + n)), so early
    weights are forgotten quickly. "lookahead": every LOOKAHEAD_EVERY steps, with a decay growing
    as the cube of the fraction of the run done (none at first, ema_decay**LOOKAHEAD_EVERY at the
    end), and the training model jumps back to the average each time.
    """

    LOOKAHEAD_EVERY = 5

    def __init__(self, model, mode, decay, total_steps):
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.mode, self.decay, self.total_steps = mode, decay, total_steps
        # The average's and the live model's tensors, gathered once: state_dict() shares the
        # tensors' storage, and loading a checkpoint copies into them in place, so they stay valid
        # all run. Floating-point state is averaged, counters copied; each list is updated by one
        # foreach call rather than a kernel launch per tensor.
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))
        self.averages, self.lives = [[p[i] for p in pairs if p[0].is_floating_point()] for i in (0, 1)]
        self.counters, self.live_counters = [[p[i] for p in pairs if not p[0].is_floating_point()]
                                             for i in (0, 1)]

    @torch.no_grad()
    def update(self, steps_done):
        """Fold the live model's current state into the average (and, in lookahead, back)."""
        if self.mode == "lookahead":
            if steps_done % self.LOOKAHEAD_EVERY and steps_done < self.total_steps:
                return
            decay = self.decay ** self.LOOKAHEAD_EVERY * (steps_done / self.total_steps) ** 3
        else:
            decay = min(self.decay, (1 + steps_done) / (10 + steps_done))
        torch._foreach_lerp_(self.averages, self.lives, 1 - decay)
        if self.mode == "lookahead":
            torch._foreach_copy_(self.lives, self.averages)
        if self.counters:
            torch._foreach_copy_(self.counters, self.live_counters)
