"""``qlass view``: the offline HTML page, read back by headless Chromium (Debian's ``chromium``).

The test data is written with the project's own writers: trees through :class:`qlass.tree.Tree`,
evaluation records through :func:`qlass.eval_worker.make_record` (plus ``write_report`` for the
results files) and decision states through :func:`qlass.decisions.decision_record`.
"""

from __future__ import annotations

import gzip
import http.server
import json
import math
import os
import random
import re
import shutil
import stat
import struct
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import pytest

from qlass.decisions import _Candidate, _Decision, decision_record
from qlass.errors import QlassError
from qlass.eval_worker import MethodRun, make_record
from qlass.jsonl import write_jsonl
from qlass.report import write_report
from qlass.search import make_method_config
from qlass.tree import Node, Tree, assign_q
from qlass.types import Completion, Message, Step, Task, Trajectory
from qlass.view import data_block, detect_kind, load_view_data, write_view

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.usefixtures("require_chromium")


@pytest.fixture
def require_chromium() -> None:
    """Browser tests fail (not skip) without Chromium: the test setup installs it."""
    assert CHROMIUM is not None, "needs Debian's chromium: run `bash scripts/setup.sh --test`"

HOOK = "http://127.0.0.1:{port}"
PLANT = ('<script>document.title="pwned";document.body.setAttribute("data-pwned","1")</script></div></section>'
         '<img id="planted-img" src="{hook}/img" onerror="document.body.setAttribute(\'data-pwned\',\'2\')">'
         '<link rel="stylesheet" href="{hook}/css"><b id="planted">bold</b><!-- ')


# -- test data, through the project's writers --------------------------------------------------
def make_tree(task: str, n: int, seed: int = 0, planted: str = "") -> Tree:
    """A tree of ``n`` nodes: an expert chain, sampled branches at its steps, rollout chains below."""
    rng = random.Random(seed)
    nodes = [Node(0, None, 0, "", None, f"Your task is {task}. {planted}", 0.0, False, "root")]

    def node(parent: int, source: str) -> Node:
        p = nodes[parent]
        i = len(nodes)
        act = f"go to room {i}"
        done = rng.random() < 0.05
        reward = min(1.0, p.reward + rng.choice([0.0, 0.0, 0.25])) if not done else rng.choice([0.0, 1.0])
        nd = Node(i, parent, p.depth + 1, f"Thought: try {i}.\nAction: {act}", act, f"You are in room {i}.",
                  reward, done, source, prompt_tokens=50, completion_tokens=9, env_steps=1, pruned=rng.random() < 0.1)
        nodes.append(nd)
        return nd

    chain = [0]
    for _ in range(min(8, n - 1)):
        chain.append(node(chain[-1], "expert").id)
    while len(nodes) < n:
        base = rng.choice(chain[:-1])
        head = node(base, "sample")
        tip = head
        for _ in range(rng.randint(0, 6)):
            if len(nodes) >= n or tip.done:
                break
            tip = node(tip.id, "rollout")
    if planted:
        nodes[-1].observation = planted
        nodes[-1].output = "Thought: " + planted + "\nAction: look"
    tree = Tree(tree_id=task, task=task, env="toy", split="train", task_type="toy", prefix=[Message("user", "rules")],
                nodes=nodes, config={"gamma": 0.9}, stats={"merged": 3, "branches": 5, "prompt_tokens": 1000,
                                                           "completion_tokens": 200})
    return assign_q(tree)


def make_episode(method: str, options: dict, task: Task, rewards: list[float], decisions: list[dict] | None = None,
                 planted: str = "") -> dict:
    """An evaluation record written by :func:`make_record` for a played episode."""
    run = MethodRun(method, make_method_config(method, options))
    steps, msgs = [], [Message("user", "You are an agent."), Message("assistant", "OK"),
                       Message("user", f"Your task is {task.id}.")]
    for t, r in enumerate(rewards):
        obs = f"You see thing {t}." + (planted if t == 1 else "")
        out = f"Thought: step {t}.\nAction: act {t}"
        steps.append(Step(out, f"act {t}", obs, r, t == len(rewards) - 1, 100, 10, 5 if decisions else 0))
        msgs += [Message("assistant", out), Message("user", "Observation: " + obs)]
    meta = {"decisions": decisions} if decisions is not None else {}
    traj = Trajectory(task.id, msgs, rewards[-1], rewards[-1] >= 1.0, task.id, steps, meta)
    return make_record(run, "toy", task, traj, 1.5)


def make_decision(task: Task, step: int, planted: str = "") -> dict:
    """A decision state as ``qlass decisions collect`` writes it."""
    cands = [_Candidate(Completion(f"Thought: a.\nAction: open door {k}{planted if k == 1 else ''}", 20, 8, -2.0 - k),
                        anchor=k == 0, count=1 + k, terminal=k == 2, reward=0.0, rewards=[0.0, k / 2], lengths=[3, 2])
             for k in range(3)]
    dec = _Decision(task, step, [Completion("Thought: x.\nAction: look", 0, 0)] * step,
                    [Message("user", "rules"), Message("user", "Observation: a room" + planted)], cands, 0, 7, 1)
    return decision_record("toy", dec)


TASKS = [Task(f"toy/t{i}", "toy", "seen" if i < 2 else "unseen", "kind") for i in range(3)]
QDECISIONS = [{"step": 0, "actions": ["act 0", "jump"], "values": [0.4, 0.1], "chosen": 0},
              {"step": 1, "actions": ["act 1", "wait", "run"], "values": [0.2, 0.7, 0.3], "chosen": 1}]


