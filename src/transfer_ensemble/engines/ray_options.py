"""The Ray engine's options (``--engine ray``), declared apart from its engine (engines/ray.py) so
that ``--help`` and option checks never import the engine, its Ray-facing code or its models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transfer_ensemble.options import Checker, Rule, check_self, option, real, whole


def _check_ray_address(check: Checker, key: str, value: Any, values: dict) -> str:
    if not isinstance(value, str) or not value.strip():
        raise check.fail(key, value, "must be a Ray cluster address such as 10.0.0.5:6379 or ray://head:10001")
    return value


@dataclass(frozen=True)
class RayOptions:
    """Where the Ray engine runs and what its actors reserve. None means: `ray_address`, the
    RAY_ADDRESS variable, else a local Ray started for the run; `actors`, one per GPU of the
    cluster (one without GPUs); `gpus_per_actor`, 1 when the cluster has GPUs, else 0;
    `cpus_per_actor`, 1."""

    ray_address: str | None = option(None, "--ray-address", "Ray cluster to use with --engine ray (default: "
                                                             "$RAY_ADDRESS, else a local Ray started for this run)",
                                     Rule("text", _check_ray_address), optional=True)
    actors: int | None = option(None, "--actors", "actors holding the models (default: one per GPU of the "
                                                  "cluster, else 1)", whole(1), optional=True)
    gpus_per_actor: float | None = option(None, "--gpus-per-actor", "GPUs each actor reserves (default: 1 when "
                                                                    "the cluster has GPUs, else 0)",
                                          real(0, allowed="0 (CPU actors) or more (0.5 puts two actors on a GPU)"),
                                          optional=True)
    cpus_per_actor: float | None = option(None, "--cpus-per-actor", "CPUs each actor reserves (default 1)",
                                          real(0, above=True), optional=True)

    def __post_init__(self) -> None:
        check_self(self)
