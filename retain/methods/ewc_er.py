"""EWC + experience replay: the two existing methods composed, with no training code of its own."""

from __future__ import annotations

from retain.method import Compose, register
from retain.methods.er import ER
from retain.methods.ewc import EWC


@register("ewc_er")
class EWCER(Compose):
    """EWC + ER: every step trains on the current batch plus a replayed batch, with EWC's quadratic penalty.

    A :class:`retain.method.Compose` of :class:`retain.methods.er.ER` (Chaudhry et al. 2019) and
    :class:`retain.methods.ewc.EWC` (Kirkpatrick et al. 2017), so it takes both methods' hyper-parameters
    (``buffer_size``, ``per_class``, ``storage``, ``selection``, ``replay_batch``, ``weighting``; ``lambda``,
    ``fisher``, ``fisher_samples``, ``online``, ``gamma``). Hooks, in order: ER's ``augment`` (replayed rows appended),
    the sum of both ``penalty`` terms, ER's ``after_update`` (buffer insertion), EWC's ``end_task`` (Fisher and
    anchor of the task just trained, computed on that task's data only, as in EWC alone).

    The hybrid the course chapter's third exercise asks for; no single paper defines it, so there are no
    deviations to list. benchmarks/reproduce_replay.py (protocol ``ewc_er``) compares it with each part alone.
    """

    parts = (ER, EWC)
    presets = {
        # benchmarks/reproduce_replay.py ewc_er grid (Split-MNIST class-IL, 1 epoch per task, 2 seeds): the penalty
        # helps only with a small buffer (200: 82.1 against ER's 76.7); with 1,100 every λ tried lowers accuracy.
        "split-mnist/class": {"buffer_size": 200, "lambda": 1000.0},
    }
