"""spikeinfer.metrics against scikit-learn and scipy on random data."""

import numpy as np
import pytest

from spikeinfer import metrics

skm = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")

SEEDS = range(5)


@pytest.mark.parametrize("seed", SEEDS)
def test_accuracy_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 3, size=200))
    assert metrics.accuracy(p, y) == pytest.approx(100 * skm.accuracy_score(y, p))


@pytest.mark.parametrize("seed", SEEDS)
def test_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=150)
    p = np.where(rng.random(150) < 0.7, y, 1 - y)
    assert metrics.f1(p, y) == pytest.approx(100 * skm.f1_score(y, p))


def test_f1_without_positives_is_zero():
    assert metrics.f1([0, 0, 0], [0, 0, 0]) == 0.0


@pytest.mark.parametrize("num_classes", [2, 3, 5])
@pytest.mark.parametrize("seed", SEEDS)
def test_mcc_matches_sklearn(seed, num_classes):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, size=300)
    p = np.where(rng.random(300) < 0.5, y, rng.integers(0, num_classes, size=300))
    expected = 100 * skm.matthews_corrcoef(y, p)
    assert metrics.matthews_corrcoef(p, y) == pytest.approx(expected, abs=1e-9)


def test_mcc_undefined_is_zero():
    # Constant predictions: one factor of the denominator vanishes.
    assert metrics.matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0
    assert metrics.matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0


def test_mcc_perfect_and_inverted():
    y = np.array([0, 1, 1, 0, 1])
    assert metrics.matthews_corrcoef(y, y) == pytest.approx(100.0)
    assert metrics.matthews_corrcoef(1 - y, y) == pytest.approx(-100.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_pearson_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=100)
    y = 0.5 * x + rng.normal(size=100)
    assert metrics.pearson(x, y) == pytest.approx(100 * stats.pearsonr(x, y)[0], abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_spearman_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    # STS-B style: scores on a coarse grid (many ties) against continuous predictions, plus a
    # tie-heavy pair on both sides.
    y = rng.integers(0, 6, size=120).astype(float)
    x = y + rng.normal(scale=1.5, size=120)
    assert metrics.spearman(x, y) == pytest.approx(100 * stats.spearmanr(x, y)[0], abs=1e-9)
    xr = np.round(x)
    assert metrics.spearman(xr, y) == pytest.approx(100 * stats.spearmanr(xr, y)[0], abs=1e-9)


def test_rankdata_matches_scipy():
    x = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0, 5.0])
    np.testing.assert_allclose(metrics.rankdata(x), stats.rankdata(x))


def test_constant_input_correlation_is_zero():
    assert metrics.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0
    assert metrics.spearman([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == 0.0


def test_length_mismatch_and_empty_raise():
    with pytest.raises(ValueError, match="differ in length"):
        metrics.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="zero examples"):
        metrics.f1([], [])


@pytest.mark.parametrize(
    "task, names",
    [
        ("cola", ["mcc"]),
        ("SST-2", ["accuracy"]),
        ("mrpc", ["accuracy", "f1"]),
        ("qqp", ["accuracy", "f1"]),
        ("sts-b", ["pearson", "spearman"]),
        ("mnli", ["accuracy"]),
        ("qnli", ["accuracy"]),
        ("rte", ["accuracy"]),
        ("wnli", ["accuracy"]),
    ],
)
def test_compute_metrics_names(task, names):
    rng = np.random.default_rng(0)
    if task == "sts-b":
        labels = rng.uniform(0, 5, size=50)
        preds = labels + rng.normal(size=50)
    else:
        labels = rng.integers(0, 2, size=50)
        preds = rng.integers(0, 2, size=50)
    result = metrics.compute_metrics(task, preds, labels)
    assert list(result) == names
    assert all(isinstance(v, float) and -100.0 <= v <= 100.0 for v in result.values())


def test_compute_metrics_takes_logits():
    labels = np.array([0, 1, 2, 1])
    logits = np.eye(3)[[0, 1, 2, 0]]
    assert metrics.compute_metrics("mnli", logits, labels) == {"accuracy": 75.0}
    scores = np.array([[0.1], [0.5], [0.9]])
    stsb = metrics.compute_metrics("stsb", scores, [1.0, 2.0, 3.0])
    assert stsb["spearman"] == pytest.approx(100.0)
