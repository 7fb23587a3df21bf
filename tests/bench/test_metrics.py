"""Continual-learning metrics against hand-computed values and loop-based references."""

import math
import warnings

import numpy as np
import pytest

from rgo_jax.bench import metrics

NAN = float("nan")

# 3 tasks. Row i = after training task i, column j = task j.
R3 = np.array(
    [
        [0.90, 0.20, 0.10],
        [0.93, 0.95, 0.30],
        [0.70, 0.85, 0.92],
    ]
)
B3 = np.array([0.10, 0.10, 0.25])  # accuracies of a randomly initialised network


def test_3x3_hand_computed():
    # ACC = (0.70 + 0.85 + 0.92) / 3 = 2.47 / 3
    assert metrics.average_accuracy(R3) == pytest.approx(2.47 / 3, abs=1e-12)
    # BWT = ((0.70 - 0.90) + (0.85 - 0.95)) / 2 = (-0.20 - 0.10) / 2 = -0.15
    assert metrics.backward_transfer(R3) == pytest.approx(-0.15, abs=1e-12)
    # GEM's code divides the same sum by T = 3: -0.30 / 3 = -0.10
    assert metrics.backward_transfer(R3, divisor="T") == pytest.approx(-0.10, abs=1e-12)
    # forgetting, task 0: best of R[0,0]=0.90, R[1,0]=0.93 -> 0.93 - 0.70 = 0.23
    #             task 1: best of R[1,1]=0.95 (R[0,1] is zero-shot) -> 0.95 - 0.85 = 0.10
    #             mean = (0.23 + 0.10) / 2 = 0.165
    assert metrics.forgetting(R3) == pytest.approx(0.165, abs=1e-12)
    # LA = (0.90 + 0.95 + 0.92) / 3 = 2.77 / 3
    assert metrics.learning_accuracy(R3) == pytest.approx(2.77 / 3, abs=1e-12)
    # FWT: j=1: R[0,1] - b1 = 0.20 - 0.10 = 0.10; j=2: R[1,2] - b2 = 0.30 - 0.25 = 0.05
    #      (0.10 + 0.05) / 2 = 0.075; GEM's code: 0.15 / 3 = 0.05
    assert metrics.forward_transfer(R3, B3) == pytest.approx(0.075, abs=1e-12)
    assert metrics.forward_transfer(R3, B3, divisor="T") == pytest.approx(0.05, abs=1e-12)
    # average accuracy over seen tasks after each task:
    # [0.90, (0.93 + 0.95) / 2 = 0.94, 2.47 / 3]
    np.testing.assert_allclose(
        metrics.average_accuracy_curve(R3), [0.90, 0.94, 2.47 / 3], rtol=0, atol=1e-12
    )


def test_2x2_hand_computed():
    R = [[0.8, 0.5], [0.6, 0.9]]
    assert metrics.average_accuracy(R) == pytest.approx(0.75)  # (0.6 + 0.9) / 2
    assert metrics.backward_transfer(R) == pytest.approx(-0.2)  # (0.6 - 0.8) / 1
    assert metrics.backward_transfer(R, divisor="T") == pytest.approx(-0.1)  # -0.2 / 2
    assert metrics.forgetting(R) == pytest.approx(0.2)  # 0.8 - 0.6
    assert metrics.learning_accuracy(R) == pytest.approx(0.85)  # (0.8 + 0.9) / 2
    assert metrics.forward_transfer(R, [0.5, 0.3]) == pytest.approx(0.2)  # 0.5 - 0.3


def test_forgetting_ignores_zero_shot_and_can_be_negative():
    # A zero-shot accuracy above the learned one must not count as "knowledge lost":
    # task 1 best after learning = R[1,1] = 0.95 (not R[0,1] = 0.99) -> 0.95 - 0.85 = 0.10;
    # task 0: 0.93 - 0.70 = 0.23; mean 0.165 (as with R[0,1] = 0.20 above).
    R = R3.copy()
    R[0, 1] = 0.99
    assert metrics.forgetting(R) == pytest.approx(0.165, abs=1e-12)
    # Improvement at the end gives negative forgetting and positive BWT: 0.6 -> 0.7.
    R = [[0.6, NAN], [0.7, 0.9]]
    assert metrics.forgetting(R) == pytest.approx(-0.1)
    assert metrics.backward_transfer(R) == pytest.approx(0.1)


