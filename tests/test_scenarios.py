"""Scenarios: tasks partition the data; the mode changes only the target and the mask; transforms per batch."""

import pytest
import torch

from retain import scenarios
from retain.data import Arrays, make_synthetic, pad
from retain.errors import ConfigError

from .conftest import tiny_split


def _digits_like(n=200, classes=10, shape=(1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % classes
    return Arrays("fake", x, y, x[: n // 2].clone(), y[: n // 2].clone(), classes)


def test_split_tasks_partition_the_data():
    data = _digits_like()
    sc = scenarios.split(data, "class", n_tasks=5, val_fraction=0.2)
    train = torch.cat([torch.cat([t.train_idx, t.val_idx]) for t in sc.tasks])
    assert sorted(train.tolist()) == list(range(len(data.y_train)))  # every sample in exactly one task
    test = torch.cat([t.test_idx for t in sc.tasks])
    assert sorted(test.tolist()) == list(range(len(data.y_test)))
    for task in sc.tasks:
        assert set(data.y_train[task.train_idx].tolist()) == set(task.classes)
        assert set(task.val_idx.tolist()).isdisjoint(task.train_idx.tolist())
        n = len(task.train_idx) + len(task.val_idx)
        assert len(task.val_idx) == round(0.2 * n)


def test_label_maps_per_mode():
    data = _digits_like()
    order = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]
    cls = scenarios.split(data, "class", n_tasks=5, class_order=order)
    tsk = scenarios.split(data, "task", n_tasks=5, class_order=order)
    dom = scenarios.split(data, "domain", n_tasks=5, class_order=order)
    assert cls.tasks[1].classes == [4, 0] and cls.n_outputs == 10
    # class-IL: position in the global class order
    assert cls.targets(torch.tensor([4, 0]), 1).tolist() == [2, 3]
    # task-IL: head offset + position within the task
    assert tsk.targets(torch.tensor([4, 0]), 1).tolist() == [2, 3] and tsk.n_outputs == 10
    assert tsk.targets(torch.tensor([5, 9]), 2).tolist() == [4, 5]
    # domain-IL: position within the task, two shared outputs
    assert dom.targets(torch.tensor([4, 0]), 1).tolist() == [0, 1] and dom.n_outputs == 2


def test_masks_per_mode_are_the_same_in_training_and_evaluation():
    tsk = tiny_split("task", n_tasks=2)
    m = tsk.mask(torch.tensor([0, 1, 1]))
    assert m.tolist() == [[True, True, False, False], [False, False, True, True], [False, False, True, True]]
    seen = torch.tensor([True, True, False, False])
    assert torch.equal(tsk.mask(1, seen), tsk.mask(1))  # task-IL: the task's head, training or not
    cls = tiny_split("class", n_tasks=2)
    assert torch.equal(cls.mask(0, seen), seen)  # class-IL training: seen classes
    assert cls.mask(0) is None  # class-IL evaluation: all classes
    dom = tiny_split("domain", n_tasks=2)
    assert dom.mask(0, seen) is None and dom.mask(1) is None


def test_task_il_is_really_multi_head():
    """The masked loss gives exactly zero gradient to other tasks' heads (equivalent to separate heads)."""
    from retain.models import MLP
    from retain.trainer import masked

    sc = tiny_split("task", n_tasks=2)
    model = MLP(8, sc.n_outputs, (16,))
    b = sc.batch(sc.tasks[1].train_idx[:8], 1)
    loss = torch.nn.functional.cross_entropy(masked(model(b.x), sc.mask(1)), b.y)
    loss.backward()
    assert model.head.weight.grad[:2].abs().sum() == 0  # task 0's head untouched
    assert model.head.weight.grad[2:].abs().sum() > 0


def test_task_order_and_errors():
    data = _digits_like()
    sc = scenarios.split(data, "class", n_tasks=5, task_order=[4, 3, 2, 1, 0])
    assert sc.tasks[0].classes == [8, 9]
    with pytest.raises(ConfigError, match="tasks"):
        scenarios.split(data, "class", n_tasks=11)
    with pytest.raises(ConfigError, match="at least 1"):
        scenarios.split(data, "class", n_tasks=0)
    with pytest.raises(ConfigError, match="mode"):
        scenarios.split(data, "classy", n_tasks=5)
    with pytest.raises(ConfigError, match="permutation"):
        scenarios.split(data, "class", n_tasks=5, task_order=[0, 0, 1, 2, 3])
    with pytest.raises(ConfigError, match="needs"):
        scenarios.split(data, "class", n_tasks=4, classes_per_task=3)


def test_uint8_images_are_scaled_per_batch_and_stored_once():
    data = _digits_like()
    sc = scenarios.split(data, "class", n_tasks=5)
    assert sc.x_train.dtype == torch.uint8 and sc.x_train.data_ptr() == data.x_train.data_ptr()
    b = sc.batch(torch.tensor([0, 1]), 0)
    assert torch.allclose(b.x, data.x_train[:2].float() / 255)


def test_permuted_applies_one_stored_permutation_per_task():
    data = _digits_like()
    sc = scenarios.permuted(data, "domain", n_tasks=3, seed=1)
    idx = torch.arange(6)
    plain = data.x_train[idx].float().div(255).view(6, -1)
    assert torch.equal(sc.batch(idx, 0).x.view(6, -1), plain)  # task 0 unpermuted
    perm = sc.transform_params[2]
    assert torch.equal(sc.batch(idx, 2).x.view(6, -1), plain[:, perm])
    assert not torch.equal(sc.transform_params[1], sc.transform_params[2])
    mixed = sc.batch(idx, torch.tensor([0, 2, 1, 2, 0, 1]))  # rows of different tasks in one batch
    for row, t in enumerate([0, 2, 1, 2, 0, 1]):
        assert torch.equal(mixed.x[row].view(-1), plain[row, sc.transform_params[t]])
    # every task has all classes; class-IL gives each task its own block of outputs
    cls = scenarios.permuted(data, "class", n_tasks=3)
    assert cls.n_outputs == 30 and cls.targets(torch.tensor([7]), 2).tolist() == [27]


def test_rotated_by_zero_is_identity_and_by_90_is_rot90():
    x = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    x[0, 0, 1, 2] = 255
    data = Arrays("r", x, torch.zeros(1, dtype=torch.long), x, torch.zeros(1, dtype=torch.long), 1)
    sc = scenarios.rotated(data, "domain", n_tasks=2, angles=[0, 90])
    base = x.float() / 255
    assert torch.allclose(sc.batch(torch.tensor([0]), 0).x, base, atol=1e-6)
    rot = sc.batch(torch.tensor([0]), 1).x
    assert any(torch.allclose(rot, torch.rot90(base, k, dims=(2, 3)), atol=1e-5) for k in (1, 3))


def test_task_free_stream_covers_everything_once():
    sc = tiny_split("class", n_tasks=3)
    g = torch.Generator().manual_seed(0)
    batches = list(sc.stream(10, g))
    idx = torch.cat([b[0] for b in batches])
    t = torch.cat([b[1] for b in batches])
    all_idx = torch.cat([task.train_idx for task in sc.tasks])
    assert sorted(idx.tolist()) == sorted(all_idx.tolist())
    assert torch.all(t[1:] >= t[:-1])  # sharp boundaries: tasks in order
    assert batches[-1][2] == 3  # every task passed by the end
    blurry = list(sc.stream(10, torch.Generator().manual_seed(0), blurry=0.4))
    tb = torch.cat([b[1] for b in blurry])
    assert sorted(torch.cat([b[0] for b in blurry]).tolist()) == sorted(all_idx.tolist())
    assert (tb[1:] < tb[:-1]).any()  # transitions are blurred: some later-task samples come early


def test_from_tensors_and_from_dataset_agree():
    data = make_synthetic(n_classes=4, n_train=8, n_test=4)
    a = scenarios.from_tensors(data.x_train, data.y_train, data.x_test, data.y_test, "task", n_tasks=2)
    ds_train = torch.utils.data.TensorDataset(data.x_train, data.y_train)
    ds_test = torch.utils.data.TensorDataset(data.x_test, data.y_test)
    b = scenarios.from_dataset(ds_train, ds_test, "task", n_tasks=2)
    assert [t.classes for t in a.tasks] == [t.classes for t in b.tasks] == [[0, 1], [2, 3]]
    assert torch.equal(a.x_train, b.x_train)
    with pytest.raises(ConfigError, match="labels"):
        scenarios.from_tensors(data.x_train, data.y_train[:-1], data.x_test, data.y_test)


def test_pad_adds_a_zero_border_that_the_permutation_then_spreads():
    """van de Ven's loader pads MNIST to 32x32 before permuting: the border is zeros, the interior is the image,
    and the permutation runs over every padded position."""
    data = _digits_like()
    padded = pad(data, 2)
    assert padded.x_train.shape[1:] == (1, 12, 12) and padded.x_test.shape[1:] == (1, 12, 12)
    assert torch.equal(padded.x_train[:, :, 2:10, 2:10], data.x_train)
    border = padded.x_train.clone()
    border[:, :, 2:10, 2:10] = 0
    assert int(border.abs().sum()) == 0
    assert pad(data, 0) is data
    sc = scenarios.permuted(padded, "domain", n_tasks=3, seed=1)
    assert sc.transform_params.shape == (3, 144) and sc.input_shape == (1, 12, 12)
    x = sc.batch(torch.arange(4), 2).x.view(4, -1)
    assert (x == 0).sum(1).min() >= 144 - 64  # at most the 64 image pixels are non-zero, wherever they went
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="pad must be a whole number of pixels"):
            pad(data, bad)
    with pytest.raises(ConfigError, match="pad needs image data"):
        pad(make_synthetic(), 2)
