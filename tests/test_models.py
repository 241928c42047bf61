"""Models: MLP sizes, the ResNets (parameter counts against their references' structures), building from a
scenario's shape."""

import pytest
import torch

import retain
from retain import scenarios
from retain.data import Arrays
from retain.errors import ConfigError
from retain.models import MLP, ResNet18, ResNet32, build_model, parse_hidden


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


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _mammoth_resnet18_params(nf: int, n_out: int, stem_k: int = 3) -> int:
    """Mammoth's ``backbone/ResNetBlock.py`` ResNet(BasicBlock, [2, 2, 2, 2]), counted from its layer list: a bias-free
    stem conv + BN, per block two bias-free 3x3 convs + two BNs, a 1x1 conv + BN shortcut where the shape changes,
    the linear classifier."""
    def conv(k: int, a: int, b: int) -> int:
        return k * k * a * b

    def bn(c: int) -> int:  # weight and bias
        return 2 * c

    total, cin = conv(stem_k, 3, nf) + bn(nf), nf
    for i, stride in enumerate((1, 2, 2, 2)):
        cout = nf * 2**i
        for b in range(2):
            a = cin if b == 0 else cout
            total += conv(3, a, cout) + conv(3, cout, cout) + 2 * bn(cout)
            if b == 0 and (stride != 1 or a != cout):
                total += conv(1, a, cout) + bn(cout)
        cin = cout
    return total + 8 * nf * n_out + n_out


def test_resnet18_matches_mammoth_parameter_count_and_stems():
    m = build_model("resnet18", (3, 32, 32), 10)
    assert _params(m) == _mammoth_resnet18_params(64, 10) == 11_173_962  # Mammoth's resnet18(10)
    assert m.stem == "cifar" and m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not any(isinstance(x, torch.nn.MaxPool2d) for x in m.modules())
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10) and m.features(torch.zeros(2, 3, 32, 32)).shape == (2, 512)
    # seq-tinyimg: Mammoth keeps the CIFAR stem at 64 px
    tiny = build_model("resnet18", (3, 64, 64), 200)
    assert tiny.stem == "cifar" and tiny(torch.zeros(1, 3, 64, 64)).shape == (1, 200)
    # from 128 px: the ImageNet stem (7x7 stride 2 + 3x3 max-pool), torchvision's resnet18 at 10 classes
    big = build_model("resnet18", (3, 128, 160), 10)
    assert big.stem == "imagenet" and big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2)
    assert _params(big) == _mammoth_resnet18_params(64, 10, stem_k=7) == 11_181_642
    assert big.features(torch.zeros(1, 3, 128, 160)).shape == (1, 512)


def test_reduced_resnet18_keeps_its_numbers():
    m = build_model("resnet18-reduced", (3, 32, 32), 10)
    assert type(m) is ResNet18 and m.head.in_features == 160
    assert _params(m) == _mammoth_resnet18_params(20, 10) == 1_094_750  # Mammoth's reduced_resnet18(10)


def test_convnet_is_four_plain_convolutions_and_a_head():
    """OML's representation cut to digits: 3x3 convs of 64 filters at strides 2, 1, 2, 1, no padding, no batch norm:
    28 -> 13 -> 11 -> 5 -> 3, so 64 * 3 * 3 = 576 features; a sample's features do not depend on its batch."""
    m = build_model("convnet", (1, 28, 28), 5)
    convs = [x for x in m.features if isinstance(x, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 1, 2, 1] and all(c.out_channels == 64 for c in convs)
    assert not any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())
    assert m.head.in_features == 576 and m(torch.zeros(2, 1, 28, 28)).shape == (2, 5)
    assert _params(m) == (9 * 64 + 64) + 3 * (9 * 64 * 64 + 64) + 576 * 5 + 5
    x = torch.randn(3, 1, 28, 28)
    m.train()
    assert torch.allclose(m.features(x)[:1], m.features(x[:1]), atol=1e-6)
    assert build_model("convnet", (3, 32, 32), 10).head.in_features == 64 * 4 * 4  # 32 -> 15 -> 13 -> 6 -> 4
    with pytest.raises(ConfigError, match="convnet needs square images of at least 19 x 19"):
        build_model("convnet", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="convnet needs image inputs"):
        build_model("convnet", (784,), 10)


