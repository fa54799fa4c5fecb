"""``qlass serve`` against hostile and dead clients and a faulty environment, on real servers bound to
127.0.0.1 (a :class:`~qlass.serve.BackgroundServer` thread, or a ``qlass serve`` process where signals
and options matter): instance ids a restarted server does not reissue, idle instances reclaimed, a
request on a busy instance refused at once, stalled bodies timed out, the environment contract checked
as in-process play checks it, and strict request fields."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Iterator, Sequence

import pytest
from setup_parts import installed

installed("fastapi")  # the serve extra
installed("uvicorn")

from qlass.envs.base import parse_action
from qlass.errors import QlassError
from qlass.serve import BackgroundServer, EnvPool
from qlass.types import Message, StepResult, Task

TESTS = os.path.dirname(os.path.abspath(__file__))


class Probe:
    """A small environment whose action picks what ``step`` returns: ``wait S`` sleeps S seconds,
    ``echo X`` answers X, and the rest break the environment contract (``done no``, ``nan``, ``int``,
    ``tuple``, ``surrogate``: an observation holding a lone surrogate, ``info surrogate``: info holding
    one, ``refuse``: a QlassError of its own). Task ``probe/str`` has an expert that returns a string.
    ``closed_to``: a file to which ``close()`` appends a line."""

    name = "probe"

    def __init__(self, closed_to: str = "") -> None:
        self.steps, self.closed_to = 0, closed_to

    def splits(self) -> dict[str, int]:
        return {"train": 2}

    def tasks(self, split: str, task_types: Sequence[str] | None = None) -> list[Task]:
        return [Task("probe/ok", self.name, split, "t"), Task("probe/str", self.name, split, "t")]

    def prompt(self) -> list[Message]:
        return [Message("user", "Probe.")]

    def reset(self, task: Task) -> str:
        self.steps = 0
        return f"Probing {task.id}."

    def step(self, output: str) -> Any:
        self.steps += 1
        action = parse_action(output) or ""
        faults: dict[str, Any] = {
            "done no": StepResult("ok", 0.0, "no", {}), "nan": StepResult("ok", float("nan"), False, {}),
            "int": StepResult(123, 0.0, False, {}), "tuple": ("ok", 0.0, False, {}),
            "surrogate": StepResult("bad \ud800", 0.0, False, {}),
            "info surrogate": StepResult("ok", 0.0, False, {"said": "bad \ud800"})}
        if action in faults:
            return faults[action]
        if action == "refuse":
            raise QlassError("probe: this environment refuses to 'refuse'")
        if action.startswith("wait "):
            time.sleep(float(action[5:]))
        return StepResult(f"step {self.steps}: {action}", 0.0, False, {"steps": self.steps})

    def expert(self, task: Task) -> Any:
        return "Action: echo x" if task.id == "probe/str" else ["Action: echo x"]

    def close(self) -> None:
        if self.closed_to:
            with open(self.closed_to, "a", encoding="utf-8") as f:
                f.write("closed\n")


SPEC = f"{__name__}:Probe"


def _raw(url: str, method: str, path: str, body: Any = None, timeout: float = 30,
         content_type: str | None = "application/json") -> tuple[int, Any]:
    """One request with the standard library: ``body`` a JSON value or raw bytes; the status and the
    decoded answer."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers={"Content-Type": content_type} if content_type else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _episode(url: str, task: str = "probe/ok") -> int:
    """A new instance with an episode of ``task`` under way."""
    status, created = _raw(url, "POST", "/create")
    assert status == 200, created
    assert _raw(url, "POST", "/reset", {"id": created["id"], "task": task})[0] == 200
    return created["id"]


def _step(url: str, env_id: int, action: str) -> tuple[int, Any]:
    return _raw(url, "POST", "/step", {"id": env_id, "action": action})


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(EnvPool(SPEC, max_instances=8)) as srv:
        yield srv


