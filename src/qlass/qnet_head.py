"""A head-only QNet: the SFT model's own hidden states, a value head fitted in closed form
(``qlass train-qnet-head``).

Full fine-tuning a 135M-parameter QNet on a few dozen trees takes tens of optimizer steps and about
an hour per model on this CPU, too slow to cross-validate. Here the backbone stays the SFT model
(frozen) and only the value head is learned:

1. **Features.** Each Q record's input (history + action, encoded exactly as :class:`~qlass.qnet.QNet`
   encodes it) runs once through the SFT backbone, histories shared by siblings and by the nodes of
   one tree path computed once (a cache of recent histories). The hidden state at the action's last
   token is the record's feature — what the QNet's head reads. The same pass gives the SFT policy's
   log-likelihood of the action (its language-model head over the same hidden states), the baseline
   to beat. Features are appended to ``OUT/features.jsonl`` as they are computed, so a killed run
   resumes without redoing them.
2. **Head.** Ridge regression of Q on the features, either on the records as they are or on
   *contrasts* (features and targets minus their sibling group's mean, over groups with at least two
   records): a linear head ranks siblings by ``w · x`` whichever its offset, so contrasts spend all of
   the data's information on the ranking. The L2 strength (and the contrast mode) is picked by
   k-fold cross-validation by tree on held-out sibling-pair accuracy
   (:func:`qlass.qnet_cv.pooled_summary`, with the tree-bootstrap interval of the difference to the
   SFT log-likelihood ranker on the same pairs).
3. **Output.** An ordinary QNet folder (``AutoModelForSequenceClassification``, one label: the SFT
   backbone and the fitted head), so ``qlass eval --qnet`` and ``qlass decisions report --qnet``
   load it like any other. The head has no bias, and either fit leaves the offset out (the plain
   records are centred, contrasts are offsets from their group's mean), so its values rank candidates
   and finished trajectories (what Q-guided search and Best-of-N with ``select=qnet`` compare) but are
   not outcome estimates: ``qnet.json`` records ``calibrated: false``, and ``oracle_terminal``, which
   puts true rewards beside the values, needs a QNet trained by ``train-qnet``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import to_dict
from .config_fields import require_config
from .errors import DataError, QlassError, naming_failed_saves
from .jsonl import append_jsonl, read_json_object, read_numbered_jsonl, write_text_atomic
from .locking import writes_to
from .policy.loading import check_causal_lm_folder
from .precision import use_autocast
from .qnet_cv import pooled_summary
from .qnet_data import QRecord, fold_trees, make_groups, read_qdata
from .recorded import model_files, same_path, setting_changes
from .training.caller_state import keeping_caller_state
from .training.common import file_digest, input_snapshot
from .training.configs import QNetHeadConfig
from .training.run_folders import refuse_overwriting_run

if TYPE_CHECKING:  # torch: imported once the options and the Q data are checked
    from .qnet import QNet

log = logging.getLogger(__name__)

FEATURES_FILE = "features.jsonl"
RESULT_FILE = "qnet_head_result.json"
PROGRESS_EVERY_S = 30.0


HEAD_FEATURE_SETTINGS = ("max_length", "max_action_tokens", "autocast", "cache_slots")
"""Settings of the features, which ``features.settings.json`` checks (a rerun's head settings are checked
against ``qnet_head_result.json``)."""


def record_key(r: QRecord) -> str:
    """A record's key in the features (``tree/node``)."""
    return f"{r.tree_id}/{r.node_id}"


