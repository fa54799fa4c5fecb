"""KV-cache plumbing for :class:`~qlass.policy.hf.HFPolicy`.

- :class:`BufferLayer`: a full-attention cache layer over a preallocated buffer. Appending a token
  writes in place; the stock ``DynamicLayer`` concatenates, copying the whole cache at every
  decoding step (a cost that grows with the history, which is what cache reuse is meant to avoid).
- :func:`batch_cache`: the decode cache of several cached prompts at once: prompt ``i``'s keys and
  values repeated for its ``rows`` candidates and left-padded to the longest prompt, with the 2-D
  attention mask that hides the padding.
- :class:`PrefixStore`: a small LRU of prompt caches keyed by token ids; a new prompt reuses the
  longest token prefix it shares with any stored one.

All of this assumes plain full-attention layers (Llama, Qwen, Mistral without sliding window, GPT-2,
...); :func:`plain_attention` tells whether a model qualifies.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

log = logging.getLogger(__name__)

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per model layer, the (keys, values) of one sequence: ``[1, kv_heads, length, head_dim]`` each."""


def plain_attention(config: Any) -> bool:
    """Whether every layer of the model caches plain full-attention keys and values."""
    try:
        layers = DynamicCache(config=config).layers
    except Exception as exc:  # noqa: BLE001 - exotic configs: treat as not plain, use the generic path
        log.debug("no cache layers for %s (%s: %s): prompts are prefilled one at a time, without cache reuse",
                  type(config).__name__, type(exc).__name__, exc)
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


class BufferLayer(DynamicLayer):
    """A :class:`DynamicLayer` whose keys/values are views into a buffer grown by doubling, stored in
    ``dtype`` when given (else the dtype of the first keys/values written)."""

    def __init__(self, capacity: int = 0, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.capacity = int(capacity)
        self.dtype = dtype
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._n = 0

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor, length: int) -> BufferLayer:
        """A layer over existing buffers whose first ``length`` positions are filled."""
        layer = cls(keys.shape[-2])
        layer._k, layer._v, layer._n = keys, values, length
        layer._refresh()
        return layer

    def _refresh(self) -> None:
        assert self._k is not None and self._v is not None
        self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]
        self.device = self._k.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[-2]
        if self._k is None or self._v is None:
            b, h, _, d = key_states.shape
            cap = max(self.capacity, new)
            self._k = key_states.new_empty(b, h, cap, d, dtype=self.dtype or key_states.dtype)
            self._v = value_states.new_empty(b, h, cap, value_states.shape[-1], dtype=self.dtype or value_states.dtype)
        elif self._n + new > self._k.shape[-2]:
            cap = max(2 * self._k.shape[-2], self._n + new)
            grow = cap - self._k.shape[-2]
            self._k = torch.cat([self._k, self._k.new_empty(*self._k.shape[:2], grow, self._k.shape[-1])], dim=2)
            self._v = torch.cat([self._v, self._v.new_empty(*self._v.shape[:2], grow, self._v.shape[-1])], dim=2)
        self._k[:, :, self._n : self._n + new] = key_states
        self._v[:, :, self._n : self._n + new] = value_states
        self._n += new
        self._refresh()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._k is not None and self._v is not None:
            self._k, self._v = self._k[indices], self._v[indices]
            self._refresh()


def new_cache(layers: Sequence[DynamicLayer]) -> DynamicCache:
    """A :class:`DynamicCache` made of the given layers (one per model layer)."""
    cache = DynamicCache()
    cache.layers = list(layers)
    return cache


def prefill_cache(prefix: KV | None, reused: int, capacity: int, num_layers: int,
                  dtype: torch.dtype | None = None) -> DynamicCache:
    """A cache holding the first ``reused`` positions of ``prefix`` with room for ``capacity`` in all;
    a fresh one stores new keys/values in ``dtype`` (default: as computed)."""
    if not prefix or reused == 0:
        return new_cache([BufferLayer(capacity, dtype) for _ in range(num_layers)])
    layers = []
    for k, v in prefix:
        kb = k.new_empty(1, k.shape[1], capacity, k.shape[-1])
        vb = v.new_empty(1, v.shape[1], capacity, v.shape[-1])
        kb[:, :, :reused], vb[:, :, :reused] = k[:, :, :reused], v[:, :, :reused]
        layers.append(BufferLayer.holding(kb, vb, reused))
    return new_cache(layers)


