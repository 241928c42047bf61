"""The replay buffer: reservoir statistics, class balance, per-class budgets, selection, sampling, state."""

from __future__ import annotations

import io

import pytest
import torch

from retain.buffers import Buffer, herding, kcenter
from retain.errors import ConfigError


def _retention(insert, n: int, capacity: int, trials: int) -> torch.Tensor:
    """How often each of ``n`` offered indices is still stored at the end, over ``trials`` seeded runs."""
    kept = torch.zeros(n)
    for trial in range(trials):
        stored = insert(torch.Generator().manual_seed(trial))
        assert len(stored) == capacity
        kept[stored] += 1
    return kept / trials


def _uniform(freq: torch.Tensor, p: float, bins: int = 10, tol: float = 0.1) -> bool:
    """Every bin of consecutive indices (early ... recent) is kept with probability p, within ``tol`` relative."""
    return bool(((freq.view(bins, -1).mean(1) - p).abs() <= tol * p).all())


def _buffer_insert(capacity: int, n: int, batch: int):
    def insert(g: torch.Generator) -> torch.Tensor:
        buf = Buffer(capacity)
        ids = torch.arange(n)
        for s in range(0, n, batch):
            b = ids[s:s + batch]
            buf.add(b.float().unsqueeze(1), b, torch.zeros_like(b), generator=g)
        return buf.rows().y
    return insert


def test_reservoir_keeps_every_index_with_probability_capacity_over_n():
    capacity, n = 100, 2000
    freq = _retention(_buffer_insert(capacity, n, 32), n, capacity, trials=200)
    assert _uniform(freq, capacity / n)
    # the oldest samples (inserted while the buffer was filling) are kept as often as the newest
    assert abs(freq[:capacity].mean() - freq[-capacity:].mean()) < 0.2 * capacity / n


@pytest.mark.parametrize("batch", [1, 7, 2000])
def test_reservoir_is_uniform_for_any_batch_size(batch):
    capacity, n = 50, 1000
    trials = 40 if batch == 1 else 150
    freq = _retention(_buffer_insert(capacity, n, batch), n, capacity, trials)
    assert _uniform(freq, capacity / n, bins=5, tol=0.2)


def test_a_reservoir_that_draws_over_the_buffer_length_fails_the_check():
    """The statistical check has power: seed defect 4 (index drawn over len(buffer)) favours recent samples."""
    capacity, n = 100, 2000

    def broken(g: torch.Generator) -> torch.Tensor:
        slots = list(range(capacity))
        for i in range(capacity, n):
            j = int(torch.randint(capacity, (1,), generator=g))  # over the buffer length, not i + 1
            if j < capacity:
                slots[j] = i
        return torch.tensor(slots)

    freq = _retention(broken, n, capacity, trials=50)
    assert not _uniform(freq, capacity / n)


def test_class_balanced_counts_differ_by_at_most_one():
    g = torch.Generator().manual_seed(0)
    buf = Buffer(97, balanced=True)
    for task in range(5):  # classes arrive two at a time, as in Split-MNIST
        for _ in range(20):
            y = torch.randint(2 * task, 2 * task + 2, (32,), generator=g)
            buf.add(torch.randn(32, 3, generator=g), y, torch.full_like(y, task), generator=g)
            counts, share = buf.counts(), buf.shares()
            assert max(share.values()) - min(share.values()) <= 1 and sum(share.values()) == 97
            assert counts == {k: min(share[k], buf.seen_per_key[k]) for k in share}
        counts = list(buf.counts().values())  # every class has seen more rows than its share by now
        assert max(counts) - min(counts) <= 1 and sum(counts) == 97
        assert sorted(buf.counts()) == list(range(2 * task + 2))
    assert len(buf) == 97


