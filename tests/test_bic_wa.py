"""BiC and WA: the bias layer's closed effect, its training on the validation part only, WA's aligned norms, the
weighted distillation, the class-balanced exemplar memory; and both beat fine-tuning on split-digits class-IL."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import retain
from retain import scenarios
from retain.data import make_synthetic
from retain.methods.bic import BiC, apply_correction, fit_bias, weighted_distillation
from retain.methods.wa import WA, align_weights
from retain.models import MLP
from retain.scenarios import Batch


def tiny(n_train: int = 64) -> scenarios.Scenario:
    data = make_synthetic(n_classes=8, n_train=n_train, n_test=16, dim=16, spread=1.5, seed=0)
    return scenarios.split(data, "class", n_tasks=2)


RUN = {"hidden": (32,), "iterations": 30, "batch_size": 16, "lr": 0.01, "seed": 0}


# ----------------------------------------------------------------------------------------------------- BiC

def test_bias_layer_rescales_only_the_new_logits():
    z = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, -2.0]])
    new = torch.tensor([False, False, True, True])
    out = apply_correction(z, (new, torch.tensor(2.0), torch.tensor(-1.0)))
    # old logits untouched; new = 2 z - 1
    assert torch.equal(out, torch.tensor([[1.0, 2.0, 5.0, 7.0], [-1.0, 0.5, -1.0, -5.0]]))
    assert torch.equal(apply_correction(z, None), z)


def test_forward_applies_the_correction_at_evaluation_only():
    method = BiC()
    model = nn.Linear(2, 3)
    ctx = SimpleNamespace(model=model)
    x = torch.randn(5, 2)
    method.correction = (torch.tensor([False, False, True]), torch.tensor(0.5), torch.tensor(3.0))
    model.train()
    raw = method.forward(ctx, x, torch.zeros(5, dtype=torch.long))
    assert torch.equal(raw, model(x))
    model.eval()
    corrected = method.forward(ctx, x, torch.zeros(5, dtype=torch.long))
    assert torch.equal(corrected[:, :2], raw[:, :2])
    assert torch.allclose(corrected[:, 2], 0.5 * raw[:, 2] + 3.0)


def test_fit_bias_removes_a_bias_toward_the_new_classes():
    # outputs 0, 1 old, 2, 3 new; every new logit is 2 too high: the old rows are all predicted new before
    z = torch.tensor([[3.0, 0.0, 4.0, 1.0], [0.0, 3.0, 1.0, 4.0],     # old classes 0, 1 (true logit 3, new 4)
                      [0.0, 1.0, 5.0, 2.0], [1.0, 0.0, 2.0, 5.0]])    # new classes 2, 3
    y = torch.tensor([0, 1, 2, 3])
    new = torch.tensor([False, False, True, True])
    seen = torch.ones(4, dtype=torch.bool)
    assert (z.argmax(1) == y).float().mean() == 0.5
    alpha, beta = fit_bias(z, y, new, seen, epochs=300, batch_size=4, lr=0.05, generator=torch.Generator())
    q = apply_correction(z, (new, alpha, beta))
    assert torch.equal(q.argmax(1), y)
    assert torch.equal(q[:, :2], z[:, :2])  # the old logits are never changed


class Recording(BiC):
    """BiC that records, per task, the training data it returned and the model before and after stage 2."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.trained_on: list[torch.Tensor] = []
        self.stage2: list[tuple[dict, dict, torch.Tensor]] = []

    def task_data(self, ctx, data):
        out = super().task_data(ctx, data)
        self.trained_on.append(out.idx.clone())
        return out

    def train_bias(self, ctx):
        before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
        got = super().train_bias(ctx)
        self.stage2.append((before, {k: v.clone() for k, v in ctx.model.state_dict().items()}, self.val.idx.clone()))
        return got


def test_bias_stage_trains_on_the_validation_part_only_and_freezes_the_model():
    sc = tiny()
    method = Recording(buffer_size=40, val_fraction=0.2, bias_epochs=5)
    retain.run(scenario=sc, method=method, **RUN)
    assert len(method.stage2) == 1  # only from the second task on
    before, after, val = method.stage2[0]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # validation part: ⌊0.2 · 40 / 4⌋ = 2 rows of each of the 4 old and 4 new classes, none of them trained on
    labels = sc.y_train[val]
    assert sorted(torch.bincount(labels, minlength=8).tolist()) == [2] * 8
    assert not torch.isin(val, method.trained_on[1]).any()
    # stage 1 of task 2: the task's data less its 8 held-out rows, plus the 40 - 8 other exemplars
    assert len(method.trained_on[1]) == len(sc.tasks[1].train_idx) - 8 + 40 - 8
    assert method.lam == pytest.approx(4 / 8)
    new, alpha, beta = method.correction
    assert torch.equal(new, sc.task_out[1]) and (float(alpha), float(beta)) != (1.0, 0.0)


