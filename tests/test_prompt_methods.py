"""L2P, DualPrompt and CODA-Prompt: their maths on hand-made keys, queries and components, the layers their prompts
reach, and the frozen parts (the ViT; CODA's earlier components) getting no gradient. Tiny ViTs, seconds."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

import retain
from retain import backbones, checkpoint
from retain.backbones import Pretrained
from retain.checkpoint import Checkpointer
from retain.data import make_synthetic
from retain.errors import ConfigError
from retain.method import create
from retain.methods.coda_prompt import assemble, component_weights
from retain.methods.l2p import pull_loss
from retain.models import MLP
from retain.ops.prompts import cosine, ortho_penalty, orthonormal_rows, select
from retain.scenarios import Batch, from_tensors
from retain.trainer import Context, TrainConfig
from retain.vit import ViT, ViTConfig
from tests.conftest import Recording

D = 16


def _position(saved: dict) -> dict:
    return saved["position"] if "position" in saved else saved["state"]["position"]


def _scenario(mode: str = "class", n_tasks: int = 2):
    d = make_synthetic(n_classes=4, n_train=32, n_test=8, dim=64, spread=1.5, seed=0)
    return from_tensors(d.x_train.view(-1, 1, 8, 8), d.y_train, d.x_test.view(-1, 1, 8, 8), d.y_test, mode=mode,
                        n_tasks=n_tasks)


def _model(sc, depth: int = 5) -> Pretrained:
    torch.manual_seed(0)
    vit = ViT(ViTConfig(img_size=8, patch_size=4, in_chans=1, embed_dim=D, depth=depth, num_heads=2))
    model = Pretrained(vit, sc.n_outputs)
    backbones.freeze(model, "all")  # what the run does for freeze = "all"
    return model


def _ctx(method, mode: str = "class", n_tasks: int = 2, depth: int = 5) -> Context:
    sc = _scenario(mode, n_tasks)
    model = _model(sc, depth)
    return Context(model, sc.train_view(), TrainConfig(lr=0.01, optimizer="adam"), method, torch.device("cpu"),
                   torch.Generator().manual_seed(0), torch.zeros(sc.n_outputs, dtype=torch.bool))


def _enter(ctx: Context, task: int) -> None:
    ctx.task = task
    ctx.seen |= ctx.scenario.task_out[task]
    ctx.method.begin_task(ctx)
    ctx.optimizer = ctx.make_optimizer()


def _trained_head(ctx: Context) -> None:
    """A head as after some training (the methods start it at zero, where no gradient reaches the prompts)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ctx.model.head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def _batch(ctx: Context, task: int, n: int = 6) -> Batch:
    data = ctx.scenario.task_data(task)
    return ctx.scenario.batch(data.idx[:n], task)


def _loss(ctx: Context, batch: Batch) -> torch.Tensor:
    ctx.model.train()
    out = ctx.forward(batch.x, batch.t)
    extra = ctx.method.penalty(ctx, batch, out)
    return ctx.loss(out, batch) + (0 if extra is None else extra)


# ------------------------------------------------------------------------------------------------------ L2P

def test_l2p_selects_the_top_keys_and_its_pull_loss_is_one_minus_their_cosines():
    keys = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0]])
    q = torch.tensor([[2.0, 1, 0], [0, 0, 3]])  # cos with the keys: [2/√5, 1/√5, 0, -2/√5], [0, 0, 1, 0]
    sim = cosine(q, keys)
    assert torch.allclose(sim, torch.tensor([[2 / 5 ** .5, 1 / 5 ** .5, 0, -2 / 5 ** .5], [0, 0, 1, 0]]), atol=1e-6)
    idx = select(sim, 2)
    assert idx[0].tolist() == [0, 1] and idx[1][0].item() == 2
    loss = pull_loss(sim, torch.tensor([[0, 1], [2, 0]]))
    expected = ((1 - 2 / 5 ** .5) + (1 - 1 / 5 ** .5) + (1 - 1) + (1 - 0)) / 2  # Σ over the N keys, mean over rows
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_l2p_batchwise_selection_gives_every_row_the_most_frequent_prompts():
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.9, 0.1, 0.8, 0.0], [0.7, 0.9, 0.0, 0.1]])
    assert select(sim, 2).tolist() == [[0, 1], [0, 2], [1, 0]]
    assert select(sim, 2, batchwise=True).tolist() == [[0, 1]] * 3  # picked 3, 2, 1 and 0 times
    tie = torch.tensor([[0.9, 0.8, 0.0], [0.1, 0.0, 0.9]])  # picked 1, 0 and 1 times; mean cos 0.5, 0.4, 0.45
    assert select(tie, 1, batchwise=True).tolist() == [[0], [0]]


