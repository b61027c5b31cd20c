import numpy as np

from transfer_ensemble.crossval import fold_assignment


def test_folds_are_stratified_and_fixed_by_seed():
    labels = np.repeat(np.arange(4), [10, 15, 20, 25])
    folds = fold_assignment(labels, 5, seed=3)
    for k in range(5):
        counts = np.bincount(labels[folds == k], minlength=4)
        np.testing.assert_array_equal(counts, [2, 3, 4, 5])
    np.testing.assert_array_equal(folds, fold_assignment(labels, 5, seed=3))
    assert not np.array_equal(folds, fold_assignment(labels, 5, seed=4))
