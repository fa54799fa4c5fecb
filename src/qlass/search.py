"""Inference methods (stage 4): greedy, sample, best-of-n and QLASS's Q-guided stepwise search.

Each method is a plain function ``method(task, ctx, cfg) -> Trajectory`` registered under a name,
with a small frozen dataclass config validated on construction. Methods never read the
environment's reward to choose an action; only ``QlassConfig.oracle_terminal`` (the reference
code's shortcut, off by default) does, and trajectories made with it are labelled ``oracle``.

Token accounting lives on each :class:`~qlass.types.Step` (policy prompt/completion tokens, QNet
tokens); a method that plays several trajectories (best-of-n) reports the tokens of all of them in
``meta``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .agent import EpisodeConfig, apply_output, continue_episode, episode_running, finish, start_messages
from .config import build, option, parse_kv
from .envs.base import Env, parse_action
from .errors import QlassError
from .policy.base import Policy
from .types import Completion, History, Message, Step, Task, Trajectory

log = logging.getLogger(__name__)


class ValueModel(Protocol):
    """What Q-guided search needs from a QNet: one value per candidate output for a history."""

    def score(self, history: History, candidates: Sequence[str]) -> list[float]:
        """Values of ``candidates`` (raw agent outputs) after ``history``."""


@dataclass
class SearchContext:
    """Everything a method may use. ``make_env`` builds an auxiliary env (only the oracle needs it);
    ``env_pool(k)`` gives ``k`` environments to play side by side (``env`` first; the caller owns
    and closes them)."""

    env: Env
    policy: Policy
    qnet: ValueModel | None = None
    make_env: Callable[[], Env] | None = None
    seed: int = 0
    env_pool: Callable[[int], list[Env]] | None = None


_MAX_STEPS = "step limit per episode"
_MAX_NEW = "token limit per agent turn"
_TEMPERATURE = "sampling temperature"


@dataclass(frozen=True)
class GreedyConfig:
    """Temperature-0 decoding: the SFT agent as it is."""

    max_steps: int = option(30, _MAX_STEPS)
    max_new_tokens: int = option(128, _MAX_NEW)

    def __post_init__(self) -> None:
        EpisodeConfig(self.max_steps, 0.0, self.max_new_tokens)


@dataclass(frozen=True)
class SampleConfig:
    """One sampled trajectory at ``temperature``."""

    temperature: float = option(0.7, _TEMPERATURE)
    max_steps: int = option(30, _MAX_STEPS)
    max_new_tokens: int = option(128, _MAX_NEW)

    def __post_init__(self) -> None:
        EpisodeConfig(self.max_steps, self.temperature, self.max_new_tokens)


@dataclass(frozen=True)
class BestOfNConfig:
    """N whole trajectories at ``temperature``; the winner is chosen without the env's reward, by
    the QNet's value of each trajectory's final step (``select="qnet"``) or by the policy's mean
    log-likelihood per completion token (``select="likelihood"``)."""

    n: int = option(4, "trajectories per task")
    temperature: float = option(0.7, _TEMPERATURE)
    select: str = option("qnet", "how the winner is chosen: qnet (value of the final step) or likelihood")
    max_steps: int = option(30, _MAX_STEPS)
    max_new_tokens: int = option(128, _MAX_NEW)

    def __post_init__(self) -> None:
        EpisodeConfig(self.max_steps, self.temperature, self.max_new_tokens)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.select not in ("qnet", "likelihood"):
            raise ValueError(f"select must be 'qnet' or 'likelihood', got {self.select!r}")


@dataclass(frozen=True)
class QlassConfig:
    """Q-guided stepwise search: M candidates per step at ``temperature``, execute the QNet argmax
    (duplicates merged; ties go to the earliest candidate)."""

    m: int = option(2, "candidate actions sampled per step")
    temperature: float = option(0.7, _TEMPERATURE)
    max_steps: int = option(30, _MAX_STEPS)
    max_new_tokens: int = option(128, _MAX_NEW)
    oracle_terminal: bool = option(False, "score episode-ending candidates by the true reward (the reference "
                                   "code's shortcut; results are labelled [oracle])")

    def __post_init__(self) -> None:
        EpisodeConfig(self.max_steps, self.temperature, self.max_new_tokens)
        if self.m < 1:
            raise ValueError(f"m must be >= 1, got {self.m}")


def normalise_action(output: str) -> str:
    """The comparison key of an output: its parsed action, lower-cased, whitespace collapsed."""
    action = parse_action(output)
    text = action if action is not None else output
    return re.sub(r"\s+", " ", text.strip().lower())


def unique_candidates(completions: Sequence[Completion]) -> list[int]:
    """Indices of the first completion of each distinct action, in order."""
    seen: set[str] = set()
    keep = []
    for i, c in enumerate(completions):
        key = normalise_action(c.text)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the earliest one wins ties (deterministic)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def greedy(task: Task, ctx: SearchContext, cfg: GreedyConfig) -> Trajectory:
    """Play ``task`` with greedy decoding."""
    messages = start_messages(ctx.env, task)
    steps: list[Step] = []
    continue_episode(ctx.env, ctx.policy, messages, steps, EpisodeConfig(cfg.max_steps, 0.0, cfg.max_new_tokens))
    return finish(task, messages, steps, env_steps=len(steps))


def sample(task: Task, ctx: SearchContext, cfg: SampleConfig) -> Trajectory:
    """Play ``task`` with one sampled trajectory."""
    messages = start_messages(ctx.env, task)
    steps: list[Step] = []
    ep = EpisodeConfig(cfg.max_steps, cfg.temperature, cfg.max_new_tokens)
    continue_episode(ctx.env, ctx.policy, messages, steps, ep, seed=ctx.seed)
    return finish(task, messages, steps, env_steps=len(steps))


def _likelihood(traj: Trajectory, logprobs: list[float | None]) -> float:
    tokens = sum(s.completion_tokens for s in traj.steps)
    if any(lp is None for lp in logprobs):
        raise QlassError("best-of-n select='likelihood' needs a policy backend that reports logprobs")
    return sum(lp for lp in logprobs if lp is not None) / max(tokens, 1)


@dataclass
class _Playthrough:
    """One best-of-n trajectory in progress, on its own environment."""

    env: Env
    messages: list[Message]
    steps: list[Step] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)



def best_of_n(task: Task, ctx: SearchContext, cfg: BestOfNConfig) -> Trajectory:
    """N sampled trajectories; returns the selected one with every candidate's summary in ``meta``.

    The trajectories are played side by side, one environment each (``ctx.env_pool``; without it,
    one after another on ``ctx.env``): every step samples the next output of all unfinished ones
    in one policy call, so a local model decodes them as one batch. Step ``t`` of a wave of
    trajectories uses seed ``f(ctx.seed, wave, t)``; the policy gives each history of the call its
    own stream (see :meth:`qlass.policy.hf.HFPolicy.sample`).

    ``meta["candidates"]`` lists, in sampling order, each trajectory's reward (for oracle pass@N
    reporting only), selection score and tokens, so budget curves for any N' <= N can be read
    from one run by taking the first N' candidates.
    """
    if cfg.select == "qnet" and ctx.qnet is None:
        raise QlassError("best-of-n with select='qnet' needs a QNet (--qnet DIR) or select='likelihood'")
    envs = ctx.env_pool(cfg.n) if ctx.env_pool is not None else [ctx.env]
    plays: list[_Playthrough] = []
    for wave, first in enumerate(range(0, cfg.n, len(envs))):
        group = [_Playthrough(env, start_messages(env, task)) for env in envs[: cfg.n - first]]
        t = 0
        while active := [p for p in group if episode_running(p.steps, cfg.max_steps)]:
            seed = ctx.seed * 1_000_003 + wave * 10_007 + t * 101
            outs = ctx.policy.sample([p.messages for p in active], 1, cfg.temperature, cfg.max_new_tokens, seed=seed)
            for p, out in zip(active, outs, strict=True):
                p.logprobs.append(out[0].logprob)
                apply_output(p.env, p.messages, p.steps, out[0])
            t += 1
        plays += group
    trajs: list[Trajectory] = []
    summaries: list[dict[str, Any]] = []
    for p in plays:
        traj = finish(task, p.messages, p.steps)
        qnet_tokens = 0
        if cfg.select == "qnet" and p.steps:
            score = float(ctx.qnet.score(p.messages[:-2], [p.steps[-1].output])[0])
            qnet_tokens = _qnet_tokens(ctx.qnet)
            p.steps[-1].qnet_tokens += qnet_tokens
        else:
            score = _likelihood(traj, p.logprobs) if p.steps else float("-inf")
        trajs.append(traj)
        summaries.append({
            "reward": traj.reward, "success": traj.success, "score": score,
            "prompt_tokens": traj.prompt_tokens, "completion_tokens": traj.completion_tokens,
            "qnet_tokens": qnet_tokens, "env_steps": len(p.steps),
        })
    pick = argmax([s["score"] for s in summaries])
    chosen = trajs[pick]
    chosen.meta.update(
        selected=pick,
        candidates=summaries,
        env_steps=sum(s["env_steps"] for s in summaries),
        prompt_tokens=sum(s["prompt_tokens"] for s in summaries),
        completion_tokens=sum(s["completion_tokens"] for s in summaries),
        qnet_tokens=sum(s["qnet_tokens"] for s in summaries),
        oracle_pass_at_n=max(s["reward"] for s in summaries),
    )
    return chosen


def _qnet_tokens(qnet: ValueModel) -> int:
    """Tokens the QNet processed in its last call, when it reports them."""
    return int(getattr(qnet, "last_tokens", 0) or 0)


def _oracle_scores(task: Task, ctx: SearchContext, outputs: Sequence[str], taken: Sequence[str],
                   scores: list[float]) -> tuple[list[float], int]:
    """The reference code's shortcut: a candidate that ends the episode is scored by its true reward."""
    if ctx.make_env is None:
        raise QlassError("oracle_terminal needs an auxiliary environment (make_env)")
    probe = ctx.make_env()
    env_steps = 0
    try:
        out = list(scores)
        for i, text in enumerate(outputs):
            probe.reset(task)
            for prev in taken:
                probe.step(prev)
            result = probe.step(text)
            env_steps += len(taken) + 1
            if result.done:
                out[i] = float(result.reward)
        return out, env_steps
    finally:
        probe.close()


