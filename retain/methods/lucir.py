"""LUCIR: a cosine-normalised classifier with a less-forget constraint, a margin ranking loss and a class-balanced
finetuning (Hou et al. 2019); the cosine head and the finetuning it shares with PODNet live here too."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.buffers import Exemplars, embed
from retain.errors import ConfigError
from retain.method import Memory, Method, frozen_copy, param, register
from retain.scenarios import Batch, TaskData

# ------------------------------------------------------------------------------------------ the cosine head

def merge_proxies(cos: Tensor, proxies: int) -> Tensor:
    """PODNet's local-similarity aggregation: each class's similarity is the mean of its ``proxies`` similarities
    weighted by their softmax, ŝ_c = Σ_k softmax_k(s_c,k) s_c,k. Columns are grouped per class ([c·K, c·K + K))."""
    if proxies == 1:
        return cos
    s = cos.view(len(cos), -1, proxies)
    return (F.softmax(s, dim=-1) * s).sum(-1)


class CosineHead(nn.Module):
    """``sigma · cos(f, w_c)``: the cosine-normalised classifier of LUCIR (one weight per class) and PODNet's
    local-similarity classifier (``proxies`` weights per class, merged by :func:`merge_proxies`). ``sigma`` is the
    learned scale (η in PODNet), initialised to 1; the weights are drawn as both reference codes do, uniform in
    ±1/sqrt(d)."""

    def __init__(self, in_features: int, n_outputs: int, proxies: int = 1):
        super().__init__()
        self.in_features, self.n_outputs, self.proxies = in_features, n_outputs, proxies
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(n_outputs * proxies, in_features).uniform_(-bound, bound))
        self.sigma = nn.Parameter(torch.ones(()))

    def cosine(self, f: Tensor) -> Tensor:
        """[B, n_outputs] class similarities (proxies merged), without the scale."""
        cos = F.linear(F.normalize(f.flatten(1), dim=1), F.normalize(self.weight, dim=1))
        return merge_proxies(cos, self.proxies)

    def forward(self, f: Tensor) -> Tensor:
        return self.sigma * self.cosine(f)

    def rows(self, classes: Tensor) -> Tensor:
        """Bool mask over the weight's rows: the proxies of the outputs in ``classes`` (a bool [n_outputs])."""
        return classes.repeat_interleave(self.proxies)


def install_head(ctx: Any, proxies: int, who: str) -> CosineHead:
    """Replace the model's linear output layer by a :class:`CosineHead` with the same number of outputs (so the
    scenario's masks still apply); a model resumed from a checkpoint already has it."""
    model = ctx.model
    head = getattr(model, "head", None)
    if isinstance(head, CosineHead):
        return head
    if not (isinstance(head, nn.Linear) and isinstance(getattr(model, "features", None), nn.Module)):
        raise ConfigError(f"{who} replaces the model's output layer by a cosine classifier: it needs a model with "
                          "`features` (the embedding) and `head` (an nn.Linear), as retain's mlp, resnet18 and "
                          "resnet32 have")
    new = CosineHead(head.in_features, head.out_features, proxies).to(head.weight.device)
    model.head = new
    return new


@torch.no_grad()
def imprint(ctx: Any, head: CosineHead, new: Tensor) -> None:
    """Weight imprinting (LUCIR's code, Mammoth's ``imprint_weights``): each new class's weight is the normalised
    mean of its training rows' normalised embeddings, scaled to the mean norm of the older classes' weights."""
    old = head.rows(ctx.scenario.task_out[:ctx.task].any(0).to(head.weight.device))
    norm = head.weight[old].norm(dim=1).mean() if bool(old.any()) else head.weight.new_ones(())
    sc = ctx.scenario
    data = sc.task_data(ctx.task)
    y = sc.targets(sc.y_train[data.idx], ctx.task)
    f = F.normalize(embed(ctx.model, sc, data.idx, ctx.task), dim=1)
    for c in new.nonzero().flatten().tolist():
        mine = f[y == c]
        if len(mine):
            w = F.normalize(mine.mean(0), dim=0) * norm
            head.weight[c * head.proxies:(c + 1) * head.proxies] = w


