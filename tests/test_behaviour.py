"""Behaviour on real data: catastrophic forgetting shows, and joint training does not forget."""

import pytest

import retain


@pytest.fixture(scope="module")
def class_il():
    return {m: retain.run(benchmark="split-digits", mode="class", method=m, seed=0) for m in ("finetune", "joint")}


def test_finetune_forgets_in_class_il(class_il):
    m = class_il["finetune"].metrics
    assert 0.15 <= m["acc"] <= 0.25  # near 1/T: only the last task is remembered
    assert m["learning_acc"] > 0.9  # each task was learned...
    assert m["bwt"] < -0.85  # ...and then forgotten


def test_joint_does_not_forget(class_il):
    m = class_il["joint"].metrics
    assert m["acc"] > 0.9 and m["bwt"] > -0.05


def test_task_il_is_easier_than_class_il(class_il):
    task = retain.run(benchmark="split-digits", mode="task", method="finetune", seed=0)
    assert task.metrics["acc"] > class_il["finetune"].metrics["acc"] + 0.4


def test_split_mnist_subset_forgets(mnist_dir):
    """Real MNIST, a short budget: fine-tuning in class-IL ends near 1/T."""
    r = retain.run(benchmark="split-mnist", mode="class", method="finetune", iterations=100, data_dir=mnist_dir)
    assert r.metrics["acc"] < 0.25 and r.metrics["learning_acc"] > 0.95