def test_l2p_prepends_the_selected_prompts_and_the_head_reads_their_outputs():
    for head in ("prompt", "token"):
        l2p = create("l2p", {"pool_size": 4, "length": 3, "top_k": 2, "head": head})
        ctx = _ctx(l2p)
        _enter(ctx, 0)
        _trained_head(ctx)
        x = _batch(ctx, 0).x
        ctx.model.eval()
        enc = ctx.model.features
        q = enc(x)  # the frozen class token of the plain input
        idx = cosine(q, l2p.key).topk(2, dim=1).indices
        tokens = enc.tokens(x, prompts=l2p.prompt[idx].flatten(1, 2))
        assert tokens.shape == (len(x), 1 + 2 * 3 + 4, D)
        feat = tokens[:, 1:7].mean(1) if head == "prompt" else tokens[:, 0]
        assert torch.allclose(ctx.forward(x, torch.zeros(len(x), dtype=torch.long)), ctx.model.head(feat), atol=1e-6)


def test_l2p_trains_only_the_current_tasks_classes_and_pulls_the_keys():
    l2p = create("l2p", {"pool_size": 4, "length": 2, "top_k": 2, "lambda": 0.5})
    ctx = _ctx(l2p)
    _enter(ctx, 0)
    _enter(ctx, 1)
    batch = _batch(ctx, 1)
    ctx.model.train()
    out = ctx.forward(batch.x, batch.t)
    task_out = ctx.scenario.task_out
    assert torch.isinf(out[:, task_out[0]]).all() and torch.isfinite(out[:, task_out[1]]).all()
    q = ctx.model.features(batch.x)
    sim = cosine(q, l2p.key)
    expected = 0.5 * pull_loss(sim, sim.topk(2, dim=1).indices)
    assert l2p.penalty(ctx, batch, out).item() == pytest.approx(expected.item(), abs=1e-6)


# ------------------------------------------------------------------------------------------------ DualPrompt

def _record_prefixes(vit: ViT) -> dict[int, list]:
    """Per layer, the (keys, values) shapes that reached its attention (None: no prefix)."""
    seen: dict[int, list] = {i: [] for i in range(len(vit.blocks))}
    for i, block in enumerate(vit.blocks):
        forward = block.attn.forward

        def record(x, prefix=None, _i=i, _f=forward):
            seen[_i].append(None if prefix is None else (prefix[0].detach().clone(), prefix[1].detach().clone()))
            return _f(x, prefix)

        block.attn.forward = record
    return seen


