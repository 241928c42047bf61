"""On-device augmentation (retain.augment): hand-checked crops and colour ops, draw statistics, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from retain.augment import PIPELINES, Augment, Crop, Greyscale, Jitter, ResizedCrop, build, hue_shift
from retain.errors import ConfigError

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def images(n: int, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    """Normalised images whose [0, 1] values are multiples of 1/255, as a uint8 dataset gives."""
    raw = torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed)).float() / 255
    return (raw - torch.tensor(MEAN[:c]).view(1, c, 1, 1)) / torch.tensor(STD[:c]).view(1, c, 1, 1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------- the crop

def test_crop_content_is_the_slice_of_the_black_padded_image_at_the_drawn_offset():
    aug = build("crop-flip", MEAN, STD, (3, 8, 8))
    assert aug.geometry.pad == 1  # an eighth of 8 pixels
    x = images(16)
    params = aug.draw(16, gen(3))
    out = aug.apply(x, params)
    black = [(0 - m) / s for m, s in zip(MEAN, STD)]
    padded = torch.stack([F.pad(x[:, k], (1, 1, 1, 1), value=black[k]) for k in range(3)], 1)
    for i in range(16):  # the expected crop built by slicing, row by row
        dy, dx, flipped = int(params[i, 0]), int(params[i, 1]), bool(params[i, 2])
        want = padded[i, :, dy:dy + 8, dx:dx + 8]
        assert torch.equal(out[i], want.flip(-1) if flipped else want), i
    assert aug(x, gen(3)).equal(out)  # __call__ = draw then apply on the same generator


def test_pad_is_black_before_normalisation():
    aug = build("crop-flip", MEAN, STD, (3, 32, 32))
    assert aug.geometry.pad == 4
    x = images(2, h=32, w=32)
    corner = torch.tensor([[0.0, 0.0, 0.0], [8.0, 8.0, 1.0]])  # top-left corner unflipped; bottom-right flipped
    out = aug.apply(x, corner)
    raw = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert raw[0, :, :4, :].abs().max() < 1e-6 and raw[0, :, :, :4].abs().max() < 1e-6  # the pad, black
    assert torch.equal(out[0, :, 4:, 4:], x[0, :, :28, :28])
    assert raw[1, :, -4:, :].abs().max() < 1e-6 and raw[1, :, :, :4].abs().max() < 1e-6  # flipped: pad on the left
    assert torch.equal(out[1, :, :28, 4:], x[1, :, 4:, 4:].flip(-1))


def test_offsets_are_uniform_over_0_to_2p_and_half_the_rows_flip():
    n = 18_000
    params = build("crop-flip", MEAN, STD, (3, 32, 32)).draw(n, gen(1))
    for axis in (0, 1):
        counts = torch.bincount(params[:, axis].long(), minlength=9)
        assert len(counts) == 9  # offsets 0..8, nothing outside
        sd = math.sqrt(n * (1 / 9) * (8 / 9))
        assert ((counts.float() - n / 9).abs() < 5 * sd).all(), counts
    rate = params[:, 2].mean().item()
    assert abs(rate - 0.5) < 5 * math.sqrt(0.25 / n)
    # the two axes and the flip are drawn independently: the joint cell (0, 0) has about 1/81 of the rows
    corner = ((params[:, 0] == 0) & (params[:, 1] == 0)).sum().item()
    assert abs(corner - n / 81) < 5 * math.sqrt(n / 81)


def test_flip_rate_through_the_images():
    x = torch.arange(8.0).expand(4000, 1, 1, 8).clone()  # a horizontal ramp: a flip reverses it
    aug = Augment("flip", Crop(pad=0), (), (0.0,), (1.0,), (1, 1, 8))
    out = aug(x, gen(2))
    flipped = out[:, 0, 0, 0] == 7
    assert torch.equal(out[flipped], x[flipped].flip(-1)) and torch.equal(out[~flipped], x[~flipped])
    assert abs(flipped.float().mean().item() - 0.5) < 5 * math.sqrt(0.25 / 4000)


# ---------------------------------------------------------------------------------------------- reproducibility

@pytest.mark.parametrize("name", [p for p in PIPELINES if p != "none"])
def test_the_same_seed_gives_the_same_batch_and_another_seed_another(name):
    aug = build(name, MEAN, STD, (3, 16, 16))
    x = images(32, h=16, w=16)
    a, b, c = aug(x, gen(7)), aug(x, gen(7)), aug(x, gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype


@pytest.mark.parametrize("name", [p for p in PIPELINES if p != "none"])
def test_draws_do_not_depend_on_the_images_dtype(name):
    aug = build(name, MEAN, STD, (3, 16, 16))
    x = images(24, h=16, w=16)
    g32, g64 = gen(5), gen(5)
    out32, out64 = aug(x, g32), aug(x.double(), g64)
    assert out64.dtype == torch.float64 and out32.dtype == torch.float32
    assert torch.allclose(out32.double(), out64, atol=1e-4)
    assert torch.equal(g32.get_state(), g64.get_state())  # the same number of draws
    assert torch.equal(aug.draw(24, gen(5)), aug.draw(24, gen(5)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", [p for p in PIPELINES if p != "none"])
def test_cpu_and_gpu_draw_the_same(name):
    aug = build(name, MEAN, STD, (3, 16, 16))
    x = images(64, h=16, w=16)
    cpu, gpu = aug(x, gen(4)), aug(x.cuda(), gen(4))
    assert gpu.device.type == "cuda"
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-4)


# ------------------------------------------------------------------------------------------------------- colour

def test_jitter_of_strength_zero_is_the_identity():
    aug = Augment("j0", Crop(pad=0, flip=0.0), (Jitter(0.0, 0.0, 0.0, 0.0, p=1.0),), MEAN, STD, (3, 8, 8))
    params = aug.draw(10, gen(0))
    assert (params[:, 3] == 1).all() and (params[:, 4:7] == 1).all() and (params[:, 7] == 0).all()
    x = images(10)
    assert torch.allclose(aug(x, gen(0)), x, atol=1e-5)


def test_jitter_factors_by_hand():
    raw = torch.rand(3, 3, 4, 4, generator=gen(1))
    jit = Jitter()
    p = torch.tensor([[1.0, 1.3, 1.0, 1.0, 0.0],  # brightness only
                      [1.0, 1.0, 0.5, 1.0, 0.0],  # contrast only
                      [0.0, 1.3, 0.5, 0.5, 0.1]])  # drawn but not applied
    out = jit.apply(raw, p)
    assert torch.allclose(out[0], (raw[0] * 1.3).clamp(0, 1))
    grey = (0.299 * raw[1, 0] + 0.587 * raw[1, 1] + 0.114 * raw[1, 2]).mean()
    assert torch.allclose(out[1], 0.5 * raw[1] + 0.5 * grey, atol=1e-6)
    assert torch.equal(out[2], raw[2])


def test_hue_shift_rotates_through_hsv():
    red, green, blue = torch.eye(3).view(3, 3, 1, 1)
    assert torch.allclose(hue_shift(red[None], torch.tensor([1 / 3])), green[None], atol=1e-6)
    assert torch.allclose(hue_shift(red[None], torch.tensor([-1 / 3])), blue[None], atol=1e-6)
    raw = torch.rand(4, 3, 5, 5, generator=gen(2))
    assert torch.allclose(hue_shift(raw, torch.zeros(4)), raw, atol=1e-6)
    assert torch.allclose(hue_shift(raw, torch.ones(4)), raw, atol=1e-5)  # a whole turn
    g = torch.full((1, 3, 2, 2), 0.4)  # grey has no hue
    assert torch.allclose(hue_shift(g, torch.tensor([0.25])), g)


def test_simclr_recipe_rates_and_untouched_rows_are_exact():
    aug = build("crop-flip-jitter", MEAN, STD, (3, 8, 8))
    assert aug.colour == (Jitter(0.4, 0.4, 0.4, 0.1, 0.8), Greyscale(0.2))
    n = 6000
    params = aug.draw(n, gen(9))
    jit, grey = params[:, 3], params[:, 8]
    assert abs(jit.mean().item() - 0.8) < 5 * math.sqrt(0.16 / n)
    assert abs(grey.mean().item() - 0.2) < 5 * math.sqrt(0.16 / n)
    factors = params[:, 4:7]
    assert factors.min() >= 0.6 and factors.max() <= 1.4 and params[:, 7].abs().max() <= 0.1
    x = images(n)
    out = aug.apply(x, params)
    plain = aug.apply(x, torch.cat([params[:, :3], torch.zeros(n, 6)], 1))  # the same crops, no colour
    untouched = (jit == 0) & (grey == 0)
    assert untouched.sum() > 100
    assert torch.equal(out[untouched], plain[untouched])
    raw = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    greyed = raw[grey == 1]
    assert torch.allclose(greyed[:, 0], greyed[:, 1], atol=1e-5) and torch.allclose(greyed[:, 1], greyed[:, 2],
                                                                                     atol=1e-5)


# ------------------------------------------------------------------------------------------- random resized crop

def test_resized_crop_boxes_stay_within_scale_and_ratio():
    h, w = 32, 32
    params = build("rrc-flip", MEAN, STD, (3, h, w)).draw(5000, gen(3))
    top, left, bh, bw = params[:, 0], params[:, 1], params[:, 2], params[:, 3]
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
    frac = bh * bw / (h * w)
    # rounding the sides to whole pixels moves the area by at most about one row and one column
    assert frac.max() <= 1 and frac.min() >= 0.07
    ratio = bw / bh
    assert ratio.min() >= 0.75 * (1 - 2 / math.sqrt(0.08 * h * w)) - 1e-6
    assert ratio.max() <= 4 / 3 * (1 + 2 / math.sqrt(0.08 * h * w)) + 1e-6
    assert frac.mean() > 0.4  # the area is uniform in [0.08, 1] before the ratio test (mean ~0.54)
    assert abs(params[:, 4].mean().item() - 0.5) < 0.05


def test_resized_crop_resamples_exactly_the_drawn_box():
    # a horizontal and a vertical ramp: bilinear resampling of a linear image is exact, so each output pixel
    # must hold the input coordinate it maps to, clamped at the border
    h, w = 12, 16
    aug = Augment("rrc", ResizedCrop(), (), (0.0,), (1.0,), (2, h, w))
    cols = torch.arange(w, dtype=torch.float64).expand(h, w)
    rows = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
    x = torch.stack([cols, rows]).expand(200, 2, h, w).clone()
    params = aug.draw(200, gen(6))
    out = aug.apply(x, params)
    top, left, bh, bw, flipped = params.double().unbind(1)
    k = torch.arange(w, dtype=torch.float64)
    u = left[:, None] + (k + 0.5) * bw[:, None] / w - 0.5
    u = torch.where(flipped[:, None] > 0.5, u.flip(-1), u).clamp(0, w - 1)
    v = (top[:, None] + (torch.arange(h, dtype=torch.float64) + 0.5) * bh[:, None] / h - 0.5).clamp(0, h - 1)
    assert torch.allclose(out[:, 0], u[:, None, :].expand(-1, h, -1), atol=1e-6)
    assert torch.allclose(out[:, 1], v[:, :, None].expand(-1, -1, w), atol=1e-6)
    assert out.shape == x.shape


def test_resized_crop_falls_back_to_the_centre_crop():
    never = ResizedCrop(scale=(2.0, 3.0), flip=0.0)  # a box larger than the image never fits
    square = never.draw(5, (8, 8), gen(0))
    assert torch.equal(square[:, :4], torch.tensor([[0.0, 0.0, 8.0, 8.0]]).expand(5, 4))
    wide = never.draw(5, (8, 20), gen(0))  # ratio 2.5 > 4/3: full height, width round(8 * 4/3) = 11, centred
    assert torch.equal(wide[:, :4], torch.tensor([[0.0, 4.0, 8.0, 11.0]]).expand(5, 4))
    tall = never.draw(5, (20, 8), gen(0))  # ratio 0.4 < 3/4: full width, height round(8 / 0.75) = 11
    assert torch.equal(tall[:, :4], torch.tensor([[4.0, 0.0, 11.0, 8.0]]).expand(5, 4))
    x = images(5)
    out = Augment("rrc", never, (), MEAN, STD, (3, 8, 8)).apply(x, square)
    assert torch.allclose(out, x, atol=1e-5)  # the whole image at its own size


def test_a_mix_of_fitting_and_failing_rows_takes_the_first_fitting_try():
    n, side = 300, 10
    crop = ResizedCrop(scale=(0.9, 2.5), flip=0.0)  # most tries are too large for the image
    params = crop.draw(n, (side, side), gen(1))
    g = gen(1)  # the candidates again, in the order draw() takes them
    area = torch.empty(n, 10).uniform_(0.9, 2.5, generator=g) * side * side
    log_ratio = torch.empty(n, 10).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)
    fallbacks = 0
    for i in range(n):
        want = (side, side)  # the centre crop of a square image when nothing fits
        for a, r in zip(area[i].tolist(), log_ratio[i].tolist()):
            cw, ch = round(math.sqrt(a * math.exp(r))), round(math.sqrt(a / math.exp(r)))
            if 0 < cw <= side and 0 < ch <= side:
                want = (ch, cw)
                break
        else:
            fallbacks += 1
        assert (params[i, 2].item(), params[i, 3].item()) == want, i
    assert 10 < fallbacks < n - 10  # both paths ran


# ------------------------------------------------------------------------------------------------------ build

def test_build_refuses_what_the_inputs_cannot_take():
    assert build("none", MEAN, STD, (784,)) is None
    with pytest.raises(ConfigError, match=r"--augment crop-flip needs image inputs \[C, H, W\]; .*\[784\]; "
                                          r"use --augment none"):
        build("crop-flip", (0.0,), (1.0,), (784,))
    with pytest.raises(ConfigError, match="3 channels.*use --augment crop-flip$"):
        build("crop-flip-jitter", (0.1307,), (0.3081,), (1, 28, 28))
    with pytest.raises(ConfigError, match="unknown augmentation 'flip'"):
        build("flip", MEAN, STD, (3, 8, 8))
    with pytest.raises(ConfigError, match="mean has 2 values for 3 channels"):
        build("crop-flip", (0.1, 0.2), (1.0,), (3, 8, 8))
    assert build("rrc-flip", (0.1307,), (0.3081,), (1, 28, 28)).input_shape == (1, 28, 28)
    assert build("crop-flip", MEAN, STD, (3, 64, 64)).geometry.pad == 4  # Mammoth's Tiny-ImageNet padding
    assert build("crop-flip", MEAN, STD, (3, 64, 64), pad=8).geometry.pad == 8
    for message in [str(e) for e in _errors()]:
        assert "\n" not in message


def _errors() -> list[ConfigError]:
    out = []
    for args in (("crop-flip", (0.0,), (1.0,), (784,)), ("rrc-flip-jitter", (0.0,), (1.0,), (1, 8, 8))):
        try:
            build(*args)
        except ConfigError as e:
            out.append(e)
    return out


def test_a_single_mean_and_std_serve_every_channel():
    one = build("crop-flip", (0.5,), (0.25,), (3, 8, 8))
    three = build("crop-flip", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (3, 8, 8))
    x = images(6)
    assert torch.equal(one(x, gen(1)), three(x, gen(1)))


# ------------------------------------------------------------------------------------- through the trainer

def tiny_images(n_train: int = 96, n_test: int = 48, seed: int = 0):
    """uint8 RGB images [N, 3, 8, 8] of 4 classes (a per-class colour plus noise): a 2-task class-IL scenario."""
    from retain.scenarios import from_tensors

    g = gen(seed)

    def make(n):
        y = torch.arange(n) % 4
        base = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])[y]
        x = base[:, :, None, None] + torch.randint(-40, 41, (n, 3, 8, 8), generator=g)
        return x.clamp(0, 255).to(torch.uint8), y

    sc = from_tensors(*make(n_train), *make(n_test), mode="class", n_tasks=2)
    sc.mean, sc.std = MEAN, STD
    return sc


def tiny_conv(n_outputs: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(16, n_outputs))


class Recorder:
    """Wraps a pipeline: keeps every augmented batch it returned (alive, so storages are not reused)."""

    def __init__(self, aug: Augment):
        self.aug, self.outputs = aug, []

    def __call__(self, x, generator):
        out = self.aug(x, generator)
        self.outputs.append(out)
        return out

    def storages(self) -> set[int]:
        return {o.untyped_storage().data_ptr() for o in self.outputs}


def trainer(method, augment: str = "crop-flip", **kw):
    from retain.trainer import TrainConfig, Trainer

    config = TrainConfig(**{"iterations": 6, "batch_size": 8, "lr": 0.01, "device": "cpu", "augment": augment, **kw})
    return Trainer(tiny_images(), method, tiny_conv(), config)


def test_evaluation_is_never_augmented():
    from retain.methods.er import ER
    from retain.trainer import evaluate

    t = trainer(ER(buffer_size=30))
    rec = Recorder(t.ctx.augment)
    t.ctx.augment = rec
    trained = t.run()
    assert len(rec.outputs) >= 12  # training was augmented
    calls = len(rec.outputs)
    row = evaluate(t.ctx, t.scenario)
    assert len(rec.outputs) == calls  # no call at evaluation
    assert row == trained.accuracy_matrix[-1]
    t.ctx.augment = None
    assert evaluate(t.ctx, t.scenario) == row  # the same model, nothing configured: the same row


@pytest.mark.parametrize("storage", ["reservoir", "class_balanced"])
def test_er_buffer_holds_the_unaugmented_rows(storage):
    from retain.methods.er import ER

    t = trainer(ER(buffer_size=40, storage=storage))
    t.run()
    buf = t.method.buffer
    stored = buf.x[buf.occupied()]
    assert len(stored) == 40
    raw = torch.cat([t.scenario.batch(t.scenario.tasks[k].train_idx, k).x for k in range(2)])
    match = (stored.flatten(1)[:, None, :] == raw.flatten(1)[None, :, :]).all(-1)
    assert match.any(1).all()  # every stored row is exactly one of the prepared, un-augmented training rows


def test_der_stores_the_logits_of_the_augmented_view_it_trained_on():
    import copy

    from retain.methods.der import DER

    t = trainer(DER(buffer_size=50), iterations=1)  # one step per task; the buffer keeps all 16 rows
    model0 = copy.deepcopy(t.ctx.model)
    seen = []
    t.ctx.model.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach()))
                                      if m.training else None)
    t.run()
    xin, out = seen[0]  # the first step's forward (its buffer was empty: no replay)
    buf = t.method.buffer
    rows = buf.occupied()[:8]  # the reservoir fills in arrival order
    assert torch.equal(buf.logits[rows], out)
    t.ctx.task = 0  # the first task's batch order again
    first = next(t.ctx.batches(t.view.task_data(0)))
    assert torch.equal(buf.x[rows], first.x)  # the rows are stored un-augmented
    assert not torch.equal(xin, first.x)  # ... but the step trained on an augmented view
    with torch.no_grad():
        assert torch.allclose(model0(xin), buf.logits[rows], atol=1e-6)  # the logits are that view's
        assert not torch.allclose(model0(first.x), buf.logits[rows], atol=1e-3)


@pytest.mark.parametrize("method,params", [("er", {"weighting": "task"}), ("er", {}), ("der", {}), ("derpp", {}),
                                           ("agem", {"sample_size": 8}), ("gem", {"memory_per_task": 8}),
                                           ("mer", {"replay_batch": 3, "buffer_size": 20}),
                                           ("maml_replay", {"inner_steps": 1, "buffer_size": 20})])
def test_every_training_forward_sees_augmented_rows(method, params):
    from retain.method import create

    t = trainer(create(method, params), iterations=4)
    rec = Recorder(t.ctx.augment)
    t.ctx.augment = rec
    inputs = []
    t.ctx.model.register_forward_hook(lambda mod, args, out: inputs.append(args[0]) if mod.training else None)
    t.run()
    ptrs = rec.storages()
    assert inputs and all(x.untyped_storage().data_ptr() in ptrs for x in inputs)  # none un-augmented
    if params == {} and method == "er":  # concat: the replayed rows join the batch, augmented with it
        assert len(rec.outputs) == 2 * 4
    else:  # replayed rows augmented by the method, beyond the one call per step for the batch
        assert len(rec.outputs) > 2 * 4


def test_dgr_augments_the_current_rows_once_per_step_and_not_the_generated_ones():
    from retain.methods.dgr import DGR

    t = trainer(DGR(fc_units=16, z_dim=4), iterations=3)
    rec = Recorder(t.ctx.augment)
    t.ctx.augment = rec
    t.run()
    assert len(rec.outputs) == 6  # 2 tasks x 3 steps: the current rows only


@pytest.mark.parametrize("method", ["der", "mer"])
def test_resume_mid_task_with_augmentation_is_identical(tmp_path, method):
    from retain.checkpoint import Checkpointer
    from retain.method import create
    from tests.test_checkpoint import Recording

    params = {"buffer_size": 20} if method == "der" else {"buffer_size": 20, "replay_batch": 3}

    def go(checkpointer=None, augment="crop-flip"):
        t = trainer(create(method, params), augment=augment, iterations=None, epochs=2, batch_size=16)
        t.checkpointer = checkpointer
        trained = t.run()
        return trained.accuracy_matrix, [p.detach().clone() for p in t.ctx.model.parameters()]

    plain_R, plain = go()
    _, unaugmented = go(augment="none")
    assert not all(torch.equal(a, b) for a, b in zip(plain, unaugmented))  # augmentation changed the training
    rec = Recording(tmp_path / "run.ckpt", every=5)
    R, params_ck = go(rec)
    assert R == plain_R and all(torch.equal(a, b) for a, b in zip(plain, params_ck))
    positions = []
    for copy in (rec.copies[0], rec.copies[len(rec.copies) // 2], rec.copies[-1]):
        ck = Checkpointer(copy, every=5, resume=True, keep=True)
        R, resumed = go(ck)
        positions.append(ck.resumed_from)
        assert R == plain_R, ck.resumed_from
        assert all(torch.equal(a, b) for a, b in zip(plain, resumed)), ck.resumed_from
    assert any(p["task_step"] > 0 for p in positions)  # resumed inside a task at least once


def test_a_run_on_feature_vectors_refuses_an_image_pipeline():
    import retain
    from retain.scenarios import from_tensors

    x, y = torch.rand(40, 10), torch.arange(40) % 4
    sc = from_tensors(x, y, x, y, n_tasks=2)
    with pytest.raises(ConfigError, match=r"--augment crop-flip needs image inputs \[C, H, W\]; .*\[10\]"):
        retain.run(scenario=sc, method="er", augment="crop-flip", iterations=2)
