"""What the scheduler side tells the workers each step, and what they tell it back.

Plain picklable dataclasses of ints, strings and bytes: vLLM pickles them between its
processes. vLLM duck-types both (it never checks their base class), which keeps this module
free of vLLM and torch imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LoadJob:
    """Fill blocks ``block_ids`` of request ``req_id`` with the pool's ``hashes``."""

    job_id: int
    req_id: str
    block_ids: tuple[int, ...]
    hashes: tuple[bytes, ...]

    def __post_init__(self) -> None:
        # An empty job is legal: it tells every worker to report the load failed at once.
        if len(self.block_ids) != len(self.hashes):
            raise ValueError(
                f"LoadJob {self.job_id}: needs as many block ids as hashes, "
                f"got {len(self.block_ids)} and {len(self.hashes)}"
            )


@dataclass(frozen=True)
class SaveJob:
    """Copy blocks ``block_ids`` (full and computed by the end of this step) into the pool.

    One job per step covers every request's new blocks: one message, one event.
    """

    job_id: int
    block_ids: tuple[int, ...]
    hashes: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if len(self.block_ids) != len(self.hashes) or not self.hashes:
            raise ValueError(
                f"SaveJob {self.job_id}: needs as many block ids as hashes (>0), "
                f"got {len(self.block_ids)} and {len(self.hashes)}"
            )


@dataclass
class PegaConnectorMetadata:
    """One step's work for every worker: loads to start, and at most one save."""

    loads: list[LoadJob] = field(default_factory=list)
    save: SaveJob | None = None
    preempted_req_ids: frozenset[str] = frozenset()


@dataclass
class PegaWorkerMetadata:
    """Save jobs that finished on this worker (summed over workers by :meth:`aggregate`).

    ``saves_done`` maps job id -> how many workers finished it; ``saves_failed`` how many of
    them gave up (server unreachable or past the deadline). ``blocks_saved`` /
    ``blocks_skipped`` count blocks for the stats.
    """

    saves_done: dict[int, int] = field(default_factory=dict)
    blocks_saved: int = 0
    blocks_skipped: int = 0
    saves_failed: int = 0

    def aggregate(self, other: PegaWorkerMetadata) -> PegaWorkerMetadata:
        merged = dict(self.saves_done)
        for job_id, count in other.saves_done.items():
            merged[job_id] = merged.get(job_id, 0) + count
        return PegaWorkerMetadata(
            saves_done=merged,
            blocks_saved=self.blocks_saved + other.blocks_saved,
            blocks_skipped=self.blocks_skipped + other.blocks_skipped,
            saves_failed=self.saves_failed + other.saves_failed,
        )
