"""analysis.py: the ROC AUC against its pairwise definition, and the predictor probe on the shipped model."""
import warnings

import numpy as np
import pytest

import analysis
import data
import eval as evaluate
from checkpoint import load
from generate import DEFAULT_MODEL


def pairwise_auc(score, label):
    """P(score of a random positive > score of a random negative), ties counted half."""
    pos = [s for s, y in zip(score, label) if y]
    neg = [s for s, y in zip(score, label) if not y]
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg])


@pytest.mark.parametrize("seed", range(5))
def test_auc_is_the_pairwise_probability(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    score = rng.integers(0, 6, n).astype(float)         # few values: many ties
    label = rng.random(n) < 0.4
    label[0], label[1] = True, False                   # both classes present
    assert analysis.auc(score, label) == pytest.approx(pairwise_auc(score, label))


def test_auc_extremes():
    assert analysis.auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert analysis.auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert analysis.auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5


@pytest.mark.slow
def test_predictor_probe_on_the_shipped_model():
    model, tok = load(DEFAULT_MODEL)
    out = analysis.predictor_probe(model, tok, data.make_problems("heldout", 4), 64, 0.9, 4)
    assert out["steps_with_both_classes"] > 0 and out["steps_where_focus_evicts"] > 0
    for name in analysis.PREDICTORS:
        v = out[name]
        for key in ("auc_per_step", "auc_pooled", "precision_top_k", "top1_kept", "decoded_kept"):
            assert 0.0 <= v[key] <= 1.0, (name, key, v[key])
        fpr, tpr = np.array(v["roc"]).T                 # from the strictest cut to the loosest
        assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all() and v["roc"][-1] == [1.0, 1.0]


def test_predictor_probe_where_focus_never_evicts(loaded):
    """alpha at the block size: FOCUS keeps every masked token, so whether it keeps the most confident one is
    absent (None) in the results and "-" in the reports, with no warning (it was NaN, with numpy's warnings)."""
    model, tok = loaded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = analysis.predictor_probe(model, tok, data.make_problems("heldout", 2), 16, 0.9, 2,
                                       alpha=model.config.block_size)
    assert out["steps_where_focus_evicts"] == 0 and out["steps_with_both_classes"] > 0
    assert all(out[name]["top1_kept"] is None and out[name]["decoded_kept"] is None for name in analysis.PREDICTORS)
    assert evaluate.predictor_table(out).splitlines()[2].endswith("| - | - |")
