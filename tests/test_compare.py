import numpy as np

from pipeline.parity.compare import compare_logits, macro_f1
from pipeline.parity.uncertainty import mcnemar_exact, wilson
from pipeline.recipe import Gate


def test_identical_logits_pass_a_strict_gate():
    logits = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    report = compare_logits("a", logits, logits.copy(), Gate(min_agreement=1.0, max_abs_diff=0.0))
    assert report and report.agreement == 1.0 and report.max_abs_diff == 0.0 and not report.flips


def test_flips_fail_agreement_and_are_listed():
    ref = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    cand = ref.copy()
    cand[1] = [2.0, 0.0]
    labels = np.array([0, 1, 0, 1])
    report = compare_logits("a", ref, cand, Gate(min_agreement=0.9, max_metric_drop=0.1), "accuracy",
                            labels, {0: "neg", 1: "pos"}, ["w", "x", "y", "z"])
    assert not report
    assert report.agreement == 0.75
    assert report.metric_drop == 0.25
    assert len(report.failures) == 2
    assert report.flips[0].text == "x" and report.flips[0].reference == "pos" and report.flips[0].artifact == "neg"


def test_metric_gate_without_labels_fails_rather_than_passing_silently():
    ref = np.eye(3)
    report = compare_logits("a", ref, ref, Gate(max_metric_drop=0.01))
    assert not report and "no labels" in report.failures[0]


def test_macro_f1_matches_hand_computation():
    pred = np.array([0, 0, 1, 1, 2])
    labels = np.array([0, 1, 1, 1, 2])
    # class0: tp1 fp1 fn0 -> 2/3; class1: tp2 fp0 fn1 -> 4/5; class2: 1
    assert abs(macro_f1(pred, labels, 3) - np.mean([2 / 3, 4 / 5, 1.0])) < 1e-12


def test_count_ratios_on_the_limit_pass():
    """0.74 - 0.72 is 0.020000000000000018 in floats; a drop of exactly 2 points meets a 0.02 limit."""
    labels = np.zeros(100, dtype=int)
    ref = np.tile([[1.0, 0.0]], (100, 1))
    ref[74:] = [0.0, 1.0]
    cand = ref.copy()
    cand[72:74] = [0.0, 1.0]
    report = compare_logits("a", ref, cand, Gate(min_agreement=0.98, max_metric_drop=0.02), "accuracy", labels)
    assert report.metric_drop > 0.02 and report.agreement == 0.98
    assert report, report.failures


def test_wilson_interval_matches_published_values():
    # Wilson 95% for 988 of 1,000 and for 400 of 400 (upper end 1, lower end 1 - 3.84/403.84).
    low, high = wilson(988, 1000)
    assert round(low, 4) == 0.9791 and round(high, 4) == 0.9931
    low, high = wilson(400, 400)
    assert abs(low - 400 / (400 + 1.959963984540054**2)) < 1e-12 and high == 1.0


def test_mcnemar_counts_only_the_rows_where_one_side_is_right():
    reference = np.array([1] * 10 + [0] * 2 + [1] * 50, bool)
    artifact = np.array([0] * 10 + [1] * 2 + [1] * 50, bool)
    test = mcnemar_exact(reference, artifact)
    assert (test["reference_only_correct"], test["artifact_only_correct"]) == (10, 2)
    # The exact McNemar test of 10 against 2 discordant pairs is the two-sided binomial test of 2
    # in 12 at 1/2: R's binom.test(2, 12)$p.value and scipy.stats.binomtest(2, 12).pvalue, 0.03857.
    assert round(test["p_value"], 5) == 0.03857
    assert mcnemar_exact(reference, reference)["p_value"] == 1.0


def test_lower_bound_gate_fails_where_the_point_passes():
    """97 of 100 rows agree: above a 0.95 point gate, but the rows cannot show 0.95 at 95%."""
    labels = np.zeros(100, dtype=int)
    ref = np.tile([[1.0, 0.0]], (100, 1))
    cand = ref.copy()
    cand[:3] = [0.0, 1.0]
    point = compare_logits("a", ref, cand, Gate(min_agreement=0.95), "accuracy", labels)
    assert point and point.agreement_interval[0] < 0.95 < point.agreement
    lower = compare_logits("a", ref, cand, Gate(min_agreement_lower=0.95), "accuracy", labels)
    assert not lower and lower.failures == ["agreement's 95% lower bound 0.9155 < 0.95 (100 rows)"]
    assert lower.mcnemar == {"reference_only_correct": 3, "artifact_only_correct": 0, "p_value": 0.25}