def test_mammoth_weighting_reverses_the_papers_lambda():
    paper, mammoth = BiC(bias_epochs=1), BiC(bias_epochs=1, weighting="mammoth")
    for m in (paper, mammoth):
        retain.run(scenario=tiny(), method=m, **RUN)
    assert (paper.kd_weight, paper.ce_weight) == (0.5, 0.5)  # λ = 4 / (4 + 4)
    assert (mammoth.kd_weight, mammoth.ce_weight) == (2.0, 0.5)  # T² / (t + 1), t / (t + 1) at t = 1


def test_exemplar_memory_is_class_balanced_with_the_total_budget():
    sc = tiny()
    method = BiC(buffer_size=20, bias_epochs=1)
    retain.run(scenario=sc, method=method, **RUN)
    counts = {c: len(idx) for c, idx in method.exemplars.idx.items()}
    assert counts == method.exemplars.shares(list(range(8))) == {0: 3, 1: 3, 2: 3, 3: 3, 4: 2, 5: 2, 6: 2, 7: 2}
    for c, idx in method.exemplars.idx.items():
        task = method.exemplars.task[c]
        assert torch.equal(sc.targets(sc.y_train[idx], task), torch.full((len(idx),), c))
    assert method.memory(sc).rows == 20


def test_weighted_distillation_makes_the_loss_a_convex_mix():
    # two old outputs: student logits (0, 0), teacher (0, 2 ln 3): at T = 2 q = (1/4, 3/4), p = (1/2, 1/2)
    out = torch.tensor([[0.0, 0.0, 1.0]])
    teacher = torch.tensor([[0.0, 2 * math.log(3), 0.0]])
    batch = Batch(torch.zeros(1, 1), torch.tensor([2]), torch.zeros(1, dtype=torch.long))
    ctx = SimpleNamespace(loss=lambda o, b: F.cross_entropy(o, b.y))
    ce = F.cross_entropy(out, batch.y)
    kd = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    old = torch.tensor([True, True, False])
    total = ce + weighted_distillation(ctx, out, batch, teacher, old, 2 / 3, 1 / 3, 2.0)
    assert float(total) == pytest.approx(float(ce) / 3 + 2 / 3 * kd, abs=1e-6)


# ------------------------------------------------------------------------------------------------------- WA

def test_weight_aligning_equalises_the_mean_norms():
    head = nn.Linear(2, 5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0],      # old rows: norms 1, 3 (mean 2)
                                        [0.0, 4.0], [6.0, 8.0],      # new rows: norms 4, 10 (mean 7)
                                        [-5.0, 5.0]]))               # a class not seen yet
    bias = head.bias.detach().clone()
    old = torch.tensor([True, True, False, False, False])
    new = torch.tensor([False, False, True, True, False])
    gamma = align_weights(head, old, new)
    assert gamma == pytest.approx(2 / 7)
    w = head.weight.detach()
    assert torch.allclose(w[2:4], torch.tensor([[0.0, 8 / 7], [12 / 7, 16 / 7]]))
    assert w[new].norm(dim=1).mean() == pytest.approx(float(w[old].norm(dim=1).mean()))
    assert torch.equal(w[:2], torch.tensor([[1.0, 0.0], [0.0, 3.0]])) and torch.equal(w[4], torch.tensor([-5.0, 5.0]))
    assert torch.equal(head.bias.detach(), bias)


def test_weight_clipping_spares_the_classes_not_seen():
    model = SimpleNamespace(head=nn.Linear(2, 3))
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[-1.0, 2.0], [3.0, -4.0], [-5.0, -6.0]]))
    ctx = SimpleNamespace(model=model, seen=torch.tensor([True, True, False]))
    WA().after_update(ctx, None, None)
    assert torch.equal(model.head.weight.detach(), torch.tensor([[0.0, 2.0], [3.0, 0.0], [-5.0, -6.0]]))


