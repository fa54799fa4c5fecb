"""The HTTP environment protocol: ``qlass serve`` / :mod:`qlass.serve` and the :class:`HttpEnv` client,
on real servers bound to 127.0.0.1 (a thread for the small env defined here, a ``qlass serve``
subprocess for ALFWorld)."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from setup_parts import installed, shared_data

installed("fastapi")  # the serve extra
installed("uvicorn")

from qlass.envs.base import FORMAT_HINT, parse_action
from qlass.envs.http import HttpEnv
from qlass.errors import QlassError
from qlass.serve import BackgroundServer, EnvPool
from qlass.types import Message, StepResult, Task

TESTS = os.path.dirname(os.path.abspath(__file__))


class Keypad:
    """Type the task's code digit by digit (``press N``). Reward: fraction of the code typed;
    ``press 9`` raises (an environment bug), ``wait`` sleeps 2 s, info carries a non-JSON value."""

    name = "keypad"

    def __init__(self, codes: str = "12,345,5678") -> None:
        self.codes = codes.split(",")
        self._code, self._typed, self._steps = "", "", 0

    def splits(self) -> dict[str, int]:
        return {"train": len(self.codes), "seen": 1}

    def tasks(self, split: str, task_types: Sequence[str] | None = None) -> list[Task]:
        if split not in self.splits():
            raise ValueError(f"unknown split {split}")
        codes = self.codes if split == "train" else ["42"]
        return [Task(f"keypad/{split}/{c}", self.name, split, f"len{len(c)}", {"code": c}) for c in codes
                if not task_types or f"len{len(c)}" in task_types]

    def prompt(self) -> list[Message]:
        return [Message("user", "Type the code. Action: press N"), Message("assistant", "OK")]

    def reset(self, task: Task) -> str:
        self._code, self._typed, self._steps = task.meta["code"], "", 0
        return f"Enter the code {self._code}."

    def step(self, output: str) -> StepResult:
        self._steps += 1
        action = parse_action(output)
        if action is None:
            obs = FORMAT_HINT
        elif action == "press 9":
            raise RuntimeError("keypad short-circuit")
        elif action == "wait":
            time.sleep(2.0)
            obs = "You wait."
        elif action.startswith("press ") and self._code[len(self._typed):].startswith(action[6:]):
            self._typed += action[6:]
            obs = f"Display: {self._typed}"
        else:
            obs = "Beep."
        done = self._typed == self._code
        return StepResult(obs, len(self._typed) / len(self._code), done, {"steps": self._steps, "when": object()})

    def expert(self, task: Task) -> list[str]:
        return [f"Thought: next digit.\nAction: press {d}" for d in task.meta["code"]]

    def close(self) -> None:
        pass


SPEC = f"{__name__}:Keypad"


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(EnvPool(SPEC, max_instances=4)) as srv:
        yield srv


def _raw(url: str, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    """One request with the standard library, bypassing the client (to send malformed requests)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _triple(result: StepResult) -> tuple[str, float, bool]:
    return result.observation, result.reward, result.done


def _play(env: Any, task: Task, outputs: list[str]) -> list[tuple[str, float, bool]]:
    first = env.reset(task)
    return [(first, 0.0, False)] + [(r.observation, r.reward, r.done) for r in map(env.step, outputs)]


def test_same_episode_over_http_and_in_process(server: BackgroundServer) -> None:
    remote, local = HttpEnv(server.url), Keypad()
    try:
        assert remote.name == "keypad" and remote.splits() == local.splits()
        assert remote.tasks("train") == local.tasks("train")
        assert remote.tasks("train", ["len3"]) == local.tasks("train", ["len3"])
        assert remote.prompt() == local.prompt()
        task = remote.tasks("train")[2]
        assert remote.expert(task) == local.expert(task)
        outputs = ["Action: press 6", "no action at all", "Action: press 1"] + local.expert(task)[1:]
        assert _play(remote, task, outputs) == _play(local, task, outputs)
        assert remote.step("Action: press 6").info["when"].startswith("<object")  # made JSON-safe
    finally:
        remote.close()


