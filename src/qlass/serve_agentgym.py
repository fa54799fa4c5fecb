"""AgentGym's wire protocol for ``qlass serve ENV --protocol agentgym`` (sciworld, alfworld, webshop).

AgentGym's environment clients (``agentenv.envs.{sciworld,alfworld,webshop}``) read fixed answer
fields and index tasks by an integer; this module answers them as AgentGym's own servers do:

========  ===========================  ==============================================================
env       reset request / answer       step answer (request: ``{ID, "action"}``)
========  ===========================  ==============================================================
sciworld  ``{"id", "data_idx"}`` →     ``{"observation", "reward", "score", "done"}``: ``score`` is
          ``{"task_name", "var_num",   the simulator's 0–100 score (−100 on failure), ``reward`` its
          "task_description",          change since the last step
          "observation", "reward",
          "score", "deleted", "done"}``
alfworld  ``{"id", "game",             ``{"observation", "reward", "available_actions", "done"}``
          "world_type"}`` → ``{"id",   (reward 1.0 once won)
          "observation",
          "available_actions",
          "task_type"}``
webshop   ``{"env_idx", "session_id"}``  ``{"state", "reward", "done", "info": null}``
          → ``[observation, null]``
========  ===========================  ==============================================================

``POST /create`` answers ``{"id": N}`` (webshop: the bare number), ``GET /observation?id=N``
(webshop: ``env_idx=N``) the latest observation as a JSON string, ``POST /close`` ``true``;
alfworld also has ``GET /available_actions?id=N``. A step after the episode ended is refused,
as AgentGym's sciworld and alfworld servers refuse it ("The task with environment N has
finished."), and so is reading its observation.

Errors: refused requests and environment failures are answered ``{"error": message}`` with HTTP 200
(sciworld, alfworld: AgentGym's servers catch every exception and answer it so) or 500 (webshop,
whose AgentGym server does not catch them); an unexpected exception's text stays in the server's
log (the answer names a reference). Malformed bodies and unknown paths get FastAPI's own answers
(422 / 404 with ``{"detail"}``), as from AgentGym's FastAPI servers; ids and indices must be JSON
integers (``true``, ``"3"``, ``3.0`` are malformed) and a query's id plain digits. As with the qlass
protocol (:mod:`qlass.serve`), a request on an instance busy with another, an action holding a lone
surrogate and an environment breaking its contract (a NaN reward ...) are refused in the error answer,
the first two before the environment is touched; ``GET /instances`` lists the open instances.

Task indices, as AgentGym's server for each environment maps them:

- sciworld ``data_idx``: ScienceWorld's task list in its own order (``scienceworld.constants``)
  without tasks 5-1, 5-2, 9-1, 9-2, 9-3, 10-1 and 10-2, each task's variations 0..n−1 in turn.
- alfworld ``game``: the entries of AgentGym's ``mappings_train.json`` (games of ALFWorld's
  ``train`` folder) then ``mappings_test.json`` (games of ``valid_train``), read from the folder
  given as ``agentgym_games`` (``agentenv-alfworld/configs`` of an AgentGym checkout).
- webshop ``session_id``: WebShop's synthetic goals in the order WebShop builds them (catalog
  order, then each product's option combinations, option names sorted), shuffled as WebShop's
  ``SimServer`` shuffles them (``random.seed(233)``). This is WebShop's goal list when the catalog
  is WebShop's own ``items_shuffle_1000.json``; with another file its product order decides.

Environment options default to AgentGym's game variant and step limit (:data:`SPECS`): ScienceWorld
without the ``easy`` simplification and 100 steps, ALFWorld's 50 steps (its ``max_nb_steps_per_episode``),
WebShop without a limit. ``--env-arg`` overrides them.

(No postponed annotations here: FastAPI reads the request models from the endpoints' annotations.)
"""

import json
import logging
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from itertools import product as combinations
from pathlib import Path
from typing import Any

from .errors import DataError, QlassError
from .file_checks import refuse_device
from .jsonl import JSONContentError, loads

log = logging.getLogger(__name__)

