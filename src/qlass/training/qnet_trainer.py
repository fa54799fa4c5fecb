"""The QNet's training loop on transformers' ``Trainer``: the schedule of optimizer steps over packed
rows, dealt to the processes (:func:`schedule`), the datasets the Trainer reads, and
:class:`QNetTrainer`, whose training step is the packed-path loss and whose evaluation loop gives the
sibling-ranking metrics. :func:`qlass.training.qnet.train_qnet` runs it.

Steps. An optimizer step covers at least ``batch_size`` records from at least ``min_trees_per_step``
trees (whole rows; with a pairwise loss, all rows through a sibling group with contrast together,
:func:`qlass.qnet_pack.step_batches`), in a seeded order per epoch. The steps of every epoch are laid
out in advance and each is dealt to the W processes (whole units, balanced by tokens), so the
Trainer reads one sequential dataset whose item ``k·W + p`` is process p's share of step k: one
micro-batch per process per optimizer step (``gradient_accumulation_steps`` 1), the same steps on one
CPU as under ``accelerate launch``, epochs of different lengths, and a resume that skips exactly the
steps done. Epoch ends are marked by :class:`EpochEnds` (validation, then a checkpoint).

A share's rows are backpropagated one at a time (one row's graph in memory); only the last backward
synchronises gradients across processes, and every process makes as many passes per step as the
fullest share (one-token, zero-weight passes fill the others), so sharded runs (FSDP, ZeRO-3) gather
their weights the same number of times on every process. The loss (:mod:`qlass.qnet_loss`) is
normalised by the whole step's records and pairs, so the processes' gradients add up to one
process's. A record's value is the model's own head (``score``) read at its last token in a forward
of the model as the Trainer wraps it (so DDP/FSDP see every forward); a hook catches the head's
output at every position of the row.

Evaluation: each held-out row is one item of the Trainer's evaluation loop (sharded over the
processes, gathered); ``prediction_step`` gives Q and the ranking score of its records with their
indices as labels, and ``compute_metrics`` the MSE of Q, the sibling pair accuracy of the score and
Spearman (logged as ``eval_mse``, ``eval_pair_accuracy``, ``eval_pairs``, ``eval_spearman``,
``eval_records``). With ``select_best`` each epoch that beats every earlier one is saved as the best
(``best_epoch/``, the Trainer's ``save_model``: the adapter with LoRA).
"""

from __future__ import annotations

import bisect
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from ..qnet_data import fmt
from ..qnet_loss import contrast_groups, group_key, pair_coefficients, record_losses, scores_of, sibling_pairs
from ..qnet_pack import PackedRow, batch_units, step_batches
from ..qnet_validate import outputs_metrics
from .schedule import WarmupWithinRun

if TYPE_CHECKING:
    from .qnet import QNetTrainConfig

log = logging.getLogger(__name__)
BEST_MARK = "qnet_epoch.json"
"""In a best-epoch snapshot: the epoch and step it was taken at."""
HEAD = "score"
"""The value head's module name (``AutoModelForSequenceClassification``'s for the decoder models)."""


@dataclass(frozen=True)
class Share:
    """One process's part of an optimizer step (``rows``, by index) and what the whole step holds."""

    rows: list[int]
    records: int
    pairs: int
    trees: int
    tokens: int
    passes: int
    """backward passes every process makes in this step: the most rows of any share"""
    scoring: int
    """no-gradient passes every process makes for the pair coefficients: the most rows holding a
    paired record of any share"""


def deal(units: Sequence[Sequence[int]], tokens: Sequence[int], processes: int) -> list[list[int]]:
    """The rows of a step's ``units`` (``tokens`` each) dealt to ``processes`` shares: largest unit
    first, each to the share with the fewest tokens so far; a share keeps the step's order."""
    load = [0] * processes
    parts: list[list[int]] = [[] for _ in range(processes)]
    for k in sorted(range(len(units)), key=lambda k: -tokens[k]):
        p = min(range(processes), key=load.__getitem__)
        parts[p].append(k)
        load[p] += tokens[k]
    return [[i for k in sorted(part) for i in units[k]] for part in parts]


