"""Metrics on hand-computed accuracy matrices."""

import numpy as np
import pytest

from retain import metrics

R = [[0.90, 0.10, 0.20],
     [0.60, 0.80, 0.30],
     [0.50, 0.70, 0.95]]
B = [0.10, 0.20, 0.30]


def test_acc_is_mean_of_last_row():
    assert metrics.average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)


def test_bwt_lopez_paz():
    assert metrics.backward_transfer(R) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)


def test_fwt_subtracts_random_init_baseline():
    # R[0,1] - b[1] = -0.1 ; R[1,2] - b[2] = 0.0
    assert metrics.forward_transfer(R, B) == pytest.approx(-0.05)
    # the seed's variant without b is a different quantity, reported under its own name
    assert metrics.zero_shot_accuracy(R) == pytest.approx((0.1 + 0.3) / 2)


def test_forgetting_chaudhry_max_over_rows_from_task_j_on():
    assert metrics.forgetting(R) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    # task 1 at 0.80 before its training, 0.75 right after it, 0.70 at the end: forgetting 0.05, not 0.10
    R2 = [[0.90, 0.80, 0.20],
          [0.60, 0.75, 0.30],
          [0.50, 0.70, 0.95]]
    assert metrics.forgetting(R2) == pytest.approx(((0.9 - 0.5) + (0.75 - 0.70)) / 2)
    # a later rise still counts: the max runs over rows j..T-2, not only R[j, j]
    R3 = np.array([[0.9, 0.1, 0.1, 0.1], [0.95, 0.8, 0.1, 0.1], [0.7, 0.85, 0.9, 0.1], [0.6, 0.6, 0.6, 0.9]])
    assert metrics.forgetting(R3) == pytest.approx(((0.95 - 0.6) + (0.85 - 0.6) + (0.9 - 0.6)) / 3)


def test_learning_accuracy_is_diagonal_mean():
    assert metrics.learning_accuracy(R) == pytest.approx((0.9 + 0.8 + 0.95) / 3)


def test_all_metrics_keys():
    assert set(metrics.all_metrics(R, B)) == {"acc", "bwt", "fwt", "forgetting", "learning_acc"}


def test_single_task_has_no_transfer():
    assert metrics.backward_transfer([[0.7]]) == 0.0
    assert metrics.forward_transfer([[0.7]], [0.1]) == 0.0
    assert metrics.forgetting([[0.7]]) == 0.0


def test_unfilled_matrix_is_refused():
    # the seed evaluator left the upper triangle empty and FWT silently read it
    with pytest.raises(ValueError, match="unfilled"):
        metrics.forward_transfer([[0.9, np.nan], [0.5, 0.8]], [0.1, 0.1])
    with pytest.raises(ValueError, match="square"):
        metrics.average_accuracy([[0.9, 0.1]])
    with pytest.raises(ValueError, match="baseline"):
        metrics.forward_transfer(R, [0.1])