def cache_kv(cache: DynamicCache) -> KV:
    """The (keys, values) a one-row cache holds, per layer."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def batch_cache(prompts: Sequence[KV], rows: int | Sequence[int], extra: int
                ) -> tuple[DynamicCache, torch.Tensor | None]:
    """One decode cache: each prompt's cache repeated for its rows (``rows`` each, or ``rows[i]`` for
    prompt ``i``), left-padded to the longest, with ``extra`` free positions; and the
    ``[batch, longest]`` attention mask (``None`` without padding). Prompt ``i``'s rows come after
    those of prompts ``0 .. i-1``."""
    counts = [rows] * len(prompts) if isinstance(rows, int) else list(rows)
    starts = [sum(counts[:i]) for i in range(len(counts) + 1)]
    lengths = [p[0][0].shape[-2] for p in prompts]
    longest = max(lengths)
    batch = starts[-1]
    layers = []
    for li in range(len(prompts[0])):
        k0, v0 = prompts[0][li]
        kb = k0.new_zeros(batch, k0.shape[1], longest + extra, k0.shape[-1])
        vb = v0.new_zeros(batch, v0.shape[1], longest + extra, v0.shape[-1])
        for i, prompt in enumerate(prompts):
            k, v = prompt[li]
            kb[starts[i] : starts[i + 1], :, longest - lengths[i] : longest] = k
            vb[starts[i] : starts[i + 1], :, longest - lengths[i] : longest] = v
        layers.append(BufferLayer.holding(kb, vb, longest))
    if all(n == longest for n in lengths):
        return new_cache(layers), None
    mask = torch.zeros(batch, longest, dtype=torch.long, device=kb.device)
    for i, n in enumerate(lengths):
        mask[starts[i] : starts[i + 1], longest - n :] = 1
    return new_cache(layers), mask


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences (slice compares, binary search)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class Prefix:
    """A cached prompt: its keys/values and the next-token logits after its last token."""

    kv: KV
    logits: torch.Tensor


class PrefixStore:
    """The caches of the ``slots`` most recently used prompts (LRU), looked up by shared prefix."""

    def __init__(self, slots: int) -> None:
        self.slots = max(0, int(slots))
        self._items: OrderedDict[tuple[int, ...], Prefix] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def lookup(self, ids: tuple[int, ...]) -> tuple[int, Prefix | None]:
        """``(len(ids), prefix)`` on an exact hit; else ``(reusable, prefix)`` where the first
        ``reusable < len(ids)`` positions of ``prefix`` equal those of ``ids`` (``(0, None)`` if none)."""
        if ids in self._items:
            self._items.move_to_end(ids)
            return len(ids), self._items[ids]
        best, found = 0, None
        for key, prefix in self._items.items():
            shared = min(common_prefix(ids, key), len(ids) - 1)
            if shared > best:
                best, found = shared, (key, prefix)
        if found is None:
            return 0, None
        self._items.move_to_end(found[0])
        return best, found[1]

    def put(self, ids: tuple[int, ...], prefix: Prefix) -> None:
        """Store ``prefix`` as the cache of ``ids``; stored prompts that ``ids`` extends are dropped
        (any lookup they could serve, this one serves as well), so a slot per live conversation
        suffices: N episodes played side by side keep their caches with N slots."""
        if self.slots == 0:
            return
        for key in [k for k in self._items if len(k) < len(ids) and ids[: len(k)] == k]:
            del self._items[key]
        self._items[ids] = prefix
        self._items.move_to_end(ids)
        while len(self._items) > self.slots:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()