def test_dualprompt_puts_g_prefixes_on_layers_0_1_and_e_prefixes_on_2_to_4_only():
    dp = create("dualprompt")  # L_g = 5 at 0-1, L_e = 5 at 2-4
    ctx = _ctx(dp, depth=6)
    _enter(ctx, 0)
    seen = _record_prefixes(ctx.model.features.backbone)
    batch = _batch(ctx, 0, n=3)
    ctx.model.eval()
    ctx.forward(batch.x, batch.t)
    for layer in range(6):
        got = seen[layer][-1]  # the last call: the prompted pass (the first is the query's plain pass)
        assert all(s is None for s in seen[layer][:-1])
        if layer in (0, 1):
            k, v = got
            assert k.shape == v.shape == (3, 5, D)
            assert torch.equal(k[0], dp.g[layer, 0]) and torch.equal(v[2], dp.g[layer, 1])
        elif layer in (2, 3, 4):
            k, v = got
            assert k.shape == v.shape == (3, 5, D)
            assert torch.equal(k[1], dp.e[0][layer - 2, 0]) and torch.equal(v[1], dp.e[0][layer - 2, 1])
        else:
            assert got is None  # layer 5: nothing
    # a layer in both lists gets the G tokens then the E tokens; lengths are per key and per value
    dp2 = create("dualprompt", {"g_layers": "0,1", "e_layers": "1", "g_length": 2, "e_length": 3})
    ctx2 = _ctx(dp2, depth=3)
    _enter(ctx2, 0)
    seen2 = _record_prefixes(ctx2.model.features.backbone)
    ctx2.model.eval()
    ctx2.forward(batch.x, batch.t)
    k, v = seen2[1][-1]
    assert k.shape == (3, 5, D) and torch.equal(k[0, :2], dp2.g[1, 0]) and torch.equal(k[0, 2:], dp2.e[0][0, 0])
    assert seen2[0][-1][0].shape == (3, 2, D) and seen2[2][-1] is None


def test_dualprompt_trains_by_task_identity_and_evaluates_by_key_matching():
    dp = create("dualprompt", {"lambda": 0.5})
    ctx = _ctx(dp, depth=5)
    _enter(ctx, 0)
    e0 = dp.e[0].detach().clone()
    _enter(ctx, 1)
    assert torch.equal(dp.e[1].detach(), e0)  # e_1 starts where e_0 ended (the authors' shared_prompt_pool)
    own = {id(p) for p in dp.parameters(ctx.model)}
    assert id(dp.e[1]) in own and id(dp.keys[1]) in own and id(dp.e[0]) not in own and id(dp.keys[0]) not in own
    with torch.no_grad():
        dp.e[1].add_(1.0)  # tell the two E-prompts apart
    batch = _batch(ctx, 1, n=4)
    seen = _record_prefixes(ctx.model.features.backbone)
    ctx.model.train()
    out = ctx.forward(batch.x, batch.t)
    assert torch.equal(seen[2][-1][0][0], dp.e[1][0, 0].detach())  # training: the row's task, 1
    q = ctx.model.features(batch.x)
    expected = 0.5 * (1 - F.cosine_similarity(q, dp.keys[1][None].expand_as(q), dim=1)).mean()
    assert dp.penalty(ctx, batch, out).item() == pytest.approx(expected.item(), abs=1e-6)
    # evaluation: the E-prompt whose key matches the query best; make task 0's key the query itself
    with torch.no_grad():
        dp.keys[0].copy_(q[0])
        dp.keys[1].copy_(-q[0])
    ctx.model.eval()
    ctx.forward(batch.x[:1], batch.t[:1])
    assert torch.equal(seen[2][-1][0][0], dp.e[0][0, 0].detach())


# ----------------------------------------------------------------------------------------------- CODA-Prompt

def test_coda_component_weights_and_prompt_on_a_hand_case():
    q = torch.tensor([[1.0, 2.0]])
    A = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    K = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    # q ⊙ A_1 = (1, 0): cos with K_1 = 1; q ⊙ A_2 = (1, 2): cos with K_2 = 2/√5
    alpha = component_weights(q, K, A)
    assert torch.allclose(alpha, torch.tensor([[1.0, 2 / math.sqrt(5)]]), atol=1e-6)
    P = torch.arange(2 * 4 * 2, dtype=torch.float).view(2, 4, 2)  # 2 components of 4 tokens
    keys, values = assemble(alpha, P)
    prompt = alpha[0, 0] * P[0] + alpha[0, 1] * P[1]
    assert torch.allclose(keys[0], prompt[:2]) and torch.allclose(values[0], prompt[2:])