def record_digest(r: QRecord) -> str:
    """A digest of what a record's features are computed from (its history and action)."""
    text = json.dumps([[[m.role, m.content] for m in r.messages], r.action], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _check_row(path: Path, line: int, row: Any, width: int) -> None:
    """A :class:`DataError` naming ``path``, the line and the field of a feature row that is not what
    :func:`record_features` writes (``width``: the backbone's hidden size)."""
    fields = ("keys", "features", "loglik_mean", "loglik_sum")
    if not isinstance(row, dict) or not all(isinstance(row.get(f), list) for f in fields):
        raise DataError(str(path), f"line {line}: a feature row holds the lists {', '.join(fields)} (damaged? "
                        "delete the file, or use another --out)")
    if "digests" in row:
        fields += ("digests",)
    lengths = {len(row[f]) if isinstance(row[f], list) else -1 for f in fields}
    if len(lengths) != 1 or not all(isinstance(f, list) and len(f) == width for f in row["features"]):
        raise DataError(str(path), f"line {line}: its lists differ in length, or a feature is not {width} numbers "
                        "(damaged, or from another model? delete the file, or use another --out)")


def record_features(qnet: QNet, lm: Any, records: Sequence[QRecord], out: Path, source: str,
                    cache_slots: int = 8) -> dict[str, tuple[np.ndarray, float, float]]:
    """Per record key (``tree/node``): its feature (the SFT backbone's hidden state at the action's last
    token), and the SFT policy's mean and summed log-probability of the action's tokens. Computed
    records are appended to ``out`` (one line per sibling group, with each record's
    :func:`record_digest`) and read back on a rerun; a record whose history or action differs from
    the one its stored features were computed from is refused (the input changed at the same path)."""
    import torch

    from .policy import kv
    from .qnet_forward import backbone_of, last_real_hidden, stored_prefix_hidden

    have: dict[str, tuple[np.ndarray, float, float]] = {}
    digests = {record_key(r): record_digest(r) for r in records}
    width = qnet.model.config.hidden_size
    for line, row in read_numbered_jsonl(out, repair_tail=True):
        _check_row(out, line, row, width)
        for j, (key, feat, mean, total) in enumerate(zip(row["keys"], row["features"], row["loglik_mean"],
                                                         row["loglik_sum"], strict=True)):
            stored = row["digests"][j] if "digests" in row else None  # rows written before digests: not checked
            if stored is not None and key in digests and stored != digests[key]:
                raise QlassError(f"{out}: the features of record {key} were computed from another history or "
                                 f"action than {source} now holds (it changed at the same path); use another --out")
            have[key] = (np.asarray(feat, np.float32), float(mean), float(total))
    # A tree's groups in order (histories extend), each tree from an empty prefix cache: a feature depends on its
    # own tree's groups alone, so a resumed run recomputes (and writes) nothing of a finished tree, and replays
    # the finished groups of a tree it stopped in to fill the cache as the uninterrupted run had it (a cold
    # prefix gives features that differ in the fifth decimal, and a head fitted on them other results).
    every = make_groups(records, source)
    todo = {g.tree_id for g in every if any(record_key(r) not in have for r in g.records)}
    groups = sorted((g for g in every if g.tree_id in todo), key=lambda g: (g.tree_id, len(g.messages)))
    if have:
        log.info("features: %d records already in %s, %d trees to compute", len(have), out, len(todo))
    backbone, head = backbone_of(lm), lm.get_output_embeddings()
    slots = cache_slots if kv.plain_attention(lm.config) else 0
    store, tree = kv.PrefixStore(slots), None
    start = last_log = time.perf_counter()
    with torch.no_grad():
        for n, group in enumerate(groups, 1):
            if group.tree_id != tree:
                store, tree = kv.PrefixStore(slots), group.tree_id
            prefix = qnet.encode_history(group.messages)
            suffixes = [qnet.encode_action(r.action) for r in group.records]
            prefix_last, hidden, _ = stored_prefix_hidden(backbone, store, prefix, suffixes, qnet.autocast)
            feats = last_real_hidden(prefix_last, hidden, [len(s) for s in suffixes])
            means, sums = [], []
            for i, ids in enumerate(suffixes):
                if not ids:
                    means.append(0.0)
                    sums.append(0.0)
                    continue
                states = torch.cat([prefix_last[None], hidden[i, : len(ids) - 1]])  # each predicts the next token
                logp = torch.log_softmax(head(states.to(head.weight.dtype)).float(), dim=-1)
                total = float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum())
                sums.append(total)
                means.append(total / len(ids))
            keys = [record_key(r) for r in group.records]
            if all(k in have for k in keys):  # a finished group, replayed for the cache alone
                continue
            rows = [[round(float(x), 5) for x in f] for f in feats]  # used as stored: a resumed run fits the same
            append_jsonl(out, {"keys": keys, "digests": [digests[k] for k in keys], "features": rows,
                               "loglik_mean": means, "loglik_sum": sums})
            for k, row, m, s in zip(keys, rows, means, sums):
                have[k] = (np.asarray(row, np.float32), m, s)
            if time.perf_counter() - last_log > PROGRESS_EVERY_S:
                last_log = time.perf_counter()
                log.info("features: %d of %d groups (%.0f s)", n, len(groups), last_log - start)
    return have