SCIWORLD_SKIPPED = frozenset({"5-1", "5-2", "9-1", "9-2", "9-3", "10-1", "10-2"})
"""ScienceWorld task ids AgentGym's server leaves out of its ``data_idx`` list."""
ALFWORLD_MAPPINGS = (("mappings_train.json", "train"), ("mappings_test.json", "valid_train"))
"""AgentGym's ALFWorld game lists, in ``game`` order, and the data folder of each one's games."""
WEBSHOP_SHUFFLE_SEED = 233
NO_STEP_LIMIT = 1_000_000_000


@dataclass(frozen=True)
class AgentGymSpec:
    """How AgentGym's server for one environment names things and which options it plays with."""

    env: str
    id_key: str  # the request field naming the instance
    index_key: str  # the reset field holding the task index
    error_status: int  # the HTTP status of an error answer
    env_args: dict[str, Any] = field(default_factory=dict)


SPECS: dict[str, AgentGymSpec] = {
    "sciworld": AgentGymSpec("sciworld", "id", "data_idx", 200, {"simplification": "", "step_limit": 100}),
    "alfworld": AgentGymSpec("alfworld", "id", "game", 200, {"step_limit": 50}),
    "webshop": AgentGymSpec("webshop", "env_idx", "session_id", 500, {"step_limit": NO_STEP_LIMIT}),
}


def spec_for(env: str) -> AgentGymSpec:
    """The AgentGym spec of environment ``env`` (a name), or a clear error."""
    if env not in SPECS:
        raise QlassError(f"serve: --protocol agentgym serves {', '.join(SPECS)}; got {env!r}")
    return SPECS[env]


