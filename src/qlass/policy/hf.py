"""Local Hugging Face causal LMs as policies: shared prefill, KV-cache reuse, batched decoding.

What one call ``sample(histories, n, ...)`` does:

1. Each history becomes ids through :func:`~qlass.policy.render.encode_conversation` (the one
   rendering SFT and the QNet use); a history longer than ``max_length - max_new_tokens`` loses its
   oldest turns (:func:`~qlass.policy.render.truncate_history`, instruction prefix and task kept).
2. Prefill with reuse: the caches of the ``cache_slots`` most recent prompts are kept. A prompt is
   prefilled only from the longest token prefix it shares with one of them — the previous turn of
   the episode (``encode_conversation`` is prefix-stable), a sibling in an exploration tree, or the
   fixed instruction prefix — so a turn costs its new tokens, not its whole history.
3. Decode: each prompt's cache is expanded to its ``n`` rows (one prefill for all candidates); the
   rows of several histories are left-padded into one batch and decoded together by a plain loop
   over ``model(ids, cache=...)``; finished rows leave the batch.
4. A token is drawn from the tempered distribution, filtered by ``top_p`` / ``min_p`` when set
   (:mod:`~qlass.policy.sampling`; with ``distinct``, under its rules). A row stops after the
   newline that ends its ``Action:`` line, at EOS or at the end-of-turn token. The returned text is
   ``Thought: ...\\nAction: ...`` without the end token; a row the token limit stopped first comes
   back as generated with ``truncated=True`` (:func:`~qlass.policy.outputs.final_output`).
   ``completion_tokens`` counts every generated token (end token included); ``logprob`` sums the
   sampled tokens' log-probabilities under the model (temperature 1, unfiltered), what
   :meth:`HFPolicy.score_outputs` computes teacher-forced.

Sampling is reproducible and independent of batching: history ``i`` has a base seed (``seed[i]``
when ``seed`` is a list, one per history; ``seed + i * SEED_STRIDE`` when it is one int) and its
candidate ``j`` draws from its own ``torch.Generator`` seeded with
:func:`~qlass.seeding.candidate_seed` ``(base, j)`` — the base itself for candidate 0, a hash for
the others, so no stream is shared between calls seeded ``s`` and ``s + 1``. A history therefore
samples the same completions whichever other histories share its call. Temperature 0 is greedy:
one row per history, copied ``n`` times.

Models whose cache is not plain full attention (sliding-window or hybrid layers) still work, one
history at a time and without reuse across calls.
"""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..envs.base import parse_action
from ..errors import QlassError
from ..models import resolve_device
from ..precision import use_autocast
from ..seeding import candidate_seed, history_seeds
from ..types import Completion, History, Message
from . import kv
from .base import SampleJob, check_sample_args
from .loading import SFT_RECORD, fine_tuned_length, load_causal_lm
from .option_values import check_hf_options
from .outputs import complete_action, final_output
from .render import encode_conversation, fit_history
from .sampling import DistinctGuard, Row, distinct_rounds, filter_probs
from .scoring import score_outputs

log = logging.getLogger(__name__)

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")


