"""Models: MLP sizes, the reduced ResNet-18, and building from a scenario's shape."""

import pytest
import torch

import retain
from retain import scenarios
from retain.data import Arrays
from retain.errors import ConfigError
from retain.models import MLP, ResNet18, build_model, parse_hidden


def test_mlp_hidden_sizes():
    m = MLP(64, 10, parse_hidden("32,16"))
    assert [layer.out_features for layer in m.features if isinstance(layer, torch.nn.Linear)] == [32, 16]
    assert m(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_reduced_resnet18_shape_and_width():
    m = ResNet18(3, 7, nf=20)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    assert m.head.in_features == 160  # 8 x nf: the GEM / A-GEM reduced width
    with pytest.raises(ConfigError, match="image inputs"):
        build_model("resnet18", (64,), 10)
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("vit", (3, 32, 32), 10)


def test_resnet_trains_through_the_loop_on_cifar_shaped_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(40) % 4
    sc = scenarios.split(Arrays("tiny-cifar", x, y, x[:16], y[:16], 4, (0.5,) * 3, (0.25,) * 3), "task", n_tasks=2)
    r = retain.run(scenario=sc, arch="resnet18", method="finetune", epochs=1, batch_size=10, optimizer="sgd",
                   lr=0.01)
    assert len(r.accuracy_matrix) == 2 and r.config["arch"] == "resnet18"


def test_xavier_init_is_glorot_uniform_with_zero_biases():
    """Mammoth's ``backbone.xavier`` (P3): weights uniform in ±sqrt(6 / (fan_in + fan_out)), biases 0."""
    from retain.models import init_xavier_

    torch.manual_seed(0)
    m = init_xavier_(build_model("mlp", (784,), 10, (100, 100)))
    linears = [x for x in m.modules() if isinstance(x, torch.nn.Linear)]
    assert [tuple(x.weight.shape) for x in linears] == [(100, 784), (100, 100), (10, 100)]
    for x in linears:
        fan_out, fan_in = x.weight.shape
        bound = (6 / (fan_in + fan_out)) ** 0.5
        w = x.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound  # fills the interval, not PyTorch's ±1/√fan_in
        assert abs(w.std().item() - bound / 3 ** 0.5) < 0.05 * bound  # a uniform's std: bound / √3
        assert torch.count_nonzero(x.bias) == 0
