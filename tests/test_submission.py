import numpy as np
import pandas as pd
import pytest

from transfer_ensemble import submission
from transfer_ensemble.submission import SubmissionError

IDS = ["b", "a", "c"]
CLASSES = ["dog", "cat"]


def good() -> pd.DataFrame:
    return submission.build(IDS, CLASSES, np.array([[0.2, 0.8], [0.5, 0.5], [1.0, 0.0]]))


def test_valid_submission_is_written_atomically(tmp_path):
    path = submission.write(good(), tmp_path / "sub.csv", IDS, CLASSES)
    frame = pd.read_csv(path, dtype={"id": str})
    assert list(frame.columns) == ["id", *CLASSES]
    assert list(frame["id"]) == IDS
    np.testing.assert_allclose(frame[CLASSES].to_numpy(), good()[CLASSES].to_numpy())
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]


@pytest.mark.parametrize("mutate, expected", [
    (lambda f: f.drop(index=1), "missing"),
    (lambda f: pd.concat([f, f.iloc[[0]].assign(id="zzz")]), "not test ids"),
    (lambda f: pd.concat([f, f.iloc[[0]]]), "appear twice"),
    (lambda f: f.iloc[[1, 0, 2]], "order"),
    (lambda f: f[["id", "cat", "dog"]], "order"),
    (lambda f: f.drop(columns=["cat"]), "columns differ"),
    (lambda f: f.assign(dog=[np.nan, 0.5, 1.0]), "NaN"),
    (lambda f: f.assign(dog=[0.3, 0.5, 1.0]), "sum to 1"),
    (lambda f: f.assign(dog=[-0.2, 0.5, 1.0], cat=[1.2, 0.5, 0.0]), "outside [0, 1]"),
])
def test_validator_rejects_each_kind_of_wrong_submission(tmp_path, mutate, expected):
    frame = mutate(good())
    with pytest.raises(SubmissionError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        submission.write(frame, tmp_path / "sub.csv", IDS, CLASSES)
    assert not list(tmp_path.iterdir()), "a rejected submission must leave no file behind"
