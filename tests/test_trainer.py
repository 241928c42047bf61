"""The loop: hook order, full accuracy matrix, task-free streams, determinism, pairing checks."""

from dataclasses import dataclass, field

import pytest
import torch

import retain
from retain.errors import ConfigError
from retain.method import Method, check_pairing
from retain.models import MLP
from retain.trainer import TrainConfig, TrainingError, train

from .conftest import tiny_split


@dataclass
class Recorder(Method):
    calls: list = field(default_factory=list)

    def begin_task(self, ctx):
        self.calls.append(("begin", ctx.task))

    def end_task(self, ctx):
        self.calls.append(("end", ctx.task))

    def after_update(self, ctx, batch, out):
        self.calls.append(("step", ctx.task))


def test_hooks_run_in_order_and_the_matrix_is_full():
    sc = tiny_split("class", n_tasks=3)
    rec = Recorder()
    torch.manual_seed(0)
    out = train(sc, rec, MLP(8, sc.n_outputs, (16,)), TrainConfig(iterations=4, batch_size=8))
    kinds = [c for c in rec.calls if c[0] != "step"]
    assert kinds == [("begin", 0), ("end", 0), ("begin", 1), ("end", 1), ("begin", 2), ("end", 2)]
    assert sum(c[0] == "step" for c in rec.calls) == 12  # exactly `iterations` steps per task
    R = torch.tensor(out.accuracy_matrix)
    assert not torch.isnan(R).any()  # unseen tasks are evaluated too (upper triangle filled)
    assert len(out.baseline) == 3


def test_task_free_stream_gets_no_boundary_calls_and_still_fills_R():
    sc = tiny_split("class", n_tasks=3)
    rec = Recorder()
    out = train(sc, rec, MLP(8, sc.n_outputs, (16,)), TrainConfig(batch_size=8, task_free=True, blurry=0.3))
    assert {c[0] for c in rec.calls} == {"step"}
    assert not torch.isnan(torch.tensor(out.accuracy_matrix)).any()


def test_method_needing_boundaries_is_refused_on_a_stream():
    sc = tiny_split("class", n_tasks=2)
    with pytest.raises(ConfigError, match="needs task boundaries"):
        retain.run(scenario=sc, method="joint", task_free=True)


def test_unsupported_mode_is_refused_before_training():
    class TaskOnly(Method):
        modes = ("task",)

    check_pairing(TaskOnly(), "task")
    with pytest.raises(ConfigError, match="does not support class-IL"):
        check_pairing(TaskOnly(), "class")  # what resolve() calls before anything is built
    with pytest.raises(ConfigError, match="does not support class-IL"):
        retain.run(scenario=tiny_split("class", n_tasks=2), method=TaskOnly(), iterations=1)


def test_optimizer_is_rebuilt_after_begin_task():
    """A method that adds a parameter in begin_task sees it trained (PNN columns rely on this)."""

    @dataclass
    class Grow(Method):
        def begin_task(self, ctx):
            if ctx.task == 1:
                self.extra = torch.nn.Parameter(torch.zeros(ctx.scenario.n_outputs))

        def parameters(self, model):
            return list(model.parameters()) + ([self.extra] if hasattr(self, "extra") else [])

        def forward(self, ctx, x, t):
            out = ctx.model(x)
            return out + self.extra if hasattr(self, "extra") else out

    sc = tiny_split("task", n_tasks=2)
    g = Grow()
    train(sc, g, MLP(8, sc.n_outputs, (8,)), TrainConfig(iterations=5, batch_size=8))
    assert g.extra.abs().sum() > 0


@pytest.mark.parametrize("reset", [False, True])
def test_optimizer_state_carries_over_tasks_unless_reset(reset):
    """Adam's step count and moments continue into the next task (the P1/P2 reference code), or restart."""

    @dataclass
    class Steps(Method):
        seen: list = field(default_factory=list)

        def after_update(self, ctx, batch, out):
            p = next(ctx.model.parameters())
            self.seen.append((ctx.task, int(ctx.optimizer.state[p]["step"])))

    sc = tiny_split("class", n_tasks=3)
    m = Steps()
    train(sc, m, MLP(8, sc.n_outputs, (8,)), TrainConfig(iterations=4, batch_size=8, reset_optimizer=reset))
    first_of_task = [s for (t, s), prev in zip(m.seen, [(-1, 0)] + m.seen) if t != prev[0]]
    assert first_of_task == ([1, 1, 1] if reset else [1, 5, 9])