def test_bad_requests_get_4xx_with_a_message(server: BackgroundServer) -> None:
    url = server.url
    status, env_id = _raw(url, "POST", "/create")
    env_id = env_id["id"]
    cases = [
        ("POST", "/step", {"id": 999, "output": "Action: press 1"}, 404, "unknown environment id 999"),
        ("POST", "/step", {"id": env_id, "output": "Action: press 1"}, 409, "POST /reset first"),
        ("POST", "/step", {"id": env_id}, 400, "exactly one of 'output'"),
        ("POST", "/step", {"output": "x"}, 400, "id: Field required"),
        ("POST", "/reset", {"id": "seven", "task": "keypad/train/12"}, 400, "malformed request to /reset"),
        ("POST", "/reset", {"id": env_id, "task": "keypad/train/99"}, 404, "unknown task"),
        ("POST", "/reset", {"id": env_id, "data_idx": 17}, 404, "out of range"),
        ("POST", "/reset", {"id": env_id, "task": "keypad/train/12", "game": 0}, 400, "exactly one of 'task'"),
        ("GET", "/tasks?split=nope", None, 404, "unknown split 'nope'; splits: train, seen"),
        ("GET", "/observation", None, 400, "id: Field required"),
        ("POST", "/close", {"id": 12345}, 404, "unknown environment id"),
    ]
    for method, path, body, want_status, want_text in cases:
        status, answer = _raw(url, method, path, json.dumps(body).encode() if body is not None else None)
        assert status == want_status and want_text in answer["error"], (path, body, status, answer)
    status, answer = _raw(url, "POST", "/step", b"{not json")
    assert status == 400 and "malformed request" in answer["error"]
    # an environment that raises: 500 without its internals, and the server keeps serving
    assert _raw(url, "POST", "/reset", json.dumps({"id": env_id, "data_idx": 0}).encode())[0] == 200
    status, answer = _raw(url, "POST", "/step", json.dumps({"id": env_id, "action": "press 9"}).encode())
    assert status == 500 and "environment error on /step" in answer["error"]
    assert "short-circuit" not in answer["error"] and "RuntimeError" not in answer["error"]
    status, answer = _raw(url, "POST", "/step", json.dumps({"id": env_id, "action": "press 1"}).encode())
    assert status == 200 and answer["observation"] == "Display: 1" and answer["reward"] == 0.5
    assert _raw(url, "GET", f"/observation?id={env_id}") == (200, "Display: 1")
    assert _raw(url, "POST", "/close", json.dumps({"id": env_id}).encode()) == (200, {"id": env_id, "closed": True})


def _status_and_body(url: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                     chunked: bool = False) -> tuple[int, bytes]:
    """One request, answering the status and the raw body (for pages that are not JSON, chunked uploads)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})},
                     encode_chunked=chunked)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_every_failure_has_one_shape_and_no_environment_internals(server: BackgroundServer,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Unknown paths, wrong methods and unreadable bodies answer ``{"error"}`` like every other failure;
    an environment's exception text is only in the server log, under the reference the answer gives."""
    url = server.url
    for method, path, body, want in [("GET", "/nope", None, 404), ("GET", "/step", None, 405),
                                     ("POST", "/", b"{}", 405), ("POST", "/close", b"\xff\xfe", 400),
                                     ("POST", "/step", b"[1, 2]", 400)]:
        status, answer = _raw(url, method, path, body)
        assert status == want and list(answer) == ["error"] and isinstance(answer["error"], str), (path, status, answer)
    env_id = _raw(url, "POST", "/create")[1]["id"]
    try:
        assert _raw(url, "POST", "/reset", json.dumps({"id": env_id, "data_idx": 0}).encode())[0] == 200
        with caplog.at_level(logging.ERROR, logger="qlass.serve"):
            status, answer = _raw(url, "POST", "/step", json.dumps({"id": env_id, "action": "press 9"}).encode())
        assert status == 500 and list(answer) == ["error"]
        assert "short-circuit" not in answer["error"] and "RuntimeError" not in answer["error"]
        ref = answer["error"].rsplit("reference ", 1)[1].rstrip(")")
        logged = [r for r in caplog.records if ref in r.getMessage()]
        assert logged and logged[0].exc_info and "keypad short-circuit" in str(logged[0].exc_info[1])
    finally:
        _raw(url, "POST", "/close", json.dumps({"id": env_id}).encode())