def fit_head(x: np.ndarray, y: np.ndarray, groups: Sequence[str], l2: float, contrast: bool) -> np.ndarray:
    """Ridge weights ``w`` (no offset) of ``y ≈ x·w`` — on sibling contrasts when ``contrast`` (each
    group's rows minus the group's mean, groups of one dropped), else on the rows centred over all
    records (the offset a bias would take is left out: the head has none)."""
    if contrast:
        index: dict[str, list[int]] = defaultdict(list)
        for i, g in enumerate(groups):
            index[g].append(i)
        rows = [idx for idx in index.values() if len(idx) > 1]
        if not rows:
            raise QlassError("qnet-head: no sibling group has two records; fit with contrast: [false]")
        xs = np.concatenate([x[idx] - x[idx].mean(0) for idx in rows])
        ys = np.concatenate([y[idx] - y[idx].mean() for idx in rows])
    else:
        xs, ys = x - x.mean(0), y - y.mean()
    a = xs.T @ xs + l2 * np.eye(x.shape[1])
    return np.linalg.solve(a, xs.T @ ys)


def fit_records(records: Sequence[QRecord], feats: dict[str, tuple[np.ndarray, float, float]], l2: float,
                contrast: bool) -> np.ndarray:
    """:func:`fit_head` on ``records`` (their features from ``feats``, their Q, their sibling groups)."""
    x = np.stack([feats[record_key(r)][0] for r in records]).astype(np.float64)
    return fit_head(x, np.array([r.q for r in records]), [f"{r.tree_id}/{r.group}" for r in records], l2, contrast)