def test_coda_orthogonality_penalty_and_orthonormal_rows():
    assert ortho_penalty(torch.eye(3)).item() == 0
    rot = torch.tensor([[math.cos(0.3), math.sin(0.3)], [-math.sin(0.3), math.cos(0.3)]])
    assert ortho_penalty(rot).item() == pytest.approx(0, abs=1e-12)
    assert ortho_penalty(torch.tensor([[1.0, 0.0], [1.0, 0.0]])).item() == pytest.approx(0.5)  # (0²+1²+1²+0²)/4
    assert ortho_penalty(2 * torch.eye(2)).item() == pytest.approx(9 / 2)  # (3² + 3²)/4
    g = torch.Generator().manual_seed(0)
    old = orthonormal_rows(torch.zeros(0, 6), 2, g)
    new = orthonormal_rows(old, 3, g)
    rows = torch.cat([old, new])
    assert torch.allclose(rows @ rows.T, torch.eye(5), atol=1e-5)
    trained = old + 0.3 * torch.randn(2, 6, generator=g)  # earlier rows after training: no longer orthonormal
    assert torch.allclose(orthonormal_rows(trained, 3, g) @ trained.T, torch.zeros(3, 2), atol=1e-5)


def test_coda_expands_per_task_and_old_components_get_no_gradient():
    coda = create("coda_prompt", {"pool_size": 4, "length": 4, "layers": "0,2", "ortho_mu": 0.1})
    ctx = _ctx(coda, n_tasks=2, depth=3)
    _enter(ctx, 0)
    assert len(coda.P) == 1 and coda.P[0][0].shape == (2, 4, D) and coda.K[0][1].shape == (2, D)
    _enter(ctx, 1)
    assert len(coda.P) == 2
    for part in (coda.P, coda.K, coda.A):
        for j in range(2):
            rows = torch.cat([part[0][j], part[1][j]]).detach().flatten(1)
            assert torch.allclose(rows @ rows.T, torch.eye(4), atol=1e-5)  # the new rows orthonormal to the old
    old = [p.detach().clone() for part in (coda.P, coda.K, coda.A) for p in part[0]]
    _trained_head(ctx)
    own = {id(p) for p in coda.parameters(ctx.model)}
    assert all(id(p) not in own for part in (coda.P, coda.K, coda.A) for p in part[0])
    assert all(id(p) in own for part in (coda.P, coda.K, coda.A) for p in part[1])
    batch = _batch(ctx, 1)
    loss = _loss(ctx, batch)
    ctx.optimizer.zero_grad()
    loss.backward()
    for part in (coda.P, coda.K, coda.A):
        assert all(p.grad is None or not p.grad.any() for p in part[0])  # the old components: none
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part[1])
    ctx.optimizer.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(old, [p for part in (coda.P, coda.K, coda.A)
                                                                 for p in part[0]]))


def test_coda_penalty_is_the_weighted_orthogonality_of_the_components_in_use():
    coda = create("coda_prompt", {"pool_size": 4, "length": 2, "layers": "1", "ortho_mu": 0.5})
    ctx = _ctx(coda, n_tasks=2, depth=2)
    _enter(ctx, 0)
    batch = _batch(ctx, 0, n=2)
    ctx.model.train()
    out = ctx.forward(batch.x, batch.t)
    assert coda.penalty(ctx, batch, out).item() == pytest.approx(0, abs=1e-10)  # orthonormal at the start
    with torch.no_grad():
        coda.K[0][0].mul_(2)  # ‖KKᵀ − I‖² mean: (3² + 3²) / 4
    out = ctx.forward(batch.x, batch.t)
    assert coda.penalty(ctx, batch, out).item() == pytest.approx(0.5 * 9 / 2, rel=1e-5)


# ---------------------------------------------------------------------------------------------- all three

PROMPTS = {"l2p": {"pool_size": 4, "length": 2, "top_k": 2}, "dualprompt": {},
           "coda_prompt": {"pool_size": 4, "length": 4, "ortho_mu": 0.1}}