def test_resnet32_matches_pycil_structure_and_count():
    """PyCIL's convs/cifar_resnet.py resnet32: 16-channel stem, 3 stages x 5 blocks of 16/32/64 channels,
    parameter-free shortcuts, 64 features: 463,504 parameters before the classifier (0.46 M)."""
    m = build_model("resnet32", (3, 32, 32), 10)
    assert type(m) is ResNet32 and len(m.stages) == 15
    assert [blk.conv2.out_channels for blk in m.stages] == [16] * 5 + [32] * 5 + [64] * 5
    assert _params(m.features) == 463_504 and _params(m) == 463_504 + 64 * 10 + 10
    assert m.features(torch.zeros(2, 3, 32, 32)).shape == (2, 64) and m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # the option-A shortcut: every second pixel, the new channels zero
    x = torch.randn(1, 16, 8, 8)
    sc = m.stages[5].shortcut(x)
    assert sc.shape == (1, 32, 4, 4) and torch.equal(sc[:, :16], x[:, :, ::2, ::2]) and not sc[:, 16:].any()
    with pytest.raises(ConfigError, match="resnet32 is the CIFAR ResNet"):
        build_model("resnet32", (3, 224, 224), 10)
    with pytest.raises(ConfigError, match="resnet32 needs image inputs"):
        build_model("resnet32", (784,), 10)


def test_resnet_trains_through_the_loop_on_cifar_shaped_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(40) % 4
    sc = scenarios.split(Arrays("tiny-cifar", x, y, x[:16], y[:16], 4, (0.5,) * 3, (0.25,) * 3), "task", n_tasks=2)
    r = retain.run(scenario=sc, arch="resnet18-reduced", method="finetune", epochs=1, batch_size=10,
                   optimizer="sgd", lr=0.01)
    assert len(r.accuracy_matrix) == 2 and r.config["arch"] == "resnet18-reduced"
    assert r.model["parameters"] == _mammoth_resnet18_params(20, 4)


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


def test_pycil_init_redraws_only_the_output_layer_as_pycils_simplelinear():
    """PyCIL's SimpleLinear: head weights uniform in ±sqrt(3 / fan_in) (Kaiming-uniform, linear gain), biases 0;
    the hidden layers keep PyTorch's draw (the same as without it, from the same seed)."""
    import pytest

    from retain.errors import ConfigError
    from retain.models import init_pycil_, initialise

    torch.manual_seed(0)
    plain = build_model("mlp", (784,), 10, (100, 100))
    torch.manual_seed(0)
    m = initialise(build_model("mlp", (784,), 10, (100, 100)), "pycil")
    bound = (3 / 100) ** 0.5
    w = m.head.weight.detach()
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound  # PyTorch's would stay within 0.1
    assert torch.count_nonzero(m.head.bias) == 0
    for a, b in zip(plain.features.parameters(), m.features.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="--init pycil"):
        init_pycil_(torch.nn.Sequential(torch.nn.Linear(3, 2)))


def test_init_option_reinitialises_the_run_model_through_the_one_path():
    """``--init xavier`` (config files, sweeps and the API alike): the built MLP's linear biases are zero and its
    weights fill Glorot's interval; ``default`` leaves PyTorch's; an unknown name is a one-line error."""
    import pytest

    from retain.config import resolve
    from retain.errors import ConfigError

    run = resolve(benchmark="split-digits", mode="class", init="xavier", hidden=(50,))
    sc = run.build_scenario()
    m = run.build_model(sc)
    first = next(x for x in m.modules() if isinstance(x, torch.nn.Linear))
    assert torch.count_nonzero(first.bias) == 0
    assert first.weight.abs().max() > 0.95 * (6 / sum(first.weight.shape)) ** 0.5
    plain = resolve(benchmark="split-digits", mode="class", hidden=(50,))
    first = next(x for x in plain.build_model(sc).modules() if isinstance(x, torch.nn.Linear))
    assert torch.count_nonzero(first.bias) > 0  # PyTorch's biases are uniform, not zero
    from retain.config import hashed

    assert "init" not in hashed(plain.spec()) and hashed(run.spec())["init"] == "xavier"  # old stores keep hashes
    with pytest.raises(ConfigError, match="unknown init 'kaiming'; choose one of default, xavier, agem"):
        resolve(benchmark="split-digits", init="kaiming")