def _prediction_rows(records: Sequence[QRecord], feats: dict[str, tuple[np.ndarray, float, float]],
                     w: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        f, mean, total = feats[record_key(r)]
        score = float(f @ w)
        rows.append({"tree_id": r.tree_id, "group": r.group, "node_id": r.node_id, "q": r.q, "qnet_score": score,
                     "qnet_q": score, "loglik_mean": mean, "loglik_sum": total})
    return rows


def cross_validate_head(records: Sequence[QRecord], feats: dict[str, tuple[np.ndarray, float, float]],
                        cfg: QNetHeadConfig, source: str) -> list[dict[str, Any]]:
    """Pooled held-out results (:func:`pooled_summary`) of every ``(l2, contrast)`` setting, best first."""
    folds = fold_trees(records, cfg.folds, cfg.seed, source)
    results = []
    for contrast in cfg.contrast:
        for l2 in cfg.l2:
            rows: list[dict[str, Any]] = []
            for held in folds:
                train = [r for r in records if r.tree_id not in held]
                w = fit_records(train, feats, l2, contrast)
                rows += _prediction_rows([r for r in records if r.tree_id in held], feats, w)
            summary = pooled_summary(rows, cfg.seed)
            results.append({"l2": l2, "contrast": contrast, **summary})
    def accuracy(res: dict[str, Any]) -> float:
        acc = res["rankers"].get("qnet", {}).get("pair_accuracy")
        return -1.0 if acc is None else acc
    return sorted(results, key=lambda res: (-accuracy(res), -res["l2"]))


def stamp_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What ``now`` changes of the feature settings ``saved`` in ``features.settings.json``
    (:func:`~qlass.recorded.setting_changes`): the SFT model as a model folder (another spelling of
    it, or the same files moved, is the same model), the Q data as a file (another spelling of it, or
    a copy of the same bytes, is the same input; a file rewritten at its path is checked record by
    record). A setting an older stamp lacks is taken as compatible."""
    def view(stamp: dict[str, Any]) -> dict[str, Any]:
        renamed = {"sft": "sft_model", "model_files": "sft_model_files"}
        return {renamed.get(k, k): v for k, v in stamp.items() if k not in ("qdata", "qdata_sha256")}

    changes = setting_changes(view(saved), view(now))
    old, new = saved.get("qdata"), now["qdata"]
    same_bytes = saved.get("qdata_sha256") == now["qdata_sha256"]
    if old != new and not same_bytes and not same_path(old, new):
        changes.insert(0, f"qdata: {old!r} → {new!r}")
    return changes


def inputs_digest(paths: Sequence[str | Path]) -> str:
    """The SHA-256 that stamps features computed from the files ``paths``: one file's own digest, or for
    several a digest of theirs in order (a file that cannot be read again, a pipe, counts by its name)."""
    digests = [file_digest(p) if Path(p).is_file() else f"not a file: {p}" for p in paths]
    return digests[0] if len(paths) == 1 else hashlib.sha256("\n".join(digests).encode()).hexdigest()


def features_of(records: Sequence[QRecord], sft_dir: str | Path, out: Path, cfg: QNetHeadConfig, source: str,
                digest: str) -> tuple[QNet, dict[str, tuple[np.ndarray, float, float]]]:
    """A QNet on the SFT backbone (its head still untrained) and every record's features, computed
    into ``out/features.jsonl`` (resumable; a folder whose features came from other inputs or
    settings, or in another precision than this machine computes them in, is refused; one stamped
    before the precision was recorded is checked on the rest). ``source`` names the inputs, ``digest``
    is their SHA-256 (:func:`inputs_digest`): the inputs are not read again here (a pipe gives its bytes
    once, and ``source`` may name several files)."""
    from .policy.loading import load_causal_lm
    from .qnet import QNet

    qnet = QNet.from_sft(sft_dir, cfg.max_length, cfg.max_action_tokens, cfg.autocast, cfg.seed)
    lm, _ = load_causal_lm(sft_dir)
    settings = {"qdata": source, "qdata_sha256": digest, "sft": str(sft_dir),
                "max_length": cfg.max_length, "max_action_tokens": cfg.max_action_tokens, "autocast": cfg.autocast,
                "precision": "bf16" if use_autocast(cfg.autocast, lm.device) else "fp32",
                "model_files": model_files(sft_dir)}
    stamp = out / "features.settings.json"
    if stamp.exists():
        changes = stamp_changes(read_json_object(stamp), settings)
        if changes:
            raise QlassError(f"{out}: its features were computed with other inputs or settings "
                             f"({'; '.join(changes)}; see {stamp}); use another --out")
    write_text_atomic(stamp, json.dumps(settings) + "\n")
    feats = record_features(qnet, lm, records, out / FEATURES_FILE, source, cfg.cache_slots)
    del lm
    missing = [record_key(r) for r in records if record_key(r) not in feats]
    if missing:
        raise QlassError(f"{out / FEATURES_FILE}: no features for records {missing[:3]}")
    return qnet, feats


@writes_to("out_dir", folder=True)
def train_qnet_head(qdata: str | Path, sft_dir: str | Path, out_dir: str | Path, cfg: QNetHeadConfig) -> dict[str, Any]:
    """Fit a head-only QNet on ``qdata`` from the SFT model in ``sft_dir`` (see the module docstring):
    cross-validate the head's settings, fit the best on every record, save the QNet to ``out_dir``
    with ``qnet_head_result.json`` / ``.md``; returns the result."""
    require_config(cfg, QNetHeadConfig, "train_qnet_head")
    out = Path(out_dir)
    refuse_overwriting_run(out, sft_dir, "qnet-head")
    if (out / RESULT_FILE).is_file():  # a finished head: refitting it with other settings would replace it unsaid
        before = read_json_object(out / RESULT_FILE).get("settings")
        changes = setting_changes(before if isinstance(before, dict) else {}, to_dict(cfg),
                                  ignore=HEAD_FEATURE_SETTINGS)
        if changes:
            raise QlassError(f"{out}: holds a head-only QNet fitted with other settings ({', '.join(changes)}); "
                             "use another --out")
    with input_snapshot(qdata) as source:  # a pipe is copied: its digest is taken from the bytes read
        records = read_qdata(source.path)
    trees = len({r.tree_id for r in records})
    if trees < cfg.folds:
        raise DataError(str(qdata), f"{trees} trees cannot be split into {cfg.folds} folds; lower folds")
    digest = source.digest or inputs_digest([qdata])
    check_causal_lm_folder(sft_dir)
    out.mkdir(parents=True, exist_ok=True)
    with keeping_caller_state():  # cfg.threads, the seeded head: the caller's process keeps its own
        return _fit_head(records, str(qdata), digest, sft_dir, out, cfg)


def _fit_head(records: list[QRecord], source: str, digest: str, sft_dir: str | Path, out: Path,
              cfg: QNetHeadConfig) -> dict[str, Any]:
    import torch

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    trees = len({r.tree_id for r in records})
    qnet, feats = features_of(records, sft_dir, out, cfg, source, digest)
    results = cross_validate_head(records, feats, cfg, source)
    best = results[0]
    w = fit_records(records, feats, best["l2"], best["contrast"])
    with torch.no_grad():
        qnet.model.score.weight.copy_(torch.tensor(w, dtype=qnet.model.score.weight.dtype)[None])
    result = {"records": len(records), "trees": trees, "kept": {"l2": best["l2"], "contrast": best["contrast"]},
              "cross_validation": results, "settings": to_dict(cfg)}
    with naming_failed_saves(out):
        qnet.save(out, extra={"head_only": True, "calibrated": False, "l2": best["l2"]})  # no offset: see above
    write_text_atomic(out / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    write_text_atomic(out / "qnet_head_result.md", "\n".join(result_markdown(result)) + "\n")
    return result


def result_markdown(result: dict[str, Any]) -> list[str]:
    """The cross-validation table (every setting tried, best first) as Markdown lines."""
    kept = result["kept"]
    lines = [(f"Head-only QNet: {result['records']} records from {result['trees']} trees; kept l2 {kept['l2']:g}, "
              f"{'sibling contrasts' if kept['contrast'] else 'plain records'}."), "",
             (f"{result['settings']['folds']}-fold cross-validation by tree (held-out sibling pairs, 95% "
              "tree-bootstrap intervals). The kept setting is the best row of these folds, so its row is "
              "optimistic when several settings are tried:"), "",
             "| l2 | fit on | head pair accuracy | 95% interval | SFT log-lik (per token) | head − log-lik [95%] "
             "| pairs |",
             "|---|---|---|---|---|---|---|"]
    for res in result["cross_validation"]:
        head, lik = res["rankers"].get("qnet", {}), res["rankers"].get("sft_loglik", {})
        diff = res.get("qnet_minus_sft_loglik")

        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.3f}"

        ci = head.get("ci95")
        lines.append(f"| {res['l2']:g} | {'contrasts' if res['contrast'] else 'records'} | "
                     f"{fmt(head.get('pair_accuracy'))} "
                     f"| {'n/a' if not ci else f'{ci[0]:.3f} – {ci[1]:.3f}'} | {fmt(lik.get('pair_accuracy'))} | "
                     + ("n/a" if not diff else f"{diff['difference']:+.3f} [{diff['ci95'][0]:+.3f}, "
                                               f"{diff['ci95'][1]:+.3f}]")
                     + f" | {head.get('pairs', 0)} |")
    return lines