def test_a_restarted_server_does_not_reissue_ids() -> None:
    """A client still holding an id of the server before a restart gets 404, not a new client's episode
    (ids were 0, 1, 2 ... in every server process)."""
    with BackgroundServer(EnvPool(SPEC)) as first:
        port = int(first.url.rsplit(":", 1)[1])
        stale = _episode(first.url)
    with BackgroundServer(EnvPool(SPEC), port=port) as second:
        fresh = _episode(second.url)
        status, answer = _step(second.url, stale, "echo from the old client")
        assert status == 404 and f"unknown environment id {stale}" in answer["error"], (stale, fresh, answer)
        ids = [_raw(second.url, "POST", "/create")[1]["id"] for _ in range(6)]
        assert len(set(ids + [fresh])) == 7 and all(isinstance(i, int) and 0 <= i < 2**53 for i in ids)
        assert _step(second.url, fresh, "echo mine") == (200, {"observation": "step 1: echo mine", "reward": 0.0,
                                                              "done": False, "info": {"steps": 1}})


def test_idle_instances_are_reclaimed_and_listed(caplog: pytest.LogCaptureFixture) -> None:
    """Instances of dead clients are closed after the idle timeout (before: the server answered 429 for
    ever once --max-instances of them were left), each logged; GET /instances lists what is open."""
    with caplog.at_level(logging.WARNING, logger="qlass.serve"), \
            BackgroundServer(EnvPool(SPEC, max_instances=2, idle_timeout=1.0)) as srv:
        dead = [_episode(srv.url), _raw(srv.url, "POST", "/create")[1]["id"]]
        status, listing = _raw(srv.url, "GET", "/instances")
        assert status == 200 and listing["idle_timeout"] == 1.0
        assert sorted((i["id"], i["task"]) for i in listing["instances"]) == sorted(zip(dead, ["probe/ok", None]))
        assert all(i["idle_s"] >= 0 and i["busy"] is False for i in listing["instances"])
        status, answer = _raw(srv.url, "POST", "/create")
        assert status == 429 and "idle timeout" in answer["error"]
        deadline = time.time() + 20
        while status == 429 and time.time() < deadline:
            time.sleep(0.2)
            status, answer = _raw(srv.url, "POST", "/create")
        assert status == 200, answer
        alive = answer["id"]
        assert _raw(srv.url, "POST", "/reset", {"id": alive, "task": "probe/ok"})[0] == 200
        assert _step(srv.url, alive, "wait 2")[0] == 200  # a request longer than the timeout: not reclaimed
        assert _step(srv.url, alive, "echo on")[1]["observation"] == "step 2: echo on"
        for env_id in dead:
            status, answer = _step(srv.url, env_id, "echo late")
            assert status == 404 and "idle timeout" in answer["error"]
        reclaimed = [r.getMessage() for r in caplog.records if "over the idle timeout" in r.getMessage()]
        assert any(f"closed environment {dead[0]} (task probe/ok)" in m for m in reclaimed), reclaimed


def test_idle_instances_are_reclaimed_without_requests(caplog: pytest.LogCaptureFixture) -> None:
    """The server closes idle instances on its own, not only when a client asks for one."""
    with caplog.at_level(logging.WARNING, logger="qlass.serve"), \
            BackgroundServer(EnvPool(SPEC, idle_timeout=0.5)) as srv:
        env_id = _episode(srv.url)
        deadline = time.time() + 20
        while time.time() < deadline and not any(f"closed environment {env_id}" in r.getMessage()
                                                 for r in caplog.records):
            time.sleep(0.1)
        assert _raw(srv.url, "GET", "/")[1]["instances"] == 0
    with BackgroundServer(EnvPool(SPEC, idle_timeout=0)) as never:
        env_id = _episode(never.url)
        time.sleep(0.3)
        assert [i["id"] for i in _raw(never.url, "GET", "/instances")[1]["instances"]] == [env_id]