def schedule(rows: Sequence[PackedRow], cfg: QNetTrainConfig, processes: int) -> tuple[list[Share], list[int]]:
    """Every optimizer step of the run (``max_steps`` at most) cut into ``processes`` shares, share p of
    step k at index ``k·processes + p``; and the step at which each epoch ends (the last one cut short
    by ``max_steps``; epochs after it left out)."""
    records = [r for row in rows for r in row.records]
    contrast = contrast_groups(records) if cfg.pair_weight > 0 else set()
    units = batch_units(rows, lambda r: group_key(r) in contrast)
    counts = [sum(len(rows[i].records) for i in u) for u in units]
    trees = [rows[u[0]].records[0].tree_id for u in units]
    tokens = [sum(len(rows[i].ids) for i in u) for u in units]
    steps = [(epoch, step) for epoch in range(cfg.epochs)
             for step in step_batches(counts, cfg.batch_size, cfg.seed, epoch, trees, cfg.min_trees_per_step)]
    if cfg.max_steps is not None:
        steps = steps[:cfg.max_steps]
    shares: list[Share] = []
    for _, step in steps:
        parts = deal([units[u] for u in step], [tokens[u] for u in step], processes)
        step_records = [r for part in parts for i in part for r in rows[i].records]
        pairs = sibling_pairs(step_records) if contrast else []
        paired = {id(step_records[i]) for pair in pairs for i in pair}
        scoring = max(sum(any(id(r) in paired for r in rows[i].records) for i in part) for part in parts)
        shares += [Share(part, len(step_records), len(pairs), len({trees[u] for u in step}),
                         sum(tokens[u] for u in step), max(map(len, parts)), scoring) for part in parts]
    ends = [sum(1 for e, _ in steps if e <= epoch) for epoch in range(cfg.epochs)]
    return shares, sorted({e for e in ends if e > 0})


def _row_inputs(row: PackedRow) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([row.ids], dtype=torch.long), "ends": torch.tensor(row.ends),
            "starts": torch.tensor([e - n for e, n in zip(row.ends, row.action_lengths, strict=True)])}


class StepShares(torch.utils.data.Dataset):
    """The schedule as the Trainer's training dataset: item i is share i as tensors (per row: ids,
    value positions, targets and state targets; the share's sibling pairs; the step's counts)."""

    def __init__(self, rows: Sequence[PackedRow], shares: Sequence[Share],
                 baselines: dict[tuple[str, str], float]) -> None:
        self.rows, self.shares, self.baselines = rows, shares, baselines

    def __len__(self) -> int:
        return len(self.shares)

    def __getitem__(self, i: int) -> dict[str, Any]:
        share = self.shares[i]
        rows = [self.rows[k] for k in share.rows]
        pairs = sibling_pairs([r for row in rows for r in row.records]) if share.pairs else []
        hi, lo = (list(x) for x in zip(*pairs)) if pairs else ([], [])
        return {"rows": [{**_row_inputs(row), "targets": torch.tensor(row.targets),
                          "baselines": torch.tensor([self.baselines[group_key(r)] for r in row.records])}
                         for row in rows],
                "pair_hi": torch.tensor(hi, dtype=torch.long), "pair_lo": torch.tensor(lo, dtype=torch.long),
                "records": share.records, "pairs": share.pairs, "trees": share.trees, "tokens": share.tokens,
                "passes": share.passes, "scoring": share.scoring}


def validation_items(rows: Sequence[PackedRow]) -> list[dict[str, torch.Tensor]]:
    """One evaluation item per held-out row: its inputs and its records' indices in record order."""
    items, start = [], 0
    for row in rows:
        items.append({**_row_inputs(row), "index": torch.arange(start, start + len(row.records))})
        start += len(row.records)
    return items


