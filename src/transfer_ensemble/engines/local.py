"""The local engine (the default): features and scores computed in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from transfer_ensemble import features
from transfer_ensemble.engines import EngineConfig
from transfer_ensemble.scoring import Scorer
from transfer_ensemble.store import StoreFiles


class LocalEngine:
    """Extraction by ``features.extract_split``; scoring chunk by chunk, here."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    def extract_split(self, extractor: features.Extractor, split: str, paths: Sequence[Path], ids: Sequence[str],
                      keys: Sequence[str], store_of: Callable[[str], StoreFiles],
                      donors_of: Callable[[str], Sequence[StoreFiles]] = lambda name: ()
                      ) -> features.ExtractSummary:
        return features.extract_split(extractor, split, paths, ids, keys, store_of, donors_of)

    def score(self, scorer: Scorer, stores: Sequence[StoreFiles], n: int, tta: bool,
              chunk: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, n, chunk):
            yield start, scorer.score_rows(stores, start, min(n, start + chunk), tta)
