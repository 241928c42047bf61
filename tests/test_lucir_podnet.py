"""LUCIR and PODNet: hand-computed cases of their maths, and both beating fine-tuning on split-digits class-IL."""

import math

import pytest
import torch
from torch import nn

import retain
from retain.methods.lucir import CosineHead, margin_ranking, merge_proxies
from retain.methods.podnet import nca, pod_flat, pod_spatial, pooled, run_with_maps, stage_modules
from retain.models import MLP, ResNet18, ResNet32

# ------------------------------------------------------------------------------------------------- LUCIR

def test_cosine_classifier_is_sigma_times_the_cosine():
    head = CosineHead(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))  # directions (1, 0) and (1, 1)/sqrt(2)
        head.sigma.fill_(4.0)
    f = torch.tensor([[3.0, 0.0], [0.0, 5.0]])
    expected = 4.0 * torch.tensor([[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]])
    assert torch.allclose(head(f), expected)
    assert torch.allclose(head(10 * f), expected)  # the scale of the embedding does not matter
    assert torch.allclose(head.cosine(f), expected / 4)


def test_margin_ranking_loss_on_a_tiny_case():
    # outputs 0, 1 old; 2, 3, 4 new. Row 0 (class 0): gt 0.9, new cosines 0.7, 0.1, 0.5 -> top-2 0.7, 0.5:
    # max(0, 0.5 - 0.9 + 0.7) = 0.3, max(0, 0.5 - 0.9 + 0.5) = 0.1. Row 1 (class 1): gt 0.2, new 0.0, 0.3, -0.4 ->
    # top-2 0.3, 0.0: 0.6, 0.3. Row 2 is of a new class: not an anchor. Mean over the 4 pairs: 1.3 / 4.
    cos = torch.tensor([[0.9, 0.0, 0.7, 0.1, 0.5],
                        [0.1, 0.2, 0.0, 0.3, -0.4],
                        [0.0, 0.0, 0.9, 0.0, 0.0]])
    y = torch.tensor([0, 1, 2])
    old = torch.tensor([True, True, False, False, False])
    loss = margin_ranking(cos, y, old, ~old, K=2, margin=0.5)
    assert loss.item() == pytest.approx(1.3 / 4)
    ref = nn.MarginRankingLoss(margin=0.5)(torch.tensor([0.9, 0.9, 0.2, 0.2]), torch.tensor([0.7, 0.5, 0.3, 0.0]),
                                           torch.ones(4))
    assert loss.item() == pytest.approx(ref.item())
    assert margin_ranking(cos, torch.tensor([2, 3, 4]), old, ~old, K=2, margin=0.5).item() == 0  # no exemplar


# ------------------------------------------------------------------------------------------------- PODNet

def test_pod_spatial_pooling_by_hand():
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # [B=1, C=1, H=2, W=2]
    # squares 1 4 / 9 16: summed over the width (per row) 5, 25; over the height (per column) 10, 20
    assert torch.equal(pooled(a), torch.tensor([[5.0, 25.0, 10.0, 20.0]]))
    b = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # pooled: 1, 0, 1, 0
    u = torch.tensor([5.0, 25.0, 10.0, 20.0]) / math.sqrt(25 + 625 + 100 + 400)
    v = torch.tensor([1.0, 0.0, 1.0, 0.0]) / math.sqrt(2)
    assert pod_spatial([a], [b]).item() == pytest.approx((u - v).norm().item(), rel=1e-6)
    # two maps: the mean of the two distances; zero when old == new
    assert pod_spatial([a, a], [b, a]).item() == pytest.approx((u - v).norm().item() / 2, rel=1e-6)
    x = torch.randn(3, 4, 5, 6)
    assert pod_spatial([x], [x.clone()]).item() == 0
    assert pod_spatial([x], [2 * x]).item() == pytest.approx(0, abs=1e-6)  # normalised: the scale does not count


