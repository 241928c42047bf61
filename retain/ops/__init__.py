"""Shared maths for methods: per-sample gradient statistics (Fisher, MAS importance) and quadratic penalties.

Kept apart from any one method so that EWC, MAS, hybrids (EWC + replay) and later methods use the same,
tested code.
"""

from retain.ops.fisher import (
    Params,
    fisher_diagonal,
    output_sensitivity,
    per_sample_grad_stat,
    quadratic_penalty,
    sample_predictive,
    snapshot,
    task_batches,
    trainable,
)

__all__ = [
    "Params",
    "fisher_diagonal",
    "output_sensitivity",
    "per_sample_grad_stat",
    "quadratic_penalty",
    "sample_predictive",
    "task_batches",
    "snapshot",
    "trainable",
]
