"""iCaRL and GDumb: hand-computed nearest-mean-of-exemplars and herding, GDumb's greedy class-balanced sampler and its
retraining from scratch, and the behaviour of both on split-digits class-IL."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import retain
from retain.buffers import herding
from retain.data import make_synthetic
from retain.method import create
from retain.methods.gdumb import GDumb, GreedyBuffer
from retain.methods.icarl import ICaRL, class_mean, nme_scores
from retain.scenarios import split

# ------------------------------------------------------------------------------------------------------ iCaRL


class _Identity2D(nn.Module):
    """A "model" whose features are its 2-D input, with a head that would predict the opposite class."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.head = nn.Linear(2, 3)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_class_mean_normalises_each_feature_then_the_mean():
    # class 0's exemplars (2, 0) and (0, 5): normalised (1, 0), (0, 1); their mean (.5, .5), re-normalised (1, 1)/√2.
    # Averaging before normalising would give (1, 2.5)/|.|: the larger feature would dominate.
    mu = class_mean(torch.tensor([[2.0, 0.0], [0.0, 5.0]]))
    assert torch.allclose(mu, torch.tensor([1.0, 1.0]) / math.sqrt(2))
    # with flipped exemplars: the two means averaged, then re-normalised
    mu = class_mean(torch.tensor([[1.0, 0.0]]), flipped=torch.tensor([[0.0, 3.0]]))
    assert torch.allclose(mu, torch.tensor([1.0, 1.0]) / math.sqrt(2))


def test_nme_predicts_the_nearest_class_mean_on_a_2d_case():
    r = 1 / math.sqrt(2)
    means = torch.tensor([[r, r], [-1.0, 0.0]])  # class 0: mean of (1, 0), (0, 1); class 1: (-1, 0)
    queries = torch.tensor([[0.6, 0.8], [-0.8, 0.6]])  # unit vectors
    scores = nme_scores(queries, means)
    # ‖(.6, .8) − (r, r)‖² = (.6 − r)² + (.8 − r)² = 0.020101..., ‖(.6, .8) − (−1, 0)‖² = 1.6² + .8² = 3.2
    # ‖(−.8, .6) − (r, r)‖² = (.8 + r)² + (.6 − r)² = 2.28284..., ‖(−.8, .6) − (−1, 0)‖² = .2² + .6² = 0.4
    expected = -torch.tensor([[(0.6 - r) ** 2 + (0.8 - r) ** 2, 3.2], [(0.8 + r) ** 2 + (0.6 - r) ** 2, 0.4]])
    assert torch.allclose(scores, expected, atol=1e-6)
    assert scores.argmax(1).tolist() == [0, 1]

    # through the method's forward in evaluation: φ(x) is normalised (the scale of x does not matter), the classes
    # without exemplars score −inf, and the linear head (which says the opposite) is not used
    method = ICaRL(buffer_size=4)
    method.means, method.mean_classes = means, torch.tensor([0, 1])
    model = _Identity2D().eval()
    ctx = SimpleNamespace(model=model, scenario=SimpleNamespace(n_outputs=3))
    out = method.forward(ctx, queries * torch.tensor([[10.0], [0.1]]), torch.zeros(2, dtype=torch.long))
    assert torch.allclose(out[:, :2], expected, atol=1e-5)
    assert out[:, 2].eq(float("-inf")).all()
    assert out.argmax(1).tolist() == [0, 1]
    assert model(queries).argmax(1).tolist() == [1, 0]  # the head would have got both wrong
    linear = ICaRL(buffer_size=4, classifier="linear")
    linear.means, linear.mean_classes = means, torch.tensor([0, 1])
    assert torch.equal(linear.forward(ctx, queries, torch.zeros(2, dtype=torch.long)), model(queries))
    model.train()  # in training the head is always what the loss sees
    assert torch.equal(method.forward(ctx, queries, torch.zeros(2, dtype=torch.long)), model(queries))


def test_herding_order_on_a_small_set():
    # unit features; class mean μ = (0.64, 0.52). Step k picks the row minimising ‖f − (kμ − Σ chosen)‖:
    #   k=1, target (.64, .52): d² = .40, .64, .08, .16                -> row 2 (.6, .8)
    #   k=2, target (.68, .24): d² = .16, 1.04, —, .08                 -> row 3 (.96, .28)
    #   k=3, target (.36, .48): d² = .64, .40                          -> row 1 (0, 1)
    #   k=4                                                            -> row 0 (1, 0)
    # Row 0 is nearer the mean than row 1 (.40 < .64) yet chosen after it: herding is not nearest-to-mean.
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.96, 0.28]])
    assert herding(f, 4).tolist() == [2, 3, 1, 0]
    assert herding(f, 2).tolist() == [2, 3]
    # iCaRL's features are L2-normalised first: rescaling the rows changes nothing
    assert herding(f * torch.tensor([[3.0], [0.5], [7.0], [2.0]]), 4).tolist() == [2, 3, 1, 0]