def make_run(root: Path, planted: str = "") -> dict[str, int]:
    """A run folder (trees, an evaluation folder with its report, a decisions file); returns the counts."""
    trees = [make_tree("toy/t0", 40, 1, planted), make_tree("toy/t1", 25, 2)]
    write_jsonl(root / "trees.jsonl", [t.to_dict() for t in trees])
    recs = []
    for task in TASKS:
        recs.append(make_episode("greedy", {}, task, [0.0, 0.5, 0.5], planted=planted))
        recs.append(make_episode("qlass", {"m": 2}, task, [0.0, 0.5, 1.0], QDECISIONS, planted=planted))
    write_jsonl(root / "eval" / "records.jsonl", recs)
    write_report(recs, root / "eval")
    decs = [make_decision(TASKS[0], 1, planted), make_decision(TASKS[0], 3), make_decision(TASKS[2], 0)]
    write_jsonl(root / "decisions" / "decisions.jsonl", decs)
    return {"nodes": sum(len(t.nodes) for t in trees), "episodes": len(recs),
            "qnet_decisions": sum(len(r["trajectory"].get("decisions", [])) for r in recs), "decisions": len(decs)}


# -- reading the page back ---------------------------------------------------------------------
class Dom(HTMLParser):
    """Elements, classes, attributes and the visible text of a dumped DOM."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.title = ""
        self._titles = 0
        self._in: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        if tag in ("script", "style", "title"):
            self._in.append(tag)
            self._titles += tag == "title"

    def handle_endtag(self, tag: str) -> None:
        if self._in and self._in[-1] == tag:
            self._in.pop()

    def handle_data(self, data: str) -> None:
        if self._in and self._in[-1] == "title":
            if self._titles == 1:  # the page's own title, not an SVG tooltip
                self.title += data
        elif not self._in:
            self.text.append(data)

    def with_class(self, cls: str) -> list[dict[str, str]]:
        return [a for _, a in self.tags if cls in a.get("class", "").split()]

    def attr(self, tag: str, name: str) -> str | None:
        return next((a.get(name) for t, a in self.tags if t == tag and name in a), None)


def chromium(args: list[str], url: str, profile: Path, timeout: int = 120) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-default-apps", "--mute-audio", f"--user-data-dir={profile}", *args, url]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def dump(page: Path, tmp_path: Path, fragment: str = "") -> Dom:
    text = chromium(["--dump-dom"], page.resolve().as_uri() + fragment, tmp_path / "profile")
    dom = Dom(text)
    assert dom.attr("body", "data-ready") == "1", "the page's script did not finish"
    return dom


# -- without a browser -------------------------------------------------------------------------
def test_kinds_and_counts(tmp_path: Path) -> None:
    counts = make_run(tmp_path)
    assert detect_kind(tmp_path) == "run"
    assert detect_kind(tmp_path / "trees.jsonl") == "trees"
    assert detect_kind(tmp_path / "eval" / "records.jsonl") == "records"
    assert detect_kind(tmp_path / "decisions" / "decisions.jsonl") == "decisions"
    data = load_view_data(tmp_path)
    assert sum(len(t["nodes"]) for t in data["trees"]) == counts["nodes"]
    assert len(data["episodes"]) == counts["episodes"] and len(data["decisions"]) == counts["decisions"]
    assert [r["name"] for r in data["results"]] == ["eval"] and data["results"][0]["paired"]
    assert data["episodes"][0]["first_observation"] == "Your task is toy/t0."
    tree = data["trees"][0]
    assert tree["summary"]["nodes"] == 40 and tree["summary"]["merged"] == 3 and tree["summary"]["contrast_pairs"] > 0
    only = load_view_data(tmp_path / "eval" / "records.jsonl")
    assert not only["trees"] and len(only["episodes"]) == counts["episodes"] and only["results"]


def test_gzipped_records_and_several_runs_in_one_folder(tmp_path: Path) -> None:
    """Records shipped gzipped are found and shown; a folder holding two runs' records of the same
    tasks (no results.json beside them) shows one result set per file instead of refusing to mix them."""
    import gzip

    counts = make_run(tmp_path)
    plain = (tmp_path / "eval" / "records.jsonl").read_bytes()
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "records.jsonl").write_bytes(plain)
    (tmp_path / "more" / "records-again.jsonl.gz").write_bytes(gzip.compress(plain))
    assert detect_kind(tmp_path / "more" / "records-again.jsonl.gz") == "records"
    data = load_view_data(tmp_path)
    assert len(data["episodes"]) == 3 * counts["episodes"]
    names = [r["name"] for r in data["results"]]
    assert names == ["eval", "more/records-again.jsonl.gz", "more/records.jsonl"], names
    assert data["results"][1]["rows"] == data["results"][2]["rows"] and data["results"][1]["paired"]


def test_a_records_file_beside_another_runs_results_shows_its_own(tmp_path: Path) -> None:
    """``qlass view DIR/other.jsonl`` showed DIR's results.json, the table of DIR/records.jsonl, beside
    other.jsonl's episodes. The folder's summary is shown for its records.jsonl only; another records
    file's results are computed from it."""
    make_run(tmp_path)
    folder = tmp_path / "eval"
    lines = (folder / "records.jsonl").read_text().splitlines(keepends=True)
    first_task = json.loads(lines[0])["task"]
    (folder / "other.jsonl").write_text("".join(line for line in lines if json.loads(line)["task"] == first_task))
    stored = json.loads((folder / "results.json").read_text())["rows"]
    own = load_view_data(folder / "records.jsonl")["results"]
    assert [r["rows"] for r in own] == [stored]
    other = load_view_data(folder / "other.jsonl")["results"]
    assert len(other) == 1 and {row["tasks"] for row in other[0]["rows"]} == {1}
    assert {row["tasks"] for row in stored} != {1}
    # a method that played one more task: the table pairs on the tasks every method played, as qlass report does
    extra = next(json.loads(line) for line in lines if json.loads(line)["task"] != first_task)
    with (folder / "other.jsonl").open("a") as f:
        f.write(json.dumps(extra) + "\n")
    other = load_view_data(folder / "other.jsonl")["results"]
    assert {row["tasks"] for row in other[0]["rows"]} == {1}


