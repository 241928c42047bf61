"""SimpleCIL, RanPAC and APER: hand-computed prototypes and cosine predictions, RanPAC's ridge solution against a
least-squares solve and its λ search against one solve per λ, APER's adapter as the identity at initialisation,
and the frozen backbone untouched by every run (no gradient, no change)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import retain
from retain.backbones import Pretrained
from retain.data import Arrays
from retain.errors import ConfigError
from retain.methods.aper import APER, AdaptedBlock, add_adapters, add_ssf
from retain.methods.ranpac import RIDGES, RanPAC, project, ridge_solution, select_ridge
from retain.methods.simplecil import Prototypes, SimpleCIL, cosine_scores
from retain.models import MLP
from retain.scenarios import from_tensors, split
from retain.vit import ViT, ViTConfig


def _tiny_vit(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return ViT(ViTConfig(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2))


def _images(seed: int = 0, per_class: int = 24):
    """8 classes of 1x8x8 images: a random template per class plus a little noise; 4 tasks of 2 classes."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(8, 1, 8, 8, generator=g)

    def draw(n: int):
        y = torch.arange(8).repeat_interleave(n)
        return (centres[y] + 0.1 * torch.randn(len(y), 1, 8, 8, generator=g)).clamp(0, 1), y

    (xtr, ytr), (xte, yte) = draw(per_class), draw(8)
    return from_tensors(xtr, ytr, xte, yte, "class", n_tasks=4)


# ---------------------------------------------------------------------------------------------------- SimpleCIL

def test_prototypes_are_class_means_and_predict_by_cosine():
    # class 0: (2, 0), (4, 2) -> mean (3, 1); class 1: (0, 1), (0, 3) -> mean (0, 2)
    p = Prototypes()
    p.add(torch.tensor([[2.0, 0.0], [0.0, 1.0], [4.0, 2.0], [0.0, 3.0]]), torch.tensor([0, 1, 0, 1]), 3)
    assert torch.allclose(p.means[:2], torch.tensor([[3.0, 1.0], [0.0, 2.0]]))
    q = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    s = p.scores(q)
    # cos((1,0),(3,1)) = 3/√10, cos((1,0),(0,2)) = 0; cos((1,1),(3,1)) = 4/(√2√10), cos((1,1),(0,2)) = 1/√2
    expected = torch.tensor([[3 / math.sqrt(10), 0.0], [4 / math.sqrt(20), 1 / math.sqrt(2)]])
    assert torch.allclose(s[:, :2], expected, atol=1e-6)
    assert torch.isinf(s[:, 2]).all() and (s[:, 2] < 0).all()  # no rows yet: never predicted
    assert s.argmax(1).tolist() == [0, 0]  # 4/√20 = .894 > 1/√2 = .707
    # the cosine, not the distance: (10, 0) is far from (3, 1) and still closest in angle
    assert p.scores(torch.tensor([[10.0, 0.0]])).argmax(1).item() == 0
    assert torch.allclose(cosine_scores(q, p.means[:2]), expected, atol=1e-6)