class _Recording(ICaRL):
    """iCaRL that keeps a copy of its exemplar sets at every task's end."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.history: list[dict[int, list[int]]] = []

    def end_task(self, ctx):
        super().end_task(ctx)
        self.history.append({c: v.tolist() for c, v in self.exemplars.idx.items()})


def test_icarl_memory_is_split_evenly_and_shrinks_by_dropping_the_last_chosen():
    data = make_synthetic(n_classes=6, n_train=40, n_test=8, dim=8, seed=0)
    sc = split(data, "class", n_tasks=3)
    method = _Recording(buffer_size=13)
    torch.manual_seed(0)
    retain.run(scenario=sc, method=method, hidden=(16,), iterations=10, batch_size=16, lr=0.01, seed=0)
    for task, sets in enumerate(method.history):
        m = 13 // (2 * (task + 1))  # ⌊K / classes seen⌋: 6, 3, 2
        assert sorted(sets) == list(range(2 * (task + 1)))
        assert all(len(v) == m for v in sets.values()), (task, sets)
        assert sum(len(v) for v in sets.values()) <= 13
        if task:
            for c, before in method.history[task - 1].items():
                assert sets[c] == before[:m]  # the first m chosen are kept
    # each exemplar is a training row of its own class
    for c, rows in method.history[-1].items():
        task = method.exemplars.task[c]
        assert sc.targets(sc.y_train[torch.tensor(rows)], task).eq(c).all()
    # the next task would train on its data plus every exemplar
    assert method.memory(sc).rows == 13


def test_icarl_distils_the_old_sigmoids_and_trains_the_new_classes_one_hot():
    # with the previous model equal to the current one, the old outputs' BCE gradient is zero: their targets are
    # the model's own sigmoids; the new outputs see one-hot targets
    sc = split(make_synthetic(n_classes=4, n_train=8, n_test=4, dim=4, seed=0), "class", n_tasks=2)
    model = nn.Linear(4, 4)
    method = ICaRL(buffer_size=4)
    seen = torch.ones(4, dtype=torch.bool)
    ctx = SimpleNamespace(model=model, scenario=sc, task=1, mask=lambda t: seen)
    method.begin_task(ctx)
    x = torch.randn(3, 4)
    batch = SimpleNamespace(x=x, y=torch.tensor([2, 3, 0]), t=torch.tensor([1, 1, 0]), task=None)
    out = model(x).detach().requires_grad_(True)
    method.loss(ctx, batch, out).backward()
    old = sc.task_out[0]
    assert torch.allclose(out.grad[:, old], torch.zeros(3, 2), atol=1e-7)  # even for the exemplar of class 0
    target = torch.nn.functional.one_hot(batch.y, 4).float()
    new_grad = (torch.sigmoid(out.detach()) - target) / out.numel()
    assert torch.allclose(out.grad[:, ~old], new_grad[:, ~old], atol=1e-7)


# ------------------------------------------------------------------------------------------------------ GDumb


def _offer(buf: GreedyBuffer, labels: list[int], g: torch.Generator) -> None:
    y = torch.tensor(labels)
    buf.add(y.float().unsqueeze(1), y, torch.zeros_like(y), generator=g)


def test_greedy_sampler_hand_computed():
    g = torch.Generator().manual_seed(0)
    buf = GreedyBuffer(5)
    _offer(buf, [0, 0, 0, 1, 1], g)  # room for all
    assert buf.counts() == {0: 3, 1: 2}
    _offer(buf, [0, 1], g)  # full; 0 and 1 hold ≥ 5/2 ... 0 has 3 ≥ 2.5, 1 has 2 < 2.5: 1 evicts from 0
    assert buf.counts() == {0: 2, 1: 3}
    _offer(buf, [2], g)  # a new class (0 < 5/3): evicts a random row of the largest, class 1
    assert buf.counts() == {0: 2, 1: 2, 2: 1}
    _offer(buf, [2], g)  # 1 < 5/3: evicts from a largest class (0 or 1, at random)
    assert sorted(buf.counts().values()) == [1, 2, 2] and buf.counts()[2] == 2
    _offer(buf, [2, 2, 2], g)  # 2 ≥ 5/3: not stored
    assert buf.counts()[2] == 2 and len(buf) == 5
    # every stored row is a row that was offered, with its own label
    rows = buf.rows()
    assert torch.equal(rows.x.squeeze(1).long(), rows.y)


@pytest.mark.parametrize("order", ["blocks", "interleaved", "blurry"])
def test_greedy_sampler_counts_differ_by_at_most_one(order):
    """After any stream in which, once the last class has arrived, each class still offers rows until it reaches its
    share (every class-IL stream of tasks larger than the memory does), the class counts differ by at most one and
    the memory is full; before it is full every row is kept, and it never holds more than k."""
    g0 = torch.Generator().manual_seed(1)
    for trial in range(6):
        k = int(torch.randint(7, 40, (1,), generator=g0))
        n_classes = int(torch.randint(2, 9, (1,), generator=g0))
        sizes = torch.randint(1, 3 * k, (n_classes,), generator=g0).tolist()  # some classes smaller than k
        labels = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])
        if order == "interleaved":
            labels = labels[torch.randperm(len(labels), generator=g0)]
        elif order == "blurry":
            labels = labels[torch.argsort(labels.float() + 2.5 * torch.rand(len(labels), generator=g0))]
        tail = torch.arange(n_classes).repeat(k)[torch.randperm(n_classes * k, generator=g0)]  # k more rows each
        buf = GreedyBuffer(k)
        g = torch.Generator().manual_seed(trial)
        offered = 0
        for start in range(0, len(labels), 5):
            _offer(buf, labels[start:start + 5].tolist(), g)
            offered += len(labels[start:start + 5])
            assert len(buf) == min(offered, k)  # kept while there is room, never more than k
        _offer(buf, tail.tolist(), g)
        counts = buf.counts()
        assert len(buf) == k and sum(counts.values()) == k
        assert sorted(counts) == list(range(n_classes))
        assert max(counts.values()) - min(counts.values()) <= 1, (trial, counts)


class _Perturbed(GDumb):
    """GDumb whose model is also pushed around by random SGD steps on the stream (which GDumb never takes)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.after_fit: list[dict[str, torch.Tensor]] = []
        self.perturb = False
        self.noise = torch.Generator().manual_seed(99)  # not ctx.rng: the memory must see the same draws

    def observe(self, ctx, batch):
        loss = super().observe(ctx, batch)
        if self.perturb:
            with torch.no_grad():
                for p in ctx.model.parameters():
                    p.add_(torch.randn(p.shape, generator=self.noise))
        return loss

    def end_task(self, ctx):
        super().end_task(ctx)
        self.after_fit.append(copy.deepcopy(ctx.model.state_dict()))