@pytest.mark.parametrize("name", PROMPTS)
def test_the_vit_gets_no_gradient_and_the_prompts_do(name):
    method = create(name, PROMPTS[name])
    ctx = _ctx(method)
    _enter(ctx, 0)
    assert not any(p.any() for p in ctx.model.head.parameters())  # the head starts at zero (authors' L2P code)
    _trained_head(ctx)
    loss = _loss(ctx, _batch(ctx, 0))
    loss.backward()
    vit = ctx.model.features.backbone
    assert all(p.grad is None for p in vit.parameters())
    trained = method.parameters(ctx.model)
    assert not {id(p) for p in vit.parameters()} & {id(p) for p in trained}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)  # head, prompts, keys: all learn


@pytest.mark.parametrize("name", PROMPTS)
def test_a_run_leaves_the_backbone_as_it_was_and_refuses_a_model_without_a_vit(name):
    sc = _scenario()
    model = _model(sc)
    for p in model.features.parameters():
        p.requires_grad_(True)  # the run freezes it (the method's freeze = "all")
    before = {k: v.clone() for k, v in model.features.state_dict().items()}
    result = retain.run(scenario=sc, model=model, method=create(name, PROMPTS[name]), epochs=1, batch_size=16,
                        lr=0.01, optimizer="adam", seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.features.state_dict().items())
    assert not any(p.requires_grad for p in model.features.parameters())
    assert len(result.to_dict()["accuracy_matrix"]) == 2
    mlp = MLP(64, sc.n_outputs, (16,))
    with pytest.raises(ConfigError, match="ViT"):
        retain.run(scenario=sc, model=mlp, method=create(name, PROMPTS[name]), epochs=1, seed=0)


@pytest.mark.parametrize("name", PROMPTS)
def test_stopped_mid_task_and_resumed_gives_the_identical_matrix(name, tmp_path):
    """The contract test's resume check on a tiny ViT (the contract's MLP cannot carry prompts): a run resumed
    from a checkpoint written mid-task, or at the second task's start, with a fresh method and model, ends with the
    matrix of the run never stopped; the method's state (prompts, keys, components) round-trips through a
    checkpoint."""
    run = {"epochs": 2, "batch_size": 8, "lr": 0.01, "optimizer": "adam", "seed": 0}
    sc = _scenario()
    plain = retain.run(scenario=sc, model=_model(sc), method=create(name, PROMPTS[name]), **run)
    rec = Recording(tmp_path / "run.ckpt", every=3)
    method = create(name, PROMPTS[name])
    with_ckpt = retain.run(scenario=sc, model=_model(sc), method=method, checkpointer=rec, **run)
    assert with_ckpt.accuracy_matrix == plain.accuracy_matrix
    positions = [_position(checkpoint.load(c)) for c in rec.copies]
    mid = [c for c, p in zip(rec.copies, positions) if p["task"] == 1 and p["task_step"] > 0]
    boundary = [c for c, p in zip(rec.copies, positions) if p["task"] == 1 and p["task_step"] == 0]
    assert mid
    for copy in [mid[len(mid) // 2], *boundary[:1]]:
        ck = Checkpointer(copy, every=3, resume=True, keep=True)
        resumed = retain.run(scenario=sc, model=_model(sc), method=create(name, PROMPTS[name]), checkpointer=ck,
                             **run)
        assert ck.resumed_from is not None and ck.resumed_from["task"] == 1
        assert resumed.accuracy_matrix == plain.accuracy_matrix
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    fresh = create(name, method.params())
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    assert fresh.state_dict().keys() == method.state_dict().keys()


def test_bad_layers_and_lengths_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="does not exist; the ViT has 3 blocks"):
        _enter(_ctx(create("dualprompt"), depth=3), 0)  # E-layers 2-4 on a 3-block ViT
    with pytest.raises(ConfigError, match="layer indices"):
        create("coda_prompt", {"layers": "0,x"})
    with pytest.raises(ConfigError, match="even"):
        create("coda_prompt", {"length": 5})
    with pytest.raises(ConfigError, match="top_k"):
        create("l2p", {"pool_size": 3, "top_k": 4})