def test_normalize_gives_the_model_standardised_inputs():
    """``normalize=(mean, std)`` (Hsu et al.'s MNIST loader) turns [0, 1] pixels into (x - mean) / std."""
    from retain import benchmarks

    @dataclass
    class Peek(Method):
        first: list = field(default_factory=list)

        def after_update(self, ctx, batch, out):
            if not self.first:
                self.first.append(batch.x.clone())

    plain, norm = Peek(), Peek()
    retain.run(benchmark="split-digits", method=plain, iterations=1, n_tasks=2, seed=5)
    retain.run(benchmark="split-digits", method=norm, iterations=1, n_tasks=2, seed=5, normalize=(0.25, 0.5))
    x, xn = plain.first[0], norm.first[0]
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.allclose(xn, (x - 0.25) / 0.5)
    assert benchmarks.scenario("split-digits").mean == (0.0,)  # the benchmark itself is untouched


def test_pad_reaches_the_model_and_is_the_benchmark_protocol_by_default():
    """``pad`` (a run field) enlarges every image, so the model is built for the padded input; permuted-mnist's
    protocol (van de Ven's P2) pads by 2 unless told otherwise; a user-built scenario refuses it."""
    from retain import benchmarks
    from retain.api import RunConfig

    @dataclass
    class Peek(Method):
        shape: list = field(default_factory=list)

        def after_update(self, ctx, batch, out):
            self.shape.append(tuple(batch.x.shape[1:]))

    peek = Peek()
    r = retain.run(benchmark="split-digits", method=peek, iterations=1, n_tasks=2, seed=0, pad=3)
    assert peek.shape[0] == (1, 14, 14) and r.config["pad"] == 3
    assert RunConfig(benchmark="permuted-mnist").resolved().pad == 2
    assert RunConfig(benchmark="permuted-mnist", pad=0).resolved().pad == 0
    assert RunConfig(benchmark="split-mnist").resolved().pad == 0
    assert benchmarks.scenario("split-digits").input_shape == (1, 8, 8)  # the cached arrays are untouched
    with pytest.raises(ConfigError, match="applies to the named benchmarks"):
        retain.run(scenario=tiny_split("task"), method="finetune", iterations=1, pad=2)


def test_evaluation_restores_each_module_mode():
    """A module a method keeps in eval mode (frozen normalisation) is still in eval mode after evaluating."""
    from retain.trainer import Context, evaluate

    sc = tiny_split("class", n_tasks=2)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, sc.n_outputs))
    model.train()
    model[1].eval()
    ctx = Context(model, sc, TrainConfig(), Method(), torch.device("cpu"), torch.Generator(),
                  torch.zeros(sc.n_outputs, dtype=torch.bool))
    evaluate(ctx, sc)
    assert model.training and model[0].training and not model[1].training


def test_same_seed_same_matrix_different_seed_different():
    a = retain.run(benchmark="split-digits", method="finetune", epochs=1, seed=3)
    b = retain.run(benchmark="split-digits", method="finetune", epochs=1, seed=3)
    c = retain.run(benchmark="split-digits", method="finetune", epochs=1, seed=4)
    assert a.accuracy_matrix == b.accuracy_matrix
    assert a.accuracy_matrix != c.accuracy_matrix


def test_diverging_loss_stops_with_the_step():
    sc = tiny_split("class", n_tasks=2)

    class Explode(Method):
        def penalty(self, ctx, batch, out):
            return torch.tensor(float("nan")) if ctx.step == 3 else None

    with pytest.raises(TrainingError, match="step 3") as e:
        train(sc, Explode(), MLP(8, 4, (4,)), TrainConfig(iterations=10, batch_size=8))
    assert e.value.task == 0