def test_wa_run_aligns_after_the_second_task():
    sc = tiny()
    method = WA(buffer_size=20)
    model = MLP(16, sc.n_outputs, (32,))
    result = retain.run(scenario=sc, model=model, method=method, **{k: v for k, v in RUN.items() if k != "hidden"})
    assert len(method.gammas) == 1 and method.gammas[0] > 0
    w = model.head.weight.detach()
    old, new = sc.task_out[0], sc.task_out[1]
    assert float(w[new].norm(dim=1).mean()) == pytest.approx(float(w[old].norm(dim=1).mean()), rel=1e-5)
    assert (w >= 0).all()  # every class is seen by the end: all rows clipped, and γ > 0 keeps them so
    assert method.lam == pytest.approx(4 / 8) and method.memory(sc).rows == 20
    assert result.accuracy_matrix[-1][-1] > 0.5


# ------------------------------------------------------------------------------------------------ behaviour

@pytest.fixture(scope="module")
def digits():
    return {m: retain.run(benchmark="split-digits", mode="class", method=m, seed=0).metrics["acc"]
            for m in ("finetune", "bic", "wa")}


@pytest.mark.parametrize("name", ["bic", "wa"])
def test_beats_finetuning_on_split_digits_class_il(digits, name):
    assert digits[name] >= digits["finetune"] + 0.4, digits  # about 0.9 against 0.19


def test_the_mammoth_diagnostic_of_bic_keeps_mammoths_memory_and_split(monkeypatch):
    """benchmarks/bic_mammoth.py (the docs' explanation of the gap to Mammoth): a task-wise reservoir memory,
    ``size // t`` rows a task label after the shrink, and a validation part of memory rows held out at random plus
    as many new rows, none of them in the task's training set."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bic_mammoth

    seen: list[dict] = []

    class Probe(bic_mammoth.MammothBiC):
        def task_data(self, ctx, data):
            out = super().task_data(ctx, data)
            if ctx.task > 0:
                from_memory = torch.isin(self.val.idx, self.mem_idx).sum().item()
                seen.append({"task": ctx.task, "val": len(self.val), "from_memory": from_memory,
                             "overlap": torch.isin(self.val.idx, out.idx).sum().item(),
                             "train": len(out), "data": len(data), "memory": len(self.mem_idx)})
            return out

        def build_buffer(self, ctx):
            super().build_buffer(ctx)
            counts = torch.bincount(self.mem_label + 1).tolist()
            seen.append({"task": ctx.task, "labels": counts, "size": len(self.mem_idx)})

    sc = tiny(n_train=96)  # 2 tasks of 4 classes
    retain.run(scenario=sc, method=Probe(buffer_size=40, bias_epochs=2, weighting="mammoth"), **RUN)
    end0, split1, end1 = seen
    assert end0 == {"task": 0, "labels": [40], "size": 40}  # the whole buffer of task 0, Mammoth's label -1
    assert split1["val"] == 2 * split1["from_memory"] and split1["from_memory"] > 0
    assert split1["overlap"] == 0  # nothing validated on is trained on
    assert split1["train"] + split1["val"] == split1["data"] + split1["memory"]
    # end of task 1: 40 // 1 rows offered to the full reservoir: some replace task 0's slots, the size stays 40
    assert end1["size"] == 40 and len(end1["labels"]) == 2 and end1["labels"][1] > 0


def test_the_mammoth_diagnostic_of_bic_shrinks_by_task_label(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bic_mammoth

    m = bic_mammoth.MammothBiC(buffer_size=12)
    m.mem_idx, m.mem_t = torch.arange(12), torch.zeros(12, dtype=torch.long)
    m.mem_label = torch.tensor([-1, 0, -1, 0, -1, 0, -1, 0, -1, -1, -1, -1])
    m.seen_rows = 500
    ctx = SimpleNamespace(task=2, rng=torch.Generator().manual_seed(0), scenario=None)
    m.train_part = scenarios.TaskData(torch.arange(100, 102), torch.full((2,), 2))
    m.build_buffer(ctx)
    # 12 // 2 = 6 per label: label -1 keeps its first six slots (0, 2, 4, 6, 8, 9), label 0 its four (1, 3, 5, 7);
    # the reservoir count restarts at 10, so the task's two rows fill the two free slots, labelled 1
    assert m.mem_idx.tolist() == [0, 2, 4, 6, 8, 9, 1, 3, 5, 7, 100, 101] or \
        m.mem_idx.tolist() == [0, 2, 4, 6, 8, 9, 1, 3, 5, 7, 101, 100]
    assert m.mem_label.tolist() == [-1] * 6 + [0] * 4 + [1, 1] and m.seen_rows == 12
    assert m.mem_t[-2:].tolist() == [2, 2]
