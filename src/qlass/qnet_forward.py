"""Forward passes of the QNet's backbone that share a history: the prefix computed once (or taken
from a stored cache), then every candidate after it in one forward — packed into one row with a
block attention mask where the attention kernel takes one, batched over an expanded cache
otherwise (:func:`shared_prefix_hidden`, :func:`stored_prefix_hidden`); and a plain causal
forward (:func:`sequence_hidden`). Training and inference both use them, so a candidate's value
is computed the same way in both.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .policy import kv
from .precision import bf16_autocast

PACK_TOKENS = 4096
"""Most candidate tokens in one packed row (bounds the block attention mask's memory)."""


def backbone_of(model: Any) -> Any:
    """The transformer body of an HF ``*ForCausalLM`` / ``*ForSequenceClassification`` model."""
    return getattr(model, model.base_model_prefix)


def shared_prefix_hidden(backbone: Any, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
                         autocast: bool = False, packed: bool | None = None,
                         pack_tokens: int = PACK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states of ``prefix + suffix`` for every suffix, the prefix computed once.

    The prefix runs alone and leaves its KV cache (:func:`prefix_state`); the suffixes then run
    after it (:func:`suffix_hidden`). Returns ``(prefix_last [H], suffix_hidden [M, S, H])`` with
    ``S`` the longest suffix (rows of shorter suffixes are filled with unused values past their end).
    Differentiable.
    """
    if not prefix:
        raise ValueError("the shared prefix must not be empty")
    cache, prefix_last = prefix_state(backbone, prefix, autocast)
    return prefix_last, suffix_hidden(backbone, cache, len(prefix), suffixes, autocast, packed, pack_tokens)


def prefix_state(backbone: Any, ids: Sequence[int], autocast: bool = False, cache: Any = None,
                 reused: int = 0) -> tuple[Any, torch.Tensor]:
    """Run ``ids[reused:]`` after ``cache`` (which holds ``ids[:reused]``; a fresh cache when
    ``None``); returns the cache, now holding all of ``ids``, and the final hidden state of the last
    token ``[H]`` (float32)."""
    from transformers import DynamicCache

    if cache is None:
        cache = DynamicCache(config=backbone.config)
    with bf16_autocast(backbone.device, autocast):
        out = backbone(input_ids=torch.tensor([list(ids[reused:])], dtype=torch.long, device=backbone.device),
                       cache=cache, use_cache=True)
    return cache, out.last_hidden_state[0, -1].float()


def suffix_hidden(backbone: Any, cache: Any, n_prefix: int, suffixes: Sequence[Sequence[int]],
                  autocast: bool = False, packed: bool | None = None, pack_tokens: int = PACK_TOKENS) -> torch.Tensor:
    """Final hidden states ``[M, S, H]`` of every suffix run after a cache of ``n_prefix`` positions
    (the cache is extended, so pass one that may be changed). The suffixes run in one forward:

    - *packed* (sdpa / eager attention): all suffix tokens in a single row after the prefix, with a
      block attention mask (each token sees the whole prefix and the earlier tokens of its own
      suffix) and positions restarting at ``n_prefix`` for each suffix — no padding and no copies
      of the prefix cache;
    - *batched* (other attention kernels, which take no custom mask): the cache expanded to one row
      per suffix and the suffixes right-padded (padding sits after every real token, so causality
      keeps it invisible).

    ``packed=None`` picks the packed layout whenever the attention kernel allows it; a packed row
    holds at most ``pack_tokens`` suffix tokens (more candidates take further rows, each after the
    same cached prefix), which bounds the attention mask's memory."""
    lengths = [len(s) for s in suffixes]
    if max(lengths, default=0) == 0:
        return torch.zeros((len(suffixes), 0, backbone.config.hidden_size), device=backbone.device)
    if packed is None:
        packed = backbone.config._attn_implementation in ("sdpa", "eager")
    with bf16_autocast(backbone.device, autocast):
        if packed:
            parts = []
            for k, chunk in enumerate(_pack_chunks(lengths, pack_tokens)):
                if k:  # forget the previous chunk's suffix tokens
                    cache.crop(-(cache.get_seq_length() - n_prefix))
                parts.append(_packed_forward(backbone, cache, n_prefix, [suffixes[i] for i in chunk], max(lengths)))
            hidden = torch.cat(parts)
        else:
            width = max(lengths)
            rows = [list(s) + [0] * (width - len(s)) for s in suffixes]
            hidden = backbone(input_ids=torch.tensor(rows, dtype=torch.long, device=backbone.device),
                              cache=_expand_cache(cache, len(suffixes)), use_cache=True).last_hidden_state
    return hidden.float()


def stored_prefix_hidden(backbone: Any, store: kv.PrefixStore, prefix: Sequence[int],
                         suffixes: Sequence[Sequence[int]], autocast: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`shared_prefix_hidden` (no gradient) with the prefix's cache kept in ``store``: a prefix
    that extends a stored one (the next turn of an episode, a deeper node of a tree path) runs only
    its new tokens. Returns ``(prefix_last, suffix_hidden, prefix tokens computed)``."""
    key = tuple(prefix)
    reused, entry = store.lookup(key)
    computed = 0
    if entry is None or reused < len(key):
        cache = kv.prefill_cache(entry.kv if entry else None, reused, len(key),
                                 backbone.config.get_text_config(decoder=True).num_hidden_layers)
        cache, last = prefix_state(backbone, key, autocast, cache, reused)
        computed = len(key) - reused
        entry = kv.Prefix(kv.cache_kv(cache), last)
        store.put(key, entry)
    return entry.logits, suffix_hidden(backbone, cache_over(entry.kv), len(key), suffixes, autocast), computed


def cache_over(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A :class:`~transformers.DynamicCache` that starts from stored per-layer (keys, values) without
    copying them (a dynamic layer's update concatenates, so the stored tensors are never written)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    cache.layers = []
    for keys, values in layers:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def sequence_hidden(backbone: Any, ids: Sequence[int], autocast: bool = False) -> torch.Tensor:
    """Final hidden states ``[T, H]`` (float32) of one causal forward over ``ids`` (differentiable)."""
    device = backbone.device
    with bf16_autocast(device, autocast):
        out = backbone(input_ids=torch.tensor([list(ids)], dtype=torch.long, device=device), use_cache=False)
    return out.last_hidden_state[0].float()


def _pack_chunks(lengths: Sequence[int], limit: int) -> list[list[int]]:
    """Consecutive suffix indices grouped so that each group holds at most ``limit`` tokens (a longer
    suffix gets a group of its own); every group has at least one token."""
    chunks: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if used and used + n > limit:
            chunks.append([])
            used = 0
        chunks[-1].append(i)
        used += n
    return chunks


def _packed_forward(backbone: Any, cache: Any, n_prefix: int, suffixes: Sequence[Sequence[int]],
                    width: int) -> torch.Tensor:
    """All suffixes in one row after the cached prefix (see :func:`shared_prefix_hidden`); returns
    their hidden states unpacked to ``[M, width, H]``."""
    device = backbone.device
    owner = torch.tensor([i for i, s in enumerate(suffixes) for _ in s], device=device)
    local = torch.tensor([k for s in suffixes for k in range(len(s))], device=device)
    same = (owner[:, None] == owner[None, :]) & (local[None, :] <= local[:, None])
    allowed = torch.cat([torch.ones(len(owner), n_prefix, dtype=torch.bool, device=device), same], dim=1)
    if backbone.config._attn_implementation == "eager":
        dtype = backbone.dtype
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    ids = torch.tensor([[t for s in suffixes for t in s]], dtype=torch.long, device=device)
    hidden = backbone(input_ids=ids, attention_mask=allowed[None, None], position_ids=(n_prefix + local)[None],
                      cache=cache, use_cache=True).last_hidden_state[0]
    starts = torch.tensor([0] + [len(s) for s in suffixes], device=device).cumsum(0)[:-1]
    index = (starts[:, None] + torch.arange(width, device=device)[None, :]).clamp(max=len(owner) - 1)
    return hidden[index]


def _expand_cache(cache: Any, rows: int) -> Any:
    """One-row cache → ``rows`` rows; plain dynamic layers as broadcast views (the next update's
    concatenation materialises them once), other layer kinds by copying."""
    from transformers.cache_utils import DynamicLayer

    if rows == 1:
        return cache
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        for layer in cache.layers:
            layer.keys = layer.keys.expand(rows, -1, -1, -1)
            layer.values = layer.values.expand(rows, -1, -1, -1)
    else:
        cache.batch_repeat_interleave(rows)
    return cache


def last_real_hidden(prefix_last: torch.Tensor, suffix_hidden: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Per candidate, the hidden state of its last real token ([M, H]); an empty candidate reads the
    prefix's last token."""
    rows = []
    for i, n in enumerate(lengths):
        rows.append(suffix_hidden[i, n - 1] if n > 0 else prefix_last)
    return torch.stack(rows)