def test_gdumb_retrains_from_scratch_on_the_memory_alone():
    sc = split(make_synthetic(n_classes=4, n_train=64, n_test=16, dim=8, seed=0), "class", n_tasks=2)
    runs = {}
    for perturb in (False, True):
        method = _Perturbed(buffer_size=24, num_passes=4, batch_size=8)
        method.perturb = perturb
        torch.manual_seed(0)
        result = retain.run(scenario=sc, method=method, hidden=(16,), iterations=6, batch_size=16, lr=0.01, seed=0)
        runs[perturb] = (method, result)
    (plain, r_plain), (pushed, r_pushed) = runs[False], runs[True]
    assert torch.equal(plain.buffer.rows().x, pushed.buffer.rows().x)  # the same memory
    for a, b in zip(plain.after_fit, pushed.after_fit):  # and so the same weights at each evaluation
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert r_plain.accuracy_matrix == r_pushed.accuracy_matrix
    # the weights do change with the memory: the fit after task 1 differs from the one after task 0
    assert not all(torch.equal(plain.after_fit[0][k], plain.after_fit[1][k]) for k in plain.after_fit[0])
    # masking at test: after task 0 only classes 0 and 1 are in memory, so task 1's test rows are all wrong
    assert r_plain.accuracy_matrix[0][1] == 0.0
    assert r_plain.accuracy_matrix[0][0] > 0.5


def test_gdumb_task_free_retrains_before_each_evaluation():
    sc = split(make_synthetic(n_classes=4, n_train=64, n_test=16, dim=8, seed=0), "class", n_tasks=2)
    method = create("gdumb", {"buffer_size": 24, "num_passes": 8, "batch_size": 8})
    torch.manual_seed(0)
    result = retain.run(scenario=sc, method=method, hidden=(16,), batch_size=16, lr=0.01, seed=0, task_free=True)
    assert result.accuracy_matrix[0][1] == 0.0  # masked: task 1's classes are not in memory yet
    assert min(result.accuracy_matrix[1]) > 0.5  # retrained on the balanced memory of all four classes
    assert not method.stale and sorted(method.buffer.counts().values()) == [6, 6, 6, 6]


# --------------------------------------------------------------------------------------------------- behaviour


@pytest.fixture(scope="module")
def finetune_acc() -> float:
    return retain.run(benchmark="split-digits", mode="class", method="finetune", seed=0).metrics["acc"]


@pytest.mark.parametrize("name", ["icarl", "gdumb"])
def test_beats_finetuning_on_split_digits_class_il(name, finetune_acc):
    acc = retain.run(benchmark="split-digits", mode="class", method=name, seed=0).metrics["acc"]
    assert acc >= finetune_acc + 0.15, (name, acc, finetune_acc)