def check_common(method: Method, who: str, non_negative: tuple[str, ...]) -> None:
    """The checks LUCIR and PODNet share: the ``non_negative`` fields finite and >= 0, ``K`` and ``buffer_size`` at
    least 1, ``ft_epochs`` >= 0."""
    for name in non_negative:
        v = getattr(method, name)
        if not (v >= 0 and math.isfinite(v)):
            raise ConfigError(f"{who}: {name} must be a finite number >= 0, got {v}")
    if method.K < 1:
        raise ConfigError(f"{who}: K must be at least 1, got {method.K}")
    if method.buffer_size < 1:
        raise ConfigError(f"{who}: buffer_size must be at least 1, got {method.buffer_size}")
    if method.ft_epochs < 0:
        raise ConfigError(f"{who}: ft_epochs must be >= 0, got {method.ft_epochs}")


# ------------------------------------------------------------------------------------ the balanced finetuning

def balanced_finetune(method: Method, ctx: Any, train: list[nn.Parameter], epochs: int, lr: float,
                      decay_at: int | None, weight_decay: float | None = None, data: TaskData | None = None,
                      lr_at: Callable[[int], float] | None = None, freeze_bn: bool = True) -> None:
    """Train only ``train`` (the classifier's weights) on the exemplars of every seen class (a class-balanced
    set), with the method's own step and losses, the rest of the model frozen and batch-norm statistics kept as
    they are (Mammoth's ``bn_track_stats(False)``, the authors' ``fix_bn``): SGD with the run's momentum, the
    learning rate divided by 10 from epoch ``decay_at`` (None: constant).

    ``data``: other rows than the method's exemplars; ``lr_at(epoch)``: the learning rate of each epoch, in place
    of ``decay_at``'s step; ``freeze_bn=False`` lets batch norm update its statistics (PyCIL's finetuning)."""
    data = method.exemplars.data() if data is None else data
    if len(data) == 0 or epochs <= 0:
        return
    model = ctx.model
    grads = {p: p.requires_grad for p in model.parameters()}
    keep = {id(p) for p in train}
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if freeze_bn else []
    tracking = [m.track_running_stats for m in norms]
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    for m in norms:
        m.track_running_stats = False
    saved = ctx.optimizer
    wd = ctx.config.weight_decay if weight_decay is None else weight_decay
    ctx.optimizer = torch.optim.SGD(train, lr=lr, momentum=ctx.config.momentum, weight_decay=wd)
    per_epoch = math.ceil(len(data) / ctx.config.batch_size)
    method._finetuning = True
    try:
        for i, batch in enumerate(ctx.batches(data, epochs=epochs, seed=ctx.config.seed * 31 + ctx.task + 20_000)):
            if lr_at is not None and i % per_epoch == 0:
                for g in ctx.optimizer.param_groups:
                    g["lr"] = lr_at(i // per_epoch)
            elif decay_at is not None and i == decay_at * per_epoch:
                for g in ctx.optimizer.param_groups:
                    g["lr"] = lr * 0.1
            method.observe(ctx, batch)
    finally:
        method._finetuning = False
        ctx.optimizer = saved
        for p, g in grads.items():
            p.requires_grad_(g)
        for m, t in zip(norms, tracking):
            m.track_running_stats = t


# ------------------------------------------------------------------------------------------------- LUCIR

def margin_ranking(cos: Tensor, y: Tensor, old: Tensor, new: Tensor, K: int, margin: float) -> Tensor:
    """LUCIR's inter-class separation (eq. 8): for each row of an old class, its ground-truth cosine against the
    ``K`` highest cosines among the new classes, Σ_k max(0, m − cos_y + cos_k), averaged over the (row, k) pairs
    as ``nn.MarginRankingLoss`` does; 0 without such rows. ``old`` / ``new``: bool masks over the outputs."""
    hard = old[y]
    k = min(K, int(new.sum()))
    if not bool(hard.any()) or k == 0:
        return cos.new_zeros(())
    rows = cos[hard]
    gt = rows.gather(1, y[hard].unsqueeze(1))
    negatives = rows[:, new].topk(k, dim=1).values
    return F.relu(margin - gt + negatives).mean()


@register("lucir")
@dataclass
class LUCIR(Method):
    """LUCIR: cosine classifier, less-forget constraint, margin ranking on exemplars, class-balanced finetuning.

    Hou, Pan, Loy, Wang & Lin, "Learning a Unified Classifier Incrementally via Rebalancing", CVPR 2019. The
    output layer becomes ``sigma · cos(f, w_c)`` (eq. 4, sigma learned). From the second task on, the loss is
    CE + λ L_dis^G + λ_mr L_mr with L_dis^G = 1 − cos(f*(x), f(x)) against the frozen previous model's embedding
    (eq. 6), λ = λ_base · sqrt(|C_old| / |C_new|) (eq. 7), and L_mr the margin ranking loss of each exemplar's
    ground-truth cosine against the top-K new classes' (eq. 8, :func:`margin_ranking`). The task trains on its
    data plus the exemplars, shuffled together; the class embeddings of other tasks stay fixed while it does (the
    authors' code: ``fc1`` at lr 0). New classes' weights are imprinted (normalised mean embedding, the authors'
    code). After each task: herding exemplars, ``buffer_size`` in total, split equally over the classes seen;
    then, from the second task on, class-balanced finetuning (CBF, sec. 3.4): the classifier's class weights alone
    (old and new; backbone, batch-norm statistics and sigma frozen) on the exemplars of every seen class with the
    same losses, ``ft_epochs`` epochs at ``ft_lr``, /10 at half-way. The reference does CBF in
    ``imagenet-class-incremental/cbf_class_incremental_cosine_imagenet.py`` (``--cb_finetune``, ``ft_flag=2``,
    20 epochs, lr 0.01, /10 at epoch 10); Mammoth's ``lucir.fit_buffer`` after every task.

    Hooks: ``begin_task`` (cosine head at the first task; frozen copy, imprinting, fixed rows later),
    ``task_data`` (task data + exemplars), ``forward`` (keeps the embedding for the penalty), ``penalty``
    (L_dis^G and L_mr), ``after_update`` (puts the fixed class weights back), ``end_task`` (herding, CBF).

    Deviations: evaluation uses the cosine classifier (the paper also reports NME); the backbone is retain's as
    it is: its embedding keeps the last ReLU the authors' modified ResNet removes (Mammoth's MLP keeps it too).
    Class-IL only (the method is about one classifier over all classes). Mammoth differs from the paper in
    five places this follows the paper in: its λ at task t is λ_base · sqrt(t − 1) (an off-by-one: 0 at the
    second task), its hard negatives include the future tasks' (untrained) columns, its finetuning trains
    the current task's weights and sigma only, also after the first task, that finetuning's learning rate
    drops /10 after 10 steps, not 10 epochs (a ``MultiStepLR`` stepped per batch), and its herding runs on
    unnormalised features. ``benchmarks/lucir_mammoth.py`` runs this class with all five, to compare with
    Mammoth's numbers (docs/class-incremental.md).
    """

    lambda_base: float = param(5.0, "less-forget weight λ_base (× sqrt(old classes / new classes))")
    lambda_mr: float = param(1.0, "weight of the margin ranking loss")
    K: int = param(2, "hard negatives (top new classes) per exemplar in the margin ranking loss")
    margin: float = param(0.5, "margin m of the margin ranking loss")
    buffer_size: int = param(2000, "exemplars kept in total, split equally over the classes seen (paper: 20/class)")
    ft_epochs: int = param(20, "class-balanced finetuning epochs after each task from the second on (0: none)")
    ft_lr: float = param(0.01, "learning rate of the class-balanced finetuning")
    imprint: bool = param(True, "initialise new classes' weights by imprinting (the authors' code)")

    modes = ("class",)
    needs_boundaries = True
    presets = {
        # The authors' CIFAR-100 settings (README / class_incremental_cosine_cifar100.py): λ_base 5, K 2, m 0.5,
        # 20 exemplars per class; Mammoth's defaults for the finetuning (20 epochs, lr 0.01). Buffer 200 / 500:
        # the Split-MNIST protocol (Mammoth has no seq-mnist best arguments for lucir).
        "split-mnist/class": {"buffer_size": 200},
        "split-fashion-mnist/class": {"buffer_size": 200},
        "split-digits/class": {"buffer_size": 200},
        # Mammoth's models/config/lucir.yaml has only seq-cifar100 (buffer 2000); P5 uses buffer 500.
        "seq-cifar10/class": {"buffer_size": 500},
    }

    def __post_init__(self) -> None:
        check_common(self, "lucir", ("lambda_base", "lambda_mr", "margin", "ft_lr"))
        self.exemplars = Exemplars(self.buffer_size)
        self.old: nn.Module | None = None  # the model as the previous task left it (frozen)
        self.old_classes: Tensor | None = None  # bool [n_outputs]: classes of earlier tasks
        self.new_classes: Tensor | None = None  # bool [n_outputs]: the current task's classes
        self.lam = 0.0  # λ of the current task
        self.fixed: Tensor | None = None  # bool over the head's weight rows: held fixed while the task trains
        self.fixed_values: Tensor | None = None  # their values
        self._transient()

    def _transient(self) -> None:
        self._feats: Tensor | None = None  # the step's embedding (set by forward, read by penalty)
        self._finetuning = False

    def memory(self, scenario: Any) -> Memory:
        return self.exemplars.memory(scenario)

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if not k.startswith("_")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._transient()

    # --------------------------------------------------------------------------------------------- hooks
    def begin_task(self, ctx: Any) -> None:
        head = install_head(ctx, 1, "lucir")
        task_out = ctx.scenario.task_out.to(head.weight.device)
        self.old_classes = task_out[:ctx.task].any(0)
        self.new_classes = task_out[ctx.task] & ~self.old_classes
        if ctx.task > 0:
            if self.imprint:
                imprint(ctx, head, self.new_classes)
            self.old = frozen_copy(ctx.model)
            n_old, n_new = int(self.old_classes.sum()), max(int(self.new_classes.sum()), 1)
            self.lam = self.lambda_base * math.sqrt(n_old / n_new)
        self.fixed = ~head.rows(self.new_classes)
        self.fixed_values = head.weight.detach()[self.fixed].clone()

    def task_data(self, ctx: Any, data: TaskData) -> TaskData:
        return data.cat(self.exemplars.data()) if len(self.exemplars) else data

    def forward(self, ctx: Any, x: Tensor, t: Tensor) -> Tensor:
        model = ctx.model
        if not isinstance(getattr(model, "head", None), CosineHead):
            return model(x)
        f = model.features(x)
        if model.training:
            self._feats = f
        return model.head(f)

    def penalty(self, ctx: Any, batch: Batch, out: Tensor) -> Tensor | None:
        if self.old is None or self._feats is None:
            return None
        f, self._feats = self._feats, None
        with torch.no_grad():
            f_old = self.old.features(batch.x)
        less_forget = (1 - F.cosine_similarity(f.flatten(1), f_old.flatten(1), dim=1)).mean()
        cos = ctx.model.head.cosine(f)
        ranking = margin_ranking(cos, batch.y, self.old_classes, self.negatives(), self.K, self.margin)
        return self.lam * less_forget + self.lambda_mr * ranking

    def negatives(self) -> Tensor:
        """Bool mask over the outputs: the candidates for the margin ranking's hard negatives (the new classes)."""
        return self.new_classes

    def after_update(self, ctx: Any, batch: Batch, out: Tensor) -> None:
        if not self._finetuning and self.fixed is not None:
            with torch.no_grad():
                ctx.model.head.weight[self.fixed] = self.fixed_values

    def end_task(self, ctx: Any) -> None:
        self._feats = None
        self.exemplars.select(ctx)
        if ctx.task > 0 and self.ft_epochs > 0:
            head = ctx.model.head
            balanced_finetune(self, ctx, [head.weight], self.ft_epochs, self.ft_lr, self.ft_epochs // 2)