def test_request_size_limit_and_api_pages_only_when_asked() -> None:
    with BackgroundServer(EnvPool(SPEC), max_request_bytes=2000) as small, \
            BackgroundServer(EnvPool(SPEC), docs=True) as documented:
        env_id = _raw(small.url, "POST", "/create")[1]["id"]
        assert _raw(small.url, "POST", "/reset", json.dumps({"id": env_id, "data_idx": 0}).encode())[0] == 200
        big = json.dumps({"id": env_id, "output": "x" * 5000 + "\nAction: press 1"}).encode()
        status, answer = _raw(small.url, "POST", "/step", big)
        assert status == 413 and answer == {"error": "request body over the server's limit of 2000 bytes"}
        # no Content-Length to go by: the body is counted as it arrives
        status, raw = _status_and_body(small.url, "POST", "/step", iter([big[:1500], big[1500:]]), chunked=True)
        assert status == 413 and "limit of 2000 bytes" in json.loads(raw)["error"]
        fits = json.dumps({"id": env_id, "output": "Action: press 1"}).encode()
        status, raw = _status_and_body(small.url, "POST", "/step", iter([fits[:10], fits[10:]]), chunked=True)
        assert status == 200 and json.loads(raw)["observation"] == "Display: 1"  # still serving, chunks joined
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert _raw(small.url, "GET", path) == (404, {"error": "Not Found"})
            status, page = _status_and_body(documented.url, "GET", path)
            assert status == 200 and page


def test_instance_limit_and_client_errors(server: BackgroundServer) -> None:
    envs = [HttpEnv(server.url) for _ in range(4)]
    try:
        with pytest.raises(QlassError, match="HTTP 429: too many open environments"):
            HttpEnv(server.url)
        with pytest.raises(QlassError, match=r"step\(\) before reset\(\)"):
            envs[0].step("Action: press 1")
        envs[0].reset(envs[0].tasks("seen")[0])
        with pytest.raises(QlassError, match="HTTP 500: environment error on /step"):
            envs[0].step("Action: press 9")
    finally:
        for e in envs:
            e.close()
    slow = HttpEnv(server.url, timeout=0.5)
    try:
        slow.reset(slow.tasks("seen")[0])
        with pytest.raises(QlassError, match=r"no answer within 0.5 s"):
            slow.step("Action: wait")
    finally:
        slow.close()
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(QlassError, match="connection refused — is the server running"):
        HttpEnv(f"http://127.0.0.1:{free}")
    with pytest.raises(QlassError, match="unknown dialect"):
        HttpEnv(server.url, dialect="gym")


def test_a_failed_reset_and_use_after_close(server: BackgroundServer) -> None:
    """A reset the server refuses leaves no episode (was: steps went on with the previous one); a call
    after close() names close() (was: the server's 400 for a request whose id is null)."""
    env = HttpEnv(server.url)
    env.reset(env.tasks("train")[0])
    env.step("Action: press 1")
    with pytest.raises(QlassError, match="HTTP 404"):
        env.reset(Task("keypad/train/999", "keypad", "train"))
    with pytest.raises(QlassError, match=r"step\(\) before reset\(\)"):
        env.step("Action: press 2")
    env.close()
    env.close()
    closed = r"(step|reset)\(\) after close\(\): its instance on http://\S+ was released"
    for call in (lambda: env.step("Action: press 1"), lambda: env.reset(Task("keypad/train/12", "keypad", "train"))):
        with pytest.raises(QlassError, match=closed):
            call()


def test_agentgym_style_requests_and_dialect(server: BackgroundServer) -> None:
    """Our server takes AgentGym's shapes (integer task index, bare action); the client's AgentGym
    dialect parses actions itself, enforces the step limit and takes the prompt from a prompt name."""
    env = HttpEnv(server.url, dialect="agentgym-alfworld", splits={"train": [0, 3], "seen": [3, 4]},
                  prompt="alfworld", step_limit=3)
    try:
        assert env.splits() == {"train": 3, "seen": 1}
        task = env.tasks("train")[1]
        assert task.id == "http/train/1" and task.meta == {"index": 1}
        assert env.reset(task) == "Enter the code 345."
        assert env.prompt()[0].content.startswith("You are an agent doing a household chore")
        r1 = env.step("Thought: go\nAction: press 3")
        r2 = env.step("no action")
        r3 = env.step("Action: press 4")
        assert (r1.observation, r2.observation, r3.observation) == ("Display: 3", FORMAT_HINT, "Display: 34")
        assert r3.done and r3.reward == pytest.approx(2 / 3)  # the client's step limit
        assert env.step("Action: press 5").observation == "The episode is over."
        with pytest.raises(QlassError, match=r"splits\['bad'\] must be \[first, end\) task indices"):
            HttpEnv(server.url, dialect="agentgym-sciworld", splits={"bad": [5, 1]})
    finally:
        env.close()