def qlass_search(task: Task, ctx: SearchContext, cfg: QlassConfig) -> Trajectory:
    """Q-guided stepwise search: at every step sample M candidates and execute the QNet's argmax.

    ``meta["decisions"]`` lists the steps where the QNet chose between two or more distinct
    actions: the step index, the candidate actions, the values that decided and the chosen index.
    """
    if ctx.qnet is None and cfg.m > 1:
        raise QlassError("the qlass method needs a QNet (--qnet DIR)")
    messages = start_messages(ctx.env, task)
    steps: list[Step] = []
    decisions: list[dict[str, Any]] = []
    env_steps = 0
    while episode_running(steps, cfg.max_steps):
        seed = ctx.seed * 1_000_003 + len(steps)
        completions = ctx.policy.sample([messages], cfg.m, cfg.temperature, cfg.max_new_tokens, seed=seed)[0]
        keep = unique_candidates(completions)
        outputs = [completions[i].text for i in keep]
        qnet_tokens, pick = 0, 0
        if len(outputs) > 1:
            scores = list(ctx.qnet.score(messages, outputs))
            qnet_tokens = _qnet_tokens(ctx.qnet)
            if cfg.oracle_terminal:
                scores, probe_steps = _oracle_scores(task, ctx, outputs, [s.output for s in steps], scores)
                env_steps += probe_steps
            pick = argmax(scores)
            decisions.append({"step": len(steps), "actions": [normalise_action(o) for o in outputs],
                              "values": [float(v) for v in scores], "chosen": pick})
        chosen = completions[keep[pick]]
        spent = Completion(
            text=chosen.text,
            prompt_tokens=completions[0].prompt_tokens,
            completion_tokens=sum(c.completion_tokens for c in completions),
            logprob=chosen.logprob,
        )
        apply_output(ctx.env, messages, steps, spent, qnet_tokens=qnet_tokens)
        env_steps += 1
    return finish(task, messages, steps, env_steps=env_steps, oracle=cfg.oracle_terminal, decisions=decisions)