def test_a_busy_instance_refuses_at_once(server: BackgroundServer) -> None:
    """A second request on an instance busy with a step answers 409 at once (before: it waited for the
    lock on a server thread; 40 such requests stalled every other client)."""
    env_id, other = _episode(server.url), _episode(server.url)
    try:
        slow: list[tuple[int, Any]] = []
        thread = threading.Thread(target=lambda: slow.append(_step(server.url, env_id, "wait 2")))
        thread.start()
        deadline = time.time() + 10
        while time.time() < deadline and not any(i["busy"] for i in _raw(server.url, "GET", "/instances")[1]
                                                 .get("instances", [])):
            time.sleep(0.05)
        for path, body in [("/step", {"id": env_id, "action": "echo again"}),
                           ("/reset", {"id": env_id, "task": "probe/ok"})]:
            status, answer = _raw(server.url, "POST", path, body)
            assert status == 409 and answer == {"error": f"environment {env_id} is busy with another request; "
                                                         "send one at a time"}, (path, status, answer)
        assert _step(server.url, other, "echo meanwhile")[0] == 200
        thread.join(timeout=20)
        assert slow[0][0] == 200 and slow[0][1]["observation"] == "step 1: wait 2"
        assert _step(server.url, env_id, "echo after")[1]["observation"] == "step 2: echo after"
    finally:
        for i in (env_id, other):
            _raw(server.url, "POST", "/close", {"id": i})


def test_stalled_clients_are_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that stops sending its body is answered 408 and its connection closed; one that sends
    no request, or half its head, is disconnected (before: each was held for ever, and so was a server
    asked to stop; a few hundred of them exhausted the file descriptors)."""
    import qlass.serve_uvicorn

    monkeypatch.setattr(qlass.serve_uvicorn, "HEADER_TIMEOUT", 0.5)
    with BackgroundServer(EnvPool(SPEC), body_timeout=0.5) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        for sent in (b"", b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: a"):
            with socket.create_connection((host, int(port)), timeout=20) as sock:
                sock.sendall(sent)
                assert sock.recv(4096) == b""  # closed without an answer
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(b"POST /step HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"id\": 1, ")
            answer = b""
            while chunk := sock.recv(4096):  # the server closes the connection after its answer
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
        assert json.loads(body) == {"error": "request body of POST /step not received within 0.5 s"}
        assert _raw(srv.url, "GET", "/")[0] == 200


def test_environment_faults_are_500_naming_what_it_returned(server: BackgroundServer,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """What in-process play refuses of an environment the server refuses too, as the operator's bug:
    500 saying what the environment returned, logged (before: done='no' answered done true, NaN a null
    reward, an int observation 200 then 500 on /observation, a tuple an opaque 500, a string expert its
    letters); a QlassError of the environment's own is still a 400."""
    env_id = _episode(server.url)
    cases = {"done no": "step() returned done 'no'; it must be true or false",
             "nan": "step() returned reward nan; it must be a finite number",
             "int": "step() returned an observation of type int, not a string",
             "tuple": "step() returned a tuple, not a StepResult",
             "surrogate": "step() returned an observation that is not valid Unicode"}
    try:
        with caplog.at_level(logging.ERROR, logger="qlass.serve"):
            for action, want in cases.items():
                status, answer = _step(server.url, env_id, action)
                assert status == 500 and answer["error"].startswith("environment fault on /step"), (action, answer)
                assert f"environment {SPEC}: {want}" in answer["error"], (action, answer)
        assert sum("environment fault on /step" in r.getMessage() for r in caplog.records) == len(cases)
        assert _raw(server.url, "GET", f"/observation?id={env_id}") == (200, "Probing probe/ok.")
        status, answer = _raw(server.url, "GET", "/expert?task=probe/str")
        assert status == 500 and "expert('probe/str') returned a str, not a list of outputs" in answer["error"]
        assert _raw(server.url, "GET", "/expert?task=probe/ok") == (200, {"outputs": ["Action: echo x"]})
        status, answer = _step(server.url, env_id, "refuse")
        assert status == 400 and answer == {"error": "probe: this environment refuses to 'refuse'"}
    finally:
        _raw(server.url, "POST", "/close", {"id": env_id})