def single(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """The collator: every item is a whole micro-batch already."""
    return batch[0]


class QNetTrainer(WarmupWithinRun, Trainer):
    """``Trainer`` on the QNet's packed rows (see the module docstring): ``training_step`` takes one
    share of an optimizer step, ``prediction_step`` one held-out row (Q and the ranking score of its
    records, their indices as labels), ``compute_metrics`` the sibling-ranking metrics; the value
    head gets its own learning rate; ``select_best`` snapshots each epoch that beats the earlier ones."""

    def __init__(self, *args: Any, rank: str, pair_weight: float, head_lr: float, epoch_ends: Sequence[int],
                 val_rows: Sequence[PackedRow] = (), best_dir: Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rank, self.pair_weight, self.head_lr = rank, pair_weight, head_lr
        self.epoch_ends, self.val_rows, self.best_dir = list(epoch_ends), list(val_rows), best_dir
        self.compute_metrics = self._validation_metrics
        self.head = next(m for n, m in self.model.named_modules() if n.split(".")[-1] == HEAD)
        self.body_params = self.model.num_parameters(exclude_embeddings=True)
        self._step: dict[str, Any] = {}

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer and weight-decay groups, the value head's at ``head_lr``."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
            for name, p in opt_model.named_parameters():
                if p.requires_grad:
                    groups.setdefault((HEAD in name.split("."), name in decay), []).append(p)
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = cls([{"params": params, "weight_decay": self.args.weight_decay if decayed else 0.0,
                                   **({"lr": self.head_lr} if head else {})}
                                  for (head, decayed), params in groups.items()], **kwargs)
        return self.optimizer

    def _heads(self, model: Any, row: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Q ``[K]`` of a row's records and, for the advantage ranks, V ``[K]``: one forward of
        ``model`` (as the Trainer wraps it), the head's output at every position caught by a hook."""
        caught: list[torch.Tensor] = []
        hook = self.head.register_forward_hook(lambda _module, _inputs, out: caught.append(out))
        try:
            model(input_ids=row["input_ids"], use_cache=False)
        finally:
            hook.remove()
        values = caught[0][0, :, 0].float()
        return values[row["ends"]], None if self.rank == "q" else values[row["starts"]]

    def _blank(self, model: Any) -> torch.Tensor:
        """A one-token forward whose output, times 0, stands for a row this process does not have."""
        ids = torch.zeros((1, 1), dtype=torch.long, device=self.args.device)
        return model(input_ids=ids, use_cache=False).logits.sum() * 0.0

    @contextmanager
    def _local(self, model: Any) -> Iterator[None]:
        """Accumulate gradients without synchronising them across processes (DeepSpeed's backward
        steps its engine when the gradients are synchronised)."""
        state = self.accelerator.gradient_state
        before = state.sync_gradients
        state._set_sync_gradients(False)
        try:
            with self.accelerator.no_sync(model):
                yield
        finally:
            state._set_sync_gradients(before)

    def _pair_coefficients(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor | None, float]:
        """The share's Bradley–Terry coefficients from a pass without gradients
        (:func:`qlass.qnet_loss.pair_coefficients`), or ``(None, 0.0)`` when the step has no pairs."""
        if not self.pair_weight or not inputs["pairs"]:
            return None, 0.0
        hi, lo = inputs["pair_hi"], inputs["pair_lo"]
        paired = set(hi.tolist()) | set(lo.tolist())
        scores, start, passes = [], 0, 0
        with torch.no_grad(), self.compute_loss_context_manager():
            for row in inputs["rows"]:
                k = len(row["ends"])
                if paired & set(range(start, start + k)):
                    scores.append(scores_of(*self._heads(model, row)))
                    passes += 1
                else:
                    scores.append(torch.zeros(k, device=self.args.device))
                start += k
            for _ in range(inputs["scoring"] - passes):
                self._blank(model)
        if not paired:
            return None, 0.0
        return pair_coefficients(torch.cat(scores), hi, lo, inputs["pairs"])

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Backpropagate this process's share of an optimizer step row by row (see the module
        docstring); returns its part of the step's loss, scaled so the Trainer's mean over the
        processes is the step's loss."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        rows, n = inputs["rows"], inputs["records"]
        scale = self.accelerator.num_processes  # DDP averages the gradients: each process adds its part of the sum
        coeff, bt = self._pair_coefficients(model, inputs)
        loss_sum = torch.zeros((), device=self.args.device)
        mse, start = 0.0, 0
        for k in range(inputs["passes"]):
            last = k == inputs["passes"] - 1
            with nullcontext() if last else self._local(model), self.compute_loss_context_manager():
                if k >= len(rows):
                    self.accelerator.backward(self._blank(model))
                    continue
                row = rows[k]
                q, v = self._heads(model, row)
                loss = record_losses(self.rank, q, v, row["targets"], row["baselines"]).sum() / n
                loss_sum += loss.detach()
                mse += float(((q.detach() - row["targets"]) ** 2).sum())
                if coeff is not None:
                    loss = loss + self.pair_weight * (coeff[start:start + len(q)] * scores_of(q, v)).sum()
                self.accelerator.backward(loss * scale)
                start += len(q)
        self._step = {"sums": torch.tensor([mse, bt], dtype=torch.float64),
                      **{key: inputs[key] for key in ("records", "pairs", "trees", "tokens")}}
        return (loss_sum + self.pair_weight * bt) * scale

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """6 × tokens × parameters (the Trainer's estimate) of a share."""
        return 6 * sum(row["input_ids"].numel() for row in inputs["rows"]) * self.body_params

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add to a training step's log (every step: ``logging_steps`` is 1) its records, pairs, trees,
        tokens, ``train_mse`` (mean (Q − q)² over its records) and ``pair_loss`` (mean Bradley–Terry
        loss over its pairs), summed over the processes."""
        if "loss" in logs and self._step:
            mse, bt = self.accelerator.reduce(self._step["sums"].to(self.args.device), "sum").tolist()
            logs = {**logs, "train_mse": mse / self._step["records"], "pair_loss": bt,
                    **{k: v for k, v in self._step.items() if k != "sums"}}
        super().log(logs, start_time)

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[None, torch.Tensor, torch.Tensor]:
        """Q and the ranking score ``[1, K, 2]`` of a held-out row's records, their indices ``[1, K]``."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            q, v = self._heads(model, inputs)
        return None, torch.stack([q, scores_of(q, v)], dim=-1)[None], inputs["index"][None]

    def _validation_metrics(self, predicted: Any) -> dict[str, float]:
        """MSE, sibling pair accuracy and Spearman over the held-out records (gathered from every
        process; the indices put them back in order, padding and repeats dropped)."""
        index = np.asarray(predicted.label_ids)
        values = np.asarray(predicted.predictions)
        keep = index >= 0
        order, first = np.unique(index[keep], return_index=True)
        q, score = values[..., 0][keep][first], values[..., 1][keep][first]
        n = sum(len(row.records) for row in self.val_rows)
        if order.tolist() != list(range(n)):
            raise RuntimeError(f"validation gathered {len(order)} of {n} records")
        m = outputs_metrics(self.val_rows, q.tolist(), score.tolist())
        found = {"mse": m["mse"], "pair_accuracy": m["pair_accuracy"], "pairs": m["pairs"],
                 "spearman": m["spearman"], "records": m["n"]}
        return {k: v for k, v in found.items() if v is not None}  # none: no pairs / constant targets

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """The Trainer's evaluation, then with ``select_best`` a snapshot of the weights when this
        epoch beats every earlier one."""
        metrics = super().evaluate(*args, **kwargs)
        epochs = epoch_records(self.state.log_history, self.epoch_ends)
        if self.is_world_process_zero():
            e = epochs[-1]
            log.info("epoch %d: val mse %.4f, sibling pair accuracy %s over %d pairs, spearman %s", e["epoch"],
                     e["mse"], fmt(e["pair_accuracy"]), e["pairs"], fmt(e["spearman"]))
        trained = [e for e in epochs if e["epoch"] >= 1]
        if self.best_dir is not None and trained and \
                all(selection_key(trained[-1]) > selection_key(e) for e in trained[:-1]):
            self._snapshot(trained[-1]["epoch"])
        return metrics

    def _snapshot(self, epoch: int) -> None:
        """Save the weights (the adapter with LoRA) as the best epoch's, atomically replacing the last."""
        assert self.best_dir is not None
        tmp = self.best_dir.with_name(self.best_dir.name + ".tmp")
        if self.is_world_process_zero():
            shutil.rmtree(tmp, ignore_errors=True)
        self.save_model(str(tmp))
        if self.is_world_process_zero():
            (tmp / BEST_MARK).write_text(json.dumps({"epoch": epoch, "step": self.state.global_step}) + "\n")
            shutil.rmtree(self.best_dir, ignore_errors=True)
            tmp.rename(self.best_dir)


class EpochEnds(TrainerCallback):
    """Marks this run's epochs on the Trainer's single pass over the schedule: ``state.epoch`` counts
    them (fractions within one), and each epoch end (the cut-short last one too) is validated, then
    checkpointed."""

    def __init__(self, ends: Sequence[int], validate: bool) -> None:
        self.ends, self.validate = list(ends), validate

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> Any:
        step = state.global_step
        done = bisect.bisect_right(self.ends, step)
        if done == len(self.ends):
            state.epoch = float(done)
        else:
            start = self.ends[done - 1] if done else 0
            state.epoch = done + (step - start) / (self.ends[done] - start)
        if step in self.ends:
            control.should_evaluate = self.validate
            control.should_save = True
        return control


def epoch_records(history: Sequence[dict[str, Any]], ends: Sequence[int]) -> list[dict[str, Any]]:
    """One record per validation in the Trainer's log history: the epoch it closed (0: before
    training; a cut-short epoch counts), its step, the epoch's training MSE (over all its steps, those
    before a resume too) and the metrics (``pair_accuracy``/``spearman`` ``None`` when undefined)."""
    steps = [h for h in history if "train_mse" in h]
    records = []
    for h in history:
        if "eval_mse" not in h:
            continue
        step = h["step"]
        epoch = 0 if step == 0 else bisect.bisect_left(ends, step) + 1
        start = ends[epoch - 2] if epoch >= 2 else 0
        mine = [s for s in steps if start < s["step"] <= step]
        n = sum(s["records"] for s in mine)
        records.append({"epoch": epoch, "step": step,
                        "train_mse": sum(s["train_mse"] * s["records"] for s in mine) / n if n else None,
                        "mse": h["eval_mse"], "pair_accuracy": h.get("eval_pair_accuracy"), "pairs": h["eval_pairs"],
                        "spearman": h.get("eval_spearman"), "n": h["eval_records"]})
    return records


def selection_key(metrics: dict[str, Any]) -> tuple[float, float]:
    """What ``select_best`` maximises: sibling pair accuracy (no pairs: lowest), then lower MSE."""
    acc = metrics.get("pair_accuracy")
    return (-1.0 if acc is None else acc, -metrics["mse"])
