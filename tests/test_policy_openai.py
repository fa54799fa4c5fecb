"""The OpenAI-compatible backend against real servers on 127.0.0.1.

- llama.cpp's server (``llama_cpp.server``, built by ``scripts/setup.sh --test``) serving the default
  model's GGUF: both endpoints, n candidates, token accounting, seeds, stopping, the API key.
- A small scripted HTTP server (the standard library's) for what llama.cpp will not do on demand:
  503/429/400 answers, a slow answer, a closed port, missing usage, fewer choices than asked,
  redirects, echoed keys and malformed replies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from setup_parts import installed

from qlass.errors import QlassError
from qlass.models import default_gguf_path, default_tokenizer_dir
from qlass.policy import OpenAIPolicy, load_policy, openai_http
from qlass.policy.render import encode_conversation
from qlass.seeding import SEED_STRIDE, candidate_seed
from qlass.types import Message

KEY = "sk-test-5f0c1d9e"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
HIST = [Message("user", "You are an agent in a house. Answer with two lines:\nThought: <reasoning>\nAction: <action>"),
        Message("assistant", "OK"),
        Message("user",
                "Your task is to find a plant. This room is called the kitchen. You see a door to the hallway.")]
LONGER = HIST + [Message("assistant", "Thought: Plants grow outside.\nAction: go to hallway"),
                 Message("user", "Observation: You move to the hallway. You see a door to the outside.")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a real llama.cpp server ---------------------------------------------------------------------
@contextlib.contextmanager
def running_llama_server(model: Path, folder: Path, *args: str) -> Iterator[str]:
    """llama.cpp's server on a free loopback port serving ``model`` (extra command-line ``args``), its
    log in ``folder``; yields its base URL once it answers, stops it on exit."""
    port = _free_port()
    log_path = folder / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "2048", "--api_key", KEY, *args]
    # Output to a file, not a pipe: a full pipe would block the server.
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_ready(proc, url, log_path, timeout=120)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    installed("llama_cpp.server")  # built by scripts/setup.sh --test
    with running_llama_server(default_gguf_path(), tmp_path_factory.mktemp("llama"), "--n_threads", "2",
                              "--model_alias", "smol") as url:
        yield url


def _wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"llama.cpp server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            req = urllib.request.Request(url + "/models", headers={"Authorization": f"Bearer {KEY}"})
            with NO_PROXY.open(req, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"llama.cpp server did not answer within {timeout:.0f} s: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)


@pytest.fixture
def key_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("QLASS_TEST_API_KEY", KEY)
    return "QLASS_TEST_API_KEY"


@pytest.mark.slow
def test_completions_endpoint_with_local_template(llama_server: str, key_env: str) -> None:
    policy = load_policy(llama_server, tokenizer=str(default_tokenizer_dir()), api_key_env=key_env)
    assert policy.endpoint == "completions" and policy.model == "smol"  # first model the server lists
    # llama.cpp reuses the KV cache of the previous request's common prefix, and a prompt evaluated
    # partly from that cache can round differently from a fresh one; so both seeded calls below
    # start from the same server state (this one's).
    policy.sample([HIST, LONGER], n=3, temperature=0.9, max_new_tokens=24, seed=1)
    out = policy.sample([HIST, LONGER], n=3, temperature=0.9, max_new_tokens=24, seed=1)
    assert [len(c) for c in out] == [3, 3]
    for history, comps in zip([HIST, LONGER], out):
        n_prompt = len(encode_conversation(policy.tokenizer, history)[0])
        assert all(c.prompt_tokens == n_prompt for c in comps)  # the server read exactly our ids
        assert all(1 <= c.completion_tokens <= 24 for c in comps)
        for c in comps:
            assert "\n" not in c.text.partition("Action:")[2]  # at most one action line
    assert len({c.text for c in out[1]}) > 1  # candidates differ
    again = policy.sample([HIST, LONGER], n=3, temperature=0.9, max_new_tokens=24, seed=1)
    assert again == out  # seeded: reproducible
    greedy = policy.sample([LONGER], n=2, temperature=0.0, max_new_tokens=40)[0]
    assert greedy[0] == greedy[1] == policy.sample([LONGER], n=1, temperature=0.0, max_new_tokens=40)[0][0]


@pytest.mark.slow
def test_chat_endpoint_and_logprobs(llama_server: str, key_env: str) -> None:
    chat = OpenAIPolicy(llama_server, model="smol", api_key_env=key_env)
    assert chat.endpoint == "chat"
    comps = chat.sample([HIST], n=2, temperature=0.7, max_new_tokens=24, seed=3)[0]
    assert len(comps) == 2 and all(c.prompt_tokens > 0 and 1 <= c.completion_tokens <= 24 for c in comps)
    lp = OpenAIPolicy(llama_server, model="smol", api_key_env=key_env, tokenizer=default_tokenizer_dir(), logprobs=True)
    (c,) = lp.sample([HIST], n=1, temperature=0.7, max_new_tokens=16, seed=3)[0]
    assert c.logprob is not None and c.logprob < 0


@pytest.mark.slow
def test_api_key_is_required_and_never_shown(llama_server: str, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("QLASS_WRONG_KEY", KEY + "-wrong")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(QlassError, match="HTTP 401") as err:
        OpenAIPolicy(llama_server, api_key_env="QLASS_WRONG_KEY")
    assert KEY not in str(err.value) and KEY not in caplog.text


# -- a scripted local HTTP server ------------------------------------------------------------------
class Scripted(ThreadingHTTPServer):
    """Answers GETs and POSTs with scripted (status, headers, body, delay) replies, a ``bytes`` body sent
    as is and any other JSON-encoded; records (path, headers, JSON body or ``None``) of what it got."""

    def __init__(self, replies: list[tuple[int, dict[str, str], Any, float]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.replies, self.seen = list(replies), []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: Scripted

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def do_POST(self) -> None:
        self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    def do_GET(self) -> None:
        self._answer(None)

    def _answer(self, body: Any) -> None:
        self.server.seen.append((self.path, dict(self.headers), body))
        status, headers, reply, delay = self.server.replies.pop(0) if self.server.replies else (500, {}, {}, 0)
        time.sleep(delay)
        data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        try:
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", **headers}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (timeout test)
            pass


@pytest.fixture
def scripted() -> Iterator[Any]:
    servers: list[Scripted] = []

    def start(*replies: tuple[int, dict[str, str], Any, float]) -> Scripted:
        server = Scripted(list(replies))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def ok(*texts: str, usage: dict[str, int] | None = None, chat: bool = True) -> tuple[int, dict[str, str], Any, float]:
    """A 200 reply in the chat (``message.content``) or completions (``text``) shape."""
    reply: dict[str, Any] = {"choices": [
        {"index": i, "finish_reason": "stop",
         **({"message": {"role": "assistant", "content": t}} if chat else {"text": t})}
        for i, t in enumerate(texts)]}
    if usage is not None:
        reply["usage"] = usage
    return (200, {}, reply, 0.0)


USAGE = {"prompt_tokens": 50, "completion_tokens": 9}


def test_retries_503_then_succeeds_and_cuts_after_the_action_line(scripted: Any) -> None:
    server = scripted((503, {}, {"error": "busy"}, 0), (503, {}, {"error": "busy"}, 0),
                      ok("Thought: a\nAction: go north\nThought: more", usage=USAGE))
    policy = OpenAIPolicy(server.url, model="m", endpoint="chat", backoff=0.01, max_retries=3)
    (c,) = policy.sample([HIST], n=1, temperature=0.5, max_new_tokens=20, seed=4)[0]
    assert len(server.seen) == 3
    assert (c.text, c.prompt_tokens, c.completion_tokens) == ("Thought: a\nAction: go north", 50, 9)
    path, _, body = server.seen[-1]
    assert path == "/v1/chat/completions" and body["stop"] and body["seed"] == 4 and body["max_tokens"] == 20
    assert body["messages"][-1] == {"role": "user", "content": HIST[-1].content}


def test_429_with_retry_after_and_5xx_until_giving_up(scripted: Any) -> None:
    server = scripted((429, {"Retry-After": "0"}, {}, 0), ok("Thought: t\nAction: wait", usage=USAGE))
    policy = OpenAIPolicy(server.url, model="m", endpoint="chat", backoff=5.0, max_retries=1)
    start = time.monotonic()
    assert policy.sample([HIST], 1, 0.0, 8)[0][0].text == "Thought: t\nAction: wait"
    assert time.monotonic() - start < 2.5  # waited Retry-After (0 s), not the 5 s backoff
    failing = scripted(*[(500, {}, {"error": "boom"}, 0)] * 3)
    with pytest.raises(QlassError, match="giving up after 3 attempts.*HTTP 500"):
        OpenAIPolicy(failing.url, model="m", endpoint="chat", backoff=0.01, max_retries=2).sample([HIST])
    assert len(failing.seen) == 3


def test_client_errors_are_not_retried(scripted: Any) -> None:
    server = scripted((400, {}, {"error": "bad request: max_tokens"}, 0))
    with pytest.raises(QlassError, match="HTTP 400.*max_tokens"):
        OpenAIPolicy(server.url, model="m", endpoint="chat", backoff=0.01).sample([HIST])
    assert len(server.seen) == 1


def test_timeouts_are_retried(scripted: Any) -> None:
    slow = scripted((200, {}, {}, 2.0), ok("Thought: t\nAction: look around", usage=USAGE))
    policy = OpenAIPolicy(slow.url, model="m", endpoint="chat", timeout=0.5, backoff=0.01, max_retries=2)
    assert policy.sample([HIST])[0][0].text == "Thought: t\nAction: look around"
    assert len(slow.seen) == 2


def test_a_refused_connection_fails_fast_naming_the_url() -> None:
    """A dead server is not retried like a 503: the default policy (backoff 1 s, 5 retries) waited >= 15 s."""
    closed = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    for make in (lambda: OpenAIPolicy(closed, model="m", endpoint="chat").sample([HIST]),  # a generation
                 lambda: OpenAIPolicy(closed, endpoint="chat")):  # GET /models, to find the model name
        start = time.monotonic()
        with pytest.raises(QlassError, match="connection refused") as err:
            make()
        assert time.monotonic() - start < 1.0
        assert closed in str(err.value)


def test_fewer_choices_than_n_are_topped_up_with_candidate_seeds(scripted: Any) -> None:
    server = scripted(ok("Thought: 1\nAction: a", usage=USAGE), ok("Thought: 2\nAction: b", usage=USAGE),
                      ok("Thought: 3\nAction: c", usage=USAGE))
    policy = OpenAIPolicy(server.url, model="m", endpoint="chat", backoff=0.01)
    comps = policy.sample([HIST], n=3, temperature=1.0, max_new_tokens=8, seed=10)[0]
    assert [c.text[-1] for c in comps] == ["a", "b", "c"]
    assert [(b["n"], b["seed"]) for _, _, b in server.seen] == [(3, 10), (2, candidate_seed(10, 1)),
                                                               (1, candidate_seed(10, 2))]


def test_tokens_counted_when_usage_is_missing_or_shared(scripted: Any) -> None:
    tok_dir = default_tokenizer_dir()
    texts = ("Thought: short\nAction: go", "Thought: a somewhat longer thought here\nAction: open door")
    server = scripted(ok(*texts, chat=False),
                      ok(*texts, usage={"prompt_tokens": 7, "completion_tokens": 100}, chat=False))
    policy = OpenAIPolicy(server.url, model="m", tokenizer=tok_dir, backoff=0.01)
    counted = [len(policy.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    first = policy.sample([LONGER], n=2, temperature=1.0, max_new_tokens=30)[0]
    assert [c.completion_tokens for c in first] == counted
    assert all(c.prompt_tokens == len(encode_conversation(policy.tokenizer, LONGER)[0]) for c in first)
    assert server.seen[0][2]["prompt"].endswith("<|im_start|>assistant\n")  # rendered here
    second = policy.sample([LONGER], n=2, temperature=1.0, max_new_tokens=30)[0]
    assert sum(c.completion_tokens for c in second) == 100 and second[0].completion_tokens < second[1].completion_tokens
    assert all(c.prompt_tokens == 7 for c in second)


def test_api_key_sent_in_header_only(scripted: Any, key_env: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = scripted((503, {}, {}, 0), ok("Thought: t\nAction: wait", usage=USAGE))
    policy = OpenAIPolicy(server.url, model="m", endpoint="chat", api_key_env=key_env, backoff=0.01)
    policy.sample([HIST])
    assert server.seen[-1][1]["Authorization"] == f"Bearer {KEY}"
    assert KEY not in caplog.text and KEY not in repr(policy) and KEY not in json.dumps(server.seen[-1][2])


def test_bad_replies_and_options_are_clear_errors(scripted: Any) -> None:
    server = scripted((200, {}, {"choices": []}, 0), ok("x", chat=False))
    policy = OpenAIPolicy(server.url, model="m", endpoint="chat", backoff=0.01)
    with pytest.raises(QlassError, match="choices is an empty list"):
        policy.sample([HIST])
    with pytest.raises(QlassError, match=r"choices\[0\]\.message is missing"):
        policy.sample([HIST])
    with pytest.raises(QlassError, match="tokenizer"):
        OpenAIPolicy(server.url, model="m", endpoint="completions")
    with pytest.raises(QlassError, match="no option 'autocast'"):
        load_policy(server.url, model="m", autocast=True)


def test_a_redirect_to_another_origin_does_not_carry_the_key(scripted: Any, key_env: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Bug 18.6: urllib's redirect handler forwarded ``Authorization`` to whatever host a 302 named."""
    caplog.set_level(logging.WARNING)
    elsewhere = scripted((200, {}, {"data": [{"id": "moved"}]}, 0))  # another port: another origin
    api = scripted((302, {"Location": elsewhere.url + "/models"}, {}, 0))
    policy = OpenAIPolicy(api.url, endpoint="chat", api_key_env=key_env)  # GET /models follows the 302
    assert policy.model == "moved"
    assert api.seen[0][1]["Authorization"] == f"Bearer {KEY}"
    ((path, headers, _),) = elsewhere.seen
    assert path == "/v1/models" and "authorization" not in {k.lower() for k in headers} and KEY not in str(headers)
    origins = [s.url.removesuffix("/v1") for s in (api, elsewhere)]
    assert all(o in caplog.text for o in origins) and "without the API key" in caplog.text
    same = scripted((307, {"Location": "/v1/models-here"}, {}, 0), (200, {}, {"data": [{"id": "here"}]}, 0))
    assert OpenAIPolicy(same.url, endpoint="chat", api_key_env=key_env).model == "here"
    assert [(p, h["Authorization"]) for p, h, _ in same.seen] == [("/v1/models", f"Bearer {KEY}"),
                                                               ("/v1/models-here", f"Bearer {KEY}")]