def test_lone_surrogates_never_apply_a_step_then_fail(server: BackgroundServer) -> None:
    """A request string holding a lone surrogate (JSON-legal ``\\ud800``) is refused before the
    environment steps (before: the step applied, then the answer failed with 500); one in an
    environment's free-form info is sent as U+FFFD."""
    env_id = _episode(server.url)
    try:
        for field in ("output", "action"):
            body = b'{"id": %d, "%s": "Action: echo \\ud800"}' % (env_id, field.encode())
            status, answer = _raw(server.url, "POST", "/step", body)
            assert status == 400 and answer["error"].startswith(f"'{field}' is not valid Unicode"), answer
        status, answer = _raw(server.url, "POST", "/reset", b'{"id": %d, "task": "probe/\\udc00"}' % env_id)
        assert status == 400 and "'task' is not valid Unicode" in answer["error"]
        status, answer = _step(server.url, env_id, "info surrogate")
        assert status == 200 and answer["info"] == {"said": "bad \ufffd"}
        assert answer["observation"] == "ok"
        assert _step(server.url, env_id, "echo next")[1]["observation"] == "step 2: echo next"  # one step before
    finally:
        _raw(server.url, "POST", "/close", {"id": env_id})


def test_ids_and_indices_are_strict_integers(server: BackgroundServer) -> None:
    """``true``, ``"0"`` and ``0.0`` are no instance id and ``"3"`` no task index (before: true drove
    instance 1, the others 0); a non-UTF-8 body says so; /observation before the first reset is refused
    like /step (before: 200 "")."""
    env_id = _raw(server.url, "POST", "/create")[1]["id"]
    try:
        for body in ({"id": True, "action": "echo"}, {"id": str(env_id), "action": "echo"},
                     {"id": float(env_id), "action": "echo"}):
            status, answer = _raw(server.url, "POST", "/step", body)
            assert status == 400 and "malformed request to /step: body.id: Input should be a valid integer" \
                in answer["error"], (body, answer)
        status, answer = _raw(server.url, "POST", "/reset", {"id": env_id, "data_idx": "1"})
        assert status == 400 and "body.data_idx: Input should be a valid integer" in answer["error"]
        status, answer = _raw(server.url, "GET", f"/observation?id={env_id}")
        assert status == 409 and answer == {"error": f"environment {env_id} has no episode yet: POST /reset first"}
        body = b'{"id": 1, "note": "\xff"}'
        status, answer = _raw(server.url, "POST", "/close", body)
        want = f"body of POST /close is not valid UTF-8 JSON (byte {body.index(255)})"
        assert (status, answer) == (400, {"error": want})
        # bodies FastAPI's own parse gives up on got its "There was an error parsing the body"
        for path, body in (("/reset", f'{{"id": {env_id}, "task": "probe/ok", "n": {"9" * 5000}}}'.encode()),
                           ("/step", b"[" * 100_000 + b"]" * 100_000)):
            status, answer = _raw(server.url, "POST", path, body)
            assert status == 400 and answer["error"].startswith(f"malformed request to {path}: body: "), answer
        assert "field 'n' holds an integer of 5000 digits" in _raw(server.url, "POST", "/reset", f'{{"id": {env_id}, '
                                                                   f'"n": {"9" * 5000}}}'.encode())[1]["error"]
    finally:
        _raw(server.url, "POST", "/close", {"id": env_id})


class Fragile(Probe):
    """A :class:`Probe` whose builds after the first fail with a secret in the message, or take
    ``slow`` seconds (a class-level setting)."""

    builds, slow = 0, 0.0

    def __init__(self, closed_to: str = "") -> None:
        type(self).builds += 1
        if type(self).builds > 1 and not self.slow:
            raise RuntimeError("cannot open /home/alice/.secrets/password=hunter2")
        time.sleep(self.slow if type(self).builds > 1 else 0)
        super().__init__(closed_to)

    def task(self, task_id: str) -> Any:
        if task_id == "probe/odd":
            return {"id": task_id}
        return next(t for t in self.tasks("train") if t.id == task_id)


