"""``qlass report``: results tables and budget curves from evaluation records."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        records: list[Path] = typer.Argument(None, dir_okay=False,
            help="records.jsonl file(s) of one or more evaluation runs."),
        out: Path = typer.Option(..., file_okay=False,
            help="Folder for results.md/json and budget.csv/png (sides.md/json with --side, replicates.md/json "
                 "with --replicate)."),
        side: list[str] = typer.Option([],
            help="LABEL=RECORDS (repeatable, at least two; instead of RECORDS): the same methods run under several "
                 "settings, e.g. full=runs/a/eval/records.jsonl limited=runs/b/eval/records.jsonl (paper Table 3), "
                 "side by side with paired differences to the first."),
        replicate: list[str] = typer.Option([],
            help="LABEL=RECORDS (repeatable, at least two; instead of RECORDS): the same methods on the same tasks "
                 "played by several agents of one recipe, e.g. SFT backbones of different seeds; each method is "
                 "paired with --baseline per task within each replicate, the differences averaged over the "
                 "replicates per task, and the interval resamples tasks (replicates.md/json)."),
        all_tasks: bool = typer.Option(False, "--all-tasks", help="Average every method over all of its records, "
                                       "not only over the tasks every method played."),
        title: str = typer.Option("qlass results", help="Title of results.md."),
        baseline: list[str] = typer.Option([], help="Method label the paired differences are taken against "
                                           "(repeatable), e.g. --baseline greedy --baseline 'best-of-n(n=4,qnet)'; "
                                           "default: greedy, when it was run."),
        confidence: float = typer.Option(0.95, help="Level of the paired bootstrap intervals, e.g. 0.975 for a "
                                         "second look at data already tested at 0.95 (Bonferroni over two looks)."),
        allow_mixed_settings: bool = typer.Option(False, "--allow-mixed-settings", help="Pool RECORDS of evaluation "
                                                  "runs made with other settings (model, environment or policy "
                                                  "options, seed; see each file's config.yaml), with a warning."),
    ) -> None:
        """Rebuild the results table, paired differences and budget curve from records (several runs'
        shards combined, or a run stopped part-way: by default restricted to tasks every method played);
        or compare runs side by side (--side), or pool paired differences over replicates (--replicate)."""
        from ..compare import check_confidence
        from ..errors import QlassError
        from ..eval_records import check_pooled_runs, read_records
        from ..jsonl import is_text
        from ..locking import warn_if_being_written, writer_lock
        from ..replicates import replicate_table, write_replicates
        from ..report import (
            common_tasks,
            markdown_table,
            side_by_side_table,
            write_report,
            write_side_by_side,
        )

        texts = [("--title", title)] + [(f"--{option}", item.partition("=")[0])
                                        for option, items in (("side", side), ("replicate", replicate))
                                        for item in items]
        for option, text in texts:  # bytes that are not UTF-8 (held as lone surrogates) cannot be written
            if not is_text(text):
                raise QlassError(f"{option} {text!r}: not valid UTF-8 text")
        check_confidence(confidence)
        twice = sorted({b for b in baseline if baseline.count(b) > 1})
        if twice:
            raise QlassError(f"--baseline {twice[0]!r} is given twice")
        if side and replicate:
            raise QlassError("qlass report takes --side or --replicate, not both")
        if (side or replicate) and records:
            raise QlassError(f"qlass report takes RECORDS or --{'side' if side else 'replicate'} LABEL=RECORDS, "
                             "not both")
        if side:
            if baseline or all_tasks or allow_mixed_settings:
                raise QlassError("--baseline, --all-tasks and --allow-mixed-settings apply to RECORDS, not to --side "
                                 "(sides are compared with the first)")
            sides = _labelled_records("side", side)
            with writer_lock(out, folder=True):  # an evaluation writing its results there is refused
                rows = write_side_by_side(sides, out, title=title, confidence=confidence)
            typer.echo(side_by_side_table(rows, list(sides), confidence))
            typer.echo(f"sides.md/json in {out}")
            return
        if replicate:
            if all_tasks or allow_mixed_settings:
                raise QlassError("--all-tasks and --allow-mixed-settings apply to RECORDS, not to --replicate "
                                 "(replicates are paired on the tasks all of them played, each within itself)")
            reps = _labelled_records("replicate", replicate)
            with writer_lock(out, folder=True):
                rows = write_replicates(reps, out, baselines=baseline or ["greedy"], title=title,
                                        confidence=confidence)
            typer.echo(replicate_table(rows, list(reps), confidence))
            typer.echo(f"replicates.md/json in {out}")
            return
        if not records:
            raise QlassError("qlass report needs RECORDS (records.jsonl files), or --side or --replicate LABEL=RECORDS "
                             "twice or more")
        own = out / "records.jsonl"  # an evaluation folder's results describe its records (qlass view shows both)
        if own.is_file() and not any(Path(r).exists() and own.samefile(r) for r in records):
            raise QlassError(f"{out}: holds another run's records ({own}, not among RECORDS), which its "
                             "results.md/json describe; write this report to another --out")
        for path in records:  # an evaluation under way: its records so far
            warn_if_being_written(path, in_folder=True)
        recs = read_records(records)
        if not recs:
            raise QlassError(f"{', '.join(map(str, records))}: no records to report")
        mixed = check_pooled_runs(records, allow_mixed_settings)
        if mixed:
            log.warning("records of runs with other settings pooled (--allow-mixed-settings): %s", "; ".join(mixed))
        methods = {r["method"] for r in recs}
        missing = [b for b in baseline if b not in methods]
        if missing:
            labels = ", ".join(sorted(methods))
            raise QlassError(f"--baseline {missing[0]!r}: no such method in the records (they hold: {labels})")
        if not all_tasks:
            kept = common_tasks(recs)
            if not kept:
                counts: dict[str, int] = {}
                for r in recs:
                    counts[r["method"]] = counts.get(r["method"], 0) + 1
                raise QlassError("no task was played by every method (records per method: "
                                 + ", ".join(f"{m} {n}" for m, n in sorted(counts.items()))
                                 + "); --all-tasks averages each method over its own tasks")
            if len(kept) < len(recs):
                log.info("kept %d of %d records: the tasks every method played (--all-tasks keeps all)",
                         len(kept), len(recs))
            recs = kept
        with writer_lock(out, folder=True):  # an evaluation writing its results there is refused
            rows = write_report(recs, out, title=title, baselines=baseline or None, confidence=confidence)
        typer.echo(markdown_table(rows))
        typer.echo(f"results.md/json and budget curve in {out}")


def _labelled_records(option: str, items: list[str]) -> dict[str, list[dict[str, Any]]]:
    """``--OPTION LABEL=RECORDS`` items as label → records, each file read once; at least two, labels and
    files distinct, none empty."""
    from ..errors import QlassError
    from ..eval_records import read_records
    from ..locking import warn_if_being_written

    if len(items) < 2:
        raise QlassError(f"--{option} needs at least two LABEL=RECORDS")
    labelled: dict[str, list[dict[str, Any]]] = {}
    files: dict[str, Path] = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise QlassError(f"--{option} {item!r}: expected LABEL=RECORDS")
        if label in labelled:
            raise QlassError(f"--{option} {label}: label given twice")
        same = [other for other, f in files.items() if Path(path).exists() and f.exists() and f.samefile(path)]
        if same:
            raise QlassError(f"--{option} {label}: {path} is also {option} {same[0]}'s file")
        files[label] = Path(path)
        warn_if_being_written(path, in_folder=True)  # an evaluation under way: its records so far
        labelled[label] = read_records([Path(path)])
        if not labelled[label]:
            raise QlassError(f"--{option} {label}: {path} holds no records")
    return labelled