def test_agentgym_dialects_without_task_names_say_so(server: BackgroundServer) -> None:
    """Task types come only from reset answers that name the task (tests/test_serve_agentgym.py plays
    the dialects that do); a dialect or an answer that does not gets a clear error."""
    shop = HttpEnv(server.url, dialect="agentgym-webshop", splits={"seen": [0, 2]})
    sci = HttpEnv(server.url, dialect="agentgym-sciworld", splits={"seen": [0, 2]})
    try:
        with pytest.raises(QlassError, match="dialect 'agentgym-webshop' knows no task types"):
            shop.tasks("seen", ["len3"])
        assert [t.task_type for t in sci.tasks("seen")] == ["", ""]  # no request without task types
        with pytest.raises(QlassError, match="/reset answer for index 0 does not name its task.*'task_name'"):
            sci.tasks("seen", ["len3"])  # this server's answer has no 'task_name'
    finally:
        shop.close()
        sci.close()


def test_stale_keep_alive_connection_is_reopened() -> None:
    first = BackgroundServer(EnvPool(SPEC))
    env = HttpEnv(first.url)
    port = int(first.url.rsplit(":", 1)[1])
    assert env.splits()["train"] == 3
    first.stop()  # the kept-alive connection is now dead
    second = BackgroundServer(EnvPool(SPEC), port=port)
    try:
        assert env.splits()["train"] == 3  # resent once on a fresh connection
        with pytest.raises(QlassError, match="unknown environment id"):  # a new server knows no old ids
            env.reset(env.tasks("seen")[0])
    finally:
        env.close()
        second.stop()


def _wait_for(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"qlass serve exited early: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if _raw(url, "GET", "/")[0] == 200:
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"qlass serve did not answer on {url} within {seconds} s")


@pytest.mark.slow
def test_alfworld_through_qlass_serve_matches_in_process() -> None:
    installed("textworld")  # the alfworld extra
    from qlass.envs.alfworld import AlfWorldEnv
    from qlass.envs.alfworld_data import shared_tarballs

    shared_data(bool(shared_tarballs() or os.environ.get("ALFWORLD_DATA")), "the ALFWorld tarballs")
    local = AlfWorldEnv()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "qlass", "serve", "alfworld", "--port", str(port),
                             "--env-arg", "step_limit=40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(url, proc, 120)
        remote = HttpEnv(url, timeout=120)
        try:
            assert remote.name == "alfworld" and remote.splits() == local.splits()
            assert remote.tasks("unseen") == local.tasks("unseen") and remote.prompt() == local.prompt()
            task = local.tasks("unseen", ["pick_heat_then_place_in_recep"])[0]
            expert = local.expert(task)
            assert remote.expert(task) == expert
            outputs = ["Action: fly away", "just thinking"] + expert
            played = _play(remote, task, outputs)
            assert played == _play(local, task, outputs)
            assert played[1][0] == "Nothing happens." and played[2][0] == FORMAT_HINT and played[-1][1:] == (1.0, True)
        finally:
            remote.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        local.close()