def test_a_failed_create_keeps_its_text_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """The exception of an environment's constructor on /create (its text can hold paths or secrets) was
    sent to the client and not logged; now it is logged with a reference, as on /reset and /step."""
    Fragile.builds, Fragile.slow = 0, 0.0
    with BackgroundServer(EnvPool(f"{__name__}:Fragile")) as srv, caplog.at_level(logging.ERROR, logger="qlass"):
        status, answer = _raw(srv.url, "POST", "/create")
        ref = re.fullmatch(r"environment error on /create \(see the server log, reference (\w+)\)", answer["error"])
        assert status == 500 and ref, answer
        assert f"environment error {ref[1]} on /create" in caplog.text and "hunter2" in caplog.text


def test_task_lookups_are_checked_and_a_create_ending_after_the_stop_is_closed(tmp_path: Any) -> None:
    """An environment's ``task(id)`` answer is checked like its other answers (a dict was an opaque 500,
    and kept); an instance whose build ends after the pool shut down was left open (never closed)."""
    Fragile.builds, Fragile.slow = 0, 0.0
    closed = tmp_path / "closed.txt"
    with BackgroundServer(EnvPool(f"{__name__}:Fragile", {"closed_to": str(closed)})) as srv:
        Fragile.slow = 0.01
        env_id = _raw(srv.url, "POST", "/create")[1]["id"]
        status, answer = _raw(srv.url, "POST", "/reset", {"id": env_id, "task": "probe/odd"})
        assert status == 500 and answer["error"].startswith("environment fault on /reset"), answer
        assert "task('probe/odd') returned {'id': 'probe/odd'}, not the Task of that id" in answer["error"]
        assert _raw(srv.url, "POST", "/reset", {"id": env_id, "task": "probe/ok"})[0] == 200
    assert closed.read_text() == "closed\n" * 2
    pool = EnvPool(f"{__name__}:Fragile", {"closed_to": str(closed)})
    Fragile.slow = 1.0
    answers: list[Any] = []

    def create() -> None:
        try:
            answers.append(pool.create())
        except Exception as exc:  # noqa: BLE001 - the test looks at what it was
            answers.append(exc)

    thread = threading.Thread(target=create)
    thread.start()
    time.sleep(0.3)  # the build is under way
    pool.shutdown()
    thread.join(timeout=20)
    assert [getattr(a, "status", a) for a in answers] == [503]
    assert closed.read_text() == "closed\n" * 4  # the meta instance and the one built too late


def test_a_key_given_twice_in_a_body_is_refused(server: BackgroundServer) -> None:
    """A body giving a key twice is refused naming the key, as qlass's file readers refuse it (before: the
    last value won: the step was ``echo b``, on the last id given)."""
    env_id, other = _episode(server.url), _raw(server.url, "POST", "/create")[1]["id"]
    try:
        twice = [("/step", b'{"id": %d, "action": "echo a", "action": "echo b"}' % env_id, "action"),
                 ("/step", b'{"id": %d, "id": %d, "action": "echo a"}' % (other, env_id), "id"),
                 ("/reset", b'{"id": %d, "task": "probe/ok", "task": "probe/str"}' % env_id, "task"),
                 ("/close", b'{"id": %d, "id": %d}' % (other, env_id), "id"),
                 ("/create", b'{"note": 1, "note": {"k": 1, "k": 2}}', "k")]
        for path, body, key in twice:
            want = f"malformed request to {path}: body: key {key!r} appears twice in one object"
            assert _raw(server.url, "POST", path, body) == (400, {"error": want}), path
        assert _step(server.url, env_id, "echo once")[1]["observation"] == "step 1: echo once"  # none stepped before
    finally:
        for i in (env_id, other):
            _raw(server.url, "POST", "/close", {"id": i})


def test_a_refused_reset_leaves_no_episode(server: BackgroundServer) -> None:
    """A reset refused for its task (an unknown id or index) ends the instance's episode, as a reset the
    environment fails does (before: later steps went on with the previous task); a malformed one changes nothing."""
    env_id = _episode(server.url)
    try:
        assert _raw(server.url, "POST", "/reset", {"id": env_id})[0] == 400  # no task given
        assert _step(server.url, env_id, "echo a")[0] == 200
        for body, status in (({"task": "probe/none"}, 404), ({"data_idx": 10**6}, 404)):
            assert _step(server.url, env_id, "echo a")[0] == 200
            assert _raw(server.url, "POST", "/reset", {"id": env_id, **body})[0] == status, body
            assert _step(server.url, env_id, "echo b") == (409, {"error": f"environment {env_id} has no episode yet: "
                                                                         "POST /reset first"}), body
            assert _raw(server.url, "POST", "/reset", {"id": env_id, "task": "probe/ok"})[0] == 200
    finally:
        _raw(server.url, "POST", "/close", {"id": env_id})