def test_user_model_and_tensors_through_the_api():
    from retain import scenarios
    from retain.data import make_synthetic

    d = make_synthetic(n_classes=4, n_train=40, n_test=20, dim=6, spread=4.0)
    sc = scenarios.from_tensors(d.x_train, d.y_train, d.x_test, d.y_test, "task", n_tasks=2)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, sc.n_outputs))
    r = retain.run(scenario=sc, model=model, method="finetune", epochs=20, batch_size=16)
    assert r.metrics["acc"] > 0.9  # separable blobs, task-IL
    assert set(r.to_dict()) >= {"config", "accuracy_matrix", "baseline", "metrics", "timings", "versions"}


@pytest.mark.parametrize("collapse", [False, True])
def test_a_task_left_at_a_constant_guess_is_warned_about(collapse):
    """A collapse with a finite loss (here: every hidden unit killed as task 1 begins, so only the head's bias still
    learns) leaves task 1 at the accuracy of always answering one class; the run says so once, naming that task."""
    sc = tiny_split("class", n_tasks=3)

    @dataclass
    class Kill(Method):
        def begin_task(self, ctx):
            if collapse and ctx.task == 1:
                with torch.no_grad():
                    ctx.model.features[1].bias.fill_(-1e6)

    torch.manual_seed(0)
    r = train(sc, Kill(), MLP(8, sc.n_outputs, (16,)), TrainConfig(epochs=30, batch_size=8, lr=0.1))
    flagged = [w for w in r.warnings if "was not learned" in w]
    if collapse:
        assert len(flagged) == 1 and flagged[0].startswith("task 1 was not learned"), r.warnings
        assert r.accuracy_matrix[1][1] <= 0.5  # two balanced classes: a constant answer gets half
    else:
        assert not flagged and min(r.accuracy_matrix[t][t] for t in range(3)) > 0.6, r


@pytest.mark.parametrize("all_outputs", [False, True])
def test_class_il_training_spans_the_seen_classes_or_every_output(all_outputs):
    """One SGD step from an all-zero MLP on task 0 (classes 0, 1 of 6): every logit is 0, so the softmax is uniform
    over the active outputs and only the output biases move. Seen-classes mask: the other outputs get no gradient.
    ``all_outputs`` (Mammoth's loss): each unseen bias gets the mean probability 1/6, so it ends at -lr/6."""
    sc = tiny_split("class", n_tasks=3)
    model = MLP(8, sc.n_outputs, (4,))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    lr = 0.6
    after_task_0 = []

    @dataclass
    class Peek(Method):
        def end_task(self, ctx):
            if ctx.task == 0:
                after_task_0.append(list(ctx.model.parameters())[-1].detach().clone())

    train(sc, Peek(), model, TrainConfig(iterations=1, batch_size=8, optimizer="sgd", lr=lr,
                                         all_outputs=all_outputs))
    bias = after_task_0[0]
    unseen = bias[2:]
    expected = torch.full_like(unseen, -lr / 6 if all_outputs else 0.0)
    assert torch.allclose(unseen, expected, atol=1e-7)
    assert torch.allclose(bias.sum(), torch.tensor(0.0), atol=1e-6)  # softmax - one-hot sums to 0 per row


def test_all_outputs_outside_class_il_is_refused_before_training():
    check_pairing(Recorder(), "class", all_outputs=True)
    with pytest.raises(ConfigError, match="is for class-IL"):
        check_pairing(Recorder(), "task", all_outputs=True)
    with pytest.raises(ConfigError, match="is for class-IL"):
        retain.run(scenario=tiny_split("task", n_tasks=2), method=Recorder(), iterations=1, all_outputs=True)


@dataclass
class NanAt(Method):
    """A loss that goes NaN at global step ``at`` (``ctx.step`` counts the steps taken before this one)."""

    at: int = 0
    ended: list = field(default_factory=list)

    def penalty(self, ctx, batch, out):
        return out.sum() * float("nan") if ctx.step == self.at else None

    def end_task(self, ctx):
        self.ended.append(ctx.task)