def test_qlass_serve_command_takes_the_limit_and_docs_options() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "qlass", "serve", "toy_envs:Corridor", "--port", str(port),
                             "--max-request-bytes", "100"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        _wait_for(url, proc, 60)
        assert _raw(url, "GET", "/openapi.json") == (404, {"error": "Not Found"})
        status, answer = _raw(url, "POST", "/create", json.dumps({"pad": "x" * 200}).encode())
        assert status == 413 and "limit of 100 bytes" in answer["error"]
        status, created = _raw(url, "POST", "/create", b"{}")  # ids are random, never reissued
        assert status == 200 and isinstance(created["id"], int)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class _Malformed(BaseHTTPRequestHandler):
    """A qlass-dialect server whose answer at an endpoint is replaced (``server.answers``: path → a JSON
    value, or a function that answers through the handler, for what ``qlass serve`` never sends)."""

    NORMAL: dict[str, Any] = {
        "/splits": {"env": "fake", "splits": {"train": 1}},
        "/tasks": {"tasks": [{"id": "t/0", "env": "fake", "split": "train"}]},
        "/prompt": {"messages": [{"role": "user", "content": "Go."}]},
        "/expert": {"outputs": ["Action: go"]},
        "/create": {"id": 0}, "/reset": {"id": 0, "observation": "Start."},
        "/step": {"observation": "o", "reward": 1.0, "done": True}, "/close": {"closed": True}}

    def log_message(self, *args: object) -> None:
        pass

    def send_json(self, value: Any) -> None:
        body = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        answer = self.server.answers.get(path, self.NORMAL[path])  # type: ignore[attr-defined]
        if callable(answer):
            answer(self)
        else:
            self.send_json(answer)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.do_GET()


class _KeptAlive(_Malformed):
    """:class:`_Malformed` keeping connections open between requests, as ``qlass serve`` does."""

    protocol_version = "HTTP/1.1"


class _AgentGymSciworld(_Malformed):
    """AgentGym's ScienceWorld server's answers (``agentenv_sciworld``), one replaceable; ``/observation`` as
    AgentGym's WebShop server answers it."""

    NORMAL = {"/create": {"id": 0}, "/close": True, "/observation": "WebShop [SEP] Search",
              "/reset": {"task_name": "boil", "var_num": 0, "task_description": "Your task is to boil water.",
                         "observation": "This room is called the kitchen.", "reward": 0, "score": 0,
                         "deleted": False, "done": False},
              "/step": {"observation": "You boil.", "reward": 50, "score": 50, "done": False}}