def _loop_reference(R, b):
    """Textbook formulas with explicit loops (GEM paper, Chaudhry et al. 2018)."""
    T = len(R)
    acc = sum(R[T - 1][j] for j in range(T)) / T
    bwt = sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)
    fgt = sum(max(R[i][j] for i in range(j, T - 1)) - R[T - 1][j] for j in range(T - 1)) / (T - 1)
    la = sum(R[j][j] for j in range(T)) / T
    fwt = sum(R[j - 1][j] - b[j] for j in range(1, T)) / (T - 1)
    gem_bwt = np.mean(np.asarray(R)[-1] - np.diag(R))  # GEM's metrics.py: mean over T entries
    return acc, bwt, fgt, la, fwt, gem_bwt


@pytest.mark.parametrize("T", [2, 3, 7, 20])
def test_random_matrices_match_loop_reference(T):
    rng = np.random.default_rng(T)
    R = rng.uniform(0, 1, (T, T))
    b = rng.uniform(0, 1, T)
    acc, bwt, fgt, la, fwt, gem_bwt = _loop_reference(R.tolist(), b.tolist())
    s = metrics.summarize(R, b)
    assert s["acc"] == pytest.approx(acc, abs=1e-12)
    assert s["bwt"] == pytest.approx(bwt, abs=1e-12)
    assert s["forgetting"] == pytest.approx(fgt, abs=1e-12)
    assert s["learning_accuracy"] == pytest.approx(la, abs=1e-12)
    assert s["fwt"] == pytest.approx(fwt, abs=1e-12)
    assert metrics.backward_transfer(R, divisor="T") == pytest.approx(gem_bwt, abs=1e-12)
    assert s["num_tasks"] == T and s["bwt_divisor"] == "T-1"


def test_single_task_gives_nan_not_error():
    R = [[0.9]]
    assert metrics.average_accuracy(R) == pytest.approx(0.9)
    assert metrics.learning_accuracy(R) == pytest.approx(0.9)
    assert math.isnan(metrics.backward_transfer(R))
    assert math.isnan(metrics.backward_transfer(R, divisor="T"))
    assert math.isnan(metrics.forgetting(R))
    assert math.isnan(metrics.forward_transfer(R, [0.1]))
    s = metrics.summarize(R, [0.1])
    assert math.isnan(s["bwt"]) and math.isnan(s["forgetting"]) and math.isnan(s["fwt"])


def test_nan_above_diagonal_allowed_except_for_fwt():
    R = [[0.9, NAN, NAN], [0.8, 0.9, NAN], [0.7, 0.8, 0.9]]
    s = metrics.summarize(R)
    assert s["acc"] == pytest.approx(0.8)  # (0.7 + 0.8 + 0.9) / 3
    assert "fwt" not in s
    with pytest.raises(ValueError, match=r"R\[0, 1\] is nan"):
        metrics.forward_transfer(R, [0.1, 0.1, 0.1])


@pytest.mark.parametrize(
    ("R", "match"),
    [
        ([0.5, 0.5], r"2-D .* shape \(2,\)"),
        (np.zeros((2, 2, 2)), r"2-D .* shape \(2, 2, 2\)"),
        ([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], r"square .* shape \(2, 3\)"),
        (np.zeros((0, 0)), r"at least one task"),
        ([[NAN, 0.1], [0.5, 0.5]], r"R\[0, 0\] = nan is not finite; entries on or below"),
        ([[0.5, 0.1], [NAN, 0.5]], r"R\[1, 0\] = nan is not finite"),
        ([[0.5, np.inf], [0.5, 0.5]], r"R\[0, 1\] = inf .* only nan"),
        ([[0.5, 0.1], [-0.1, 0.5]], r"R\[1, 0\] = -0.1 is outside \[0, 1\]"),
        ([[95.0, 10.0], [90.0, 97.0]], r"R\[0, 0\] = 95 .* percentages"),
    ],
)
def test_invalid_matrices(R, match):
    with pytest.raises(ValueError, match=match):
        metrics.average_accuracy(R)


