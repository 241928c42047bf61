"""The step's options (issue 19): mixed precision, channels-last, torch.compile, the reduced per-class protocol,
``--model`` for ``--arch``, and the hash policy of the options added after stores were written.

Each option enters once, in :mod:`retain.config`; these tests run it through :func:`retain.run` on the bundled
digits (seconds) and check what it does to the numbers: nothing beyond rounding for channels-last and compile, a
close result for bf16 / fp16, the exact rows for the per-class reduction.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import retain
from retain import config as cfg
from retain.cli import main
from retain.config import resolve
from retain.errors import ConfigError
from retain.scenarios import from_tensors, per_class

TINY = {"benchmark": "split-digits", "mode": "task", "n_tasks": 2, "iterations": 60, "hidden": (32,)}


def _last_row(**kw) -> list[float]:
    return retain.run(**{**TINY, **kw}).accuracy_matrix[-1]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_fp32(precision):
    fp32 = _last_row()
    low = _last_row(precision=precision)
    assert all(math.isfinite(a) for a in low)
    assert sum(low) / 2 > 0.8  # it learned (two tasks of two digits each, task-IL)
    assert max(abs(a - b) for a, b in zip(fp32, low)) < 0.15


def test_fp16_uses_a_gradient_scaler_and_bf16_does_not():
    from retain.trainer import TrainConfig, Trainer

    sc = retain.benchmarks.scenario("split-digits", n_tasks=1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    method = retain.method.create("finetune")
    fp16 = Trainer(sc, method, model, TrainConfig(precision="fp16", device="cpu"))
    bf16 = Trainer(sc, method, model, TrainConfig(precision="bf16", device="cpu"))
    assert isinstance(fp16.ctx.scaler, torch.amp.GradScaler) and bf16.ctx.scaler is None
    with bf16.ctx.autocast():
        assert model(torch.randn(2, 1, 8, 8)).dtype == torch.bfloat16


def test_a_method_with_its_own_step_refuses_mixed_precision():
    with pytest.raises(ConfigError, match=r"--precision bf16: mer takes its own training step.*--precision fp32"):
        resolve(benchmark="split-digits", method="mer", precision="bf16")
    resolve(benchmark="split-digits", method="ewc+er", precision="bf16")  # the shared step: fine


def test_channels_last_and_compile_change_nothing_but_speed():
    x = torch.randint(0, 255, (60, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(60) % 4
    sc = from_tensors(x, y, x, y, mode="class", n_tasks=2)

    def conv():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                   torch.nn.Linear(144, 4))

    plain = retain.run(scenario=sc, model=conv(), iterations=5, batch_size=16, seed=0)
    last = retain.run(scenario=sc, model=conv(), iterations=5, batch_size=16, seed=0, channels_last=True)
    assert sum(plain.accuracy_matrix, []) == pytest.approx(sum(last.accuracy_matrix, []), abs=1e-6)
    # the hash ignores options that change only the speed, so a store counts these as the same run
    assert cfg.hashed(resolve(benchmark="split-digits", channels_last=True, compile=True, eval_batch_size=10)
                      .spec()) == cfg.hashed(resolve(benchmark="split-digits").spec())


def test_compile_trains_the_same_model():
    plain = _last_row(iterations=5)
    compiled = _last_row(iterations=5, compile=True)
    assert plain == pytest.approx(compiled, abs=1e-6)


def test_per_class_keeps_the_first_rows_of_each_class_in_the_data_order():
    y = torch.tensor([1, 0, 1, 0, 1, 0, 3, 2, 2, 3, 3, 2])
    x = torch.arange(len(y), dtype=torch.float32).view(-1, 1)
    sc = per_class(from_tensors(x, y, x, y, mode="class", n_tasks=2), train=2, test=1)
    assert sc.tasks[0].train_idx.tolist() == [0, 1, 2, 3]  # class 1: rows 0, 2; class 0: rows 1, 3
    assert sc.tasks[1].train_idx.tolist() == [6, 7, 8, 9]
    assert sc.tasks[0].test_idx.tolist() == [0, 1] and sc.tasks[1].test_idx.tolist() == [6, 7]
    assert "reduced to the first 2 training images per class, the first 1 test images per class" in repr(sc)


def test_a_reduced_run_says_so_and_hashes_apart():
    r = retain.run(**TINY, train_per_class=10, test_per_class=5)
    assert "reduced to the first 10 training images per class" in r.scenario
    assert "100 training rows" in r.scenario and "50 test rows" in r.scenario  # 10 classes: 10 and 5 each
    assert cfg.hashed(resolve(benchmark="split-digits", train_per_class=10).spec()) != \
        cfg.hashed(resolve(benchmark="split-digits").spec())


def test_new_options_at_their_neutral_values_keep_earlier_hashes():
    base = cfg.hashed(resolve(benchmark="split-digits").spec())
    assert cfg.hashed(resolve(benchmark="split-digits", augment="none", precision="fp32", devices=1).spec()) == base
    assert "augment" not in base and "precision" not in base


def test_model_is_a_flag_for_arch(capsys):
    assert main(["run", "--model", "resnet18-reduced", "--benchmark", "split-digits", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["arch"] == "resnet18-reduced"
    assert main(["run", "--model", "vgg", "--dry-run"]) == 2
    assert ("unknown arch 'vgg'; choose one of mlp, convnet, resnet18, resnet18-reduced, resnet32"
            in capsys.readouterr().err)


def test_the_record_has_gpu_memory_only_on_a_gpu():
    r = retain.run(**TINY, device="cpu")
    assert r.gpu_memory_mb is None and "gpu_memory_mb" in r.to_dict()


def test_augmenting_permuted_pixels_is_refused():
    x = torch.randint(0, 255, (40, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(40) % 2
    sc = retain.scenarios.permuted(retain.data.Arrays("toy", x, y, x, y, 2), n_tasks=2)
    with pytest.raises(ConfigError, match="permuted pixels, which are no longer an image; use --augment none"):
        retain.run(scenario=sc, augment="crop-flip", iterations=1)


def test_a_class_il_run_also_scores_each_task_within_its_own_classes():
    """Mammoth's tables report "Task-IL" of the class-IL model; the record keeps it beside R, from the same
    forward pass: never below the class-IL accuracy, and equal to the argmax over the task's own outputs."""
    r = retain.run(benchmark="split-digits", mode="class", n_tasks=2, iterations=40, hidden=(32,))
    til = r.task_il_matrix
    assert len(til) == 2 and all(w >= c - 1e-12 for w, c in zip(sum(til, []), sum(r.accuracy_matrix, [])))
    assert til[0][0] == r.accuracy_matrix[0][0] or til[0][0] > r.accuracy_matrix[0][0]
    assert "within each task's classes" in r.table()
    assert retain.run(**TINY).task_il_matrix is None  # a task-IL run is scored within its tasks already


def test_a_preset_sets_the_protocols_learning_rate_under_the_users():
    """P5's best arguments differ per method (DER lr 0.03, ER 0.1): the preset carries the run's lr, over the
    benchmark's default and under the user's; it is not a method parameter."""
    assert resolve(benchmark="seq-cifar10", method="der").config.lr == 0.03
    assert resolve(benchmark="seq-cifar10", method="er").config.lr == 0.1  # the benchmark's
    assert resolve(benchmark="seq-cifar10", method="der", lr=0.5).config.lr == 0.5
    assert resolve(benchmark="seq-cifar10", method="der").config.params["alpha"] == 0.3
    assert resolve(benchmark="split-digits", method="der").config.lr == 1e-3  # no such preset there
    with pytest.raises(ConfigError, match="der: unknown parameter 'lr'"):
        resolve(benchmark="seq-cifar10", method="der", params={"lr": 0.1})