def test_an_echoed_key_is_redacted_in_errors_and_logs(scripted: Any, key_env: str, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Bug 18.6: a server (or proxy) echoing the request headers put the key into errors and retry warnings."""
    caplog.set_level(logging.DEBUG)
    echo = f"you sent Authorization: Bearer {KEY}"
    server = scripted((503, {}, {"error": echo}, 0), (401, {}, {"error": echo}, 0),
                      (200, {"Content-Type": "text/html"}, f"<html>{echo}</html>".encode(), 0))
    policy = OpenAIPolicy(server.url, model="m", endpoint="chat", api_key_env=key_env, backoff=0.01)
    with pytest.raises(QlassError, match="HTTP 401") as denied:
        policy.sample([HIST])  # a 503 (retried, logged), then a 401
    with pytest.raises(QlassError, match="not JSON") as garbled:
        policy.sample([HIST])
    for err in (denied, garbled):
        assert KEY not in str(err.value) and "Bearer ***" in str(err.value)
    assert "HTTP 503" in caplog.text and "Bearer ***" in caplog.text and KEY not in caplog.text
    monkeypatch.setenv("QLASS_BAD_KEY", "sk-abc\nX-Injected: 1")  # http.client's own error quoted the header
    with pytest.raises(QlassError, match="QLASS_BAD_KEY") as bad:
        OpenAIPolicy(server.url, model="m", endpoint="chat", api_key_env="QLASS_BAD_KEY").sample([HIST])
    assert "sk-abc" not in str(bad.value)


def _chat(**choice: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "finish_reason": "stop", **choice}], "usage": USAGE}


GOOD = {"role": "assistant", "content": "Thought: t\nAction: wait"}


@pytest.mark.parametrize(("endpoint", "reply", "field"), [
    ("chat", {"usage": USAGE}, "choices is missing"),
    ("chat", {"choices": ["Thought: t"]}, r"choices\[0\] is a string"),
    ("chat", _chat(message="Thought: t"), r"choices\[0\]\.message is a string"),
    ("chat", _chat(message={"role": "assistant", "content": 5}), r"choices\[0\]\.message\.content is a number"),
    ("chat", _chat(message={"role": "assistant", "content": ["Thought: t"]}),
     r"choices\[0\]\.message\.content is a list"),
    ("completions", _chat(text=5), r"choices\[0\]\.text is a number"),
    ("chat", {**_chat(message=GOOD), "usage": [50, 9]}, "usage is a list"),
    ("chat", {**_chat(message=GOOD), "usage": {"prompt_tokens": "ten", "completion_tokens": 9}},
     r"usage\.prompt_tokens is a string"),
    ("chat", {**_chat(message=GOOD), "usage": {"prompt_tokens": 50, "completion_tokens": 9.5}},
     r"usage\.completion_tokens is a number, expected a non-negative integer"),
    ("chat", _chat(message=GOOD, logprobs=[-0.5]), r"choices\[0\]\.logprobs is a list"),
    ("chat", _chat(message=GOOD, logprobs={"content": [{"token": "T", "logprob": "low"}]}),
     r"choices\[0\]\.logprobs\.content\[0\]\.logprob is a string"),
    ("completions", _chat(text="Thought: t\nAction: wait", logprobs={"token_logprobs": [-0.5, "x"]}),
     r"choices\[0\]\.logprobs\.token_logprobs\[1\] is a string"),
    # a NaN, +inf or positive log-probability went into records.jsonl, which every reader then refused
    ("chat", _chat(message=GOOD, logprobs={"content": [{"token": "T", "logprob": float("nan")}]}),
     r"choices\[0\]\.logprobs\.content\[0\]\.logprob is nan, expected a log-probability \(a number <= 0\)"),
    ("chat", _chat(message=GOOD, logprobs={"content": [{"token": "T", "logprob": 7.5}]}),
     r"choices\[0\]\.logprobs\.content\[0\]\.logprob is 7.5, expected a log-probability"),
    ("completions", _chat(text="Thought: t\nAction: wait", logprobs={"token_logprobs": [-0.5, float("inf")]}),
     r"choices\[0\]\.logprobs\.token_logprobs\[1\] is inf, expected a log-probability"),
    # a lone surrogate (JSON-legal "\ud83d") crashed the records writer with UnicodeEncodeError
    ("chat", _chat(message={"role": "assistant", "content": "Thought: \ud83d\nAction: wait"}),
     r"choices\[0\]\.message\.content is not valid Unicode"),
    ("chat", {**_chat(message=GOOD), "usage": {"prompt_tokens": 10**30, "completion_tokens": 9}},
     r"usage\.prompt_tokens is 1000000000000000000000000000000, more tokens than any request could hold"),
    # an integer beyond a float's range: OverflowError's traceback
    ("chat", _chat(message=GOOD, logprobs={"content": [{"token": "T", "logprob": -10**400}]}),
     r"choices\[0\]\.logprobs\.content\[0\]\.logprob is an integer of 402 digits, expected a log-probability"),
    ("chat", {"choices": [{**_chat(message=GOOD)["choices"][0], "index": 0}] * 2, "usage": USAGE},
     r"choices give an index twice \(\[0, 0\]\)"),
])
def test_malformed_replies_name_the_url_and_the_field(scripted: Any, endpoint: str, reply: dict[str, Any],
                                                      field: str) -> None:
    """Bug 18.6: mistyped fields crashed with TypeError, AttributeError or ValueError, or passed silently."""
    server = scripted((200, {}, reply, 0))
    tokenizer = default_tokenizer_dir() if endpoint == "completions" else None
    policy = OpenAIPolicy(server.url, model="m", endpoint=endpoint, tokenizer=tokenizer, backoff=0.01)
    with pytest.raises(QlassError, match=f"malformed response: {field}") as err:
        policy.sample([HIST])
    assert str(err.value).startswith(f"{server.url}/{'chat/' if endpoint == 'chat' else ''}completions: ")
    assert len(server.seen) == 1  # a broken reply is not retried


def test_max_length_drops_oldest_turns_before_sending(scripted: Any) -> None:
    turns = [Message("assistant", f"Thought: t{i}\nAction: a{i}") if i % 2 == 0
             else Message("user", f"Observation: o{i}") for i in range(40)]
    server = scripted(ok("Thought: t\nAction: wait", usage=USAGE, chat=False))
    policy = OpenAIPolicy(server.url, model="m", tokenizer=default_tokenizer_dir(), max_length=200, backoff=0.01)
    policy.sample([HIST + turns], 1, 0.0, 50)
    prompt = server.seen[0][2]["prompt"]
    assert len(policy.tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= 150
    assert HIST[0].content in prompt and HIST[-1].content in prompt  # instruction and task kept
    assert "Observation: o39" in prompt and "Observation: o1<" not in prompt  # newest kept, oldest dropped
    with pytest.raises(QlassError, match="max_new_tokens \\(200\\) leaves no room for a prompt in max_length 200"):
        policy.sample([HIST], 1, 0.0, 200)  # as the local backend says it (before: sent with every turn dropped)
    assert len(server.seen) == 1


@pytest.mark.slow
def test_pipeline_samples_through_a_policy_server(llama_server: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """``policy_server`` in a ``qlass run`` config: exploration and evaluation sample from the server
    (here llama.cpp serving the default model) with prompts rendered by the SFT folder's tokenizer."""
    import os

    import yaml

    from qlass.tree import read_trees

    tests = Path(__file__).parent
    run_dir = tmp_path / "run"
    config = {
        "run_dir": str(run_dir), "model": str(tiny_model_dir), "env": "toy_envs:Corridor",
        "env_args": {"step_limit": 3},
        "policy_server": llama_server, "policy": {"model": "smol", "api_key_env": "QLASS_TEST_API_KEY"},
        "expert": {"per_task": 2},
        "sft": {"epochs": 1, "batch_size": 2, "micro_batch": 2, "val_fraction": 0.0},
        "explore": {"limit": 1, "skip": 2, "max_new_tokens": 16, "max_depth": 1, "max_nodes": 8},
        "qnet": {"epochs": 1, "batch_size": 2, "val_fraction": 0.0, "max_length": 512, "max_action_tokens": 32,
                 "baseline": False},
        "eval": {"limit": 1, "max_steps": 2, "methods": ["greedy:max_new_tokens=16", "qlass:m=2,max_new_tokens=16"]},
    }
    path = tmp_path / "pipeline.yaml"
    env = {**os.environ, "PYTHONPATH": f"{tests}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "QLASS_TEST_API_KEY": KEY}
    path.write_text(yaml.safe_dump(config))  # the paper's workflow: SFT, then start a server on the checkpoint
    done = subprocess.run([sys.executable, "-m", "qlass", "run", str(path), "--stop-after", "sft"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "stopped after stage sft" in done.stdout, done.stderr[-3000:]
    assert (run_dir / "sft" / "model.safetensors").exists() and not (run_dir / "trees.jsonl").exists()
    closed = f"http://127.0.0.1:{_free_port()}/v1"  # a server that is not there: exploration must fail
    path.write_text(yaml.safe_dump({**config, "policy_server": closed,
                                    "policy": {**config["policy"], "max_retries": 0}}))
    done = subprocess.run([sys.executable, "-m", "qlass", "run", str(path)], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and closed.removesuffix("/v1") in done.stderr, done.stderr[-3000:]
    assert not (run_dir / "trees.jsonl").exists() or not (run_dir / "trees.jsonl").read_text()
    path.write_text(yaml.safe_dump(config))  # then the real one (the finished SFT stage is kept)
    done = subprocess.run([sys.executable, "-m", "qlass", "run", str(path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (tree,) = read_trees(run_dir / "trees.jsonl")
    sampled = [n for n in tree.nodes if n.source == "sample"]
    assert sampled and all(n.prompt_tokens > 0 for n in sampled)
    records = [json.loads(line) for line in (run_dir / "eval" / "records.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == {"greedy", "qlass(m=2)"}
    assert all(r["prompt_tokens"] > 0 for r in records)


def test_choices_cut_by_the_token_limit_are_flagged_truncated(scripted: Any) -> None:
    """Bug B3: a choice the server cut at max_tokens inside its action line came back as complete."""
    def choice(text: str, finish: str) -> dict[str, Any]:
        return {"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": text}}

    replies = [(200, {}, {"choices": [c], "usage": USAGE}, 0.0) for c in (
        choice("Thought: a\nAction: go nor", "length"),                # cut inside the action
        choice("Thought: a\nAction: go north\nThought: b", "length"),  # cut after a complete action line
        choice("Thought: a\nAction: go north", "stop"))]               # stopped by a stop sequence
    server = scripted(*replies)
    policy = OpenAIPolicy(server.url, model="m", endpoint="chat", backoff=0.01)
    got = [policy.sample([HIST], 1, 0.0, 9)[0][0] for _ in replies]
    assert [(c.text, c.truncated) for c in got] == [("Thought: a\nAction: go nor", True),
                                                    ("Thought: a\nAction: go north", False),
                                                    ("Thought: a\nAction: go north", False)]


def test_top_p_min_p_and_per_history_seeds_are_sent(scripted: Any) -> None:
    server = scripted(*[ok("Thought: t\nAction: wait", usage=USAGE) for _ in range(6)])
    plain = OpenAIPolicy(server.url, model="m", endpoint="chat", backoff=0.01)
    plain.sample([HIST], 1, 0.7, 8, seed=1)
    assert "top_p" not in server.seen[-1][2] and "min_p" not in server.seen[-1][2]
    filtered = load_policy(server.url, model="m", endpoint="chat", backoff=0.01, top_p=0.9, min_p=0.05)
    filtered.sample([HIST], 1, 0.7, 8, seed=1)
    assert (server.seen[-1][2]["top_p"], server.seen[-1][2]["min_p"]) == (0.9, 0.05)
    filtered.sample([HIST, LONGER], 1, 0.7, 8, seed=[77, 5])  # one base seed per history
    assert sorted(b["seed"] for _, _, b in server.seen[-2:]) == [5, 77]
    filtered.sample([HIST, LONGER], 1, 0.7, 8, seed=3)  # one int: history i gets 3 + i * SEED_STRIDE
    assert sorted(b["seed"] for _, _, b in server.seen[-2:]) == [3, 3 + SEED_STRIDE]
    with pytest.raises(QlassError, match="top_p must be in"):
        OpenAIPolicy(server.url, model="m", endpoint="chat", top_p=1.5)
    with pytest.raises(QlassError, match="cannot score"):
        plain.score_outputs([HIST], ["Thought: t\nAction: wait"])


@pytest.mark.slow
def test_tiny_top_p_on_a_real_server_samples_the_greedy_output(llama_server: str, key_env: str) -> None:
    greedy = OpenAIPolicy(llama_server, tokenizer=default_tokenizer_dir(), api_key_env=key_env)
    nucleus = OpenAIPolicy(llama_server, tokenizer=default_tokenizer_dir(), api_key_env=key_env, top_p=1e-6)
    (want,) = greedy.sample([LONGER], 1, 0.0, 24)[0]
    assert [c.text for c in nucleus.sample([LONGER], 2, 1.0, 24, seed=5)[0]] == [want.text] * 2


@pytest.mark.parametrize("reply,message", [
    ({"error": {"message": "maximum context length is 2048 tokens", "code": 400}},
     "the server answered an error: maximum context length is 2048 tokens"),  # was "choices is missing"
    (b"[" * 100_000 + b"]" * 100_000, r"response is not usable JSON \(nested too deeply\)"),  # a RecursionError
    (b'{"choices": "\xff"}', r"response is not UTF-8 text \(byte 13"),
])
def test_odd_answers_are_one_line_naming_the_url(scripted: Any, reply: Any, message: str) -> None:
    server = scripted((200, {}, reply, 0))
    with pytest.raises(QlassError, match=message) as err:
        OpenAIPolicy(server.url, model="m", endpoint="chat", backoff=0.01).sample([HIST])
    assert str(err.value).startswith(f"{server.url}/chat/completions: ")


@pytest.mark.parametrize("option,value,message", [
    ("timeout", -1, "timeout must be > 0, got -1"), ("timeout", 0, "timeout must be > 0, got 0"),
    ("max_retries", -1, "max_retries must be >= 0, got -1"), ("backoff", -1.0, "backoff must be >= 0"),
    ("max_backoff", -5.0, "max_backoff must be >= 0"),
])
def test_retry_options_out_of_range_are_refused(scripted: Any, option: str, value: float, message: str) -> None:
    """They were tracebacks (socket ValueError, UnboundLocalError, negative sleep) or, for timeout=0, a
    non-blocking socket retried for 30 s."""
    with pytest.raises(QlassError, match=f"policy option {message}"):
        load_policy(scripted().url, model="m", endpoint="chat", **{option: value})


def test_an_odd_retry_after_falls_back_to_the_backoff(scripted: Any) -> None:
    """``Retry-After: ²`` passed ``str.isdigit`` and crashed in ``float()``."""
    server = scripted((429, {"Retry-After": "\u00b2"}, {}, 0), ok("Thought: t\nAction: wait", usage=USAGE))
    policy = OpenAIPolicy(server.url, model="m", endpoint="chat", backoff=0.01, max_retries=1)
    assert policy.sample([HIST])[0][0].text == "Thought: t\nAction: wait" and len(server.seen) == 2


def test_null_content_is_played_empty_with_one_warning(scripted: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    null = (200, {}, _chat(message={"role": "assistant", "content": None}), 0.0)
    server = scripted(null, null)
    policy = OpenAIPolicy(server.url, model="m", endpoint="chat", backoff=0.01)
    assert [policy.sample([HIST])[0][0].text for _ in range(2)] == ["", ""]
    assert caplog.text.count("choices[0].message.content is null") == 1


class _Trickle(BaseHTTPRequestHandler):
    """Sends its headers at once, then the body one byte every 0.2 s."""

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps(_chat(message=GOOD)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            for i in range(len(body)):
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                time.sleep(0.2)


def test_timeout_bounds_an_answer_that_trickles_in() -> None:
    """The timeout was per socket read: each byte restarted it, so a trickling server held the request (here
    for about 40 s); now the whole answer must arrive within it, and the request is retried as a timeout."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        policy = OpenAIPolicy(f"http://127.0.0.1:{server.server_address[1]}/v1", model="m", endpoint="chat",
                              timeout=1.0, max_retries=1, backoff=0.01)
        start = time.monotonic()
        with pytest.raises(QlassError, match=r"giving up after 2 attempts; last error TimeoutError: .*did not arrive "
                                             r"within 1 s"):
            policy.sample([HIST])
        assert time.monotonic() - start < 10
    finally:
        server.shutdown()
        server.server_close()


def test_the_openai_backend_loads_without_torch() -> None:
    """The server backend renders prompts with a tokenizer only: importing it does not import torch
    (it did through qlass.policy.hf's history helpers: 2.3 s of imports before the first request)."""
    done = subprocess.run([sys.executable, "-c", "import sys, qlass.policy.openai; print('torch' in sys.modules)"],
                          capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "False", done.stdout + done.stderr


def test_token_log_probabilities_rounded_just_above_zero_count_as_zero(scripted: Any) -> None:
    """A server may round a near-certain token's log-probability to a tiny positive number; it is taken
    (within LOGPROB_SLACK) as 0, so the sum stays a log-probability (it was 1.5e-4 for three such tokens,
    which every decision reader then refused)."""
    tokens = [{"token": "T", "logprob": 5e-5}] * 3 + [{"token": "U", "logprob": -0.25}]
    server = scripted((200, {}, _chat(message=GOOD, logprobs={"content": tokens}), 0))
    policy = OpenAIPolicy(server.url, model="m", endpoint="chat", logprobs=True, backoff=0.01)
    [[completion]] = policy.sample([HIST])
    assert completion.logprob == -0.25


def test_answers_are_read_by_index_counted_whole_and_errors_shown(scripted: Any) -> None:
    """Choices sent out of order were taken in arrival order (candidate k was another choice for the same
    seed); llama.cpp's server leaves the stop string's tokens out of the log-probabilities but counts them
    in usage, and those were left out of completion_tokens; an error beside "choices": null lost its message."""
    said = [{"role": "assistant", "content": f"Thought: {i}\nAction: a{i}"} for i in range(3)]
    reordered = {"choices": [{"index": i, "finish_reason": "stop", "message": said[i]} for i in (2, 0, 1)],
                 "usage": {"prompt_tokens": 5, "completion_tokens": 30}}
    tokens = [{"token": "T", "logprob": -0.5}] * 9
    trimmed = _chat(message=GOOD, logprobs={"content": tokens})
    trimmed["usage"] = {"prompt_tokens": 50, "completion_tokens": 12}
    server = scripted((200, {}, reordered, 0), (200, {}, trimmed, 0),
                      (200, {}, {"choices": None, "error": {"message": "model overloaded"}}, 0))
    policy = OpenAIPolicy(server.url, model="m", endpoint="chat", logprobs=True, backoff=0.01)
    assert [c.text[-2:] for c in policy.sample([HIST], n=3, temperature=1.0)[0]] == ["a0", "a1", "a2"]
    [[c]] = policy.sample([HIST])
    assert (c.completion_tokens, c.logprob_tokens, c.logprob) == (12, 9, -4.5)
    with pytest.raises(QlassError, match="the server answered an error: model overloaded"):
        policy.sample([HIST])


def test_an_oversized_answer_is_refused(scripted: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole answer was read into memory however large (400 MB of output, counted as 8 tokens, was
    played); one over the limit is refused, not retried."""
    monkeypatch.setattr(openai_http, "MAX_ANSWER_BYTES", 200_000)
    server = scripted(ok("Thought: " + "x" * 300_000 + "\nAction: wait", usage=USAGE))
    with pytest.raises(QlassError, match="the answer is larger than 0 MiB"):
        OpenAIPolicy(server.url, model="m", endpoint="chat", backoff=0.01).sample([HIST])
    assert len(server.seen) == 1


def test_307_and_308_redirects_resend_the_post(scripted: Any) -> None:
    """urllib refused to follow a 307 or 308 answer to a POST ("HTTP 308"), where curl and requests send
    the request again to the new address (a proxy moving http to https answers 308)."""
    for code in (307, 308):
        server = scripted((code, {"Location": "/v2/chat/completions"}, {}, 0),
                          ok("Thought: t\nAction: go", usage=USAGE))
        policy = OpenAIPolicy(server.url, model="m", endpoint="chat", backoff=0.01)
        assert policy.sample([HIST], max_new_tokens=7)[0][0].text == "Thought: t\nAction: go"
        (first, _, sent), (second, _, resent) = server.seen
        assert (first, second) == ("/v1/chat/completions", "/v2/chat/completions") and resent == sent


def test_a_failed_history_stops_the_others_retries(scripted: Any) -> None:
    """One history's error (or Ctrl-C) was raised only after every other history's request had gone
    through all its retries (the thread pool waited for them): minutes with the default retry policy."""
    server = scripted((400, {}, {"error": "bad request"}, 0.2), *[(503, {}, {"error": "busy"}, 0)] * 8)
    policy = OpenAIPolicy(server.url, model="m", endpoint="chat", backoff=3.0, max_retries=5, concurrency=2)
    start = time.monotonic()
    with pytest.raises(QlassError, match="HTTP 400"):
        policy.sample([HIST, LONGER])
    assert time.monotonic() - start < 3.0  # before, it waited through 5 retries: 1.5 s + 3 s + 6 s and more
    time.sleep(2.0)
    assert len(server.seen) == 2  # the other history's request was not tried again