class HFPolicy:
    """A local causal LM implementing :class:`~qlass.policy.base.Policy`.

    Args:
        model_dir: a causal-LM folder (``AutoModelForCausalLM`` loads it).
        dtype: weight dtype, ``float32`` (default), ``bfloat16`` or ``float16``.
        autocast: run forwards under bf16 autocast (1.6–2.2× faster on AVX512-BF16/AMX CPUs); on a CPU
            without native bf16, or where it is measured slower, the policy runs fp32 and says so (see
            :mod:`qlass.precision`).
        max_length: longest prompt + completion in tokens (capped by the model's positions).
        cache_slots: prompt caches kept for reuse across calls (0 disables reuse); each holds one
            prompt's keys/values (SmolLM2-135M: 46 KB per token in float32).
        threads: ``torch.set_num_threads`` for this process, when given.
        device: ``auto`` (a CUDA GPU when visible, else the CPU), ``cpu``, ``cuda``, ``cuda:N``...
            Sampling draws on the CPU from each candidate's own generator, so seeds give the same
            draws on every device (given the same logits).
        seed: seeds the per-call seeds of calls made with ``seed=None``.
        max_batch_rows: histories are decoded together while their rows fit in this many (64: a lockstep
            wave of 16 episodes mixing greedy, best-of-4 and qlass m=2 holds about 40 rows).
        top_p: nucleus sampling: draw only from the most likely tokens holding this much probability
            (1 = off). min_p: draw only tokens at least this fraction as likely as the most likely
            one (0 = off). Both filter the tempered distribution (:func:`.sampling.filter_probs`).
        distinct: when ``n > 1`` at temperature > 0, a history's candidates get distinct actions where
            the model allows it (:mod:`.sampling`). Cost: rows repeating an action are decoded again
            in further rounds (at most ``n``), each as long as its longest row, so a call whose
            candidates repeat takes up to ``n`` times the decoding time; ``completion_tokens``
            include the tokens of the discarded attempts. Off, decoding is unchanged.
    """

    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "float32",
        autocast: bool = False,
        max_length: int = 4096,
        cache_slots: int = 8,
        threads: int | None = None,
        device: str = "auto",
        seed: int = 0,
        max_batch_rows: int = 64,
        top_p: float = 1.0,
        min_p: float = 0.0,
        distinct: bool = False,
    ) -> None:
        check_hf_options({"dtype": dtype, "max_length": max_length, "cache_slots": cache_slots, "threads": threads,
                          "device": device, "max_batch_rows": max_batch_rows, "top_p": top_p, "min_p": min_p})
        self.top_p, self.min_p, self.distinct = float(top_p), float(min_p), bool(distinct)
        if threads:
            torch.set_num_threads(threads)
        self.model, self.tokenizer = load_causal_lm(model_dir, dtype)
        self.device = torch.device(resolve_device(device))
        self.model.to(self.device)
        self.model_dir = Path(model_dir)
        self.trained_length = fine_tuned_length(self.model_dir)
        self._warned_length = False
        self.autocast = use_autocast(bool(autocast), self.device)
        # Under bf16 autocast, attention reads keys and values in bf16 anyway: storing them so casts
        # each new token once instead of the whole cache at every decoding step (same results).
        self.kv_dtype = torch.bfloat16 if self.autocast else None
        positions = getattr(self.model.config, "max_position_embeddings", None) or max_length
        self.max_length = min(int(max_length), int(positions))
        self.max_batch_rows = int(max_batch_rows)
        self.plain = kv.plain_attention(self.model.config)
        self.store = kv.PrefixStore(cache_slots if self.plain else 0)
        self._rng = random.Random(seed)
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._num_layers = self.model.config.get_text_config(decoder=True).num_hidden_layers
        vocab = self.tokenizer.get_vocab()
        stops = {self.tokenizer.eos_token_id} | {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
        self.stop_ids = {s for s in stops if s is not None}
        self._newline: dict[int, bool] = {}
        self.prefill_tokens = 0
        """Prompt tokens actually run through the model (after reuse), over the policy's life."""

    # -- public API ------------------------------------------------------------------------
    def sample(
        self,
        histories: Sequence[History],
        n: int = 1,
        temperature: float = 0.0,
        max_new_tokens: int = 128,
        seed: int | Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """``n`` completions per history from one shared prefill each (see the module docstring)."""
        check_sample_args(n, temperature, max_new_tokens)
        bases = history_seeds(seed, len(histories), self._rng)
        return self.sample_jobs([SampleJob(h, n, temperature, max_new_tokens, b) for h, b in zip(histories, bases)])

    def sample_jobs(self, jobs: Sequence[SampleJob]) -> list[list[Completion]]:
        """The completions of each job, as :meth:`sample` gives them for its history alone, with the rows
        of jobs of any ``n``, temperature and token limit decoded together (``max_batch_rows`` at a
        time). Under ``distinct``, jobs with several sampled candidates keep their own rounds."""
        for job in jobs:
            check_sample_args(job.n, job.temperature, job.max_new_tokens)
        rows = [1 if job.temperature == 0 else job.n for job in jobs]
        bases = [job.seed if job.seed is not None else self._rng.getrandbits(31) for job in jobs]
        prompts = [self.encode(list(job.history), reserve=job.max_new_tokens) for job in jobs]
        rounds = [i for i in range(len(jobs)) if self.distinct and rows[i] > 1]
        order = [i for i in range(len(jobs)) if not (self.distinct and rows[i] > 1)]
        out: dict[int, list[Completion]] = {}
        groups: dict[tuple[int, float, int], list[int]] = {}
        for i in rounds:  # distinct candidates: in rounds, histories of the same settings together
            groups.setdefault((rows[i], jobs[i].temperature, jobs[i].max_new_tokens), []).append(i)
        for (n, temperature, max_new), members in groups.items():
            per_batch = max(1, self.max_batch_rows // n) if self.plain else 1
            for start in range(0, len(members), per_batch):
                part = members[start: start + per_batch]
                seeds = [candidate_seed(bases[i], j) for i in part for j in range(n)]
                out.update(zip(part, self._distinct([prompts[i] for i in part], n, temperature, max_new, seeds)))
        batch: list[int] = []
        for i in [*order, None]:
            full = i is None or (batch and (not self.plain
                                            or sum(rows[b] for b in batch) + rows[i] > self.max_batch_rows))
            if full and batch:
                done = self._generate([prompts[b] for b in batch], [rows[b] for b in batch],
                                      [jobs[b].temperature for b in batch], [jobs[b].max_new_tokens for b in batch],
                                      [[candidate_seed(bases[b], j) for j in range(rows[b])] for b in batch])
                out.update(zip(batch, done))
                batch = []
            if i is not None:
                batch.append(i)
        return [out[i] * jobs[i].n if rows[i] == 1 else out[i] for i in range(len(jobs))]

    def encode(self, history: Sequence[Message], reserve: int = 0) -> list[int]:
        """Prompt ids of ``history``, oldest turns dropped so that ``reserve`` new tokens still fit."""
        budget = self.max_length - reserve
        if budget < 1:
            raise QlassError(f"max_new_tokens ({reserve}) leaves no room for a prompt in max_length {self.max_length}")
        ids, _ = encode_conversation(self.tokenizer, history, add_generation_prompt=True)
        if len(ids) > budget:
            short = fit_history(history, lambda msgs: len(encode_conversation(self.tokenizer, msgs, True)[0]) <= budget)
            ids, _ = encode_conversation(self.tokenizer, short, True)
            log.debug("history of %d messages truncated to %d", len(history), len(short))
            if len(ids) > budget:
                log.warning("prompt of %d tokens cut from the left to %d even after dropping old turns", len(ids),
                            budget)
                ids = ids[-budget:]
        self._check_trained_length(len(ids))
        return ids

    def _check_trained_length(self, tokens: int) -> None:
        """Warn once when a prompt is longer than the sequences the model was fine-tuned on."""
        if self.trained_length and tokens > self.trained_length and not self._warned_length:
            self._warned_length = True
            log.warning("%s: a prompt of %d tokens is longer than the %d tokens this model was fine-tuned at (%s "
                        "max_length): it reads a context it never saw in training; fine-tune with a larger max_length "
                        "or give the policy max_length=%d", self.model_dir, tokens, self.trained_length,
                        SFT_RECORD, self.trained_length)

    def score_outputs(self, histories: Sequence[History], outputs: Sequence[str]) -> list[tuple[float, int]]:
        """Teacher-forced ``(log-probability, tokens)`` of each ``outputs[i]`` as the reply to
        ``histories[i]`` (:func:`.scoring.score_outputs`): what sampling reports as ``logprob`` and
        ``completion_tokens`` for the same output ended by the end-of-turn token."""
        return score_outputs(self, histories, outputs)

    def clear_cache(self) -> None:
        """Forget the cached prompts (frees their memory; the next call prefills from scratch)."""
        self.store.clear()

    # -- internals -------------------------------------------------------------------------
    def _run(self, ids: torch.Tensor, cache: Any, mask: torch.Tensor | None = None,
             positions: torch.Tensor | None = None, keep: int = 1) -> torch.Tensor:
        """Logits (float32, on the CPU, ``[batch, keep, vocab]``) after each of the last ``keep``
        positions of ``ids``; ``cache`` grows in place."""
        kwargs: dict[str, Any] = {self._cache_arg: cache}
        if mask is not None:
            kwargs.update(attention_mask=mask, position_ids=positions)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=keep, **kwargs)
        return out.logits[:, -keep:, :].float().cpu()

    def _forward(self, ids: torch.Tensor, cache: Any, mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits (float32, ``[batch, vocab]``) after ``ids``; ``cache`` grows in place."""
        return self._run(ids, cache, mask, positions)[:, -1, :]

    def _prefill(self, ids: list[int]) -> kv.Prefix:
        """The cache and next-token logits of ``ids``, computing only what no stored prompt shares."""
        key = tuple(ids)
        reused, prefix = self.store.lookup(key)
        if prefix is not None and reused == len(ids):
            return prefix
        cache = kv.prefill_cache(prefix.kv if prefix else None, reused, len(ids), self._num_layers, self.kv_dtype)
        logits = self._forward(torch.tensor([ids[reused:]], device=self.device), cache)[0]
        self.prefill_tokens += len(ids) - reused
        entry = kv.Prefix(kv.cache_kv(cache), logits)
        self.store.put(key, entry)
        return entry

    def _start(self, prompts: list[list[int]], counts: list[int], extra: int
               ) -> tuple[Any, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Decode state for ``counts[i]`` rows of each prompt ``i``: cache, first logits, mask, positions."""
        repeats = torch.tensor(counts, device=self.device)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device).repeat_interleave(repeats)
        if not self.plain:  # generic cache classes: one prompt, prefilled fresh, rows repeated
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
            logits = self._forward(torch.tensor([prompts[0]], device=self.device), cache)
            self.prefill_tokens += len(prompts[0])
            cache.batch_repeat_interleave(counts[0])
            return cache, logits.expand(counts[0], -1), None, lengths
        entries = [self._prefill(p) for p in prompts]
        cache, mask = kv.batch_cache([e.kv for e in entries], counts, extra)
        logits = torch.stack([e.logits for e in entries]).repeat_interleave(repeats.cpu(), dim=0)
        return cache, logits, mask, lengths

    def _ends(self, tokens: list[int]) -> bool:
        """Whether a row is finished: end token, or the newline closing a complete action line."""
        tok = tokens[-1]
        if tok in self.stop_ids:
            return True
        if tok not in self._newline:
            self._newline[tok] = "\n" in self.tokenizer.decode([tok])
        return self._newline[tok] and complete_action(self.tokenizer.decode(tokens)) is not None

    def _text(self, tokens: list[int], ended: bool) -> tuple[str, bool]:
        """The returned text of a row's tokens and whether it is truncated (:func:`final_output`)."""
        return final_output(self.tokenizer.decode([t for t in tokens if t not in self.stop_ids]), cut=not ended)

    def _row_action(self, row: Row) -> str | None:
        """The action of a decoded row (``None`` if it has none or was truncated)."""
        return parse_action(self._text(row.tokens, ended=True)[0]) if row.ended else None

    def _action_if_ends(self, tokens: list[int]) -> str | None:
        """The action ``tokens`` end with (``""`` if none), or ``None`` while they do not end a row."""
        if not self._ends(tokens):
            return None
        return parse_action(self._text(tokens, ended=True)[0]) or ""

    def _generate(self, prompts: list[list[int]], rows: list[int], temperatures: list[float], limits: list[int],
                  seeds: list[list[int]]) -> list[list[Completion]]:
        """Decode ``rows[i]`` candidates of prompt ``i`` at ``temperatures[i]``, at most ``limits[i]`` tokens
        each, all in one batch; candidate ``j`` of prompt ``i`` draws from seed ``seeds[i][j]``."""
        per_row = [(i, temperatures[i], limits[i]) for i in range(len(prompts)) for _ in range(rows[i])]
        gens = [torch.Generator().manual_seed(s) if temperatures[i] > 0 else None
                for i in range(len(prompts)) for s in seeds[i]]
        decoded = self._decode(prompts, rows, [t for _, t, _ in per_row], [m for _, _, m in per_row], gens)
        return self._completions(prompts, [i for i, _, _ in per_row], decoded, rows)

    def _distinct(self, prompts: list[list[int]], rows: int, temperature: float, max_new_tokens: int,
                  seeds: list[int]) -> list[list[Completion]]:
        """``rows`` candidates of each prompt with distinct actions where the model allows (:mod:`.sampling`)."""
        gens = [torch.Generator().manual_seed(s) for s in seeds]

        def decode(todo: list[int], guard: DistinctGuard) -> list[Row]:
            counts = [sum(1 for r in todo if r // rows == i) for i in range(len(prompts))]
            live = [i for i, c in enumerate(counts) if c]
            return self._decode([prompts[i] for i in live], [counts[i] for i in live], [temperature] * len(todo),
                                [max_new_tokens] * len(todo), [gens[r] for r in todo], guard)

        decoded = distinct_rounds(len(prompts), rows, decode, self._action_if_ends, self._row_action)
        return self._completions(prompts, [r // rows for r in range(len(decoded))], decoded, [rows] * len(prompts))

    def _completions(self, prompts: list[list[int]], owner: list[int], decoded: list[Row],
                     rows: list[int]) -> list[list[Completion]]:
        """The decoded rows as completions, grouped by prompt (``owner[r]``: the prompt of row ``r``)."""
        out: list[list[Completion]] = [[] for _ in prompts]
        for r, row in enumerate(decoded):
            text, truncated = self._text(row.tokens, row.ended)
            prompt = owner[r]
            out[prompt].append(Completion(text, len(prompts[prompt]), len(row.tokens) + row.spent, row.logprob,
                                          truncated, len(row.tokens) if row.spent else None))
        assert [len(o) for o in out] == rows
        return out

    def _pick(self, logits: torch.Tensor, active: list[int], temperatures: list[float],
              gens: list[torch.Generator | None], tokens: list[list[int]], guard: DistinctGuard | None) -> list[int]:
        """The next token of each active row: argmax for a row at temperature 0, else a draw from its
        tempered, filtered distribution with the row's own generator (under ``guard``'s rules when given)."""
        picks = logits.argmax(dim=-1).tolist()
        by_temperature: dict[float, list[int]] = {}
        for b, r in enumerate(active):
            if temperatures[r] > 0:
                by_temperature.setdefault(temperatures[r], []).append(b)
        for temperature, batch in by_temperature.items():
            scaled = logits[batch] / temperature
            if not bool(torch.isfinite(scaled.amax(dim=-1)).all()):  # a tiny temperature overflowed: top logit to 0
                scaled = (logits[batch] - logits[batch].amax(dim=-1, keepdim=True)) / temperature
            probs = torch.softmax(scaled, dim=-1)
            if self.top_p < 1 or self.min_p > 0:
                probs = filter_probs(probs, self.top_p, self.min_p)
            for k, b in enumerate(batch):
                r = active[b]
                picks[b] = (guard.pick(r, probs[k], gens[r], tokens[r]) if guard is not None
                            else int(torch.multinomial(probs[k], 1, generator=gens[r])))
        return picks

    def _decode(self, prompts: list[list[int]], counts: list[int], temperatures: list[float], limits: list[int],
                gens: list[torch.Generator | None], guard: DistinctGuard | None = None) -> list[Row]:
        """Decode ``counts[i]`` rows of each prompt ``i`` together; row ``r`` samples at ``temperatures[r]``
        with ``gens[r]`` and stops after at most ``limits[r]`` tokens."""
        cache, logits, mask, positions = self._start(prompts, counts, max(limits))
        total = logits.shape[0]
        rows = [Row() for _ in range(total)]
        active = list(range(total))  # batch position -> row
        while True:
            logp = torch.log_softmax(logits, dim=-1)
            picks = self._pick(logits, active, temperatures, gens, [row.tokens for row in rows], guard)
            keep = []
            for b, (r, tok) in enumerate(zip(active, picks)):
                rows[r].tokens.append(tok)
                rows[r].logprob += float(logp[b, tok])
                rows[r].ended = self._ends(rows[r].tokens)
                if not rows[r].ended and len(rows[r].tokens) < limits[r]:
                    keep.append(b)
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask = mask[index] if mask is not None else None
                positions = positions[index]
                active = [active[b] for b in keep]
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            feed = torch.tensor([[rows[r].tokens[-1]] for r in active], device=self.device)
            logits = self._forward(feed, cache, mask, positions.unsqueeze(1))
            positions = positions + 1
        return rows
