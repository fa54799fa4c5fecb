"""``qlass report``: results tables and budget curves from evaluation records."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        records: list[Path] = typer.Argument(None, dir_okay=False,
            help="records.jsonl file(s) of one or more evaluation runs."),
        out: Path = typer.Option(..., file_okay=False,
            help="Folder for results.md/json and budget.csv/png (sides.md/json with --side)."),
        side: list[str] = typer.Option([],
            help="LABEL=RECORDS (repeatable, at least two; instead of RECORDS): the same methods run under several "
                 "settings, e.g. full=runs/a/eval/records.jsonl limited=runs/b/eval/records.jsonl (paper Table 3), "
                 "side by side with paired differences to the first."),
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
        shards combined, or a run stopped part-way: by default restricted to tasks every method played)."""
        from ..compare import check_confidence
        from ..errors import QlassError
        from ..eval_records import check_pooled_runs, read_records
        from ..jsonl import is_text
        from ..locking import warn_if_being_written, writer_lock
        from ..report import (
            common_tasks,
            markdown_table,
            side_by_side_table,
            write_report,
            write_side_by_side,
        )

        texts = [("--title", title)] + [("--side", item.partition("=")[0]) for item in side]
        for option, text in texts:  # bytes that are not UTF-8 (held as lone surrogates) cannot be written
            if not is_text(text):
                raise QlassError(f"{option} {text!r}: not valid UTF-8 text")
        check_confidence(confidence)
        twice = sorted({b for b in baseline if baseline.count(b) > 1})
        if twice:
            raise QlassError(f"--baseline {twice[0]!r} is given twice")
        if side:
            if records:
                raise QlassError("qlass report takes RECORDS or --side LABEL=RECORDS, not both")
            if baseline or all_tasks or allow_mixed_settings:
                raise QlassError("--baseline, --all-tasks and --allow-mixed-settings apply to RECORDS, not to --side "
                                 "(sides are compared with the first)")
            sides, files = {}, {}
            for item in side:
                label, sep, path = item.partition("=")
                if not sep or not label or not path:
                    raise QlassError(f"--side {item!r}: expected LABEL=RECORDS")
                if label in sides:
                    raise QlassError(f"--side {label}: label given twice")
                same = [other for other, f in files.items() if Path(path).exists() and f.exists() and f.samefile(path)]
                if same:
                    raise QlassError(f"--side {label}: {path} is also side {same[0]}'s file")
                files[label] = Path(path)
                warn_if_being_written(path, in_folder=True)  # an evaluation under way: its records so far
                sides[label] = read_records([Path(path)])
                if not sides[label]:
                    raise QlassError(f"--side {label}: {path} holds no records")
            with writer_lock(out, folder=True):  # an evaluation writing its results there is refused
                rows = write_side_by_side(sides, out, title=title, confidence=confidence)
            typer.echo(side_by_side_table(rows, list(sides), confidence))
            typer.echo(f"sides.md/json in {out}")
            return
        if not records:
            raise QlassError("qlass report needs RECORDS (records.jsonl files) or --side LABEL=RECORDS twice or more")
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
