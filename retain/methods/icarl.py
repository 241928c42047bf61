"""iCaRL: herding exemplars in a fixed memory, sigmoid distillation, and the nearest-mean-of-exemplars classifier."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.buffers import Exemplars, embed
from retain.errors import ConfigError
from retain.method import Memory, Method, frozen_copy, param, register
from retain.scenarios import Batch, TaskData

CLASSIFIERS = ("nme", "linear")


def nme_scores(features: Tensor, means: Tensor) -> Tensor:
    """Scores of the nearest-mean-of-exemplars rule: −‖φ(x) − μ_y‖² for each row of ``features`` [B, D] (already
    L2-normalised) and each class mean in ``means`` [C, D]; the argmax is the nearest mean."""
    return -(features.unsqueeze(1) - means.unsqueeze(0)).pow(2).sum(2)


def class_mean(features: Tensor, flipped: Tensor | None = None) -> Tensor:
    """μ_y of iCaRL: the mean of the L2-normalised features, re-normalised (Rebuffi et al. §2.1: "the results of
    any operation on feature vectors, e.g. averages, are also re-normalized"); with ``flipped``, the features of
    the flipped exemplars too, both means averaged before re-normalising (the authors' code)."""
    mu = F.normalize(features.float(), dim=1).mean(0)
    if flipped is not None:
        mu = (mu + F.normalize(flipped.float(), dim=1).mean(0)) / 2
    return F.normalize(mu, dim=0)


@register("icarl")
@dataclass
class ICaRL(Method):
    """iCaRL: BCE with sigmoid distillation on new data plus herding exemplars; nearest-mean-of-exemplars at test.

    Rebuffi, Kolesnikov, Sperl & Lampert, "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017
    (Algorithms 1-5).

    Memory: K = ``buffer_size`` exemplars in total, m = ⌊K / t⌋ per class once t classes are seen. At a task's end
    (Alg. 5, 4) every old class's exemplar set is cut to its first m (the shrinking rule: the last chosen go), then
    each new class's m exemplars are chosen by herding from all its training rows in the feature space of the
    model just trained (``model.features``, L2-normalised; :func:`retain.buffers.herding`: the next exemplar is the
    one that brings the mean of those chosen closest to the class mean). Training (Alg. 3): the task's training set
    is its new data plus every exemplar (``task_data``), shuffled together; the loss is the binary cross-entropy
    (sigmoid per output) over the outputs the run trains (the classes seen so far; every output with
    ``--all-outputs``), the targets of the current task's classes one-hot, those of earlier classes the frozen
    previous model's sigmoid outputs on the same (augmented) input, for new rows and exemplars alike.
    Evaluation (Alg. 1): ``classifier = nme`` scores each class by −‖φ(x) − μ_y‖², φ the L2-normalised
    feature and μ_y the re-normalised mean of its exemplars' normalised features (:func:`class_mean`), computed at
    the task's end; classes without exemplars score −inf. ``classifier = linear`` evaluates the trained head
    instead (the "hybrid1" ablation of the paper); the record states which, as a hyper-parameter.

    Hooks: ``begin_task`` (freeze the previous model), ``task_data`` (new data + exemplars), ``observe`` (the BCE
    step in place of the trainer's cross-entropy), ``end_task`` (shrink, herding, class means), ``forward`` (NME
    in evaluation).

    Deviations, each with its reason:

    * The distillation targets q come from the frozen copy on the fly, on the step's rows, rather than computed
      once for the whole training set before training (Alg. 3 line 2): identical without augmentation; with
      ``--augment`` the target is the old model's output on the same augmented view (as Mammoth), which the paper
      does not specify. One extra no-grad forward per step.
    * The BCE is the mean over rows and trained outputs (the authors' Theano code and Mammoth both average over
      outputs too), not the paper's sum; a constant factor, absorbed by the learning rate.
    * ``flip`` (off by default): the authors' code (and Mammoth) also average the features of horizontally
      flipped exemplars into μ_y; that is right for natural images trained with flips and wrong for digits, so it
      is an option, used only on image inputs [C, H, W].
    * The paper's schedule (lr 2.0 divided by 5 at epochs 49 and 63 of 70, batch 128) is the run's (``--lr``,
      ``--epochs``, ``--batch-size``); retain has no step schedule, so a preset keeps the reference library's
      constant learning rate. The weight decay is the paper's 1e-5·Σθ² on the loss (``weight_decay``).
    * The exemplars are kept as indices into the training set (the training view holds every row), which is what
      lets them join the task's shuffled training set; the memory report counts them as K stored rows, the
      storage they stand for.

    Mammoth's ``icarl`` (checked against its code) differs from the paper in: the BCE always spans every output
    from the first task (``--all-outputs`` here), the flipped exemplars always enter μ_y (on MNIST too), and its
    MLP is Xavier-initialised; the herding, the ⌊K/t⌋ split, the training set and the NME rule are the paper's.
    """

    buffer_size: int = param(2000, "exemplars kept in total, split evenly over the classes seen (K)")
    classifier: str = param("nme", "evaluation: nme (nearest mean of exemplars) or linear (the trained head)",
                            choices=CLASSIFIERS)
    flip: bool = param(False, "class means also over horizontally flipped exemplars (authors' code; images only)")
    weight_decay: float = param(1e-5, "weight of the L2 penalty weight_decay·Σθ² added to the loss (paper: 1e-5)")

    modes = ("class",)
    needs_boundaries = True  # exemplars are chosen, and the previous model frozen, at task boundaries
    presets = {
        # Mammoth best_args.py, seq-mnist, buffer 500 (lr 0.1, batch 10, 1 epoch, SGD: set by the run)
        "split-mnist/class": {"buffer_size": 500},
        # no reference entry for Fashion-MNIST: Mammoth's seq-mnist arguments, as for MNIST
        "split-fashion-mnist/class": {"buffer_size": 500},
        # Mammoth best_args.py, seq-cifar10, buffer 500 (lr 0.1, batch 32, 50 epochs, wd 1e-5: set by the run);
        # the flipped means as the authors' code and Mammoth compute them
        "seq-cifar10/class": {"buffer_size": 500, "flip": True},
        # retain's convention for split-digits (the buffer of ER's preset)
        "split-digits/class": {"buffer_size": 200},
    }

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ConfigError(f"icarl: buffer_size must be at least 1, got {self.buffer_size}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"icarl: weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.classifier not in CLASSIFIERS:
            raise ConfigError(f"icarl: classifier must be one of {', '.join(CLASSIFIERS)}, got {self.classifier!r}")
        self.exemplars = Exemplars(self.buffer_size)  # m = K // t per class, in herding order
        self.means: Tensor | None = None  # [C, D] class means of the exemplars (rows follow mean_classes)
        self.mean_classes: Tensor | None = None  # [C] the outputs those means belong to
        self.old: nn.Module | None = None  # the model as the previous task left it (distillation targets)

    def memory(self, scenario: Any) -> Memory:
        return self.exemplars.memory(scenario)

    # --------------------------------------------------------------------------------------------- hooks
    def begin_task(self, ctx: Any) -> None:
        if ctx.task == 0:
            return
        self.old = frozen_copy(ctx.model)

    def task_data(self, ctx: Any, data: TaskData) -> TaskData:
        return data.cat(self.exemplars.data()) if len(self.exemplars) else data

    def observe(self, ctx: Any, batch: Batch) -> Tensor:
        view = ctx.view(batch)
        with ctx.autocast():
            out = self.forward(ctx, view.x, view.t)
            loss = self.loss(ctx, view, out)
            if self.weight_decay > 0:  # the paper's (and Mammoth's) decay: a penalty on the loss, not the optimizer's
                loss = loss + self.weight_decay * sum(p.pow(2).sum() for p in self.parameters(ctx.model))
        ctx.optimizer.zero_grad(set_to_none=True)
        loss = ctx.backward(loss, len(view))
        ctx.step_optimizer()
        return loss

    def end_task(self, ctx: Any) -> None:
        if getattr(ctx.model, "features", None) is None:
            raise ConfigError("icarl needs a model with a .features module (the representation φ); retain's mlp "
                              "and resnet models have one")
        self.exemplars.select(ctx)  # Alg. 5 (shrink, keeping the first m chosen), then Alg. 4 (herding)
        self.update_means(ctx)

    def forward(self, ctx: Any, x: Tensor, t: Tensor) -> Tensor:
        if ctx.model.training or self.classifier == "linear" or self.means is None:
            return ctx.model(x)
        feats = F.normalize(ctx.model.features(x).flatten(1).float(), dim=1)
        scores = feats.new_full((len(x), ctx.scenario.n_outputs), float("-inf"))
        scores[:, self.mean_classes] = nme_scores(feats, self.means)
        return scores

    # ------------------------------------------------------------------------------------------- helpers
    def loss(self, ctx: Any, batch: Batch, out: Tensor) -> Tensor:
        """Alg. 3's loss: BCE over the trained outputs, one-hot targets for the current task's classes, the old
        model's sigmoid outputs for the earlier classes'."""
        out = out.float()
        target = F.one_hot(batch.y, out.shape[1]).float()
        if self.old is not None:
            old = ctx.scenario.task_out[:ctx.task].any(0)
            with torch.no_grad():
                q = torch.sigmoid(self.old(batch.x).float())
            target[:, old] = q[:, old]
        mask = ctx.mask(batch.t if batch.task is None else batch.task)  # seen classes; None: every output
        if mask is not None:
            out, target = out[:, mask], target[:, mask]
        return F.binary_cross_entropy_with_logits(out, target)

    @torch.no_grad()
    def update_means(self, ctx: Any) -> None:
        """μ_y of every class with exemplars, from the current model (Alg. 1's class means)."""
        flip = self.flip and len(ctx.scenario.input_shape) == 3
        classes, means = [], []
        for c, idx in sorted(self.exemplars.idx.items()):
            if len(idx) == 0:
                continue
            idx, task = idx.to(ctx.scenario.y_train.device), self.exemplars.task[c]
            feats = embed(ctx.model, ctx.scenario, idx, task)
            flipped = embed(ctx.model, ctx.scenario, idx, task, flip=True) if flip else None
            classes.append(c)
            means.append(class_mean(feats, flipped))
        if classes:
            self.means = torch.stack(means)
            self.mean_classes = torch.tensor(classes, dtype=torch.long, device=self.means.device)