def test_class_balanced_keeps_a_uniform_sample_within_each_class():
    capacity, n = 20, 400  # two classes alternate: each keeps 10 of its 200 rows, each with probability 1/20
    kept = torch.zeros(n)
    for trial in range(150):
        g = torch.Generator().manual_seed(trial)
        buf = Buffer(capacity, balanced=True)
        ids = torch.arange(n)
        for s in range(0, n, 16):
            b = ids[s:s + 16]
            buf.add(b.float().unsqueeze(1), b, torch.zeros_like(b), key=b % 2, generator=g)
        kept[buf.rows().y] += 1
    assert _uniform(kept / 150, capacity / n, bins=5, tol=0.2)


def test_per_class_budget_grows_with_the_classes():
    g = torch.Generator().manual_seed(0)
    buf = Buffer(per_class=10)
    for c in range(4):
        y = torch.full((50,), c)
        buf.add(torch.randn(50, 2, generator=g), y, y // 2, generator=g)
        assert buf.counts() == {k: 10 for k in range(c + 1)}
    assert len(buf) == 40


def test_herding_follows_the_running_mean_on_a_hand_made_case():
    # unit vectors a, b, c; class mean (0.6, 0.533). Nearest to the mean: c. Then the running mean (c + ?) / 2 is
    # closest to the class mean with b (0.444 against 0.578 with a), then a. Picking by distance to the mean alone
    # would give c, a, b instead.
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    assert herding(f, 3).tolist() == [2, 1, 0]
    assert herding(f * torch.tensor([[3.0], [0.5], [2.0]]), 3).tolist() == [2, 1, 0]  # features L2-normalised
    assert herding(f, 1).tolist() == [2]
    # on the scaled rows as they are (Mammoth's fill_buffer): a' (3, 0), b' (0, 0.5), c' (1.6, 1.2), mean (1.533,
    # 0.567). c' is nearest (0.405); then (c' + a') / 2 = (2.3, 0.6) is 0.589 from the mean, (c' + b') / 2 0.618
    assert herding(f * torch.tensor([[3.0], [0.5], [2.0]]), 3, normalize=False).tolist() == [2, 0, 1]


def test_kcenter_picks_the_farthest_point_each_time():
    f = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [11.0, 0.0], [5.0, 0.0]])
    assert kcenter(f, 3).tolist() == [4, 3, 0]


def test_selection_fills_shares_and_shrinking_keeps_the_first_chosen():
    buf = Buffer(4, balanced=True)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    x = torch.arange(3).float().unsqueeze(1)
    y = torch.zeros(3, dtype=torch.long)
    buf.select(x, y, y, f, "herding")
    assert sorted(buf.rows().x.flatten().tolist()) == [0.0, 1.0, 2.0]  # share 4, only 3 rows
    y1 = torch.ones(3, dtype=torch.long)
    buf.select(x + 10, y1, y1, f, "herding")  # two classes: shares 2 + 2; class 0 keeps its first two (c, b)
    assert buf.counts() == {0: 2, 1: 2}
    assert sorted(buf.rows().x.flatten().tolist()) == [1.0, 2.0, 11.0, 12.0]
    with pytest.raises(ConfigError):
        Buffer(4).select(x, y, y, f, "herding")
    with pytest.raises(ConfigError):
        buf.select(x, y, y, f, "nearest")


def test_sample_is_without_replacement():
    g = torch.Generator().manual_seed(0)
    buf = Buffer(200)
    ids = torch.arange(300)
    buf.add(ids.float().unsqueeze(1), ids, torch.zeros_like(ids), generator=g)
    rows = buf.sample(128, g)
    assert len(rows) == 128 and len(torch.unique(rows.idx)) == 128
    assert torch.equal(rows.x.flatten().long(), rows.y)
    assert len(buf.sample(1000, g)) == 200  # fewer stored than asked: all of them, once
    only = buf.sample(50, g, tasks=[3])
    assert len(only) == 0