def test_a_run_folder_gives_each_records_file_its_own_results(tmp_path: Path) -> None:
    """``qlass view RUN`` showed the folder's results.json (the table of its records.jsonl) once for every
    records file in the folder, and another run's records there went without results of their own."""
    make_run(tmp_path)
    folder = tmp_path / "eval"
    recs = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    write_jsonl(folder / "other-run.jsonl", [{**r, "reward": 0.0, "success": False} for r in recs])
    stored = json.loads((folder / "results.json").read_text())["rows"]
    results = {r["name"]: r["rows"] for r in load_view_data(tmp_path)["results"]}
    assert list(results) == ["eval", "eval/other-run.jsonl"] and results["eval"] == stored
    assert {row["avg_reward"] for row in results["eval/other-run.jsonl"]} == {0.0}
    assert {row["avg_reward"] for row in stored} != {0.0}


def test_bad_decisions_and_results_files_name_the_file_and_field(tmp_path: Path, caplog) -> None:
    """A QNet decision with no action list (or values that do not match it) blanked the page with a
    script error while the command reported success; a results.md that is not UTF-8, a budget.csv row
    with a missing cell or a non-finite value, and a results.json nested too deeply ended in tracebacks.
    An unreadable results.json is left out with a warning naming it, as an unreadable records file is
    (it stopped the whole page), and the folder's other files are shown; a decision candidate's action
    that is not text is refused (the page's script took an object for one of its own elements)."""
    make_run(tmp_path)
    records = tmp_path / "eval" / "records.jsonl"
    good = records.read_text()
    bad = {"actions": None, "values": "abc", "chosen": 5, "step": -1, "scores": [1.0]}
    for field, value in bad.items():
        recs = [json.loads(line) for line in good.splitlines()]
        recs[1]["trajectory"]["decisions"][1][field] = value
        write_jsonl(records, recs)
        with pytest.raises(QlassError, match=rf"records\.jsonl: line 2: field 'trajectory\.decisions\[1\]\.{field}'"):
            load_view_data(records)
    recs = [json.loads(line) for line in good.splitlines()]
    recs[0]["trajectory"]["steps"][0]["observation"] = None
    write_jsonl(records, recs)
    with pytest.raises(QlassError, match=r"line 1: field 'trajectory\.steps\[0\]\.observation' must be a string"):
        load_view_data(records)
    records.write_text(good)
    (tmp_path / "eval" / "results.json").unlink()
    md, bc = tmp_path / "eval" / "results.md", tmp_path / "eval" / "budget.csv"
    md.write_bytes(b"# results \xff\xfe\n")
    with pytest.raises(QlassError, match=r"results\.md: not UTF-8 text"):
        load_view_data(tmp_path)
    md.write_text("# results\n")
    head = bc.read_text().splitlines()[0]
    for row, why in (("toy,seen", "not a budget.csv row"), ("toy,seen,greedy,n,inf,0.5", "finite")):
        bc.write_text(f"{head}\n{row}\n")
        with pytest.raises(QlassError, match=rf"budget\.csv: line 2: .*{why}"):
            load_view_data(tmp_path)
    bc.unlink()
    for text, why in (("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"), ("", "not JSON")):
        (tmp_path / "eval" / "results.json").write_text(text)
        caplog.clear()
        shown = load_view_data(tmp_path)
        assert [r["markdown"] for r in shown["results"]] == ["# results\n"]  # the folder's results.md instead
        assert f"results.json: not a qlass results file, left out ({why}" in caplog.text
    decisions = tmp_path / "decisions" / "decisions.jsonl"
    decs = [json.loads(line) for line in decisions.read_text().splitlines()]
    decs[1]["candidates"][1]["action"] = {"nodeType": 1}
    write_jsonl(decisions, decs)
    with pytest.raises(QlassError, match=r"decisions\.jsonl, line 2 .*field 'candidates\[1\]\.action' must be null "
                                         r"or a string"):
        load_view_data(decisions)