@contextlib.contextmanager
def _serving(answers: dict[str, Any], handler: type[_Malformed] = _Malformed) -> Iterator[ThreadingHTTPServer]:
    """A stand-in server on loopback (``.url``; ``.answers`` may be changed while it runs)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.answers = answers  # type: ignore[attr-defined]
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def _writes(data: bytes, gap: float = 0.0, close: bool = True) -> Callable[[BaseHTTPRequestHandler], None]:
    """An answer written as raw bytes (``gap``: seconds between bytes), then the connection closed unless
    ``close`` is false; for malformed HTTP, which no real server sends on purpose."""
    def write(handler: BaseHTTPRequestHandler) -> None:
        handler.close_connection = close
        try:
            for i in range(0, len(data), 1 if gap else len(data)):
                handler.wfile.write(data[i:i + 1] if gap else data)
                handler.wfile.flush()
                time.sleep(gap)
        except OSError:  # the client gave up
            handler.close_connection = True
    return write


def _drop(handler: BaseHTTPRequestHandler) -> None:
    """Close the connection without answering (a proxy or worker dying after the request arrived)."""
    handler.close_connection = True
    handler.connection.shutdown(socket.SHUT_RDWR)


def _json_answer(body: bytes, status: str = "200 OK", headers: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{headers}Content-Length: {len(body)}\r\n\r\n"
            .encode() + body)


@pytest.mark.parametrize("path,answer,message", [
    ("/splits", {"env": "fake"}, "/splits answer lacks 'splits'"),
    ("/create", {"id": True}, "/create answered {'id': True}, expected an id"),
    ("/splits", {"env": "fake", "splits": {"train": "many"}},
     "/splits answer's 'train' must be an integer, got 'many'"),
    ("/splits", {"env": "fake", "splits": {"train": -3}},
     "/splits answer's 'train' must be a number of tasks (>= 0), got -3"),
    ("/tasks", {"tasks": None}, "/tasks answer's 'tasks' must be a list, got None"),
    ("/tasks", {"tasks": [{"id": 5, "env": "fake", "split": "train"}]}, "/tasks answer's 'id' must be a string, got 5"),
    ("/prompt", {"messages": [{"role": "user"}]}, "/prompt answer lacks 'content'"),
    ("/expert", {"outputs": [1]}, "/expert answer's 'outputs' must be a list of strings"),
    ("/reset", {"id": 0, "observation": None}, "/reset answer's 'observation' must be a string, got None"),
    ("/step", {"observation": "o", "reward": "abc", "done": True},
     "/step answer's 'reward' must be a number, got 'abc'"),
    ("/step", {"observation": "o", "reward": 1, "done": "yes"}, "/step answer's 'done' must be true or false"),
    ("/step", ["o", 1, True], "/step answer lacks 'observation'"),
])
def test_malformed_server_answers_name_the_endpoint_and_field(path: str, answer: Any, message: str) -> None:
    with _serving({path: answer}) as fake:
        with pytest.raises(QlassError) as err:
            env = HttpEnv(fake.url)
            env.prompt()
            [task] = env.tasks("train")
            env.expert(task)
            env.reset(task)
            env.step("Action: go")
        assert f"env server {fake.url}: {message}" in str(err.value)


_DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("answer,message", [
    (_writes(b"SPLAT 999 whatever\r\n\r\n"), "malformed HTTP answer: bad status line 'SPLAT 999 whatever'"),
    (_writes(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"observ"), "answer ended after 8 of 500 bytes"),
    (_writes(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"),
     "malformed or truncated chunked answer (after 0 bytes)"),
    (_writes(_json_answer(b"{}", headers="".join(f"X-{i}: a\r\n" for i in range(150))), close=False),
     "malformed HTTP answer: HTTPException: got more than 100 headers"),
    (_writes(_json_answer(b"{}", headers=f"X-Big: {'a' * 70_000}\r\n"), close=False),
     "malformed HTTP answer: LineTooLong: got more than 65536 bytes when reading header line"),
    (_writes(_json_answer(b'{"observation": "room \xff", "reward": 1, "done": true}'), close=False),
     "HTTP 200 OK, answer is not valid UTF-8 (byte 0xff at offset 22)"),
    (_writes(_json_answer(_DEEP), close=False), "HTTP 200 OK, answer nested too deeply"),
    (_writes(_json_answer(b"", status="500 Internal Server Error"), close=False),
     "HTTP 500 Internal Server Error with an empty answer"),
    (_writes(_json_answer(b"", status="302 Found", headers="Location: http://elsewhere:8000/step\r\n"), close=False),
     "HTTP 302 Found, a redirect to http://elsewhere:8000/step, which the client does not follow: give the final "
     "address as url="),
])
def test_broken_http_answers_are_one_line_and_the_connection_is_replaced(answer: Any, message: str) -> None:
    """Answers that are not HTTP, not whole, not UTF-8 or too deep for the decoder were raw exceptions from
    http.client and json; now one line naming server and endpoint, and the next request gets a fresh connection
    (reading on would take the broken answer's leftovers for the next answer)."""
    with _serving({"/step": answer}, _KeptAlive) as fake:
        env = HttpEnv(fake.url)
        try:
            [task] = env.tasks("train")
            env.reset(task)
            with pytest.raises(QlassError) as err:
                env.step("Action: go")
            assert str(err.value) == f"env server {fake.url} (POST /step): {message}"
            assert env.tasks("train") == [task]
        finally:
            env.close()


def test_closing_is_best_effort_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    """A failing /close is a warning naming server and instance, never an exception (an escaping one lost a
    finished `qlass data expert` export); the client is closed either way."""
    for answer, problem in [(_writes(b"SPLAT\r\n\r\n"), "malformed HTTP answer: bad status line 'SPLAT'"),
                            ({"error": "no such instance"}, "HTTP 200: no such instance")]:
        with _serving({"/close": answer}, _KeptAlive) as fake:
            env = HttpEnv(fake.url)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="qlass.envs.http"):
                env.close()
                env.close()  # once only
            assert [r.getMessage() for r in caplog.records] == [
                f"http env: could not close instance 0 on env server {fake.url}: env server {fake.url} (POST /close): "
                f"{problem}"]


