"""Build, validate and write the Kaggle submission CSV: the id column, then one probability per class."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from transfer_ensemble.errors import UserError
from transfer_ensemble.storage import write_atomic

SUM_TOLERANCE = 1e-4


class SubmissionError(UserError):
    """A submission that Kaggle would reject or score wrongly; the message lists every problem."""


def build(ids: Sequence[str], classes: Sequence[str], probabilities: np.ndarray,
          id_column: str = "id") -> pd.DataFrame:
    """The submission table; `id_column` is the sample submission's id header, as written there."""
    frame = pd.DataFrame(np.asarray(probabilities, dtype=np.float64), columns=list(classes))
    frame.insert(0, id_column, list(ids))
    return frame


def validate(frame: pd.DataFrame, ids: Sequence[str], classes: Sequence[str], name: str = "submission",
             id_column: str = "id") -> None:
    """Raise SubmissionError unless `frame` has exactly `ids` in order and valid probability rows."""
    problems = []
    expected_columns = [id_column, *classes]
    if list(frame.columns) != expected_columns:
        if set(frame.columns) == set(expected_columns):
            problems.append("the class columns are not in the sample submission's order")
        else:
            missing = [c for c in expected_columns if c not in frame.columns]
            extra = [c for c in frame.columns if c not in expected_columns]
            problems.append(f"columns differ (missing: {missing[:5]}, unexpected: {extra[:5]})")
    if id_column in frame.columns:
        got = [str(i) for i in frame[id_column]]
        want = [str(i) for i in ids]
        if got != want:
            missing = [i for i in want if i not in set(got)]
            extra = [i for i in got if i not in set(want)]
            dupes = frame[id_column][frame[id_column].duplicated()].tolist()
            if missing:
                problems.append(f"{len(missing)} test ids are missing (e.g. {missing[:3]})")
            if extra:
                problems.append(f"{len(extra)} ids are not test ids (e.g. {extra[:3]})")
            if dupes:
                problems.append(f"{len(dupes)} ids appear twice (e.g. {dupes[:3]})")
            if not (missing or extra or dupes):
                problems.append("the rows are not in the sample submission's order")
    value_columns = [c for c in frame.columns if c != id_column]
    if value_columns:
        values = frame[value_columns].to_numpy(dtype=np.float64, na_value=np.nan)
        bad_rows = lambda mask: f"{int(mask.sum())} rows (first: row {int(np.argmax(mask))})"
        nan = np.isnan(values).any(axis=1)
        if nan.any():
            problems.append(f"{bad_rows(nan)} contain NaN")
        finite = np.where(np.isnan(values), 0.5, values)
        out_of_range = ((finite < 0) | (finite > 1)).any(axis=1)
        if out_of_range.any():
            problems.append(f"{bad_rows(out_of_range)} have values outside [0, 1]")
        sums = np.abs(finite.sum(axis=1) - 1) > SUM_TOLERANCE
        if (sums & ~nan).any():
            problems.append(f"{bad_rows(sums & ~nan)} do not sum to 1")
    if problems:
        raise SubmissionError(f"The {name} is not valid: {'; '.join(problems)}. It was not written; "
                              f"this is a bug in how it was produced, or a changed sample submission.")


def write(frame: pd.DataFrame, path: str | Path, ids: Sequence[str], classes: Sequence[str],
          id_column: str = "id") -> Path:
    """Validate, then write atomically: the file is either complete or absent."""
    validate(frame, ids, classes, name=f"submission for {path}", id_column=id_column)
    path = Path(path)
    write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False, float_format="%.8g"), suffix=".csv")
    return path