def test_pod_on_a_1d_map_is_the_normalised_squared_activations():
    h_old, h_new = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.0, 2.0, 1.0]])
    # squares 1 4 0 and 0 4 1, each / sqrt(17): distance sqrt(2) / sqrt(17); the same as the [B, C, 1, 1] map
    assert pod_spatial([h_old], [h_new]).item() == pytest.approx(math.sqrt(2 / 17), rel=1e-6)
    as_map = pod_spatial([h_old[:, :, None, None]], [h_new[:, :, None, None]])
    assert as_map.item() == pytest.approx(math.sqrt(2 / 17), rel=1e-6)
    assert pod_flat(h_old, h_old).item() == pytest.approx(0, abs=1e-7)
    assert pod_flat(h_old, h_new).item() == pytest.approx(1 - 4 / 5)  # cos = 4 / (sqrt(5) sqrt(5))


def test_lsc_merges_proxies_by_their_softmax():
    # one row, 2 classes x 2 proxies: class 0 similarities 0.2, 0.8; class 1 -0.5, 0.5
    cos = torch.tensor([[0.2, 0.8, -0.5, 0.5]])
    w0 = math.exp(0.2) / (math.exp(0.2) + math.exp(0.8))
    w1 = math.exp(-0.5) / (math.exp(-0.5) + math.exp(0.5))
    expected = [w0 * 0.2 + (1 - w0) * 0.8, w1 * -0.5 + (1 - w1) * 0.5]
    assert merge_proxies(cos, 2)[0].tolist() == pytest.approx(expected)
    assert torch.equal(merge_proxies(cos, 1), cos)
    head = CosineHead(2, 2, proxies=2)  # through the head: rows 0-1 are class 0's proxies, rows 2-3 class 1's
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    f = torch.tensor([[1.0, 0.0]])  # cosines 1, 0, -1, 0
    w = math.exp(1) / (math.exp(1) + 1)
    assert head(f)[0].tolist() == pytest.approx([w, -1 / (1 + math.e)])  # class 1: softmax of -1, 0


def test_nca_is_the_reference_codes_loss():
    out = torch.tensor([[2.0, 1.0, 0.0]])
    # the positive is the maximum: exp(max) stands in for it in the denominator, i.e. the softmax cross-entropy
    assert nca(out, torch.tensor([0])).item() == pytest.approx(-2 + math.log(math.e ** 2 + math.e + 1))
    # the positive is not: the largest other counts twice
    assert nca(out, torch.tensor([1])).item() == pytest.approx(-1 + math.log(2 * math.e ** 2 + 1))
    # δ lowers the positive: -(2 - δ) + log(e^(2 - δ) + e + 1) while 2 - δ is still the maximum
    assert nca(out, torch.tensor([0]), 0.6).item() == pytest.approx(-1.4 + math.log(math.e ** 1.4 + math.e + 1))
    mask = torch.tensor([True, True, False])  # an inactive output leaves the denominator
    assert nca(out, torch.tensor([0]), 0.0, mask).item() == pytest.approx(-2 + math.log(math.e ** 2 + math.e))
    assert nca(100 * out, torch.tensor([0])).item() >= 0  # bounded below: no gain from growing η


def test_stage_outputs_are_the_ends_of_the_residual_stages():
    r18, r32, mlp = ResNet18(3, 10, nf=4), ResNet32(3, 10), MLP(8, 4, (6, 5))
    assert stage_modules(r18) == ([r18.stages[i] for i in (1, 3, 5, 7)], "stages")
    assert stage_modules(r32) == ([r32.stages[i] for i in (4, 9, 14)], "stages")
    relus, kind = stage_modules(mlp)
    assert kind == "hidden" and len(relus) == 2
    out, f, maps = run_with_maps(r18, torch.randn(2, 3, 8, 8))
    assert [m.shape[1] for m in maps] == [4, 8, 16, 32] and f.shape == (2, 32) and out.shape == (2, 10)
    _, _, maps = run_with_maps(mlp, torch.randn(3, 8))
    assert [m.shape for m in maps] == [(3, 6), (3, 5)]
    assert all(not m._forward_hooks for m in r18.modules())  # the hooks are gone again


# ---------------------------------------------------------------------------------------------- behaviour

@pytest.fixture(scope="module")
def digits():
    run = {"benchmark": "split-digits", "mode": "class", "seed": 0, "optimizer": "sgd", "lr": 0.1}
    return {m: retain.run(method=m, **run).metrics["acc"] for m in ("finetune", "lucir", "podnet")}


@pytest.mark.parametrize("name", ["lucir", "podnet"])
def test_beats_finetuning_on_split_digits_class_il(digits, name):
    assert digits[name] >= digits["finetune"] + 0.4, digits


