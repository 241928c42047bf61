"""The method interface: registry, hook-name checking, Compose, parameter parsing and presets."""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from retain.errors import ConfigError
from retain.method import Compose, Method, create, hyperparameters, methods, param


def test_registry_has_the_bounds():
    reg = methods()
    assert reg["finetune"] is Method and "joint" in reg


def test_misspelled_hook_is_an_error_not_ignored():
    with pytest.raises(TypeError, match="end_tsak"):
        class Bad(Method):  # noqa: F841
            def end_tsak(self, ctx):
                pass


@dataclass
class Scaled(Method):
    lambda_: float = param(1.0, "strength (λ)")
    online: bool = param(False, "online variant")
    k: int = param(3, "count")
    kind: str = param("a", "kind", choices=("a", "b"))
    presets: ClassVar = {"split-digits/task": {"lambda": 5.0}}

    def penalty(self, ctx, batch, out):
        return torch.tensor(self.lambda_)


@dataclass
class Doubler(Method):
    def augment(self, ctx, batch):
        return batch.cat(batch)

    def penalty(self, ctx, batch, out):
        return torch.tensor(2.0)


def test_create_converts_and_checks_parameters(monkeypatch):
    import retain.method as m

    monkeypatch.setitem(m.REGISTRY, "scaled", Scaled)
    s = create("scaled", {"lambda": "1e3", "online": "true", "k": "7"})
    assert (s.lambda_, s.online, s.k) == (1000.0, True, 7)
    assert s.params() == {"lambda": 1000.0, "online": True, "k": 7, "kind": "a"}
    assert create("scaled", preset="split-digits/task").lambda_ == 5.0  # the preset applies by default
    assert create("scaled", {"lambda": 2}, preset="split-digits/task").lambda_ == 2.0  # the user wins
    for bad, msg in [({"lamda": 1}, "unknown parameter 'lamda'; valid parameters: lambda, online, k, kind"),
                     ({"k": "2.5"}, "k must be int"), ({"online": "maybe"}, "online must be bool"),
                     ({"lambda": "x"}, "lambda must be float"), ({"kind": "c"}, "kind must be one of a, b")]:
        with pytest.raises(ConfigError, match=msg):
            create("scaled", bad)
    with pytest.raises(ConfigError, match="unknown method 'nope'; choose one of"):
        create("nope")
    names = [h[0] for h in hyperparameters(Scaled)]
    assert names == ["lambda", "online", "k", "kind"]


class Hybrid(Compose):
    parts = (Scaled, Doubler)


def test_compose_folds_data_hooks_and_sums_penalties():
    from retain.scenarios import Batch

    c = Compose(Scaled(lambda_=3.0), Doubler())
    b = Batch(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert len(c.augment(None, b)) == 4
    assert float(c.penalty(None, b, None)) == 5.0
    h = Hybrid(**{"lambda": 4.0})  # a registered hybrid takes its parts' hyper-parameters (public names)
    assert h.methods[0].lambda_ == 4.0 and h.params()["lambda"] == 4.0
    assert Hybrid.modes == ("task", "domain", "class")


def test_compose_refuses_two_owners_of_forward():
    class F1(Method):
        def forward(self, ctx, x, t):
            return x

    class F2(Method):
        def forward(self, ctx, x, t):
            return x

    with pytest.raises(ConfigError, match="more than one overrides forward"):
        Compose(F1(), F2())


def test_memory_defaults_to_none_and_compose_sums_its_parts():
    from retain.method import Memory, row_bytes
    from tests.conftest import tiny_split

    sc = tiny_split("class", n_tasks=2)
    assert Method().memory(sc) == Memory(0, 0) and Memory(3, 12).to_dict() == {"rows": 3, "bytes": 12}
    er, der = create("er", {"buffer_size": 7}), create("der", {"buffer_size": 5})
    both = Compose(er, der, create("ewc"))
    assert both.memory(sc) == Memory(12, 7 * row_bytes(sc) + 5 * row_bytes(sc, logits=True))
    assert row_bytes(sc, logits=True) - row_bytes(sc) == 4 * sc.n_outputs  # DER's rows carry their logits
    with pytest.raises(dataclasses.FrozenInstanceError):
        both.memory(sc).rows = 0