def test_invalid_types_and_options():
    with pytest.raises(TypeError, match="numeric"):
        metrics.average_accuracy([["a", "b"], ["c", "d"]])
    with pytest.raises(ValueError, match='divisor must be "T-1" or "T"'):
        metrics.backward_transfer(R3, divisor="T+1")
    with pytest.raises(ValueError, match=r"random_init must have shape \(3,\)"):
        metrics.forward_transfer(R3, [0.1, 0.1])
    with pytest.raises(ValueError, match=r"random_init\[1\] = 10 must be"):
        metrics.forward_transfer(R3, [0.1, 10.0, 0.1])


def test_summarize_seeds_mean_std_and_matrix():
    # seed 0: R3 (ACC 2.47/3, BWT -0.15); seed 1: last row lowered by 0.03 everywhere
    # -> ACC 2.38/3, BWT ((0.67 - 0.90) + (0.82 - 0.95)) / 2 = -0.18.
    R_b = R3.copy()
    R_b[2] -= 0.03
    s = metrics.summarize_seeds([R3, R_b], B3)
    acc = [2.47 / 3, 2.38 / 3]
    np.testing.assert_allclose(s["acc"]["per_seed"], acc, atol=1e-12)
    assert s["acc"]["mean"] == pytest.approx((2.47 + 2.38) / 6, abs=1e-12)
    # population std of two values = |a - b| / 2 = 0.03 / 2
    assert s["acc"]["std"] == pytest.approx(0.015, abs=1e-12)
    assert s["bwt"]["mean"] == pytest.approx(-0.165, abs=1e-12)
    assert s["bwt"]["std"] == pytest.approx(0.015, abs=1e-12)
    # FWT does not depend on the last row: 0.075 for both seeds
    assert s["fwt"]["mean"] == pytest.approx(0.075, abs=1e-12)
    assert s["fwt"]["std"] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(s["mean_matrix"], (R3 + R_b) / 2, atol=1e-12)
    np.testing.assert_allclose(s["std_matrix"][2], [0.015] * 3, atol=1e-12)
    assert (s["num_seeds"], s["num_tasks"], s["bwt_divisor"], s["std_ddof"]) == (2, 3, "T-1", 0)

    # sample std (ddof=1) of two values = |a - b| / sqrt(2)
    s1 = metrics.summarize_seeds([R3, R_b], ddof=1, bwt_divisor="T")
    assert s1["acc"]["std"] == pytest.approx(0.03 / math.sqrt(2), abs=1e-12)
    assert s1["bwt"]["mean"] == pytest.approx((-0.30 - 0.36) / 3 / 2, abs=1e-12)
    assert "fwt" not in s1 and s1["std_ddof"] == 1 and s1["bwt_divisor"] == "T"


def test_summarize_seeds_per_seed_random_init_and_edge_cases():
    # per-seed random-init rows: FWT 0.075 with B3, and with b = [0, 0.2, 0.2]:
    # ((0.20 - 0.20) + (0.30 - 0.20)) / 2 = 0.05
    s = metrics.summarize_seeds([R3, R3], [B3, [0.0, 0.2, 0.2]])
    np.testing.assert_allclose(s["fwt"]["per_seed"], [0.075, 0.05], atol=1e-12)
    # 3-D array input is a stack of seeds
    assert metrics.summarize_seeds(np.stack([R3, R3]))["num_seeds"] == 2
    # one seed: population std 0, sample std undefined (nan), no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.summarize_seeds([R3])["acc"]["std"] == 0.0
        assert math.isnan(metrics.summarize_seeds([R3], ddof=1)["acc"]["std"])
        # T = 1: BWT undefined for every seed
        s1 = metrics.summarize_seeds([[[0.9]], [[0.8]]])
    assert math.isnan(s1["bwt"]["mean"]) and s1["acc"]["mean"] == pytest.approx(0.85)
    with pytest.raises(ValueError, match="at least one seed"):
        metrics.summarize_seeds([])
    with pytest.raises(ValueError, match=r"same \[T, T\] shape.*seed 1: \(2, 2\)"):
        metrics.summarize_seeds([R3, [[0.5, 0.5], [0.5, 0.5]]])
    with pytest.raises(ValueError, match=r"matrices\[1\]\[0, 0\] = 90 .* percentages"):
        metrics.summarize_seeds([R3, R3 * 100])
    with pytest.raises(ValueError, match=r"\[S, T\] with S = 2"):
        metrics.summarize_seeds([R3, R3], np.ones((3, 3)) * 0.1)