def test_a_step_is_never_sent_twice() -> None:
    """A connection that dies after a /step went out may have applied it: the client says so instead of
    sending it again (the server applied it twice, silently); GETs and resets are still sent again, and a
    connection the server closed while the client was idle is replaced before a step goes out."""
    dropped: list[str] = []

    def drop_once(handler: _Malformed) -> None:
        path = handler.path.split("?")[0]
        if path == "/step" or path not in dropped:
            dropped.append(path)
            _drop(handler)
        else:
            handler.send_json(handler.NORMAL[path])

    with _serving({"/tasks": drop_once, "/reset": drop_once, "/step": drop_once}, _KeptAlive) as fake:
        env = HttpEnv(fake.url)
        try:
            [task] = env.tasks("train")
            assert env.reset(task) == "Start."
            with pytest.raises(QlassError) as err:
                env.step("Action: go")
            assert str(err.value).startswith(f"env server {fake.url} (POST /step): connection lost during POST /step; "
                                             "the step may have been applied on the server (")
            assert dropped == ["/tasks", "/reset", "/step"]
        finally:
            env.close()
    with BackgroundServer(EnvPool(SPEC)) as real:
        real._server.config.timeout_keep_alive = 0.2  # uvicorn closes connections idle this long (here: 75 s)
        env = HttpEnv(real.url)
        try:
            task = env.tasks("train")[0]
            env.reset(task)
            time.sleep(0.6)  # the server has closed the kept connection
            assert _triple(env.step("Action: press 1")) == ("Display: 1", 0.5, False)  # applied once
            env._client._last_used -= 60  # as after a minute of thinking: a fresh connection, not the kept one
            assert _triple(env.step("Action: press 2")) == ("Display: 12", 1.0, True)
        finally:
            env.close()


def test_timeout_bounds_the_whole_answer() -> None:
    """A server trickling its answer a byte at a time held the client for ever (the timeout was per read)."""
    answer = b'HTTP/1.0 200 OK\r\n\r\n{"observation": "o", "reward": 1.0, "done": true}'
    with _serving({"/step": _writes(answer, gap=0.1)}) as fake:
        env = HttpEnv(fake.url, timeout=1)
        try:
            env.reset(env.tasks("train")[0])
            start = time.monotonic()
            with pytest.raises(QlassError, match=r"\(POST /step\): no answer within 1 s \(raise timeout=\.\.\.\)"):
                env.step("Action: go")
            assert time.monotonic() - start < 4  # about 1 s; the whole answer takes 7 s
        finally:
            env.close()


def test_answers_over_the_size_limit_are_refused() -> None:
    """Any answer was read whole (a 1000 MiB observation took 3 GiB); now up to max_answer_bytes (64 MiB)."""
    big = json.dumps({"observation": "x" * 5000, "reward": 1.0, "done": True}).encode()
    for answer, message in [(big, f"answer of {len(big)} bytes is over the limit of 1000 bytes"),
                            (b"HTTP/1.0 200 OK\r\n\r\n" + big, "answer is over the limit of 1000 bytes")]:
        with _serving({"/step": _writes(answer if answer.startswith(b"HTTP") else _json_answer(answer))}) as fake:
            env = HttpEnv(fake.url, max_answer_bytes=1000)
            try:
                env.reset(env.tasks("train")[0])
                with pytest.raises(QlassError) as err:
                    env.step("Action: go")
                assert str(err.value) == f"env server {fake.url} (POST /step): {message} (raise max_answer_bytes=...)"
            finally:
                env.close()
    huge = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (65 * 2**20)  # and then nothing: refused at once
    with _serving({"/step": _writes(huge, close=False)}, _KeptAlive) as fake:
        env = HttpEnv(fake.url, timeout=10)
        try:
            env.reset(env.tasks("train")[0])
            with pytest.raises(QlassError, match=f"answer of {65 * 2**20} bytes is over the limit of {64 * 2**20} "):
                env.step("Action: go")
        finally:
            env.close()
    with pytest.raises(QlassError, match="max_answer_bytes must be an integer >= 1, got 0"):
        HttpEnv(fake.url, max_answer_bytes=0)


@pytest.mark.parametrize("url,timeout,message", [
    ("http://127.0.0.1:99999", 5, "url='http://127.0.0.1:99999' is not a server address (Port out of range 0-65535)"),
    ("127.0.0.1:abc", 5, "url='127.0.0.1:abc' is not a server address (Port could not be cast to integer value"),
    ("http://[::1", 5, "url='http://[::1' is not a server address (Invalid IPv6 URL)"),
    ("ftp://host:1", 5, "url must look like http://HOST:PORT, got 'ftp://host:1'"),
    ("http://127.0.0.1:1", "5", "timeout must be a number of seconds > 0, got '5'"),
    ("http://127.0.0.1:1", float("inf"), "timeout must be a number of seconds > 0, got inf"),
])
def test_bad_options_name_the_option(url: str, timeout: Any, message: str) -> None:
    with pytest.raises(QlassError) as err:
        HttpEnv(url, timeout=timeout)
    assert str(err.value).startswith(f"http env: {message}")