def test_create_takes_an_empty_body_or_an_object(server: BackgroundServer) -> None:
    """/create refuses a body that is not JSON or not a JSON object, like every other endpoint (before:
    200 and a new instance), and takes an empty body or an object as before. A body that is not JSON is
    named ``body`` on every endpoint (before: /step named a character offset in it as the field)."""
    instances = _raw(server.url, "GET", "/")[1]["instances"]
    for body, problem in ((b"junk", "not JSON (Expecting value"), (b"[1]", "expected a JSON object, got list"),
                          (b" \n ", "not JSON (whitespace only)"),
                          (b"null", "expected a JSON object, got null")):
        status, answer = _raw(server.url, "POST", "/create", body)
        assert status == 400 and answer["error"].startswith(f"malformed request to /create: body: {problem}"), answer
    assert _raw(server.url, "GET", "/")[1]["instances"] == instances  # none was created
    for body, problem in ((b"  \n", "not JSON (whitespace only): give a JSON object, or no body"),
                          (b'{"id": 1,', "not JSON (Expecting property name enclosed in double quotes: line 1 column "
                                         "10 (char 9))")):  # before: named the field by a character offset: body.9
        want = {"error": f"malformed request to /step: body: {problem}"}
        assert _raw(server.url, "POST", "/step", body) == (400, want), body
    for body in (None, b"", b"{}", b'{"note": 1}'):
        status, created = _raw(server.url, "POST", "/create", body)
        assert status == 200 and _raw(server.url, "POST", "/close", {"id": created["id"]})[0] == 200, body


def test_a_json_body_of_another_content_type_is_named_so(server: BackgroundServer) -> None:
    """curl's ``-d`` sends a JSON body as a form: FastAPI does not read it as JSON, and the answer said
    'body: Input should be a valid dictionary or object to extract fields from' of a valid object."""
    env_id = _raw(server.url, "POST", "/create")[1]["id"]
    try:
        body = {"id": env_id, "task": "probe/ok"}
        for kind in ("application/x-www-form-urlencoded", "text/plain", None):
            status, answer = _raw(server.url, "POST", "/reset", body, content_type=kind)
            assert status == 400, (kind, answer)
            assert answer["error"] == (f"malformed request to /reset: body: sent as Content-Type {kind or '(none)'}, "
                                       "which is not read as JSON; send it as application/json"), answer
        assert _raw(server.url, "POST", "/reset", body, content_type="application/problem+json")[0] == 200
        status, answer = _raw(server.url, "POST", "/reset", None, content_type=None)  # no body: as before
        assert status == 400 and "body: Field required" in answer["error"], answer
    finally:
        _raw(server.url, "POST", "/close", {"id": env_id})


def test_a_query_id_is_one_field_of_digits(server: BackgroundServer) -> None:
    """``GET /observation?id=`` takes one id written in digits without leading zeros, as a JSON body
    writes it (before: ``?id=1.0`` was instance 1, ``?id=A&id=B`` instance B and ``?id=007`` instance 7)."""
    env_id, other = _episode(server.url), _episode(server.url)
    try:
        assert _raw(server.url, "GET", f"/observation?id={env_id}") == (200, "Probing probe/ok.")
        for query, problem in ((f"id={env_id}.0", "Input should be a valid integer"),
                               (f"id=00{env_id}", "Input should be a valid integer"),
                               (f"id={other}&id={env_id}", "given 2 times; give one id")):
            want = f"malformed request to /observation: query.id: {problem}"
            assert _raw(server.url, "GET", f"/observation?{query}") == (400, {"error": want}), query
    finally:
        for i in (env_id, other):
            _raw(server.url, "POST", "/close", {"id": i})