@dataclass(frozen=True)
class Method:
    """A registered inference method: its function and config class."""

    name: str
    run: Callable[[Task, SearchContext, Any], Trajectory]
    config: type
    needs_qnet: Callable[[Any], bool] = field(default=lambda cfg: False)


METHODS: dict[str, Method] = {
    "greedy": Method("greedy", greedy, GreedyConfig),
    "sample": Method("sample", sample, SampleConfig),
    "best-of-n": Method("best-of-n", best_of_n, BestOfNConfig, lambda c: c.select == "qnet"),
    "qlass": Method("qlass", qlass_search, QlassConfig, lambda c: c.m > 1),
}


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"qlass:m=4,temperature=0.7"`` → ``("qlass", {"m": 4, "temperature": 0.7})``."""
    name, _, opts = spec.partition(":")
    return name.strip(), parse_kv([o for o in opts.split(",") if o.strip()], f"method {spec!r}")


def make_method_config(name: str, options: dict[str, Any]) -> Any:
    """Build and validate the config of method ``name`` from ``options`` (unknown keys are errors)."""
    if name not in METHODS:
        raise QlassError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return build(METHODS[name].config, options, f"method {name!r}")


def method_label(name: str, cfg: Any) -> str:
    """A short, stable label for tables: ``qlass(m=2)``, ``best-of-n(n=4)``, ``greedy``."""
    if name == "qlass":
        return f"qlass(m={cfg.m})" + ("[oracle]" if cfg.oracle_terminal else "")
    if name == "best-of-n":
        return f"best-of-n(n={cfg.n},{cfg.select})"
    return name