@pytest.mark.parametrize("task_free", [False, True])
def test_a_non_finite_loss_is_caught_at_its_exact_step_without_reading_every_loss(monkeypatch, task_free):
    """The losses stay where they were computed and are read a block at a time (no device sync per step), yet a
    NaN deep inside a block, in the second task, is reported with its task and step, before ``end_task``."""
    from retain import trainer

    reads = []
    read = trainer.Losses.read
    monkeypatch.setattr(trainer.Losses, "read", lambda self: reads.append(len(self.where)) or read(self))
    from retain import scenarios
    from retain.data import make_synthetic

    sc = scenarios.split(make_synthetic(n_classes=4, n_train=125, n_test=4), "class", n_tasks=2)  # 250 per task
    config = TrainConfig(batch_size=1, task_free=True) if task_free else TrainConfig(iterations=250, batch_size=8)
    per_task = 250
    m = NanAt(at=per_task + 130)  # task 1, step 130 of the task (0-based); of a stream, its step 380
    step = per_task + 130 if task_free else 130
    with pytest.raises(TrainingError, match=f"at task 1, step {step} \\(global step {per_task + 131}\\)") as e:
        train(sc, m, MLP(8, sc.n_outputs, (4,)), config)
    assert (e.value.task, e.value.step) == (1, per_task + 131)
    assert m.ended == ([] if task_free else [0])  # task 1 never ended with a NaN model
    assert max(reads) == trainer.READ_EVERY and sum(reads) >= per_task + 131  # every loss was looked at...
    assert len(reads) < (per_task + 131) / 50  # ...in blocks, not one read per step


def test_a_crash_after_a_non_finite_loss_is_reported_as_the_divergence():
    """A method that fails on the NaN weights a step left (a QP, an eigen-decomposition) before the losses are
    read still gets the run reported as diverged at the step where the loss went NaN, not as its own crash."""

    @dataclass
    class Fragile(NanAt):
        def before_update(self, ctx):
            if ctx.step > self.at and any(p.isnan().any() for p in ctx.model.parameters()):
                raise RuntimeError("cannot factorise a NaN matrix")

    sc = tiny_split("class", n_tasks=2)
    with pytest.raises(TrainingError, match="at task 0, step 5 ") as e:
        train(sc, Fragile(at=5), MLP(8, sc.n_outputs, (4,)), TrainConfig(iterations=50, batch_size=8))
    assert isinstance(e.value.__context__, RuntimeError)


def test_progress_is_drawn_at_most_ten_times_a_second_and_at_each_task_end(monkeypatch):
    from retain import trainer

    calls = []
    clock = [0.0]
    monkeypatch.setattr(trainer.time, "monotonic", lambda: clock[0])

    @dataclass
    class Tick(Method):
        def after_update(self, ctx, batch, out):
            clock[0] += 0.01  # every step takes 10 ms

    sc = tiny_split("class", n_tasks=3)
    train(sc, Tick(), MLP(8, sc.n_outputs, (4,)), TrainConfig(iterations=40, batch_size=8),
          progress=lambda *a: calls.append(a))
    ends = [c for c in calls if c[1] == c[2] == 40]
    assert [c[0] for c in ends] == [0, 1, 2]  # each task's end, once
    assert len(calls) - len(ends) <= 3 * 40 * 0.01 / trainer.DRAW_EVERY_S + 1  # at most one draw per 0.1 s
    assert len(calls) >= 3 * 40 * 0.01 / trainer.DRAW_EVERY_S - 1  # and not fewer
    assert all(isinstance(c[3], float) and c[3] == c[3] for c in calls)  # the loss read back, finite


def test_a_class_il_task_learned_within_its_classes_but_outscored_is_not_called_collapsed():
    """Class-IL: task 1's rows are classified right among task 1's classes, but an old class wins every row (here
    forced: task 0's outputs +10⁶ at evaluation). That is forgetting-like interference, not a collapse: no warning."""
    sc = tiny_split("class", n_tasks=3)

    @dataclass
    class Outscored(Method):
        def forward(self, ctx, x, t):
            out = ctx.model(x)
            if not ctx.model.training and ctx.task >= 1:
                out = out + 1e6 * ctx.scenario.task_out[0].to(out.dtype)
            return out

    torch.manual_seed(0)
    r = train(sc, Outscored(), MLP(8, sc.n_outputs, (16,)), TrainConfig(epochs=30, batch_size=8, lr=0.1))
    assert r.accuracy_matrix[1][1] == 0.0 and r.task_il_matrix[1][1] > 0.9, (r.accuracy_matrix, r.task_il_matrix)
    assert not [w for w in r.warnings if "was not learned" in w], r.warnings