def test_state_survives_a_save_and_load():
    g = torch.Generator().manual_seed(0)
    buf = Buffer(50, balanced=True)
    y = torch.arange(120) % 3
    buf.add(torch.randn(120, 4, generator=g), y, y, logits=torch.randn(120, 3, generator=g), generator=g)
    f = io.BytesIO()
    torch.save(buf.state_dict(), f)
    f.seek(0)
    twin = Buffer(1)
    twin.load_state_dict(torch.load(f, weights_only=False))
    a, b = buf.sample(20, torch.Generator().manual_seed(1)), twin.sample(20, torch.Generator().manual_seed(1))
    assert torch.equal(a.x, b.x) and torch.equal(a.logits, b.logits) and twin.seen == buf.seen
    twin.add(torch.randn(30, 4), torch.zeros(30, dtype=torch.long), torch.zeros(30, dtype=torch.long),
             logits=torch.zeros(30, 3), generator=g)  # and keeps working
    assert len(twin) == 50


def test_bad_buffer_arguments():
    for kw in ({"capacity": 0}, {"capacity": -5}, {"per_class": 0}, {"capacity": 10, "per_class": 2}, {}):
        with pytest.raises(ConfigError):
            Buffer(**kw)


def test_exemplars_split_the_total_keep_the_herding_prefix_and_read_rows_by_index():
    """The index exemplar memory of iCaRL, BiC, WA, LUCIR and PODNet, by hand. Each class has the three rows
    (1, 0), (0, 1), (0.8, 0.6) (scaled): herding picks (0.8, 0.6) first (nearest the mean direction), then (0, 1),
    then (1, 0). Size 5 over two classes: 2 each (⌊5/2⌋), or 3 + 2 with the remainder to the earliest class; over
    four classes: 1 each, or 2 + 1 + 1 + 1, every old class keeping its first-chosen rows."""
    from types import SimpleNamespace

    from retain.buffers import Exemplars
    from retain.scenarios import from_tensors

    base = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    x = torch.cat([base * (c + 1) for c in range(4)])  # class c: rows 3c, 3c + 1, 3c + 2
    y = torch.arange(4).repeat_interleave(3)
    sc = from_tensors(x, y, x, y, "class", n_tasks=2)
    assert torch.equal(sc.batch(torch.arange(12), 0).x, x)  # float features reach the model unchanged
    model = torch.nn.Module()
    model.features = torch.nn.Identity()
    ctx = SimpleNamespace(scenario=sc, model=model, rng=torch.Generator().manual_seed(0))
    floor, full = Exemplars(5), Exemplars(5, remainder=True)
    for ex in (floor, full):
        ctx.task = 0
        ex.select(ctx)
    assert {c: v.tolist() for c, v in floor.idx.items()} == {0: [2, 1], 1: [5, 4]}
    assert {c: v.tolist() for c, v in full.idx.items()} == {0: [2, 1, 0], 1: [5, 4]}
    for ex in (floor, full):
        ctx.task = 1
        ex.select(ctx)
    assert {c: v.tolist() for c, v in floor.idx.items()} == {0: [2], 1: [5], 2: [8], 3: [11]}
    assert {c: v.tolist() for c, v in full.idx.items()} == {0: [2, 1], 1: [5], 2: [8], 3: [11]}
    assert len(floor) == 4 and len(full) == 5 and full.task == {0: 0, 1: 0, 2: 1, 3: 1}
    data = full.data(leave_out=torch.tensor([1, 8]))
    assert data.idx.tolist() == [2, 5, 11] and data.t.tolist() == [0, 0, 1]
    assert full.memory(sc).rows == 5 and Exemplars(100).memory(sc).rows == 12  # never more than the data
    rand = Exemplars(4)
    ctx.task = 0
    rand.select(ctx, "random")
    assert all(len(v) == 2 and set(v.tolist()) <= set(range(3 * c, 3 * c + 3)) for c, v in rand.idx.items())
    with pytest.raises(ConfigError):
        rand.select(ctx, "kcenter")
