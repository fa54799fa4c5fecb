"""The QNet: a value model read at the last token of a candidate action, saved as a standard HF
sequence classifier, scored in shared-prefix batches (the history once, then all candidates packed
in one forward; see :func:`qlass.qnet_forward.shared_prefix_hidden`).

Input layout (identical in training and inference)::

    encode_conversation(history, add_generation_prompt=True)   the policy's prompt for this turn
    + tokenizer(action, add_special_tokens=False).input_ids     the candidate output, as generated

i.e. exactly the token sequence the policy produced the action from, followed by the action. The
value is the regression head applied to the final hidden state of the action's last token.

Head: a single bias-free linear layer ``score`` (hidden → 1) on the last hidden layer — what
``AutoModelForSequenceClassification`` builds for ``num_labels=1``. The paper's reference code uses a
3-layer MLP head; we chose the linear head so that the saved folder loads unchanged in HF Auto
classes, vLLM's pooling runner and SGLang's classify endpoint (an MLP head would need custom code
in each of them). The backbone is fine-tuned, so the head's capacity is not the bottleneck.

HF's ``*ForSequenceClassification`` pools the rightmost token that is not ``pad_token_id``. Our
inputs carry no trailing padding, and trailing pad-id tokens of an action are dropped when it is
encoded, so the Auto class reads the same position as :meth:`QNet.score` (tested).

Truncation: a candidate keeps its last ``max_action_tokens`` tokens; the history gets the rest of
``max_length`` (a fixed budget, so a candidate's value never depends on its siblings). Too-long
histories lose their oldest turns first (:func:`~qlass.policy.render.fit_history`, as the policy does, keeping the
instruction prefix and task turn; the newest turn is always kept), then, if still too long, their
oldest tokens.

Ranking score (``rank`` in ``qnet.json``, set by training's ``rank`` option): ``q`` scores a
candidate by the value at its last token, Q(s, a). ``advantage`` and ``dueling`` also read the same
head at the last token of the history (the end of the generation prompt), V(s), and score Q − V;
siblings share V, so their order is Q's, but the score no longer carries how far the state is from the
end (see :mod:`qlass.qnet_loss` for what each rank trains). The saved folder's Auto-class logit is
always Q; V is the same model's logit on the history alone.

Token accounting: ``last_tokens`` is the number of tokens the QNet processed in its last call (the
shared history once plus every candidate's own tokens, padding excluded); ``total_tokens`` sums them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import QlassError
from .file_checks import refuse_classifier, require_model_folder
from .jsonl import write_text_atomic
from .models import resolve_device
from .policy import kv
from .policy.loading import load_tokenizer, loading_weights
from .policy.render import encode_conversation, ensure_chat_template, fit_history
from .precision import bf16_autocast, use_autocast
from .qnet_forward import backbone_of, last_real_hidden, sequence_hidden, shared_prefix_hidden, stored_prefix_hidden
from .qnet_options import META_FILE, check_qnet_folder, read_qnet_meta
from .training.configs import RANKS
from .types import History, Message

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def _dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in table:
        raise QlassError(f"unknown dtype {name!r}; use float32 or bfloat16")
    return table[name]


def pad_id_of(tokenizer: Any) -> int:
    """The id used as ``pad_token_id`` in the saved config (the tokenizer's pad, else its EOS)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise QlassError("the tokenizer has neither a pad nor an EOS token; cannot set pad_token_id")
    return int(pad)


class QNet:
    """A sequence-classification model (one regression output) with qlass's input encoding."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 4096, max_action_tokens: int = 256,
                 autocast: bool = False, rank: str = "q", cache_slots: int = 0) -> None:
        if int(model.config.num_labels) != 1:
            raise QlassError(f"a QNet has exactly one output; this model has num_labels={model.config.num_labels}")
        if max_action_tokens < 1 or max_length <= max_action_tokens:
            raise QlassError(f"need 1 <= max_action_tokens < max_length, got {max_action_tokens} and {max_length}")
        if rank not in RANKS:
            raise QlassError(f"unknown QNet rank {rank!r}; use one of {', '.join(RANKS)}")
        self.model = model
        self.rank = rank
        self.tokenizer = ensure_chat_template(tokenizer)
        self.max_length = int(max_length)
        self.max_action_tokens = int(max_action_tokens)
        self.autocast = bool(autocast)
        self.pad_id = int(model.config.pad_token_id)
        self.last_tokens = 0
        self.total_tokens = 0
        self.store = kv.PrefixStore(cache_slots if kv.plain_attention(model.config) else 0)
        self.prefill_tokens = 0

    # -- construction and files ---------------------------------------------------------------
    @classmethod
    def from_sft(cls, sft_dir: str | Path, max_length: int = 4096, max_action_tokens: int = 256,
                 autocast: bool = False, seed: int = 0, dtype: str = "float32", rank: str = "q",
                 cache_slots: int = 0) -> QNet:
        """A QNet whose backbone is the SFT causal LM in ``sft_dir`` and whose head is fresh (seeded)."""
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        sft_dir = Path(sft_dir)
        require_model_folder(sft_dir, f"{sft_dir}: not a model folder (no config.json)")
        refuse_classifier(sft_dir)
        tokenizer = load_tokenizer(sft_dir)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "score.weight newly initialized" is expected here
        try:  # the head's seeded initialisation leaves the caller's generator as it was
            with torch.random.fork_rng(devices=[]), loading_weights(sft_dir, "model"):
                torch.manual_seed(seed)
                model = AutoModelForSequenceClassification.from_pretrained(
                    sft_dir, num_labels=1, problem_type="regression", pad_token_id=pad_id_of(tokenizer),
                    id2label={0: "q_value"}, label2id={"q_value": 0}, dtype=_dtype(dtype))
        finally:
            hf_logging.set_verbosity(verbosity)
        return cls(model, tokenizer, max_length, max_action_tokens, autocast, rank, cache_slots)

    @classmethod
    def load(cls, path: str | Path, dtype: str = "float32", autocast: bool | None = None,
             threads: int | None = None, max_length: int | None = None, device: str = "auto",
             cache_slots: int = 0) -> QNet:
        """Load a saved QNet folder (settings from its ``qnet.json`` unless overridden) onto
        ``device`` (``auto``: a CUDA GPU when visible, else the CPU). ``autocast=None`` scores under
        bf16 autocast exactly when training did (recorded in ``qnet.json``), so values match training's.
        ``cache_slots > 0`` keeps that many history caches for :meth:`score_batch` (see there)."""
        from transformers import AutoModelForSequenceClassification

        path = Path(path)
        require_model_folder(path, f"{path}: not a QNet folder (no config.json)")
        limits = (("threads", threads, 1), ("max_length", max_length, 2), ("cache_slots", cache_slots, 0))
        for name, value, low in limits:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise QlassError(f"QNet option {name} must be an integer >= {low}, got {value!r}")
        check_qnet_folder(path)
        if threads:
            torch.set_num_threads(threads)
        meta = read_qnet_meta(path)
        with loading_weights(path, "QNet"):
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=_dtype(dtype)).eval()
        model.to(resolve_device(device))
        tokenizer = load_tokenizer(path)
        return cls(model, tokenizer, meta.get("max_length", 4096) if max_length is None else max_length,
                   meta.get("max_action_tokens", 256),
                   bool(meta.get("autocast", False)) if autocast is None else autocast, meta.get("rank", "q"),
                   cache_slots)

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write the model (safetensors), tokenizer and ``qnet.json`` (input settings) to ``path``.
        ``autocast`` is recorded as it takes effect where the model is now (a CPU without native bf16,
        or where it is slower, runs fp32 though bf16 was asked for), so a load anywhere scores in the
        precision it trained in."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.config.problem_type = "regression"
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        value_at = "last token of the candidate action" + ("" if self.rank == "q" else
                                                            " minus the value at the last history token")
        meta = {"schema_version": SCHEMA_VERSION, "max_length": self.max_length,
                "max_action_tokens": self.max_action_tokens, "rank": self.rank,
                "autocast": use_autocast(self.autocast, self.model.device),
                "value_at": value_at, **(extra or {})}
        write_text_atomic(path / META_FILE, json.dumps(meta, indent=2) + "\n")

    # -- encoding -----------------------------------------------------------------------------
    def encode_action(self, action: str) -> list[int]:
        """The candidate's own token ids (trailing pad-id tokens dropped, last ``max_action_tokens`` kept)."""
        ids = self.tokenizer(action, add_special_tokens=False)["input_ids"]
        while ids and ids[-1] == self.pad_id:
            ids = ids[:-1]
        return ids[-self.max_action_tokens:]

    def encode_history(self, history: Sequence[Message]) -> list[int]:
        """The policy's prompt ids for ``history``, oldest turns (then tokens) dropped to fit the budget."""
        budget = self.max_length - self.max_action_tokens
        ids, _ = encode_conversation(self.tokenizer, history, add_generation_prompt=True)
        if len(ids) <= budget:
            return ids
        short = fit_history(history, lambda msgs: len(encode_conversation(self.tokenizer, msgs, True)[0]) <= budget)
        ids, _ = encode_conversation(self.tokenizer, short, add_generation_prompt=True)
        if len(ids) > budget:
            log.warning("QNet input of %d history tokens cut from the left to %d even after dropping old turns",
                        len(ids), budget)
        return ids[-budget:]

    def encode(self, history: Sequence[Message], action: str) -> list[int]:
        """The full input of one (history, action) pair — what training and scoring both read."""
        return self.encode_history(history) + self.encode_action(action)

    # -- values -------------------------------------------------------------------------------
    def values(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], value: bool = False) -> torch.Tensor:
        """Ranking scores ``[M]`` of ``prefix + suffix`` per suffix (differentiable), the history computed
        once: Q, or Q − V for the ``advantage`` and ``dueling`` ranks; Q itself with ``value=True``."""
        prefix_last, hidden = shared_prefix_hidden(backbone_of(self.model), prefix, suffixes, self.autocast)
        return self._rank_scores(prefix_last, hidden, [len(s) for s in suffixes], value)

    def _rank_scores(self, prefix_last: torch.Tensor, hidden: torch.Tensor, lengths: Sequence[int],
                     value: bool) -> torch.Tensor:
        q = self._head(last_real_hidden(prefix_last, hidden, lengths))
        return q if self.rank == "q" or value else q - self._head(prefix_last[None])

    def _cached_values(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], value: bool) -> torch.Tensor:
        """:meth:`values` (no gradient) with the history's cache kept in the store: a history that
        extends a stored one (the next turn of the same episode) runs only its new tokens."""
        prefix_last, hidden, computed = stored_prefix_hidden(backbone_of(self.model), self.store, prefix, suffixes,
                                                             self.autocast)
        self.prefill_tokens += computed
        return self._rank_scores(prefix_last, hidden, [len(s) for s in suffixes], value)

    def clear_cache(self) -> None:
        """Forget the stored history caches (call after changing the weights)."""
        self.store.clear()

    def values_at(self, ids: Sequence[int], ends: Sequence[int]) -> torch.Tensor:
        """Values ``[K]`` read at positions ``ends`` of one causal forward over ``ids`` (differentiable):
        the value of each input ``ids[: end + 1]`` — how training scores a packed path
        (:mod:`qlass.qnet_pack`)."""
        return self.heads_at(ids, [ends])[0]

    def heads_at(self, ids: Sequence[int], positions: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The head read at each list of ``positions`` of one causal forward over ``ids`` (differentiable);
        training reads Q at the records' last tokens and V at their histories' last tokens this way."""
        hidden = sequence_hidden(backbone_of(self.model), ids, self.autocast)
        return [self._head(hidden[torch.tensor(list(p), dtype=torch.long, device=hidden.device)]) for p in positions]

    def _head(self, last: torch.Tensor) -> torch.Tensor:
        """The regression head on final hidden states ``[K, H]`` → values ``[K]``."""
        head = self.model.score
        with bf16_autocast(last.device, self.autocast):
            out = head(last.to(head.weight.dtype))
        return out.float().squeeze(-1)

    def score(self, history: History, candidates: Sequence[str]) -> list[float]:
        """Values of ``candidates`` (raw agent outputs) after ``history``: one shared-prefix batch."""
        return self.score_batch([(history, candidates)])[0]

    def score_batch(self, items: Sequence[tuple[History, Sequence[str]]], value: bool = False) -> list[list[float]]:
        """:meth:`score` for several histories (``value=True``: Q itself, the outcome estimate that judges
        finished trajectories, whatever the rank); ``last_tokens`` covers the whole call and
        ``last_item_tokens`` lists each item's share (what a model without caches reads).

        With ``cache_slots`` (inference only: the stored caches describe the weights they were made
        with), a history's KV cache is kept, so the next turn of an episode runs only its new tokens
        (values equal those without the store up to float rounding)."""
        results: list[list[float]] = []
        per_item: list[int] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for history, candidates in items:
                    if not candidates:
                        results.append([])
                        per_item.append(0)
                        continue
                    prefix = self.encode_history(list(history))
                    suffixes = [self.encode_action(c) for c in candidates]
                    per_item.append(len(prefix) + sum(len(s) for s in suffixes))
                    scores = (self._cached_values(prefix, suffixes, value) if self.store.slots
                              else self.values(prefix, suffixes, value))
                    results.append([float(v) for v in scores])
        finally:
            self.model.train(was_training)
        self.last_item_tokens = per_item
        self.last_tokens = sum(per_item)
        self.total_tokens += self.last_tokens
        return results