@pytest.mark.parametrize("options,message", [
    ({"step_limit": 2}, "step_limit is an option of the AgentGym dialects; a qlass server gives its environment's own"),
    ({"splits": {"a": [0, 1]}, "prompt": "alfworld"}, "prompt, splits are options of the AgentGym dialects"),
    ({"dialect": "agentgym-alfworld", "splits": {"a": [True, 2]}}, r"splits\['a'\] must be \[first, end\) task "
                                                                    r"indices \(0 to 2147483647\), got \[True, 2\]"),
    ({"dialect": "agentgym-alfworld", "splits": {"a": [0, 10**30]}}, r"splits\['a'\] must be \[first, end\)"),
])
def test_options_a_dialect_cannot_use_are_refused(options: dict[str, Any], message: str) -> None:
    """The qlass dialect ignored step_limit, splits and prompt without a word (its server's environment
    has its own); a split's range took booleans as indices, and a huge end overflowed in splits()."""
    with pytest.raises(QlassError, match=rf"^http env: {message}"):
        HttpEnv("http://127.0.0.1:1", **options)


@pytest.mark.parametrize("path,answer,message", [
    ("/step", {"observation": "o", "score": 50, "done": "false"}, "/step answer's 'done' must be true or false, got "
     "'false'"),
    ("/step", {"observation": "o", "reward": 50, "score": 50}, "/step answer lacks 'done'"),
    ("/step", {"observation": None, "score": 50, "done": False}, "/step answer's 'observation' must be a string, got "
     "None"),
    ("/step", {"observation": "o", "score": "50", "done": False}, "/step answer's 'score' must be a number, got '50'"),
    ("/step", _writes(_json_answer(b'{"observation": "o", "score": 1e400, "done": false}')),
     "/step answer's 'score' must be a finite number, got inf"),
    ("/step", {"observation": "o", "score": "n/a", "done": False},
     "/step answer's 'score' must be a number, got 'n/a'"),
    ("/step", {"observation": "o", "score": [1], "done": False}, "/step answer's 'score' must be a number, got [1]"),
    ("/reset", {**_AgentGymSciworld.NORMAL["/reset"], "observation": None},
     "/reset answer's 'observation' must be a string, got None"),
])
def test_agentgym_answers_are_checked_field_by_field(path: str, answer: Any, message: str) -> None:
    """The AgentGym dialects coerced what they got ("done": "false" ended the episode, a null observation
    read 'None', an infinite score was a success, "n/a" a raw ValueError); AgentGym's own answers still pass."""
    with _serving({}, _AgentGymSciworld) as fake:
        env = HttpEnv(fake.url, dialect="agentgym-sciworld", splits={"train": [0, 1]})
        try:
            [task] = env.tasks("train")
            assert env.reset(task) == "Your task is to boil water.\nThis room is called the kitchen."
            assert _triple(env.step("Action: boil water")) == ("You boil.", 0.5, False)
            fake.answers["/step"] = {"observation": "Failed.", "reward": -150, "score": -100, "done": True}
            assert _triple(env.step("Action: drink water")) == ("Failed.", 0.0, True)
            fake.answers[path] = answer
            with pytest.raises(QlassError) as err:
                env.reset(task)
                env.step("Action: boil water")
            assert str(err.value).startswith(f"env server {fake.url}: {message}")
        finally:
            env.close()


def test_agentgym_webshop_observation_must_be_a_string() -> None:
    with _serving({}, _AgentGymSciworld) as fake:
        env = HttpEnv(fake.url, dialect="agentgym-webshop", splits={"train": [0, 1]})
        try:
            [task] = env.tasks("train")
            assert env.reset(task) == "WebShop [SEP] Search"
            fake.answers["/observation"] = 12345
            with pytest.raises(QlassError, match=f"env server {fake.url}: /observation answer must be a string, got "
                                                 "12345"):
                env.reset(task)
        finally:
            env.close()
