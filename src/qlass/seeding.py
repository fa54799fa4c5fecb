"""Seeds that are the same in every process and independent of how work is batched.

Every random draw in qlass comes from a stream named by what it is for (run seed, method, task,
step, candidate), never from a counter shared by whatever happens to be computed together: an
episode samples the same actions whether it plays alone or in a wave with fifteen others.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

SEED_STRIDE = 1_000_003
"""The distance between the base seeds of consecutive histories seeded with one int."""


def stable_seed(*parts: object) -> int:
    """A 32-bit seed from text parts that is the same in every process (unlike Python's ``hash``)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def candidate_seed(base: int, j: int) -> int:
    """The stream of candidate ``j`` of a history whose base seed is ``base``: ``base`` itself for
    candidate 0, a hash of both for the others, so candidate ``j`` of seed ``s`` never equals
    candidate ``j - 1`` of seed ``s + 1`` (consecutive steps seeded ``s``, ``s + 1`` share no stream)."""
    return base if j == 0 else stable_seed(base, "candidate", j)


def history_seeds(seed: int | Sequence[int] | None, count: int, rng: random.Random) -> list[int]:
    """The base seed of each of ``count`` histories: ``seed`` itself when it is a list (one per history),
    ``seed + i * SEED_STRIDE`` for one int, fresh draws from ``rng`` for ``None``."""
    if seed is None:
        base = rng.getrandbits(31)
        return [base + i * SEED_STRIDE for i in range(count)]
    if isinstance(seed, int):
        return [seed + i * SEED_STRIDE for i in range(count)]
    seeds = [int(s) for s in seed]
    if len(seeds) != count:
        raise ValueError(f"got {len(seeds)} seeds for {count} histories")
    return seeds
