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
    assert set(metrics.all_metrics(R, B)) == {"acc", "bwt", "fwt", "forgetting", "learning_acc",
                                              "avg_incremental_acc"}


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


def test_average_incremental_accuracy_is_the_mean_of_the_seen_tasks_at_each_end():
    # 0.90 ; (0.60 + 0.80) / 2 = 0.70 ; (0.50 + 0.70 + 0.95) / 3 = 0.71666
    assert metrics.average_incremental_accuracy(R) == pytest.approx((0.90 + 0.70 + 2.15 / 3) / 3)


def test_old_and_new_class_accuracy_pool_the_old_tasks_by_their_test_rows():
    # old: (0.50 * 100 + 0.70 * 300) / 400 = 0.65 ; new: 0.95
    assert metrics.old_new_accuracy(R, [100, 300, 50]) == pytest.approx({"old_acc": 0.65, "new_acc": 0.95})


# A two-task curve, every 10 samples; task 0 ends at 20 (its end point is R's row 0), task 1 at 50.
CURVE = [
    {"samples": 10, "task": 0, "acc": [0.50, 0.00], "end": False},
    {"samples": 20, "task": 0, "acc": [0.90, 0.00], "end": True},
    {"samples": 30, "task": 1, "acc": [0.30, 0.60], "end": False},  # the dip: 0.90 -> 0.30
    {"samples": 40, "task": 1, "acc": [0.70, 0.80], "end": False},
    {"samples": 50, "task": 1, "acc": [0.89, 0.90], "end": True},  # back within 0.01 of 0.90
]


def test_average_anytime_accuracy_by_hand():
    # seen-task means: 0.50, 0.90, 0.45, 0.75, 0.895 -> mean 0.699
    assert metrics.average_anytime_accuracy(CURVE) == pytest.approx((0.5 + 0.9 + 0.45 + 0.75 + 0.895) / 5)
    # the task ends alone: Ā of the matrix they are the rows of
    ends = [p for p in CURVE if p["end"]]
    assert metrics.average_anytime_accuracy(ends) == pytest.approx(
        metrics.average_incremental_accuracy([[0.9, 0.0], [0.89, 0.9]]))


def test_area_under_the_accuracy_curve_weights_by_samples_and_test_rows():
    # test rows 100 and 300: f = 0.50, 0.90, (0.3*100 + 0.6*300)/400 = 0.525, 0.775, 0.8975; every width 10 of 50
    f = [0.5, 0.9, 0.525, 0.775, 0.8975]
    assert metrics.area_under_accuracy(CURVE, [100, 300]) == pytest.approx(sum(f) * 10 / 50)
    # uneven spacing: widths 20 and 30
    two = [CURVE[1], CURVE[4]]
    assert metrics.area_under_accuracy(two, [100, 300]) == pytest.approx((0.9 * 20 + 0.8975 * 30) / 50)


def test_stability_gap_depth_time_to_minimum_and_recovery():
    gap = metrics.stability_gap(CURVE)
    (pair,) = gap["pairs"]
    assert pair["switch"] == 1 and pair["task"] == 0
    assert pair["before"] == 0.90 and pair["min"] == 0.30 and pair["drop"] == pytest.approx(0.60)
    assert pair["min_after"] == 10 and pair["recovered_after"] == 30  # 0.89 >= 0.90 - 0.01, 30 samples in
    assert metrics.stability_gap(CURVE, tolerance=0.0)["pairs"][0]["recovered_after"] is None
    assert gap["gap"] == pytest.approx(0.60)
    # De Lange et al.: min-ACC over task 0's points after its end = 0.30; WC-ACC = 1/2 * 0.90 + 1/2 * 0.30
    assert gap["min_acc"] == pytest.approx(0.30) and gap["wc_acc"] == pytest.approx(0.60)
    with pytest.raises(ValueError, match="--eval-every"):
        metrics.average_anytime_accuracy([])