@contextlib.contextmanager
def _qlass_serve(*args: str, preexec_fn: Any = None) -> Iterator[tuple[subprocess.Popen, int]]:
    """A ``qlass serve`` process of :data:`SPEC` on a free port (``args``: more options), yielded once it
    accepts connections; killed on exit if it is still running."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "qlass", "serve", SPEC, "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=preexec_fn)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                break
            except OSError:
                time.sleep(0.3)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_qlass_serve_stops_despite_a_stalled_client_and_caps_connections(tmp_path: Any) -> None:
    """``qlass serve`` takes --idle-timeout and --limit-concurrency (503 beyond it), and SIGTERM stops it
    within seconds, saying so, though a client stopped in the middle of a body (before: it waited for
    that client for ever, silently), and closes its environments (before: SIGTERM ended it first)."""
    closed = tmp_path / "closed.txt"
    stalled = []
    with _qlass_serve("--env-arg", f"closed_to={closed}", "--idle-timeout", "90", "--limit-concurrency", "3"
                      ) as (proc, port):
        url = f"http://127.0.0.1:{port}"
        try:
            status, root = _raw(url, "GET", "/")
            assert status == 200 and root["idle_timeout"] == 90.0
            _episode(url)
            for _ in range(2):
                sock = socket.create_connection(("127.0.0.1", port), timeout=20)
                sock.sendall(b"POST /create HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
                stalled.append(sock)
            time.sleep(0.5)  # let the server take them
            host_conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
            host_conn.request("GET", "/")
            assert host_conn.getresponse().status == 503
            host_conn.close()
            started = time.time()
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            assert time.time() - started < 15
            assert "stopping: waiting up to 3 s for 2 request(s) under way" in err and "Traceback" not in err
            assert proc.returncode == 0 and "stopped (SIGTERM)" in err  # before: killed by the signal again
            assert closed.read_text() == "closed\n" * 2  # the instance and the one answering /tasks
            for sock in stalled:
                assert sock.recv(4096).startswith(b"HTTP/1.1 503 ")  # the server is stopping
        finally:
            for sock in stalled:
                sock.close()


def test_a_request_still_running_when_the_stop_wait_ends_is_answered_503_without_a_traceback(tmp_path: Any) -> None:
    """SIGTERM while a step takes longer than the 3 s the stopping server waits for requests under way. Before:
    uvicorn cancelled the request, answered 500 and logged "ERROR: Cancel 1 running task(s)" and a 40-line
    traceback of the cancellation. Now the client is told 503, the server is stopping, the log says so in one
    line, and the instance is closed when its step returns."""
    closed = tmp_path / "closed.txt"
    answers: list[tuple[int, Any]] = []
    with _qlass_serve("--env-arg", f"closed_to={closed}") as (proc, port):
        url = f"http://127.0.0.1:{port}"
        env_id = _episode(url)
        thread = threading.Thread(target=lambda: answers.append(_step(url, env_id, "wait 6")))
        thread.start()
        time.sleep(0.5)  # the step is under way
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        thread.join(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err and "ERROR" not in err, err[-3000:]
    assert "stopping: 1 request(s) still under way after 3 s are answered 503" in err and "stopped (SIGTERM)" in err
    assert answers == [(503, {"error": "the server is stopping"})]
    assert closed.read_text() == "closed\n" * 2  # the instance (once its step returned) and the meta one


def test_answers_go_out_without_waiting_for_the_delayed_ack() -> None:
    """The listening socket is made with proto IPPROTO_TCP, so asyncio sets TCP_NODELAY on every accepted
    connection: without it each small answer waited about 40 ms for the client's delayed ACK (44.0 ms a
    remote step, 1.0 ms with it: benchmarks/bench_http_env.py)."""
    import socket

    from qlass.serve_uvicorn import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        client = socket.create_connection(sock.getsockname())
        accepted, _ = sock.accept()
        with client, accepted:
            assert accepted.proto == socket.IPPROTO_TCP  # what asyncio checks before setting TCP_NODELAY
    finally:
        sock.close()


class SlowExpert(Probe):
    """A :class:`Probe` whose ``expert()`` takes 2 s and counts its calls."""

    expert_calls = 0

    def expert(self, task: Task) -> Any:
        type(self).expert_calls += 1
        time.sleep(2)
        return super().expert(task)


def test_a_slow_expert_call_holds_no_other_task_request() -> None:
    """The task list, prompt and expert trajectories come from one environment instance, one call at a
    time: its answers are kept, so a slow ``/expert`` no longer holds every ``/tasks`` and ``/prompt``
    behind it (before: each waited the 2 s), and an expert trajectory is computed once."""
    SlowExpert.expert_calls = 0  # a rerun in the same process counts afresh
    with BackgroundServer(EnvPool(f"{__name__}:SlowExpert")) as srv:
        assert _raw(srv.url, "GET", "/tasks?split=train")[0] == 200 and _raw(srv.url, "GET", "/prompt")[0] == 200
        slow: list[tuple[int, Any]] = []
        thread = threading.Thread(target=lambda: slow.append(_raw(srv.url, "GET", "/expert?task=probe/ok")))
        thread.start()
        time.sleep(0.5)  # the expert call is under way
        start = time.monotonic()
        for path in ("/tasks?split=train", "/prompt", "/splits"):
            assert _raw(srv.url, "GET", path)[0] == 200, path
        assert time.monotonic() - start < 1.0, "a task request waited for the expert call"
        thread.join(timeout=20)
        start = time.monotonic()
        assert _raw(srv.url, "GET", "/expert?task=probe/ok") == slow[0] == (200, {"outputs": ["Action: echo x"]})
        assert time.monotonic() - start < 1.0 and SlowExpert.expert_calls == 1


def test_ctrl_c_stops_qlass_serve_cleanly(tmp_path: Any) -> None:
    """Ctrl-C (SIGINT with Python's handler, as in a terminal) is how a user stops ``qlass serve``: it
    ended in a 40-line traceback (uvicorn raised the signal again once stopped, and the lifespan task was
    cancelled under asyncio's KeyboardInterrupt) and exit code 130. Now one line, exit 0, and the
    environments closed."""
    closed = tmp_path / "closed.txt"
    with _qlass_serve("--env-arg", f"closed_to={closed}",
                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as (proc, port):
        _episode(f"http://127.0.0.1:{port}")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert err.rstrip().endswith("stopped (SIGINT)") and "interrupted" not in err
    assert closed.read_text() == "closed\n" * 2  # the instance and the one answering /tasks
    # Ctrl-C twice: uvicorn logged the traceback of the lifespan task it then cancels
    with _qlass_serve(preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as (proc, port):
        _episode(f"http://127.0.0.1:{port}")  # serving, with uvicorn's signal handlers in place
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err and "CancelledError" not in err, err[-3000:]


def test_exhausted_file_descriptors_are_one_warning_not_a_flood() -> None:
    """With the open-file limit reached, asyncio logged an error with a traceback for every connection it
    could not accept (about 40 a second, 6 lines each); ``qlass serve`` now says so in one line every
    10 s, and still stops on SIGTERM."""
    import resource

    clients: list[socket.socket] = []
    with _qlass_serve(preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (120, 120))) as (proc, port):
        start = time.monotonic()
        try:
            for _ in range(160):  # more than the server's 120 file descriptors
                try:
                    clients.append(socket.create_connection(("127.0.0.1", port), timeout=0.5))
                except OSError:  # the backlog is full for a moment
                    pass
            time.sleep(3)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            for sock in clients:
                sock.close()
    elapsed = time.monotonic() - start  # a loaded machine can stretch the 3 s past the next 10 s warning
    warnings = [line for line in err.splitlines() if "cannot accept connections" in line]
    assert len(clients) > 120 and 1 <= len(warnings) <= 1 + elapsed // 10, (elapsed, err[-3000:])
    assert "Too many open files" in warnings[0], err[-3000:]
    assert "out of system resource" not in err and "Traceback" not in err, err[-3000:]