def default_env_args(env: str, env_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """``env_args`` over the options matching AgentGym's game variant and step limit for ``env``."""
    return {**spec_for(env).env_args, **(env_args or {})}


# -- task indices ------------------------------------------------------------------------------
def task_index(pool: Any, agentgym_games: str | Path | None = None) -> list[str]:
    """The qlass task id at each AgentGym task index of ``pool``'s environment (module docstring)."""
    builders = {"sciworld": _sciworld_index, "alfworld": _alfworld_index, "webshop": _webshop_index}
    spec = spec_for(pool.name)
    if agentgym_games is not None and spec.env != "alfworld":
        raise QlassError(f"serve: agentgym_games is for alfworld only (serving {spec.env})")
    return builders[spec.env](pool, agentgym_games)


def _sciworld_index(pool: Any, _: Any) -> list[str]:
    from scienceworld.constants import ID2TASK

    variations = Counter(t.meta["task_name"] for split in pool.splits() for t in pool.tasks(split))
    return [f"sciworld/{name}/{v}" for tid, name in ID2TASK.items() if tid not in SCIWORLD_SKIPPED
            for v in range(variations[name])]


def _alfworld_index(pool: Any, games: str | Path | None) -> list[str]:
    if games is None:
        raise QlassError("serve: alfworld with --protocol agentgym needs AgentGym's game list: --agentgym-games DIR, "
                         "the folder with mappings_train.json and mappings_test.json (agentenv-alfworld/configs "
                         "of an AgentGym checkout)")
    ids = []
    for name, folder in ALFWORLD_MAPPINGS:
        path = Path(games) / name
        refuse_device(path)
        try:
            records = loads(path.read_text(encoding="utf-8-sig"))
        except OSError as exc:
            raise QlassError(f"serve: cannot read AgentGym's game list {path}: {exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, JSONContentError) as exc:
            raise DataError(str(path), f"invalid JSON: {exc}") from None
        except RecursionError:
            raise DataError(str(path), "invalid JSON: nested too deeply") from None
        if not isinstance(records, list):
            raise DataError(str(path), f"expected a list of games, got {type(records).__name__}")
        for i, rec in enumerate(records):
            for key in ("task_type", "task_id"):
                if not isinstance(rec, dict) or not isinstance(rec.get(key), str) or not rec[key]:
                    raise DataError(str(path), f"field {key!r}: expected a folder name", index=i)
            ids.append(f"alfworld/{folder}/{rec['task_type']}/{rec['task_id']}")
    return ids


def _webshop_index(pool: Any, _: Any) -> list[str]:
    shop = pool.meta.shop
    position: dict[tuple, list[int]] = {}
    for i, goal in enumerate(shop.goals):
        position.setdefault((goal.asin, tuple(goal.options.items())), []).append(i)
    built = []  # WebShop's order: products in catalog order, option combinations with names sorted
    for product in shop.products:
        if product.asin in shop.instructions:
            names = sorted(product.options)
            built += [(product.asin, tuple(zip(names, combo)))
                      for combo in combinations(*(product.options[n] for n in names))]
    random.Random(WEBSHOP_SHUFFLE_SEED).shuffle(built)
    taken: Counter = Counter()
    ids = []
    for key in built:
        found = position.get(key, [])
        if taken[key] >= len(found):
            raise QlassError(f"serve: webshop goal {key!r} of WebShop's goal list is not among this catalog's goals")
        ids.append(f"webshop/{found[taken[key]]}")
        taken[key] += 1
    return ids


# -- the application ---------------------------------------------------------------------------
def add_routes(app: Any, pool: Any, agentgym_games: str | Path | None = None) -> None:
    """Serve ``pool`` on ``app`` in AgentGym's protocol for its environment (module docstring)."""
    from fastapi import Depends, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import StrictInt, create_model

    from .envs.base import env_reset, env_step
    from .serve_pool import EnvFault, ServeError, env_call, fault_message, json_safe, refuse_non_text
    from .serve_requests import body_problem, query_id

    spec = spec_for(pool.name)
    index = task_index(pool, agentgym_games)
    log.info("agentgym protocol for %s: %d task indices", spec.env, len(index))
    id_key = spec.id_key
    IdBody = create_model("IdBody", **{id_key: (StrictInt, ...)})
    StepBody = create_model("StepBody", __base__=IdBody, action=(str, ...))
    reset_fields: dict[str, Any] = {spec.index_key: (StrictInt | None, None) if spec.env == "webshop"
                                    else (StrictInt, ...)}
    if spec.env == "alfworld":
        reset_fields["world_type"] = (str, ...)
    ResetBody = create_model("ResetBody", __base__=IdBody, **reset_fields)

    async def refuse_malformed_body(request: Request) -> None:  # e.g. a key given twice (not its last value taken)
        problem = body_problem(await request.body())
        if problem:
            raise RequestValidationError([{"loc": ("body",), "msg": problem, "type": "value_error"}])

    object_body = [Depends(refuse_malformed_body)]

    def error(message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=spec.error_status)

    @app.exception_handler(ServeError)
    async def _refused(request: Request, exc: ServeError) -> JSONResponse:
        return error(exc.message)

    @app.exception_handler(QlassError)
    async def _env_refused(request: Request, exc: QlassError) -> JSONResponse:
        return error(str(exc))

    @app.exception_handler(EnvFault)
    async def _env_fault(request: Request, exc: EnvFault) -> JSONResponse:
        return error(fault_message(request.url.path, exc))

    @app.exception_handler(RequestValidationError)
    async def _malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer, with the input it echoes made sendable (a lone surrogate broke the answer)
        return JSONResponse({"detail": json_safe(exc.errors())}, status_code=422)

    @app.exception_handler(Exception)
    async def _failed(request: Request, exc: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:8]  # the exception's text stays in the log: it may hold paths or secrets
        log.exception("server error %s on %s", ref, request.url.path)
        return error(f"environment error on {request.url.path} (see the server log, reference {ref})")

    def check_playing(inst: Any, env_id: int) -> None:
        """Refuse instance ``env_id`` unless an episode is under way (AgentGym refuses finished ones)."""
        if inst.task is None:
            raise ServeError(409, f"environment {env_id} has no episode yet: POST /reset first")
        if inst.done and spec.env != "webshop":
            raise ServeError(409, f"The task with environment {env_id} has finished.")

    @app.get("/")
    def root() -> dict[str, Any]:
        return {"env": pool.name, "protocol": f"agentgym/{spec.env}", "instances": pool.count(),
                "max_instances": pool.max_instances, "idle_timeout": pool.idle_timeout, "tasks": len(index)}

    @app.get("/instances")
    def instances() -> dict[str, Any]:
        pool.reap()
        return {"instances": pool.instances(), "idle_timeout": pool.idle_timeout}

    @app.post("/create", dependencies=object_body)
    def create() -> Any:
        env_id = pool.create()
        return env_id if spec.env == "webshop" else {"id": env_id}

    @app.post("/reset", dependencies=object_body)
    def reset(body: ResetBody) -> Any:  # type: ignore[valid-type]
        env_id, number = getattr(body, id_key), getattr(body, spec.index_key)
        if number is None:  # a malformed request changes nothing
            raise ServeError(400, f"reset needs {spec.index_key!r}: qlass does not draw random goals")
        if spec.env == "alfworld" and body.world_type not in ("Text", "Embody", "Hybrid"):
            raise ServeError(400, 'world_type must be one of "Text", "Embody" and "Hybrid"')
        with pool.use(env_id) as inst:
            inst.task = None  # a failed reset (an unknown task included) leaves no episode to step on
            if not 0 <= number < len(index):
                raise ServeError(404, f"{spec.index_key} {number} out of range 0..{len(index) - 1}")
            task = pool.task(index[number])
            first = env_call(lambda: env_reset(inst.env, task))
            inst.task, inst.done, inst.extra = task, False, {"score": 0}
            if spec.env == "sciworld":
                description = inst.env.description
                inst.observation = first[len(description) + 1:] if first.startswith(description + "\n") else first
                return json_safe({"task_name": task.meta["task_name"], "var_num": task.meta["variation"],
                                  "task_description": description, "observation": inst.observation, "reward": 0,
                                  "score": 0, "deleted": False, "done": False})
            inst.observation = first
            if spec.env == "alfworld":
                inst.extra["available_actions"] = json_safe(inst.env.admissible_commands())
                return {"id": env_id, "observation": first, "available_actions": inst.extra["available_actions"],
                        "task_type": json_safe(f"{task.meta['task_folder']}/{task.meta['trial']}")}
            return [first, None]

    @app.post("/step", dependencies=object_body)
    def step(body: StepBody) -> dict[str, Any]:  # type: ignore[valid-type]
        env_id = getattr(body, id_key)
        refuse_non_text(body.action, "action")
        with pool.use(env_id) as inst:
            check_playing(inst, env_id)
            result = env_call(lambda: env_step(inst.env, f"Action: {body.action}"))
            inst.observation, inst.done = result.observation, bool(result.done)
            if spec.env == "sciworld":
                score = int(result.info.get("score", inst.extra["score"]))
                reward, inst.extra["score"] = score - inst.extra["score"], score
                return {"observation": result.observation, "reward": reward, "score": score, "done": inst.done}
            if spec.env == "alfworld":
                inst.extra["available_actions"] = json_safe(inst.env.admissible_commands())
                return {"observation": result.observation, "reward": float(result.reward),
                        "available_actions": inst.extra["available_actions"], "done": inst.done}
            return {"state": result.observation, "reward": float(result.reward), "done": inst.done, "info": None}

    @app.get("/observation")
    def observation(request: Request) -> str:
        env_id = query_id(request, id_key)
        inst = pool.get(env_id)
        if spec.env != "webshop":
            check_playing(inst, env_id)
        elif inst.task is None:
            raise ServeError(409, f"environment {env_id} has no episode yet: POST /reset first")
        return inst.observation

    if spec.env == "alfworld":
        @app.get("/available_actions")
        def available_actions(request: Request) -> list[str]:
            env_id = query_id(request, id_key)
            inst = pool.get(env_id)
            check_playing(inst, env_id)
            return list(inst.extra["available_actions"])

    @app.post("/close", dependencies=object_body)
    def close(body: IdBody) -> bool:  # type: ignore[valid-type]
        pool.close(getattr(body, id_key))
        return True

