"""``qlass serve ENV --protocol agentgym`` against clients that make exactly the requests and read exactly
the answer fields of AgentGym's own clients (``agentenv.envs.sciworld/alfworld/webshop``: create,
reset, step, close, and WebShop's ``GET /observation``), on real ``qlass serve`` processes bound to
127.0.0.1 with the real environments; plus :class:`~qlass.envs.http.HttpEnv`'s AgentGym dialects
against the same servers (task names kept from the reset answer, ``--task-types``)."""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from itertools import product as combinations
from pathlib import Path
from typing import Any

import pytest
from setup_parts import installed, shared_data

installed("fastapi")  # the serve extra
installed("uvicorn")

from qlass.envs.http import HttpEnv
from qlass.errors import QlassError

WEBSHOP_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "webshop"
pytestmark = pytest.mark.slow


# -- the AgentGym-shaped clients -----------------------------------------------------------------
class AgentGymClient:
    """The HTTP side of AgentGym's ``BaseEnvClient`` subclasses: JSON POSTs with the instance id added
    to the body under ``id_key``, GETs with it in the query, and every answer required to be HTTP 200."""

    def __init__(self, url: str, id_key: str = "id") -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port, self.id_key = host, int(port), id_key
        self.env_id: Any = None

    def request(self, method: str, path: str, body: dict[str, Any] | bytes | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            raw = body if isinstance(body, bytes) or body is None else json.dumps(body)
            conn.request(method, path, body=raw,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def post(self, path: str, data: dict[str, Any]) -> Any:
        data[self.id_key] = self.env_id
        status, answer = self.request("POST", f"/{path}", data)
        assert status == 200, (path, status, answer)
        return answer

    def get(self, path: str) -> Any:
        status, answer = self.request("GET", f"/{path}?{self.id_key}={self.env_id}")
        assert status == 200, (path, status, answer)
        return answer


class SciWorldClient(AgentGymClient):
    """``SciworldEnvClient``: ``create()["id"]``; reset reads ``task_description`` and ``observation``;
    step reads ``observation``, ``reward``, ``score`` and ``done`` (its reward is the score)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        status, created = self.request("POST", "/create")
        assert status == 200
        self.env_id = created["id"]

    def reset(self, data_idx: int) -> dict[str, Any]:
        response = self.post("reset", {"data_idx": data_idx})
        self.info = {"observation": response["task_description"] + "\n" + response["observation"],
                     "reward": 0, "score": 0, "done": False}
        return response

    def step(self, action: str) -> tuple[str, float, bool]:
        response = self.post("step", {"action": action})
        self.info = {k: response[k] for k in ("observation", "reward", "score", "done")}
        return response["observation"], response["score"], response["done"]

    def close(self) -> Any:
        return self.post("close", {})


class AlfWorldClient(AgentGymClient):
    """``AlfWorldEnvClient``: reset with ``game`` and ``world_type`` reads ``observation`` and
    ``available_actions``; step reads those, ``reward`` and ``done``."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        status, created = self.request("POST", "/create")
        assert status == 200
        self.env_id = created["id"]

    def reset(self, game: int, world_type: str = "Text") -> dict[str, Any]:
        response = self.post("reset", {"game": game, "world_type": world_type})
        self.info = {"observation": response["observation"], "available_actions": response["available_actions"],
                     "reward": 0, "done": False}
        return response

    def step(self, action: str) -> tuple[str, float, bool]:
        response = self.post("step", {"action": action})
        self.info = {k: response[k] for k in ("observation", "available_actions", "reward", "done")}
        return response["observation"], response["reward"], response["done"]


class WebShopClient(AgentGymClient):
    """``WebshopEnvClient``: the id is ``create``'s bare answer, sent as ``env_idx``; reset sends
    ``session_id`` and replaces the answer's first item by ``GET /observation``; step reads ``state``,
    ``reward`` and ``done``."""

    def __init__(self, url: str) -> None:
        super().__init__(url, id_key="env_idx")
        status, created = self.request("POST", "/create")
        assert status == 200
        self.env_id = created

    def reset(self, idx: int) -> list[Any]:
        response = self.post("reset", {"session_id": idx})
        response[0] = self.get("observation")
        return response

    def step(self, action: str) -> tuple[str, float, bool]:
        response = self.post("step", {"action": action})
        return response["state"], response["reward"], response["done"]


# -- servers -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], seconds: float = 180) -> tuple[subprocess.Popen, str]:
    """``qlass serve ARGS --protocol agentgym`` on a free loopback port, once it answers ``GET /``."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "qlass", "serve", *args, "--protocol", "agentgym", "--port",
                             str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"qlass serve exited early: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if AgentGymClient(url).request("GET", "/")[0] == 200:
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise AssertionError(f"qlass serve did not answer on {url} within {seconds} s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


# -- ScienceWorld --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sciworld_server():
    installed("scienceworld")  # the sciworld extra
    proc, url = _start(["sciworld"])
    yield url
    _stop(proc)


@pytest.fixture(scope="module")
def sciworld_local():
    """The in-process env with AgentGym's variant (no simplification) and a generous step limit."""
    from qlass.envs.sciworld import ScienceWorldEnv

    env = ScienceWorldEnv(step_limit=100, simplification="")
    yield env
    env.close()


def _agentgym_sciworld_games(env: Any) -> list[tuple[str, int]]:
    """AgentGym's ``data_idx`` list, written from its server's rule: ScienceWorld's tasks in their own
    order without 5-1, 5-2, 9-1..9-3, 10-1, 10-2, each task's variations 0..max-1."""
    from scienceworld.constants import ID2TASK

    skipped = {"5-1", "5-2", "9-1", "9-2", "9-3", "10-1", "10-2"}
    return [(name, v) for tid, name in ID2TASK.items() if tid not in skipped
            for v in range(env._sim.getTaskMaxVariations(name))]


@pytest.mark.sciworld
def test_sciworld_agentgym_client_plays_an_episode(sciworld_server: str, sciworld_local: Any) -> None:
    games = _agentgym_sciworld_games(sciworld_local)
    client = SciWorldClient(sciworld_server)
    try:
        for data_idx in (0, 1, len(games) // 2, len(games) - 1):  # the index maps as AgentGym's server maps it
            answer = client.reset(data_idx)
            assert (answer["task_name"], answer["var_num"]) == games[data_idx]
        data_idx = games.index(("find-plant", 3))
        answer = client.reset(data_idx)
        task = sciworld_local.task("sciworld/find-plant/3")
        assert client.info["observation"] == sciworld_local.reset(task)  # description, then the room
        assert answer["task_description"].startswith("Your task is to find a(n) plant")
        assert "(that is closed)" in answer["observation"]  # no 'easy' simplification: doors start closed
        assert (answer["score"], answer["reward"], answer["done"]) == (0, 0, False)
        gold = [o.split("Action: ", 1)[1] for o in sciworld_local.expert(task)]
        sciworld_local.reset(task)
        scores = []
        for action in gold:
            observation, score, done = client.step(action)
            local = sciworld_local.step(f"Action: {action}")
            assert observation == local.observation and score == local.info["score"]
            assert client.info["reward"] == score - (scores[-1] if scores else 0)  # reward: the change in score
            scores.append(score)
        assert done and scores[-1] == 100 and any(0 < s < 100 for s in scores)
        # a finished task is refused as AgentGym's server refuses it: HTTP 200 with an error field
        status, answer = client.request("POST", "/step", {"id": client.env_id, "action": "look around"})
        assert status == 200 and answer == {"error": f"The task with environment {client.env_id} has finished."}
        status, answer = client.request("GET", f"/observation?id={client.env_id}")
        assert status == 200 and "has finished" in answer["error"]
    finally:
        assert client.close() is True


@pytest.mark.sciworld
def test_sciworld_step_limit_failure_and_errors_as_agentgym_sends_them(sciworld_server: str,
                                                                       sciworld_local: Any) -> None:
    games = _agentgym_sciworld_games(sciworld_local)
    client = SciWorldClient(sciworld_server)
    try:
        client.reset(games.index(("find-plant", 3)))
        done_at = next(n for n in range(1, 102) if client.step("look around")[2])
        assert done_at == 100  # AgentGym's limit of 100 steps, not qlass's default 30
        client.reset(games.index(("find-plant", 3)))
        _, score, done = client.step("focus on agent")  # focusing on a wrong object fails the task
        assert (score, client.info["reward"], done) == (-100, -100, True)
        for body, want in [({"id": client.env_id, "data_idx": len(games)}, f"data_idx {len(games)} out of range"),
                           ({"id": 999, "data_idx": 0}, "unknown environment id 999")]:
            status, answer = client.request("POST", "/reset", body)
            assert status == 200 and want in answer["error"], (body, status, answer)
        status, answer = client.request("POST", "/step", {"id": client.env_id})  # FastAPI's own answer, as AgentGym's
        assert status == 422 and answer["detail"][0]["loc"] == ["body", "action"]
    finally:
        client.close()
    status, answer = client.request("POST", "/close", {"id": client.env_id})
    assert status == 200 and "unknown environment id" in answer["error"]


@pytest.mark.sciworld
def test_http_env_agentgym_sciworld_dialect_keeps_task_names(sciworld_server: str, sciworld_local: Any) -> None:
    games = _agentgym_sciworld_games(sciworld_local)
    first = games.index(("find-plant", 0))
    env = HttpEnv(sciworld_server, dialect="agentgym-sciworld", splits={"seen": [first - 2, first + 2]},
                  prompt="sciworld", step_limit=5)
    try:
        plants = env.tasks("seen", ["find-plant"])  # --task-types: learned from the reset answers
        assert [t.meta for t in plants] == [{"index": first + i, "task_name": "find-plant", "variation": i}
                                            for i in (0, 1)]
        assert all(t.task_type == "find-plant" for t in plants)
        with pytest.raises(QlassError, match="no task of type.*boil.*its types: find-non-living-thing, find-plant"):
            env.tasks("seen", ["boil"])
        task = env.tasks("seen")[0]
        assert task.meta == {"index": first - 2}
        assert env.reset(task).startswith("Your task is to find a(n) non-living thing")
        assert task.meta == {"index": first - 2, "task_name": "find-non-living-thing", "variation": games[first - 2][1]}
        result = env.step("Thought: ok.\nAction: look around")
        assert "This room is called" in result.observation and result.reward == 0.0 and not result.done
    finally:
        env.close()


# -- ALFWorld ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def alfworld_local():
    installed("textworld")  # the alfworld extra
    from qlass.envs.alfworld import AlfWorldEnv
    from qlass.envs.alfworld_data import shared_tarballs

    shared_data(bool(shared_tarballs() or os.environ.get("ALFWORLD_DATA")), "the ALFWorld tarballs")
    env = AlfWorldEnv(step_limit=50)
    yield env
    env.close()


def _mapping(games: list[tuple[str, str]], first: int) -> list[dict[str, Any]]:
    return [{"item_id": first + i, "task_type": folder, "task_id": trial} for i, (folder, trial) in enumerate(games)]


def test_alfworld_agentgym_client_plays_a_game(alfworld_local: Any, tmp_path: Path) -> None:
    train = [(t.meta["task_folder"], t.meta["trial"]) for t in alfworld_local.tasks("train")[:2]]
    test_game = alfworld_local.tasks("valid_train", ["pick_heat_then_place_in_recep"])[0]
    (tmp_path / "mappings_train.json").write_text(json.dumps(_mapping(train, 0)))
    (tmp_path / "mappings_test.json").write_text(
        json.dumps(_mapping([(test_game.meta["task_folder"], test_game.meta["trial"])], 2)))
    proc, url = _start(["alfworld", "--agentgym-games", str(tmp_path)])
    try:
        client = AlfWorldClient(url)
        answer = client.reset(0)
        assert answer["task_type"] == "/".join(train[0])
        answer = client.reset(2)  # AgentGym's test games come after its train games, from valid_train
        assert answer["task_type"] == f"{test_game.meta['task_folder']}/{test_game.meta['trial']}"
        assert answer["observation"] == alfworld_local.reset(test_game)
        assert answer["observation"].startswith("You are in the middle of a room")
        walkthrough = alfworld_local.walkthrough(test_game)
        for n, action in enumerate(walkthrough):
            assert action in client.info["available_actions"]
            assert client.info["available_actions"] == sorted(client.info["available_actions"])
            observation, reward, done = client.step(action)
            assert observation == alfworld_local.step(f"Action: {action}").observation
            assert (reward, done) == ((1.0, True) if n == len(walkthrough) - 1 else (0.0, False))
        status, answer = client.request("POST", "/step", {"id": client.env_id, "action": "look"})
        assert status == 200 and answer == {"error": f"The task with environment {client.env_id} has finished."}
        client.reset(1)
        done_at = next(n for n in range(1, 52) if client.step("look")[2])
        assert done_at == 50  # AgentGym's ALFWorld ends an episode after 50 steps
        status, answer = client.request("POST", "/reset", {"id": client.env_id, "game": 0, "world_type": "Nope"})
        assert status == 200 and "world_type must be one of" in answer["error"]
        actions = client.post("reset", {"game": 0, "world_type": "Text"})["available_actions"]
        assert client.get("available_actions") == actions and "look" in actions

        env = HttpEnv(url, dialect="agentgym-alfworld", splits={"test": [0, 3]}, prompt="alfworld")
        try:
            heat = env.tasks("test", ["pick_heat_then_place_in_recep"])
            assert [t.meta for t in heat] == [{"index": 2, "task_folder": test_game.meta["task_folder"],
                                               "trial": test_game.meta["trial"]}]
            assert env.reset(heat[0]) == alfworld_local.reset(test_game)
        finally:
            env.close()
    finally:
        _stop(proc)
    proc = subprocess.run([sys.executable, "-m", "qlass", "serve", "alfworld", "--protocol", "agentgym", "--port",
                           str(_free_port())], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0 and "--agentgym-games DIR" in proc.stderr and "Traceback" not in proc.stderr
    assert "serving" not in proc.stderr  # refused before it says it is serving


# -- WebShop -------------------------------------------------------------------------------------
def _webshop_goal_order(shop: Any) -> list[tuple[str, tuple]]:
    """WebShop's goal list, written from its code's rule: products in catalog order, each one's
    option combinations (option names sorted), then ``random.seed(233); random.shuffle(goals)``."""
    goals = []
    for product in shop.products:
        if product.asin in shop.instructions:
            names = sorted(product.options)
            goals += [(product.asin, tuple(zip(names, c))) for c in combinations(*(product.options[n] for n in names))]
    random.seed(233)
    random.shuffle(goals)
    return goals


def test_webshop_agentgym_client_buys_the_goal() -> None:
    shared_data((WEBSHOP_DATA / "products_1k.jsonl.xz").is_file(), f"the WebShop catalog ({WEBSHOP_DATA})")
    installed("bm25s")  # the webshop extra
    from qlass.envs.webshop import WebShopEnv

    local = WebShopEnv(data_dir=WEBSHOP_DATA)
    order = _webshop_goal_order(local.shop)
    proc, url = _start(["webshop", "--env-arg", f"data_dir={WEBSHOP_DATA}"])
    try:
        client = WebShopClient(url)
        assert isinstance(client.env_id, int)
        by_key = {(g.asin, tuple(g.options.items())): i for i, g in enumerate(local.shop.goals)}
        session = next(i for i in range(20, 200) if local.expert(local.task(f"webshop/{by_key[order[i]]}")))
        task = local.task(f"webshop/{by_key[order[session]]}")
        response = client.reset(session)
        assert response[1] is None and response[0] == local.reset(task)
        assert local.goal(task).instruction in response[0]
        outputs = local.expert(task)
        for n, output in enumerate(outputs):
            state, reward, done = client.step(output.split("Action: ", 1)[1])
            local_result = local.step(output)
            assert (state, reward, done) == (local_result.observation, local_result.reward, local_result.done)
            assert done == (n == len(outputs) - 1)
        assert reward == local_result.reward > 0
        status, answer = client.request("POST", "/step", {"env_idx": 12345, "action": "search[x]"})
        # AgentGym's WebShop server fails with 500
        assert status == 500 and "unknown environment id 12345" in answer["error"]
        assert client.post("close", {}) is True
    finally:
        _stop(proc)
        local.close()


# -- hostile clients and a faulty environment ----------------------------------------------------
class ToyAlf:
    """An environment named ``alfworld`` with two games and what the AgentGym routes use of ALFWorld
    (task meta ``task_folder``/``trial``, ``admissible_commands``): action ``wait S`` sleeps S seconds,
    ``echo X`` answers X, ``nan`` answers a NaN reward (a contract violation)."""

    name = "alfworld"

    def __init__(self) -> None:
        self.steps = 0

    def splits(self) -> dict[str, int]:
        return {"train": 2}

    def tasks(self, split: str, task_types: Any = None) -> list[Any]:
        from qlass.types import Task

        return [Task(f"alfworld/train/pick-{n}/trial_{n}", self.name, "train", "pick",
                     {"task_folder": f"pick-{n}", "trial": f"trial_{n}"}) for n in (0, 1)]

    def prompt(self) -> list[Any]:
        return []

    def reset(self, task: Any) -> str:
        self.steps = 0
        return f"Game {task.meta['trial']}."

    def step(self, output: str) -> Any:
        from qlass.types import StepResult

        self.steps += 1
        action = output.removeprefix("Action: ")
        if action.startswith("wait "):
            time.sleep(float(action[5:]))
        return StepResult(f"step {self.steps}: {action}", float("nan") if action == "nan" else 0.0, False, {})

    def admissible_commands(self) -> list[str]:
        return ["look", "wait 1"]

    def expert(self, task: Any) -> list[str]:
        return []

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def toy_alfworld(tmp_path_factory: pytest.TempPathFactory):
    """``ToyAlf`` served in AgentGym's ALFWorld protocol (a server thread on loopback)."""
    from qlass.serve import BackgroundServer, EnvPool

    games = tmp_path_factory.mktemp("games")
    train = _mapping([("pick-0", "trial_0"), ("pick-1", "trial_1")], 0)
    (games / "mappings_train.json").write_text(json.dumps(train))
    (games / "mappings_test.json").write_text("[]")
    with BackgroundServer(EnvPool(f"{__name__}:ToyAlf"), protocol="agentgym", agentgym_games=str(games)) as srv:
        yield srv.url


def test_agentgym_ids_and_indices_are_strict(toy_alfworld: str) -> None:
    """An instance id in the query must be plain digits (``--0``, ``²`` and 5000 digits were a 500 with
    two tracebacks), and ids and indices in a body JSON integers (``true`` drove instance 1, ``"0"`` was
    taken): each gets FastAPI's 422 like any malformed request."""
    client = AlfWorldClient(toy_alfworld)
    try:
        client.reset(1)
        for bad in ("--0", "%C2%B2", "9" * 5000, "1.0", "0x1", "true"):
            for path in ("observation", "available_actions"):
                status, answer = client.request("GET", f"/{path}?id={bad}")
                assert status == 422 and answer["detail"][0]["loc"] == ["query", "id"], (path, bad, status, answer)
        for id_, game in ((True, 0), (str(client.env_id), 0), (client.env_id, "0"), (client.env_id, 0.0)):
            status, answer = client.request("POST", "/reset", {"id": id_, "game": game, "world_type": "Text"})
            assert status == 422 and answer["detail"][0]["type"] == "int_type", (id_, game, status, answer)
        assert client.get("observation") == "Game trial_1."
        other = client.request("POST", "/create")[1]["id"]  # a key or query field given twice: its last value was taken
        status, answer = client.request("GET", f"/observation?id={other}&id={client.env_id}")
        assert status == 422 and answer["detail"][0]["msg"] == "given 2 times; give one id", answer
        twice = f'{{"id": {other}, "id": {client.env_id}, "action": "look"}}'.encode()
        status, answer = client.request("POST", "/step", twice)
        assert status == 422 and answer["detail"][0]["loc"] == ["body"] and "'id'" in answer["detail"][0]["msg"], answer
        assert client.get("observation") == "Game trial_1."  # not stepped
        for body in (b'{"\\ud800": 1}', f'{{"id": {client.env_id}, "act": "\\ud83d"}}'.encode()):
            status, answer = client.request("POST", "/step", body)  # FastAPI's echo of it could not be sent
            assert status == 422 and answer["detail"][0]["input"] is not None, (body, status, answer)
        assert client.get("observation") == "Game trial_1."
        client.request("POST", "/close", {"id": other})
        status, answer = client.request("POST", "/reset", {"id": client.env_id, "game": 99, "world_type": "Text"})
        assert (status, answer) == (200, {"error": "game 99 out of range 0..1"})
        status, answer = client.request("GET", f"/observation?id={client.env_id}")  # the refused reset ended it
        no_episode = f"environment {client.env_id} has no episode yet: POST /reset first"
        assert (status, answer) == (200, {"error": no_episode})
    finally:
        client.request("POST", "/close", {"id": client.env_id})


def test_agentgym_refusals_before_the_environment_moves(toy_alfworld: str) -> None:
    """A lone surrogate in an action is refused before the step (it stepped, then failed to answer); a
    step on a busy instance is refused at once (it waited on a server thread); a NaN reward is named as
    the environment's fault: all in AgentGym's error answer (HTTP 200 for ALFWorld)."""
    client = AlfWorldClient(toy_alfworld)
    try:
        client.reset(0)
        status, answer = client.request("POST", "/step", {"id": client.env_id, "action": "echo \ud800"})
        assert status == 200 and answer["error"].startswith("'action' is not valid Unicode"), answer
        assert client.get("observation") == "Game trial_0."  # not stepped
        slow: list[Any] = []
        thread = threading.Thread(target=lambda: slow.append(client.step("wait 2")))
        thread.start()
        deadline = time.time() + 10
        while time.time() < deadline and not any(i["busy"] for i in client.request("GET", "/instances")[1]
                                                 .get("instances", [])):
            time.sleep(0.05)
        status, answer = client.request("POST", "/step", {"id": client.env_id, "action": "look"})
        assert (status, answer) == (200, {"error": f"environment {client.env_id} is busy with another request; "
                                                   "send one at a time"})
        thread.join(timeout=20)
        assert slow == [("step 1: wait 2", 0.0, False)]
        status, answer = client.request("POST", "/step", {"id": client.env_id, "action": "nan"})
        assert status == 200 and answer["error"].startswith("environment fault on /step"), answer
        assert "step() returned reward nan; it must be a finite number" in answer["error"]
    finally:
        client.request("POST", "/close", {"id": client.env_id})