def test_a_damaged_gzipped_records_file_in_a_run_folder_is_named(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    import gzip

    make_run(tmp_path)
    damaged = tmp_path / "more" / "records.jsonl.gz"
    damaged.parent.mkdir()
    damaged.write_bytes(gzip.compress((tmp_path / "eval" / "records.jsonl").read_bytes())[:300])
    with caplog.at_level("WARNING", logger="qlass"):
        load_view_data(tmp_path)
    assert f"skipping {damaged}" in caplog.text


def test_results_written_before_their_schema_version_are_shown(tmp_path: Path) -> None:
    make_run(tmp_path)
    results = tmp_path / "eval" / "results.json"
    data = json.loads(results.read_text())
    del data["schema_version"]  # as written before the field existed
    results.write_text(json.dumps(data))
    assert load_view_data(tmp_path)["results"][0]["rows"] == data["rows"]
    results.write_text(json.dumps({**data, "schema_version": 7}))
    with pytest.raises(QlassError, match=r"results\.json: field 'schema_version' is 7"):
        load_view_data(tmp_path)


def test_data_block_is_inert_and_round_trips() -> None:
    data = {"obs": PLANT + "</script><!-- & \u2028", "n": [1, 2.5, None]}
    block = data_block(data)
    assert "<" not in block and ">" not in block and "&" not in block
    assert json.loads(block) == data


def test_bad_input_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(QlassError, match=re.escape(str(missing))):
        write_view(missing, tmp_path / "v.html")
    other = tmp_path / "other.jsonl"
    other.write_text('{"hello": 1}\n')
    with pytest.raises(QlassError, match=re.escape(str(other))):
        write_view(other, tmp_path / "v.html")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QlassError, match="found no trees"):
        write_view(empty, tmp_path / "v.html")
    proc = subprocess.run([sys.executable, "-m", "qlass", "view", str(other), "--out", str(tmp_path / "v.html")],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and str(other) in proc.stderr and "Traceback" not in proc.stderr


def test_a_name_that_is_not_utf8_is_shown_not_a_traceback(tmp_path: Path) -> None:
    """A run folder (or --title) whose bytes are not UTF-8 reached the page as lone surrogates, which
    could not be written (UnicodeEncodeError)."""
    run = tmp_path / os.fsdecode(b"run\xff")
    counts = make_run(run)
    page = tmp_path / "v.html"
    write_view(run, page, title=os.fsdecode(b"title \xfe"))
    text = page.read_text(encoding="utf-8")
    assert "<title>title \ufffd</title>" in text and "run\ufffd" in text
    assert len(page_data(page)["episodes"]) == counts["episodes"]


def test_page_is_self_contained(tmp_path: Path) -> None:
    make_run(tmp_path)
    page = write_view(tmp_path, tmp_path / "view.html").read_text(encoding="utf-8")
    assert "default-src 'none'" in page
    code = re.sub(r'<script type="application/json" id="qlass-data">.*?</script>', "", page, flags=re.DOTALL)
    for needle in ("src=", "href=", "<link", "url(", "@import", "fetch(", "XMLHttpRequest", "WebSocket",
                   "EventSource", "sendBeacon", "import(", "innerHTML", "outerHTML", "insertAdjacentHTML",
                   "document.write"):
        assert needle not in code, needle
    assert code.count("<script") == 1


# -- in headless Chromium ----------------------------------------------------------------------
@pytest.mark.slow
@needs_chromium
def test_browser_shows_every_node_and_decision(tmp_path: Path) -> None:
    counts = make_run(tmp_path / "run")
    page = write_view(tmp_path / "run", tmp_path / "view.html", title="toy run")
    dom = dump(page, tmp_path, "#expand=all")
    assert dom.title == "toy run"
    assert len(dom.with_class("node")) == counts["nodes"]
    assert len(dom.with_class("qnet-decision")) == counts["qnet_decisions"]
    assert len(dom.with_class("bench-decision")) == counts["decisions"]
    assert len(dom.with_class("episode")) == counts["episodes"]
    assert len(dom.with_class("q-best")) > 0 and len(dom.with_class("contrast")) > 0
    assert sum(t == "svg" for t, _ in dom.tags) == 2  # one budget chart per (env, split)
    # without expand=all, a task shows two methods side by side (greedy and the qlass method with decisions)
    default = dump(page, tmp_path, "#tab=episodes")
    methods = [a["data-method"] for a in default.with_class("episode")]
    assert methods[:2] == ["greedy", "qlass(m=2)"]
    # the paired table names the level its intervals were drawn at
    assert "95% CI" in " ".join(dom.text)
    results = tmp_path / "run" / "eval" / "results.json"
    data = json.loads(results.read_text())
    data["paired"] = [{**r, "confidence": 0.975} for r in data["paired"]]  # qlass report --confidence 0.975
    results.write_text(json.dumps(data))
    text = " ".join(dump(write_view(tmp_path / "run", tmp_path / "view2.html"), tmp_path).text)
    assert "97.5% CI" in text and "95% CI" not in text


class _Hook(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Hook.hits.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow
@needs_chromium
def test_planted_markup_shows_as_text_and_never_runs(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hook = HOOK.format(port=server.server_address[1])
        plant = PLANT.format(hook=hook)
        counts = make_run(tmp_path / "run", planted=plant)
        title = "<b>run</b> & </title><script>document.title='x'</script>"
        page = write_view(tmp_path / "run", tmp_path / "view.html", title=title)
        dom = dump(page, tmp_path, "#expand=all")
    finally:
        server.shutdown()
    assert _Hook.hits == [], "the page made a network request"
    assert dom.title == title
    assert dom.attr("body", "data-pwned") is None
    assert not [a for _, a in dom.tags if a.get("id") in ("planted", "planted-img")]
    assert sum(t == "script" for t, _ in dom.tags) == 2 and not any(t in ("img", "link") for t, _ in dom.tags)
    text = "".join(dom.text)
    assert text.count('<script>document.title="pwned"') >= 4  # tree rows, episodes, decisions
    assert len(dom.with_class("node")) == counts["nodes"]  # the markup broke no element apart


@pytest.mark.slow
@needs_chromium
def test_screenshot(tmp_path: Path) -> None:
    make_run(tmp_path / "run")
    page = write_view(tmp_path / "run", tmp_path / "view.html")
    shot = tmp_path / "trees.png"
    chromium([f"--screenshot={shot}", "--window-size=1280,900", "--hide-scrollbars"], page.resolve().as_uri(),
             tmp_path / "profile")
    raw = shot.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 10_000
    assert struct.unpack(">II", raw[16:24]) == (1280, 900)


@pytest.mark.slow
@needs_chromium
def test_big_tree_renders_in_proportion(tmp_path: Path) -> None:
    """A 1,000-node tree against a 100-node tree in the same page: its first view (collapsed beyond a
    budget of visible nodes) costs about the same, its full expansion about 10x, never 100x."""
    trees = [make_tree("toy/small", 100, 3), make_tree("toy/big", 1000, 4)]
    write_jsonl(tmp_path / "trees.jsonl", [t.to_dict() for t in trees])
    page = write_view(tmp_path / "trees.jsonl", tmp_path / "view.html")
    dom = dump(page, tmp_path, "#bench=5")
    assert dom.attr("body", "data-bench") == "done"
    secs = {int(a["data-nodes"]): a for a in dom.with_class("tree")}
    small, big = secs[100], secs[1000]
    assert int(small["data-visible"]) == 100 and int(big["data-visible"]) <= 160
    floor = 0.2  # ms: below the browser's timer resolution a ratio means nothing
    initial = float(big["data-ms-initial"]) / max(float(small["data-ms-initial"]), floor)
    full = float(big["data-ms-full"]) / max(float(small["data-ms-full"]), floor)
    assert initial < 4, (initial, big, small)
    assert full < 30, (full, big, small)


CLICKS = r"""
(function () {
  var log = [];
  function click(el) { el.dispatchEvent(new MouseEvent("click", { bubbles: true })); }
  function count(sel) { return document.querySelectorAll(sel).length; }
  try {
    var tog = document.querySelector("#panel-trees .node .node .tog");
    click(tog); log.push(count("#panel-trees .node"));
    click(tog); log.push(count("#panel-trees .node"));
    click(document.querySelector("#panel-trees .node .node .act"));
    log.push(document.querySelector("aside.detail h3").textContent);
    click(document.querySelectorAll("#panel-trees .toolbar button")[0]);
    click(document.querySelector(".more button")); log.push(count("#panel-trees .node"));
    document.querySelectorAll("#panel-episodes input[type=checkbox]").forEach(function (c) {
      c.checked = true; c.dispatchEvent(new Event("change")); });
    log.push(count(".episode"));
    var outcome = document.querySelectorAll("#panel-episodes select")[1];
    outcome.value = "success"; outcome.dispatchEvent(new Event("change")); log.push(count(".episode"));
  } catch (e) { log.push("error: " + e); }
  document.body.setAttribute("data-clicks", JSON.stringify(log));
})();
"""


@pytest.mark.slow
@needs_chromium
def test_clicks_open_close_and_filter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clicks dispatched by a script added to the page's own (hashed) script: a node closes and
    reopens, a row shows its details, a wide node shows 100 children and then the rest, the
    episode filters redraw."""
    import qlass.view

    make_run(tmp_path / "run")
    star = [Node(0, None, 0, "", None, "start", 0.0, False, "root")]
    star += [Node(i, 0, 1, f"Action: a{i}", f"a{i}", "o", float(i % 2), True, "sample") for i in range(1, 151)]
    wide = assign_q(Tree("toy/wide", "toy/wide", "toy", "train", "x", [], star))
    with open(tmp_path / "run" / "trees.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(wide.to_dict()) + "\n")
    asset = qlass.view._asset
    monkeypatch.setattr(qlass.view, "_asset", lambda name: asset(name) + (CLICKS if name == "view.js" else ""))
    page = write_view(tmp_path / "run", tmp_path / "view.html")
    log = json.loads(dump(page, tmp_path).attr("body", "data-clicks"))
    closed, reopened, title, with_star, episodes, successes = log
    assert closed < reopened == 40 and title == "toy/t0 · node #1"
    assert with_star == 40 + 25 + 151
    assert episodes == 6 and successes == 3


PROBE_PAGE = r"""
(function () {
  function text(sel) { var e = document.querySelector(sel); return e ? e.textContent : null; }
  function texts(sel) {
    return Array.prototype.map.call(document.querySelectorAll(sel), function (e) { return e.textContent; });
  }
  var sel = document.querySelector("#panel-trees .row.selected");
  document.body.setAttribute("data-probe", JSON.stringify({
    tab: document.body.getAttribute("data-tab"),
    selected: sel ? sel.parentNode.getAttribute("data-id") : null,
    detail: text("aside.detail h3"),
    best_of_n: texts("#panel-episodes .episode[data-method^='best-of-n'] tr.chosen td:first-child"),
    tree_heads: texts("#panel-trees section.tree > .head"),
    decision_heads: texts("#panel-decisions .task-card > .head"),
    splits: texts("#panel-episodes select option"),
    charts: document.querySelectorAll("#panel-results svg").length
  }));
})();
"""


@pytest.mark.slow
@needs_chromium
def test_the_page_survives_odd_data_and_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of these once broke the page or showed the wrong thing: a stray '%' in the address, a
    link to a node past its parent's first 100 children, a best-of-n candidate that never stepped
    (score -inf) ahead of the returned one, a split or budget curve named like a built-in
    ("constructor", "toString"), and trees or decisions of two files that looked alike."""
    import qlass.view

    run = tmp_path / "run"
    make_run(run)
    star = [Node(0, None, 0, "", None, "start", 0.0, False, "root")]
    star += [Node(i, 0, 1, f"Action: a{i}", f"a{i}", "o", float(i == 140), True, "sample") for i in range(1, 151)]
    wide = assign_q(Tree("toy/wide", "toy/wide", "toy", "train", "x", [], star))
    write_jsonl(run / "b" / "trees.jsonl", [wide.to_dict()])
    shutil.copytree(run / "decisions", run / "decisions-b")
    best = make_episode("best-of-n", {"n": 3}, TASKS[0], [0.0, 0.5])
    best["candidates"] = [{"reward": 0.0, "score": -math.inf, "completion_tokens": 0},
                          {"reward": 1.0, "score": -0.9, "completion_tokens": 11},
                          {"reward": 0.5, "score": -0.2, "completion_tokens": 9}]
    odd = make_episode("greedy", {}, TASKS[1], [0.0, 0.5])
    odd["split"] = "constructor"  # a user-brought environment's split
    write_jsonl(run / "bon" / "records.jsonl", [best])
    write_jsonl(run / "odd" / "records.jsonl", [odd])
    results = run / "eval" / "results.json"
    data = json.loads(results.read_text())
    results.write_text(json.dumps({**data, "budget": [{**b, "curve": "toString"} for b in data["budget"]]}))
    asset = qlass.view._asset
    monkeypatch.setattr(qlass.view, "_asset", lambda name: asset(name) + (PROBE_PAGE if name == "view.js" else ""))
    page = write_view(run, tmp_path / "view.html")
    probe = json.loads(dump(page, tmp_path, "#tab=%ZZ&node=0:140").attr("body", "data-probe"))
    assert probe["tab"] == "trees" and probe["selected"] == "140" and probe["detail"] == "toy/wide · node #140"
    everything = json.loads(dump(page, tmp_path, "#expand=all").attr("body", "data-probe"))
    assert everything["best_of_n"] == ["2"], everything["best_of_n"]  # search's pick, not the one scored -inf
    heads = [head.split("toy / ")[0] for head in probe["tree_heads"]]  # title, then the file's chip
    assert heads == ["toy/wideb/trees.jsonl", "toy/t0trees.jsonl", "toy/t1trees.jsonl"], heads
    assert ["decisions-b/" in head for head in probe["decision_heads"]] == [False, False, True, True]
    assert probe["splits"][:5] == ["all", "seen", "unseen", "constructor", "all"], probe["splits"]  # then outcomes
    assert probe["charts"] == 4  # eval's two (env, split) charts, whose curves are named "toString"; bon's; odd's


def test_files_saved_with_a_byte_order_mark_are_read(tmp_path: Path) -> None:
    counts = make_run(tmp_path)
    for name in ("trees.jsonl", "eval/records.jsonl", "decisions/decisions.jsonl"):
        path = tmp_path / name
        path.write_bytes("\ufeff".encode() + path.read_bytes())
    data = load_view_data(tmp_path)
    assert sum(len(t["nodes"]) for t in data["trees"]) == counts["nodes"]
    assert len(data["episodes"]) == counts["episodes"] and len(data["decisions"]) == counts["decisions"]


# -- what the viewer reads: links, long lines, pipes, a torn tail (through the CLI) ----------------
PROBE = ("import atexit, sys; from qlass.cli import main; atexit.register(lambda: print('rchar', "
         "open('/proc/self/io').read().split()[1], file=sys.stderr)); main()")
"""``qlass`` that reports on exit how many bytes it read (Linux's /proc/self/io)."""


def qlass_view(*args: str, timeout: float = 120, probe: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", PROBE] if probe else [sys.executable, "-m", "qlass"]
    return subprocess.run([*cmd, "view", *args], check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def bytes_read(result: subprocess.CompletedProcess) -> int:
    return int(re.search(r"^rchar (\d+)$", result.stderr, re.MULTILINE).group(1))


def page_data(page: Path) -> dict:
    text = page.read_text(encoding="utf-8")
    return json.loads(re.search(r'<script type="application/json" id="qlass-data">(.*?)</script>', text, re.S)[1])


def test_links_show_each_folder_and_file_once(tmp_path: Path) -> None:
    """Links back to a parent folder (run/up -> ..) and to the folder itself (self -> .), and a second name
    for a records file, are followed once: each file was shown up to four times (three links deep)."""
    root = tmp_path / "loop"
    counts = make_run(root / "run")
    (root / "run" / "up").symlink_to("..")
    (root / "self").symlink_to(".")
    (root / "run" / "eval" / "same.jsonl").symlink_to("records.jsonl")
    result = qlass_view(str(root), "--out", str(tmp_path / "v.html"))
    assert result.returncode == 0, result.stderr
    data = page_data(tmp_path / "v.html")
    assert data["files"] == ["run/trees.jsonl", "run/eval/records.jsonl", "run/decisions/decisions.jsonl"]
    assert sum(len(t["nodes"]) for t in data["trees"]) == counts["nodes"]
    assert len(data["episodes"]) == counts["episodes"] and len(data["decisions"]) == counts["decisions"]
    assert [r["name"] for r in data["results"]] == ["run/eval"]


def test_files_are_told_apart_by_the_start_of_their_first_line(tmp_path: Path) -> None:
    """Unrelated 8 MiB one-line .jsonl files in a run folder, and an --out over one, are not read whole
    (at most 1 MiB of a first line is read to tell a file's kind; all of it was, twice over in memory);
    a tree whose line is longer than that is still told by the fields that begin it."""
    run, page, size = tmp_path / "run", tmp_path / "v.html", 8 << 20
    counts = make_run(run)
    before = qlass_view(str(run), "--out", str(page), probe=True)
    assert before.returncode == 0, before.stderr
    (run / "notes.jsonl").write_text('{"note": "' + "a" * size + '"}\n')
    (run / "blob.jsonl").write_bytes(b"a" * size)
    after = qlass_view(str(run), "--out", str(page), probe=True)
    assert after.returncode == 0, after.stderr
    assert bytes_read(after) - bytes_read(before) < 6 << 20, (bytes_read(before), bytes_read(after))
    assert len(page_data(page)["episodes"]) == counts["episodes"]
    (tmp_path / "small.txt").write_text("not a page\n")
    refused = [qlass_view(str(run), "--out", str(out), probe=True) for out in (tmp_path / "small.txt",
                                                                                 run / "notes.jsonl")]
    assert [r.returncode for r in refused] == [2, 2] and "exists and is not an HTML page" in refused[1].stderr
    assert bytes_read(refused[1]) - bytes_read(refused[0]) < 1 << 20, [bytes_read(r) for r in refused]
    big = make_tree("toy/big", 12, 5)
    big.nodes[-1].observation = "x" * (3 << 19)
    write_jsonl(run / "big" / "trees.jsonl", [big.to_dict()])
    for path in (run, run / "big" / "trees.jsonl"):
        result = qlass_view(str(path), "--out", str(page))
        assert result.returncode == 0, result.stderr
        assert "toy/big" in [t["tree_id"] for t in page_data(page)["trees"]]


def test_a_decisions_file_with_a_long_first_history_is_still_told(tmp_path: Path) -> None:
    """A decision writes its history (every observation) before its candidates: with a first history
    over 1 MiB, the file named alone was refused as no qlass file, and in a run folder it was left out
    without a word (the page said 0 decisions)."""
    run = tmp_path / "run"
    counts = make_run(run)
    decisions = run / "decisions" / "decisions.jsonl"
    decs = [json.loads(line) for line in decisions.read_text().splitlines()]
    decs[0]["history"][-1]["content"] += " <div>product</div>" * 60_000  # about 1.1 MB
    write_jsonl(decisions, decs)
    assert detect_kind(decisions) == "decisions"
    assert len(load_view_data(decisions)["decisions"]) == counts["decisions"]
    assert len(load_view_data(run)["decisions"]) == counts["decisions"]
    # an unrelated file that begins alike is read no further than 64 MiB (a small gzip file held 150 MiB)
    chat = run / "chat.jsonl.gz"
    with gzip.open(chat, "wb") as fh:
        fh.write(b'{"history": "')
        for _ in range(80):
            fh.write(b"x" * (1 << 20))
        fh.write(b'", "other": 1}\n')
    with pytest.raises(QlassError, match=r"chat\.jsonl\.gz: the first record is longer than 64 MiB before the "
                                         r"fields that tell its kind"):
        detect_kind(chat)
    assert len(load_view_data(run)["decisions"]) == counts["decisions"]


def test_files_deep_in_a_run_folder_are_found_and_deeper_folders_named(tmp_path: Path, caplog) -> None:
    """Only three folders below the one viewed were looked into, and what lay deeper was left out without
    a word (runs/2024/NAME/rft/eval/records.jsonl from runs/); six are now, and a folder below that is
    named in a warning."""
    root = tmp_path / "runs"
    make_run(root / "2024" / "name" / "rft")
    deep = root / "a" / "b" / "c" / "d" / "e" / "f" / "g"
    write_jsonl(deep / "trees.jsonl", [make_tree("toy/deep", 5).to_dict()])
    data = load_view_data(root)
    assert "2024/name/rft/eval/records.jsonl" in data["files"] and len(data["episodes"]) == 6
    assert "toy/deep" not in [t["tree_id"] for t in data["trees"]]
    assert f"not looking more than 6 folders deep: 1 folder(s) left out, e.g. {deep}" in caplog.text


def test_json_nested_too_deeply_to_show_names_its_file(tmp_path: Path) -> None:
    """JSON nested 500 deep passed the JSON reader (about 990 levels) and ended in a RecursionError traceback
    while the page's data was made: now a records file's is refused naming it, and a results.json's is
    left out with a warning, as an unreadable one is (at every depth: 488 once slipped past the first check
    into a last walk over the whole page)."""
    make_run(tmp_path)
    best = make_episode("best-of-n", {"n": 2}, TASKS[0], [0.0, 0.5])
    deep = json.loads("[" * 600 + "]" * 600)
    best["candidates"] = [{"reward": 0.0, "score": -0.5, "completion_tokens": 9, "x": deep},
                          {"reward": 0.5, "score": -0.2, "completion_tokens": 11}]
    records = tmp_path / "bon" / "records.jsonl"
    write_jsonl(records, [best])
    result = qlass_view(str(records), "--out", str(tmp_path / "v.html"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{records}: a record's JSON is nested too deeply to show" in result.stderr
    records.unlink()
    results = tmp_path / "eval" / "results.json"
    data = json.loads(results.read_text())
    for depth in (488, 600):
        data["rows"][0]["x"] = json.loads("[" * depth + "]" * depth)
        results.write_text(json.dumps(data))
        result = qlass_view(str(tmp_path), "--out", str(tmp_path / "v.html"))
        assert result.returncode == 0 and "Traceback" not in result.stderr, (depth, result.stderr)
        assert "results.json: not a qlass results file, left out (JSON nested too deeply)" in result.stderr


def test_a_tree_missing_some_q_values_keeps_the_recorded_ones(tmp_path: Path) -> None:
    """One node without a Q value had every Q value of its tree replaced by the viewer's own backup. The
    recorded ones are kept and the node without one shows none (a value backed up from the rewards beside
    them could contradict them: Q 0.36 over a child recorded at 0.123); a tree with none is backed up."""
    tree = make_tree("toy/t0", 12)
    for n in tree.nodes[1:]:
        n.q = 0.123
    tree.nodes[5].q = None
    bare = make_tree("toy/t1", 12)
    backed = [n.q for n in bare.nodes]
    for n in bare.nodes:
        n.q = None
    write_jsonl(tmp_path / "trees.jsonl", [tree.to_dict(), bare.to_dict()])
    some, none = load_view_data(tmp_path / "trees.jsonl")["trees"]
    qs = {n["id"]: n["q"] for n in some["nodes"][1:]}
    assert {q for i, q in qs.items() if i != 5} == {0.123} and qs[5] is None
    assert (some["summary"]["q_computed"], some["summary"]["q_missing"]) == (False, 1)
    assert [n["q"] for n in none["nodes"]] == backed
    assert (none["summary"]["q_computed"], none["summary"]["q_missing"]) == (True, 0)


@pytest.mark.slow
@needs_chromium
def test_a_results_cell_that_is_an_object_is_not_taken_for_an_element(tmp_path: Path) -> None:
    """The page's table code took any object with a nodeType for one of its own elements: a
    hand-edited results.json cell {"nodeType": 1} stopped the script (no page drawn)."""
    make_run(tmp_path / "run")
    results = tmp_path / "run" / "eval" / "results.json"
    data = json.loads(results.read_text())
    data["rows"][0]["method"] = {"nodeType": 1}
    results.write_text(json.dumps(data))
    page = write_view(tmp_path / "run", tmp_path / "view.html")
    dump(page, tmp_path, "#tab=results")  # asserts that the script finished


def test_a_pipe_or_device_is_refused_never_opened(tmp_path: Path) -> None:
    """A named pipe or device given as the input is refused (a pipe blocked qlass view for ever, /dev/null
    was 'a file with no record'); one inside a run folder is passed over; one given as --out is refused
    before anything is read, and left as it is."""
    run = tmp_path / "run"
    counts = make_run(run)
    os.mkfifo(run / "eval" / "live.jsonl")
    fifo = tmp_path / "records.jsonl"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/null")):
        result = qlass_view(str(path), "--out", str(tmp_path / "v.html"), timeout=60)
        assert result.returncode == 2 and f"{path}: not a regular file or folder" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    result = qlass_view(str(run), "--out", str(tmp_path / "v.html"), timeout=60)
    assert result.returncode == 0 and len(page_data(tmp_path / "v.html")["episodes"]) == counts["episodes"]
    result = qlass_view(str(run), "--out", str(fifo), timeout=60)
    assert result.returncode == 2 and f"{fifo}: is a named pipe (FIFO), not a regular file" in result.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path: Path) -> None:
    """A records or trees file whose last line was cut short (a writer killed mid-line, or a run still
    writing it; qlass eval cuts such a line and resumes) is shown without that line and a warning naming
    the file and line, and left as it is (the page was refused); a malformed line before the last one is
    still refused, naming the file and line."""
    run, page = tmp_path / "run", tmp_path / "v.html"
    counts = make_run(run)
    records, trees, more = run / "eval" / "records.jsonl", run / "trees.jsonl", run / "more" / "records.jsonl"
    more.parent.mkdir()
    for path in (records, trees, more):
        whole = records.read_bytes() if path == more else path.read_bytes()
        path.write_bytes(whole + whole[:40])
    written = {p: p.read_bytes() for p in (records, trees, more)}
    result = qlass_view(str(run), "--out", str(page))
    assert result.returncode == 0, result.stderr
    for path, line in ((records, 7), (trees, 3), (more, 7)):
        assert f"{path}: skipping line {line}, cut short" in result.stderr, result.stderr
        assert path.read_bytes() == written[path]
    data = page_data(page)
    assert len(data["episodes"]) == 2 * counts["episodes"]
    assert sum(len(t["nodes"]) for t in data["trees"]) == counts["nodes"]
    assert [r["name"] for r in data["results"]] == ["eval", "more"] and data["results"][1]["rows"]
    lines = written[more].split(b"\n")
    more.write_bytes(b"\n".join([lines[0], lines[1][:40], *lines[2:]]))
    result = qlass_view(str(run), "--out", str(page))
    assert result.returncode == 2 and f"error: {more}: line 2: invalid JSON" in result.stderr, result.stderr