def _blobs(seed: int = 0):
    """Four Gaussian blobs in 2-D at (±5, ±5) with unit noise, two tasks of two classes."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [-5.0, -5.0], [5.0, -5.0]])

    def draw(n: int):
        y = torch.arange(4).repeat_interleave(n)
        return centres[y] + torch.randn(len(y), 2, generator=g), y

    (xtr, ytr), (xte, yte) = draw(50), draw(25)
    return split(Arrays("blobs", xtr, ytr, xte, yte, 4), "class", n_tasks=2), xtr, ytr


class _Features(torch.nn.Module):
    """The identity as ``features`` (a frozen 'backbone' whose output we can compute by hand), a linear head."""

    def __init__(self, d: int, n_out: int):
        super().__init__()
        self.features = torch.nn.Flatten()
        self.head = torch.nn.Linear(d, n_out)

    def forward(self, x):
        return self.head(self.features(x))


def test_simplecil_run_on_blobs_prototypes_are_the_class_means_and_no_step_is_taken():
    sc, xtr, ytr = _blobs()
    m = SimpleCIL()
    model = _Features(2, 4)
    head = model.head.weight.detach().clone()
    r = retain.run(scenario=sc, model=model, method=m, epochs=3, batch_size=8, lr=0.1, seed=0)
    for i, task in enumerate(sc.tasks):
        for c in task.classes:  # each class's prototype is the mean of its training rows (the identity features)
            assert torch.allclose(m.prototypes.means[int(sc.label_map[i, c])], xtr[ytr == c].mean(0), atol=1e-5)
    assert r.metrics["acc"] > 0.97  # four well-separated directions
    assert torch.equal(model.head.weight, head)  # nothing trained
    assert r.accuracy_matrix[0][0] > 0.97 and r.accuracy_matrix[1][0] > 0.97  # no forgetting: prototypes are kept


def test_simplecil_takes_no_gradient_step_and_leaves_a_frozen_vit_unchanged():
    sc = _images()
    vit = _tiny_vit()
    model = Pretrained(vit, 8, img_size=8, in_chans=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = []
    m = SimpleCIL()
    m.observe = lambda ctx, batch: steps.append(1)  # would record any step the trainer took
    r = retain.run(scenario=sc, model=model, method=m, epochs=2, batch_size=8, seed=0, feature_cache="off")
    assert steps == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert r.metrics["acc"] > 0.5


ARCH = "timm:vit_tiny_patch16_224,img_size=8,patch_size=4,in_chans=1,embed_dim=16,depth=2,num_heads=2"


@pytest.mark.parametrize("name", ["simplecil", "ranpac", "aper"])
def test_through_a_weights_file_the_backbone_is_frozen_and_only_feature_methods_use_the_cache(name, tmp_path):
    from retain.backbones import save_weights

    save_weights(_tiny_vit(), tmp_path / "tiny.safetensors", ARCH, (0.5,), (0.5,))
    r = retain.run(scenario=_images(), arch=ARCH, weights=str(tmp_path / "tiny.safetensors"), method=name,
                   epochs=1, batch_size=8, seed=0, params={"M": 64} if name == "ranpac" else None)
    entry = r.to_dict()["model"]
    assert entry["freeze"] == "all" and entry["frozen_parameters"] == entry["backbone_parameters"]
    assert entry["feature_cache"]["used"] == (name != "aper")  # APER runs its adapted copy of the backbone
    assert r.metrics["acc"] > 0.5


# ------------------------------------------------------------------------------------------------------ RanPAC

def test_ridge_solution_equals_least_squares_on_the_augmented_system():
    g = torch.Generator().manual_seed(1)
    H, Y, lam = torch.randn(30, 6, generator=g, dtype=torch.float64), torch.randn(30, 3, generator=g,
                                                                                  dtype=torch.float64), 0.7
    W = ridge_solution(H.T @ H, H.T @ Y, lam)
    # min ‖HW − Y‖² + λ‖W‖² is the least-squares solution of [H; √λ I] W = [Y; 0]
    A = torch.cat([H, math.sqrt(lam) * torch.eye(6, dtype=torch.float64)])
    B = torch.cat([Y, torch.zeros(6, 3, dtype=torch.float64)])
    assert torch.allclose(W, torch.linalg.lstsq(A, B).solution, atol=1e-10)


def test_gram_and_targets_accumulate_exactly_as_one_batch():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(40, 5, generator=g, dtype=torch.float64)
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    Y = F.one_hot(torch.randint(0, 4, (40,), generator=g), 4).double()
    h = project(f, W)
    assert torch.equal(h, torch.relu(f @ W))
    G = sum(project(f[i:i + 7], W).T @ project(f[i:i + 7], W) for i in range(0, 40, 7))
    C = sum(project(f[i:i + 7], W).T @ Y[i:i + 7] for i in range(0, 40, 7))
    assert torch.allclose(G, h.T @ h, atol=1e-10) and torch.allclose(C, h.T @ Y, atol=1e-10)


def test_lambda_search_matches_one_solve_per_lambda_and_picks_the_obvious_one():
    g = torch.Generator().manual_seed(3)
    H = torch.randn(60, 8, generator=g, dtype=torch.float64)
    W_true = torch.randn(8, 2, generator=g, dtype=torch.float64)
    # noise-free linear targets: the least regularised λ fits the held-out rows best
    Y = H @ W_true
    lam, errors = select_ridge(H[:48].T @ H[:48], H[:48].T @ Y[:48], H[48:], Y[48:])
    brute = [float(((H[48:] @ ridge_solution(H[:48].T @ H[:48], H[:48].T @ Y[:48], r) - Y[48:]) ** 2).mean())
             for r in RIDGES]
    assert errors == pytest.approx(brute, rel=1e-6, abs=1e-12)
    assert lam == RIDGES[0]
    # targets independent of H: any fit only adds variance, the largest λ (W_o -> 0) is best
    Y = torch.randn(60, 2, generator=g, dtype=torch.float64) * 1e-3
    lam, errors = select_ridge(H[:48].T @ H[:48], H[:48].T @ Y[:48], H[48:], Y[48:])
    assert lam == RIDGES[-1]
    assert min(range(len(RIDGES)), key=lambda i: errors[i]) == len(RIDGES) - 1


def test_ranpac_run_equals_the_ridge_regression_of_all_tasks_and_trains_nothing():
    sc, xtr, ytr = _blobs()
    m = RanPAC(M=16)
    model = _Features(2, 4)
    r = retain.run(scenario=sc, model=model, method=m, epochs=1, batch_size=8, seed=0)
    assert len(m.ridges) == 2 and all(lam in RIDGES for lam in m.ridges)
    # W_o from every training row at once, with the λ the last task chose
    outs = torch.cat([sc.label_map[i, ytr[t.train_idx]] for i, t in enumerate(sc.tasks)])
    rows = torch.cat([t.train_idx for t in sc.tasks])
    h = project(xtr[rows].double(), m.W)
    Y = F.one_hot(outs, 4).double()
    assert torch.allclose(m.G, h.T @ h, rtol=1e-9) and torch.allclose(m.C, h.T @ Y, rtol=1e-9)
    assert torch.allclose(m.Wo, ridge_solution(h.T @ h, h.T @ Y, m.ridges[-1]), rtol=1e-6, atol=1e-9)
    assert r.metrics["acc"] > 0.95


def test_ranpac_refuses_bad_parameters():
    with pytest.raises(ConfigError, match="holdout"):
        RanPAC(holdout=1.0)
    with pytest.raises(ConfigError, match="ridge"):
        RanPAC(ridge=-1.0)


def test_ranpac_on_a_frozen_vit_leaves_it_unchanged():
    sc = _images()
    vit = _tiny_vit()
    model = Pretrained(vit, 8, img_size=8, in_chans=1)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    r = retain.run(scenario=sc, model=model, method=RanPAC(M=64), epochs=1, seed=0, feature_cache="off")
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    assert r.metrics["acc"] > 0.5


# -------------------------------------------------------------------------------------------------------- APER

def test_adapter_at_initialisation_leaves_the_vit_unchanged_and_only_it_trains():
    vit = _tiny_vit()
    x = torch.rand(4, 1, 8, 8)
    ref = vit(x)
    adapted = _tiny_vit()
    params = add_adapters(adapted, bottleneck=4, scale=0.1)
    assert all(isinstance(b, AdaptedBlock) for b in adapted.blocks)
    adapted.eval()
    assert torch.allclose(adapted(x), ref, atol=1e-6)  # zero up-projection: the adapter adds nothing
    # the gradient reaches the up-projection only at first (the down-projection's is zero: up's weight is 0)
    for p in adapted.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    adapted(x).sum().backward()
    assert all(p.grad is None for n, p in adapted.named_parameters() if ".adapter." not in n)
    ups = [b.adapter.up.weight.grad for b in adapted.blocks]
    assert all(gr is not None and gr.abs().sum() > 0 for gr in ups)


def test_ssf_at_unit_scale_and_zero_shift_is_the_vit_and_only_its_scales_get_gradients():
    vit = _tiny_vit()
    x = torch.rand(4, 1, 8, 8)
    ref = vit(x)
    scaled = _tiny_vit()
    params = add_ssf(scaled)
    assert len(params) == 2 * (2 + 6 * 2)  # patch embed and final norm, six per block (norm1 qkv proj norm2 fc1 fc2)
    with torch.no_grad():  # γ = 1, β = 0: every wrapped operation is unchanged
        for i in range(0, len(params), 2):
            params[i].fill_(1.0)
            params[i + 1].zero_()
    assert torch.allclose(scaled(x), ref, atol=1e-6)
    for p in scaled.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    scaled(x).pow(2).sum().backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for n, p in scaled.named_parameters() if not n.endswith(("scale", "shift")))


@pytest.mark.parametrize("variant", ["adapter", "ssf", "vpt_shallow", "vpt_deep", "finetune"])
def test_aper_trains_only_its_own_parameters_on_the_first_task(variant):
    sc = _images()
    vit = _tiny_vit()
    model = Pretrained(vit, 8, img_size=8, in_chans=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = APER(variant=variant, ffn_num=8)
    r = retain.run(scenario=sc, model=model, method=m, epochs=3, batch_size=8, lr=0.05, seed=0)
    # the pre-trained model (backbone and head) never moves, nor asks for gradients
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in vit.parameters())
    # the tuned part moved on the first task, and is frozen afterwards
    if variant.startswith("vpt"):
        assert m.tuned is None and m.prompts is not None and not m.prompts.requires_grad
        assert m.prompts.shape[0] == (1 if variant == "vpt_shallow" else 2)
    else:
        assert not any(p.requires_grad for p in m.tuned.parameters())
        moved = [n for n, p in m.tuned.state_dict().items() if n in vit.state_dict()
                 and not torch.equal(p, vit.state_dict()[n])]
        assert bool(moved) == (variant == "finetune")  # adapter / SSF: the wrapped weights are the originals
    assert m.frozen and m.prototypes.means.shape == (8, 32)  # [pre-trained 16, adapted 16] per class
    assert r.metrics["acc"] > 0.5


def test_aper_steps_only_on_the_first_task():
    sc = _images()
    model = Pretrained(_tiny_vit(), 8, img_size=8, in_chans=1)
    m = APER(ffn_num=8)
    tasks = []
    observe = m.observe
    m.observe = lambda ctx, batch: (tasks.append(ctx.task), observe(ctx, batch))[1]
    retain.run(scenario=sc, model=model, method=m, epochs=2, batch_size=8, seed=0)
    assert tasks and set(tasks) == {0}


def test_aper_needs_a_vit_except_for_finetune():
    sc, _, _ = _blobs()
    with pytest.raises(ConfigError, match="pre-trained backbone"):
        retain.run(scenario=sc, model=MLP(2, 4, (8,)), method=APER(), epochs=1, seed=0)
