"""Muon (Keller Jordan, 2024) as `optimizer=muon`: the conv filters take orthogonalised momentum
steps, every other parameter SGD with the config's momentum (Nesterov where it says so, as
fast94's does), in one optimiser (so one schedule and one checkpoint state cover both).
airbench94_muon publishes 94.01% (mean of 200 runs) in 8 epochs with it, where airbench94 takes
9.9; on fast94 with one conv per block it has not beaten Nesterov SGD here (README).
"""
import torch
from torch import nn

# The quintic Newton-Schulz coefficients of airbench94_muon, chosen for the steepest slope at zero:
# three iterations bring every singular value within a factor of ten of the largest into about
# [0.5, 1.5] (not exactly to 1: more iterations, which airbench found bought no accuracy).
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalise(matrix, steps=3, eps=1e-7):
    """`matrix` (2-D) with its singular values pushed towards 1: about U V^T of its SVD U S V^T,
    computed in bf16 (the iteration tolerates it, and it is the cheap format on GPUs)."""
    a, b, c = NEWTON_SCHULZ
    x = matrix.bfloat16()
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T
    x = x / (x.norm() + eps)  # top singular value at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(matrix.dtype)


def filter_ids(model):
    """The trainable filters of bias-free convolutions: every one of them feeds a BatchNorm in this
    project's networks, which makes the filter's scale irrelevant and lets Muon fix it."""
    return {id(m.weight) for m in model.modules()
            if isinstance(m, nn.Conv2d) and m.bias is None and m.weight.requires_grad}


def muon_groups(model, groups, config):
    """`groups` (recipe.parameter_groups) with the conv filters moved into a group of their own,
    stepped by Muon at `muon_lr` with `muon_momentum` and no weight decay."""
    filters = filter_ids(model)
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in filters]} for g in groups]
    muon = {"params": [p for g in groups for p in g["params"] if id(p) in filters],
            "lr": config.muon_lr, "momentum": config.muon_momentum, "weight_decay": 0.0,
            "orthogonalise": True}
    return [g for g in (*rest, muon) if g["params"]]


class Muon(torch.optim.Optimizer):
    """SGD with momentum (Nesterov if asked) and coupled weight decay, as torch.optim.SGD, on every
    group; in groups with `orthogonalise`, each filter is first rescaled to norm sqrt(out_channels)
    and its step is the orthogonalised momentum of its (out, in*k*k) matrix, so that every
    direction of the update moves alike however unevenly the gradient spreads."""

    def __init__(self, groups, momentum, nesterov):
        defaults = {"momentum": momentum, "nesterov": nesterov, "weight_decay": 0.0, "orthogonalise": False}
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                update = grad.add(buffer, alpha=group["momentum"]) if group["nesterov"] else buffer
                if group["orthogonalise"]:
                    p.mul_(len(p) ** 0.5 / p.norm())
                    update = orthogonalise(update.reshape(len(p), -1)).view_as(p)
                p.add_(update, alpha=-group["lr"])
