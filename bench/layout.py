"""Which cores each process of the benchmark may use. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """Which cores each process may use; empty sets mean "no pinning"."""

    server: frozenset[int]
    loadgen: frozenset[int]
    broker: frozenset[int]

    @classmethod
    def for_cpus(cls, cpus: Sequence[int]) -> Layout:
        """Server alone on the first core; broker and load generator share the rest.

        On 2 cores (the CI machine) that gives the server core 0 to itself and puts
        wrk and Tansu on core 1; with 4 or more, the broker also gets its own core.
        """
        cpus = sorted(cpus)
        if len(cpus) < 2:
            empty: frozenset[int] = frozenset()
            return cls(empty, empty, empty)
        if len(cpus) < 4:
            return cls(frozenset(cpus[:1]), frozenset(cpus[1:]), frozenset(cpus[1:]))
        return cls(frozenset(cpus[:1]), frozenset(cpus[2:]), frozenset(cpus[1:2]))

    def describe(self) -> dict[str, list[int]]:
        return {k: sorted(v) for k, v in vars(self).items()}