def test_the_mammoth_diagnostic_of_lucir_switches_on_its_four_departures(monkeypatch):
    """benchmarks/lucir_mammoth.py (the docs' explanation of the gap to Mammoth) does what its docstring says: λ =
    λ_base sqrt(t - 1), finetuning after every task that moves only the current task's rows (and σ), the lr /10
    from its tenth step."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import lucir_mammoth

    seen: dict[str, list] = {"lam": [], "changed": [], "lr": []}

    class Probe(lucir_mammoth.MammothLUCIR):
        def begin_task(self, ctx):
            super().begin_task(ctx)
            seen["lam"].append(self.lam)

        def after_update(self, ctx, batch, out):
            super().after_update(ctx, batch, out)
            if self._finetuning and ctx.task == 0:
                seen["lr"].append(ctx.optimizer.param_groups[0]["lr"])

        def end_task(self, ctx):
            before = ctx.model.head.weight.detach().clone()
            sigma = ctx.model.head.sigma.item()
            super().end_task(ctx)
            rows = (ctx.model.head.weight.detach() != before).any(1)
            seen["changed"].append((rows.nonzero().flatten().tolist(), ctx.model.head.sigma.item() != sigma))

    run = {"benchmark": "split-digits", "mode": "class", "seed": 0, "optimizer": "sgd", "lr": 0.1,
           "all_outputs": True, "batch_size": 10}
    result = retain.run(method=Probe(buffer_size=40, ft_epochs=4), **run)  # 16 finetuning steps a task
    assert seen["lam"] == pytest.approx([0.0, 0.0, 5.0, 5 * math.sqrt(2), 5 * math.sqrt(3)])
    task_out = [[2 * t, 2 * t + 1] for t in range(5)]  # split-digits: classes 0-1, 2-3, ... in order
    assert [c for c, _ in seen["changed"]] == task_out  # only the current task's rows move, the first task too
    assert all(s for _, s in seen["changed"])  # and σ
    assert seen["lr"] == pytest.approx([0.01] * 9 + [0.001] * 7)
    assert result.metrics["acc"] > 0.5


def test_the_pycil_diagnostic_of_podnet_finetunes_the_backbone_and_new_proxies_only(monkeypatch):
    """benchmarks/podnet_pycil.py (the docs' explanation of the gap to PyCIL): with ft_train=pycil the finetuning
    after a task moves the backbone, the new classes' proxies and η, never the old classes' proxies; ft_share=pycil
    finetunes on memory // old classes rows per seen class; the switches at their defaults are retain's podnet."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import podnet_pycil

    seen: list[dict] = []

    class Probe(podnet_pycil.PyCILPODNet):
        def _finetune(self, ctx, data):
            m = ctx.model
            before = {n: p.detach().clone() for n, p in m.named_parameters()}
            super()._finetune(ctx, data)
            moved = {n for n, p in m.named_parameters() if not torch.equal(p.detach(), before[n])}
            rows = (m.head.weight.detach() != before["head.weight"]).any(1).nonzero().flatten().tolist()
            seen.append({"task": ctx.task, "moved": moved, "rows": rows, "n": len(data)})

    run = {"benchmark": "split-digits", "mode": "class", "seed": 0, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
           "reset_optimizer": True, "batch_size": 10}
    probe = Probe(buffer_size=40, K=2, ft_epochs=2, ft_lr=0.005, weight_decay=5e-4, ft_train="pycil",
                  ft_cosine=True, ft_share="pycil")
    retain.run(method=probe, **run)
    assert [s["task"] for s in seen] == [1, 2, 3, 4]
    first = seen[0]
    assert any(n.startswith("features") for n in first["moved"]) and "head.sigma" in first["moved"]
    assert first["rows"] == [4, 5, 6, 7]  # K = 2 proxies of classes 2 and 3 only
    assert [s["n"] for s in seen] == [40 // 2 * 4, 40 // 4 * 6, 40 // 6 * 8, 40 // 8 * 10]
    default = podnet_pycil.PyCILPODNet(buffer_size=40)
    assert (default.ft_train, default.ft_share, default.ft_cosine, default.weight_decay) == ("retain", "retain",
                                                                                             False, 0.0)
