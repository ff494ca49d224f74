import pytest
import torch
from torch import nn

from common import models
from common.config import Config, UserError
from common.experiments import EXPERIMENTS
from common.models import (ACTIVATIONS, ARCHITECTURES, PARAMETER_BUDGET, build_model,
                           count_parameters, model_from_config, model_options)

# The original study's trainable-parameter counts (SEED.md).
SEED_PARAMETERS = {
    "og_resnet": 4_997_802,
    "og_64_resnet": 4_926_282,
    "res_512": 4_961_610,
    "res_512_d": 4_961_610,
    "res_block": 4_979_498,
}


@pytest.mark.parametrize("name", SEED_PARAMETERS)
def test_parameter_counts_match_the_original(name):
    assert count_parameters(build_model(name)) == SEED_PARAMETERS[name]


def test_registry_holds_the_five_and_the_cifar_family():
    assert set(ARCHITECTURES) == set(SEED_PARAMETERS) | {"cifar_resnet"}


@pytest.mark.parametrize("name", SEED_PARAMETERS)
def test_output_is_ten_scores_per_image(name):
    model = build_model(name).eval()
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_model_is_under_budget(name):
    assert count_parameters(model_from_config(EXPERIMENTS[name].config)) < PARAMETER_BUDGET


def test_over_budget_model_is_refused(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "huge", lambda **options: nn.Linear(5000, 1000))
    with pytest.raises(UserError, match="over the 5,000,000 budget"):
        build_model("huge")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_is_used_everywhere(activation):
    model = build_model("res_512", activation=activation)
    expected = type(ACTIVATIONS[activation]())
    found = {type(m) for m in model.modules()} & {type(f()) for f in ACTIVATIONS.values()}
    assert found == {expected}
    # stem + 2 per basic block (inside, after the sum)
    assert sum(isinstance(m, expected) for m in model.modules()) == 1 + 2 * 10


def test_res_512_d_is_res_512_with_dropout_after_first_bn_and_leakyrelu():
    model = build_model("res_512_d")
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 10 and all(d.p == 0.1 for d in dropouts)
    for block in model.blocks:
        assert isinstance(block.body[1], nn.BatchNorm2d) and isinstance(block.body[2], nn.Dropout)
    leaky = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(leaky) == 21 and all(m.negative_slope == 0.01 for m in leaky)
    assert not any(isinstance(m, nn.Dropout) for m in build_model("res_512").modules())


def test_three_conv_blocks_of_res_block():
    model = build_model("res_block")
    convs = [[m for m in block.body if isinstance(m, nn.Conv2d)] for block in model.blocks]
    assert len(convs) == 9 and all(len(c) == 3 for c in convs)


def test_seed_stem_reaches_first_block_at_8x8():
    model = build_model("res_512")
    assert model.stem(torch.zeros(1, 3, 32, 32)).shape == (1, 64, 8, 8)


def test_softmax_output_is_an_option_on_only_for_res_block_experiment():
    model = build_model("res_block", softmax_output=True).eval()
    probabilities = model(torch.randn(4, 3, 32, 32))
    assert torch.allclose(probabilities.sum(1), torch.ones(4)) and (probabilities >= 0).all()
    assert [n for n, e in EXPERIMENTS.items() if e.config.softmax_output] == ["res_block"]


def test_model_options_fill_in_architecture_defaults():
    assert model_options(Config(architecture="res_512_d")) == {
        "activation": "leakyrelu", "dropout": 0.1, "softmax_output": False}
    assert model_options(Config(architecture="res_512_d", activation="gelu"))["activation"] == "gelu"


@pytest.mark.parametrize("options, message", [
    ({"activation": "swish2"}, "unknown activation"),
    ({"dropout": 1.5}, "dropout must be"),
])
def test_bad_model_options(options, message):
    with pytest.raises(UserError, match=message):
        build_model("res_512", **options)


def test_unknown_architecture():
    with pytest.raises(UserError, match="unknown architecture"):
        build_model("resnet9000")


def test_multiply_adds_counts_the_convolutions_and_leaves_training_mode():
    model = build_model("res_512").train()
    macs = models.multiply_adds(model)
    assert model.training
    def conv(c_in, c_out, k, side):  # multiply-adds of a k x k convolution with a side x side output
        return c_in * c_out * k * k * side * side
    expected = (conv(3, 64, 7, 16)                                    # stem; max-pool to 8x8
                + 6 * conv(64, 64, 3, 8)                              # 64 x 3 blocks
                + conv(64, 128, 3, 4) + conv(64, 128, 1, 4) + 11 * conv(128, 128, 3, 4)  # 128 x 6, /2
                + conv(128, 512, 3, 2) + conv(128, 512, 1, 2) + conv(512, 512, 3, 2)    # 512 x 1, /2
                + 512 * 10)                                           # the linear head
    assert macs == expected
