"""One exploration tree (paper §4.2, Fig. 2): how :class:`TreeBuilder` grows the tree of a task.

For a task the root is the initial state. *Expanding* a node samples ``candidates`` actions in its
state (``temperature``; with ``diverse``, every candidate after the node's first child asks for an
action different from the earlier ones, :func:`qlass.perturb.diversity_prompt`; with ``paraphrase``,
every candidate after the node's first child reads the task description paraphrased,
:mod:`qlass.paraphrase`; the tree keeps the real conversation). Outputs cut off
by the token limit are dropped; actions equal to an existing child's or to each other after
normalisation (:func:`qlass.search.normalise_action`) are merged. Every new distinct alternative
is executed; one that ends the episode is a leaf (no rollout). The others are rolled out to the end
of the episode with the policy (:func:`qlass.agent.continue_episode`) ``rollouts`` times; the
rollouts' steps become chains under the branch's first node (tagged 0..K-1), and the mean of their
outcomes is the branch's outcome (the Q backup averages them, :mod:`qlass.tree`). With ``probe``
every alternative of an expansion is stepped once before any is rolled out, so the terminal ones
become leaves even when a cap then stops the rollouts.

Pruning (Fig. 2): a branch whose outcome is 0 is marked ``pruned`` and never expanded (so is each
rollout chain that ended with 0). Branches with a non-zero outcome are expanded node by node along
their first rollout chain, depth-first, down to the maximum expansion depth ``D`` (nodes at depth
< D are expanded; defaults per environment from the paper's Table 5).

Expert graft (on when the environment has expert outputs for the task): the expert chain is put
under the root, and expert steps get sampled sibling branches (every distinct sample, or at most
``expert_siblings``), in ``expert_order``: ``root-first``; ``uncertain-first``, the steps whose
expert output the policy finds least likely (teacher-forced ``score_outputs``) first; or ``all``,
every step sampled first, then one sibling per step in turn. The graft may spend ``graft_share`` of
each cap; the depth-limited search then runs on the sibling branches with the rest.

Per-tree caps (nodes, rolled-out branches, policy tokens, env steps) are checked before each new
branch; a branch that has started is rolled out to its end, so a cap can be overshot by one branch.
How the environment is positioned (replay, snapshots) is :mod:`qlass.explore_cursor`; probes spend
env steps beyond its replay floor (``stats.probe_steps``).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

from .agent import EpisodeConfig, apply_output, play
from .config import to_dict
from .config_fields import require_config
from .envs.base import Env, env_expert, env_prompt, env_step, parse_action
from .errors import QlassError
from .explore_config import CAPS, ExploreConfig, explore_digest
from .explore_cursor import Cursor, Recording
from .lockstep import Episode, Sample, run_one
from .perturb import diversity_prompt
from .policy.base import Policy
from .search import normalise_action
from .seeding import stable_seed
from .tree import BackupConfig, Node, Tree, assign_q
from .types import Completion, Step, Task

Grows = Generator[Sample, Any, list[Node]]
"""A lockstep generator (:mod:`qlass.lockstep`) that returns the new expandable nodes."""


def _step_of(node: Node) -> Step:
    return Step(node.output, node.action, node.observation, node.reward, node.done)


class TreeBuilder:
    """Builds the tree of one task (see module docstring); ``build()`` returns it."""

    def __init__(self, env: Env, policy: Policy, task: Task, cfg: ExploreConfig, seed: int) -> None:
        self.env, self.policy, self.task, self.cfg, self.seed = env, policy, task, cfg, seed
        if (cfg.expert_graft and cfg.expert_siblings != 0 and cfg.expert_order == "uncertain-first"
                and not callable(getattr(policy, "score_outputs", None))):
            name = getattr(policy, "spec", type(policy).__name__)  # a user's class: its module:Class
            raise QlassError(f"explore option expert_order=uncertain-first needs a policy that scores outputs "
                             f"(score_outputs, e.g. a local HF model); {name} has none")
        self.depth = cfg.depth_for(env.name)
        self.episode = EpisodeConfig(cfg.max_steps, cfg.rollout_temperature, cfg.max_new_tokens)
        self.cursor = Cursor(env)
        self.share = 1.0  # the fraction of each cap the current phase may reach (graft_share in the graft)
        self.stats: dict[str, Any] = {
            "policy_calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "score_tokens": 0, "merged": 0,
            "truncated": 0, "dropped": 0, "branches": 0, "rollouts": 0, "terminal_alternatives": 0,
            "probe_steps": 0, "stopped_by": None, "graft_stopped_by": None}

    # -- bookkeeping -------------------------------------------------------------------------
    def _tokens(self) -> int:
        return self.stats["prompt_tokens"] + self.stats["completion_tokens"] + self.stats["score_tokens"]

    def _room(self) -> bool:
        """Whether the current phase may start new work; else records the cap that stops it."""
        used = {"max_nodes": len(self.tree.nodes), "max_tokens": self._tokens(), "max_env_steps": self.cursor.steps,
                "max_branches": self.stats["branches"]}
        for name in CAPS:
            cap = getattr(self.cfg, name)
            if cap is not None and used[name] >= cap * self.share:
                key = "stopped_by" if self.share >= 1.0 else "graft_stopped_by"
                self.stats[key] = self.stats[key] or name
                return False
        return True

    def _expandable(self, node: Node) -> bool:
        return (not (node.done or node.pruned or node.expanded) and node.rollout == 0
                and node.depth < min(self.depth, self.cfg.max_steps))

    def _add(self, parent: int, step: Step, source: str, env_steps: int, rollout: int = 0) -> Node:
        node = Node(id=len(self.tree.nodes), parent=parent, depth=self.tree.nodes[parent].depth + 1,
                    output=step.output, action=step.action, observation=step.observation, reward=step.reward,
                    done=step.done, source=source, prompt_tokens=step.prompt_tokens,
                    completion_tokens=step.completion_tokens, env_steps=env_steps, rollout=rollout)
        self.tree.nodes.append(node)
        return node

    def _count_rollout(self, steps: Sequence[Step]) -> None:
        self.stats["policy_calls"] += len(steps)
        self.stats["prompt_tokens"] += sum(s.prompt_tokens for s in steps)
        self.stats["completion_tokens"] += sum(s.completion_tokens for s in steps)

    # -- sampling ----------------------------------------------------------------------------
    def _call(self, history: Sequence[Any], n: int, seed: int) -> Generator[Sample, Any, list[Completion]]:
        (out,) = yield Sample([history], n, self.cfg.temperature, self.cfg.max_new_tokens, [seed])
        self.stats["policy_calls"] += 1
        self.stats["prompt_tokens"] += out[0].prompt_tokens
        self.stats["completion_tokens"] += sum(c.completion_tokens for c in out)
        return out

    def _calls(self, asks: list[tuple[Sequence[Any], int, int]]) -> Generator[Any, Any, list[Completion]]:
        """``(history, n, seed)`` requests answered in one wave; their completions in order."""
        answers = yield [Sample([h], n, self.cfg.temperature, self.cfg.max_new_tokens, [s]) for h, n, s in asks]
        out = []
        for (outs,) in answers:
            self.stats["policy_calls"] += 1
            self.stats["prompt_tokens"] += outs[0].prompt_tokens
            self.stats["completion_tokens"] += sum(c.completion_tokens for c in outs)
            out += outs
        return out

    def _sample(self, node_id: int, n: int) -> Generator[Any, Any, list[Completion]]:
        """``n`` candidate outputs in ``node_id``'s state: one policy call, or with ``diverse`` or
        ``paraphrase`` the first candidate plainly (when the node has no child yet) and the rest
        perturbed — with the request for a different action (after the first), with the task
        description paraphrased (in the same wave as the first), or both (the tree keeps the plain
        history)."""
        history = self.tree.history(node_id)
        seed = stable_seed(self.seed, "expand", node_id)
        table = self.cfg.paraphrases
        if not self.cfg.diverse and table is None:
            return (yield from self._call(history, n, seed))
        previous = [self.tree.nodes[c].output for c in self.tree.children()[node_id]]
        shown = table.perturb(history, self.task) if table is not None else history
        if not self.cfg.diverse:
            plain = [] if previous else [(history, 1, seed)]
            rest = [(shown, n - len(plain), stable_seed(seed, "paraphrase"))] if n > len(plain) else []
            return (yield from self._calls(plain + rest))
        out = [] if previous else (yield from self._call(history, 1, seed))
        if n > len(out):
            differ = previous + [c.text for c in out if not c.truncated]
            out += yield from self._call(diversity_prompt(shown, differ), n - len(out), stable_seed(seed, "diverse"))
        return out

    def _alternatives(self, node_id: int, n: int) -> Generator[Sample, Any, list[Completion]]:
        """Sample at ``node_id`` (marking it expanded); the new distinct, complete outputs in order."""
        kids = {normalise_action(self.tree.nodes[c].output) for c in self.tree.children()[node_id]}
        completions = yield from self._sample(node_id, n)
        self.tree.nodes[node_id].expanded = True
        out = []
        for comp in completions:
            key = normalise_action(comp.text)
            if comp.truncated or key in kids:
                self.stats["truncated" if comp.truncated else "merged"] += 1
                continue
            kids.add(key)
            out.append(comp)
        return out

    # -- growing branches --------------------------------------------------------------------
    def _probe(self, parent: int, completion: Completion) -> bool:
        """Step ``completion`` once under ``parent``: a terminal one becomes a leaf (True); for the
        others the step is spent (``probe_steps``) and the branch is grown later."""
        replay = self.cursor.goto(self.tree, parent)
        step = apply_output(self.cursor.env, [], [], completion)
        self.cursor.steps += 1
        if not step.done:
            self.stats["probe_steps"] += replay + 1
            self.cursor.position = None  # off the tree
            return False
        self._leaf(self._add(parent, step, "sample", replay + 1))
        self.cursor.position = self.cursor.position + (len(self.tree.nodes) - 1,)  # type: ignore[operator]
        return True

    def _leaf(self, node: Node) -> None:
        """A sampled alternative that ended the episode: a leaf, pruned when it failed."""
        node.pruned = node.reward <= 0.0
        self.stats["terminal_alternatives"] += 1

    def _chain(self, parent: int, completion: Completion | None, rollout: int
               ) -> Generator[Sample, Any, tuple[list[Node], Recording | None]]:
        """Execute ``completion`` under ``parent`` (or, when ``completion`` is None, continue from
        ``parent`` itself) and roll out to the end; returns the new nodes (tagged ``rollout``) and,
        with snapshots, the recording of their states."""
        replay = self.cursor.goto(self.tree, parent)
        messages = self.tree.history(parent)
        steps = [_step_of(n) for n in self.tree.path(parent)]
        base = len(steps)
        depth = self.tree.nodes[parent].depth
        env = self.cursor.recording(lambda k: depth + 1 + k < self.depth) if rollout == 0 else self.cursor.env
        if completion is not None:
            apply_output(env, messages, steps, completion)
        first_id = len(self.tree.nodes)
        seed = (stable_seed(self.seed, "rollout", first_id) if rollout == 0
                else stable_seed(self.seed, "rollout", parent, rollout))
        if completion is None or not steps[-1].done:
            yield from play(env, messages, steps, self.episode, seed)
            self.stats["rollouts"] += 1
        self._count_rollout(steps[base + (completion is not None):])
        chain: list[Node] = []
        for k, step in enumerate(steps[base:]):
            source = "sample" if k == 0 and completion is not None else "rollout"
            chain.append(self._add(chain[-1].id if chain else parent, step, source, replay + 1 if k == 0 else 1,
                                   rollout if source == "rollout" else 0))
        self.cursor.position = self.cursor.position + tuple(n.id for n in chain)  # type: ignore[operator]
        self.cursor.steps += len(chain)
        return chain, env if isinstance(env, Recording) else None

    def _branch(self, parent: int, completion: Completion) -> Grows:
        """Grow the branch of ``completion`` under ``parent``: a leaf when it ends the episode, else
        ``rollouts`` rollouts whose mean outcome decides pruning; returns its expandable nodes."""
        chain, recording = yield from self._chain(parent, completion, 0)
        head = chain[0]
        if head.done:
            self._leaf(head)
            return []
        self.stats["branches"] += 1
        chains = [chain[1:]]
        for k in range(1, self.cfg.rollouts):
            chains.append((yield from self._chain(head.id, None, k))[0])
        outcomes = [c[-1].reward if c else head.reward for c in chains]
        for c, outcome in zip(chains, outcomes):
            for n in c:
                n.pruned = outcome <= 0.0
        head.pruned = sum(outcomes) / len(outcomes) <= 0.0
        if recording is not None and not head.pruned:
            recording.keep_states(self.cursor.saved, chain)
        return [n for n in chain if self._expandable(n)]

    def _prepare(self, parent: int, alternatives: list[Completion], limit: int | None) -> list[Completion]:
        """At most ``limit`` of ``alternatives`` (the rest dropped); with ``probe``, the terminal
        ones already added as leaves and left out."""
        if limit is not None and len(alternatives) > limit:
            self.stats["dropped"] += len(alternatives) - limit
            alternatives = alternatives[:limit]
        if self.cfg.probe:
            alternatives = [c for c in alternatives if not self._probe(parent, c)]
        return alternatives

    def _grow(self, parent: int, alternatives: list[Completion]) -> Grows:
        """A branch for each alternative while the caps allow; returns their expandable nodes."""
        todo: list[Node] = []
        for k, comp in enumerate(alternatives):
            if not self._room():
                self.stats["dropped"] += len(alternatives) - k
                break
            todo += yield from self._branch(parent, comp)
        return todo

    def _expand(self, node_id: int) -> Grows:
        """Sample at ``node_id`` and grow every new distinct alternative."""
        alternatives = yield from self._alternatives(node_id, self.cfg.candidates)
        return (yield from self._grow(node_id, self._prepare(node_id, alternatives, None)))

    # -- the whole tree ----------------------------------------------------------------------
    def _expert_chain(self, outputs: list[str]) -> list[Node]:
        """Step the expert outputs from the root and add them as a chain."""
        self.cursor.goto(self.tree, 0)
        env = self.cursor.recording(lambda k: True)  # expert steps get siblings at any depth
        chain: list[Node] = []
        for text in outputs:
            result = env_step(env, text)
            self.cursor.steps += 1
            step = Step(text, parse_action(text), result.observation, float(result.reward), bool(result.done))
            node = self._add(chain[-1].id if chain else 0, step, "expert", 1)
            self.cursor.position = self.cursor.position + (node.id,)  # type: ignore[operator]
            chain.append(node)
            if node.done:
                break
        if isinstance(env, Recording):
            env.keep_states(self.cursor.saved, chain)
        self.stats["expert_reward"] = chain[-1].reward if chain else None
        return chain

    def _expert_order(self, chain: list[Node]) -> list[Node]:
        """The expert steps in the order they get siblings (``expert_order``)."""
        order = list(range(len(chain)))
        if self.cfg.expert_order == "uncertain-first":
            scored = self.policy.score_outputs([self.tree.history(n.parent) for n in chain],  # type: ignore[attr-defined]
                                               [n.output for n in chain])
            self.stats["policy_calls"] += 1
            self.stats["score_tokens"] += sum(int(t) for _, t in scored)
            logprobs = [float(lp) for lp, _ in scored]
            self.stats["expert_logprobs"] = [round(lp, 4) for lp in logprobs]
            order.sort(key=lambda i: (logprobs[i], i))
        self.stats["expert_order"] = [chain[i].depth for i in order]
        return [chain[i] for i in order]

    def _graft_siblings(self) -> Grows:
        """Grow the queued expert-step siblings (``self.queue``: per expert step its parent and its
        alternatives, ``None`` until sampled) in ``expert_order`` while the current phase has room;
        what is left stays queued. Returns the new expandable nodes."""
        todo: list[Node] = []
        queue, n, limit = self.queue, self.cfg.candidates, self.cfg.expert_siblings
        for i, (parent, alts) in enumerate(queue):
            if alts is None:
                if not self._room():
                    return todo
                alts = self._prepare(parent, (yield from self._alternatives(parent, n)), limit)
                queue[i] = (parent, alts)
            while alts and self.cfg.expert_order != "all":  # a step's siblings all grown before the next step's
                if not self._room():
                    return todo
                todo += yield from self._branch(parent, alts.pop(0))
        while any(alts for _, alts in queue):  # "all": every step sampled above, now one sibling per step in turn
            for parent, alts in queue:
                if alts:
                    if not self._room():
                        return todo
                    todo += yield from self._branch(parent, alts.pop(0))
        return todo

    def _search(self, stack: list[Node]) -> Generator[Sample, Any, None]:
        """Depth-first expansion of ``stack`` (popped from the end) while the caps allow."""
        while stack:
            node = stack.pop()
            if not self._expandable(node):
                continue
            if not self._room():
                break
            stack += (yield from self._expand(node.id))[::-1]

    def build(self) -> Tree:
        """Explore the task and return its tree, Q values assigned (one tree at a time)."""
        return run_one(self.grow(), self.policy)

    def grow(self) -> Episode[Tree]:
        """:meth:`build` as a lockstep generator (:mod:`qlass.lockstep`): it yields its policy requests,
        so several trees can share batched policy calls (see :class:`TreeWorker`'s ``concurrency``)."""
        outputs = env_expert(self.env, self.task) if self.cfg.expert_graft else []
        first = self.cursor.start(self.task)
        root = Node(0, None, 0, "", None, first, 0.0, False, "root")
        self.tree = Tree(tree_id=self.task.id, task=self.task.id, env=self.env.name, split=self.task.split,
                         task_type=self.task.task_type, prefix=env_prompt(self.env), nodes=[root], seed=self.seed,
                         config=to_dict(self.cfg), config_hash=explore_digest(self.cfg))
        self.queue: list[tuple[int, list[Completion] | None]] = []
        if not outputs:
            yield from self._search([root])
        else:
            chain = self._expert_chain(outputs)
            todo = [chain[-1]] if chain and self._expandable(chain[-1]) else []
            if self.cfg.expert_siblings != 0 and chain:
                self.queue = [(n.parent, None) for n in self._expert_order(chain)]  # type: ignore[misc]
                self.share = self.cfg.graft_share
                todo += yield from self._graft_siblings()
                self.share = 1.0
            yield from self._search(todo[::-1])
            if any(alts is None or alts for _, alts in self.queue) and self._room():
                more = yield from self._graft_siblings()  # budget left after the search: the graft goes on
                yield from self._search(more[::-1])
        self.stats["dropped"] += sum(len(alts) for _, alts in self.queue if alts)
        t = self.tree
        self.stats.update(nodes=len(t.nodes), edges=t.edges, env_steps=self.cursor.steps, resets=self.cursor.resets,
                          restores=self.cursor.restores,
                          max_depth=max(n.depth for n in t.nodes), expansion_depth=self.depth,
                          leaves=sum(1 for k in t.children() if not k) - (len(t.nodes) == 1),
                          best_reward=max(n.reward for n in t.nodes))
        t.stats = dict(self.stats)
        return assign_q(t, BackupConfig(gamma=self.cfg.gamma))


def build_tree(env: Env, policy: Policy, task: Task, cfg: ExploreConfig, seed: int) -> Tree:
    """The exploration tree of ``task`` (see module docstring); ``seed`` fixes every sample."""
    require_config(cfg, ExploreConfig, "build_tree")
    return TreeBuilder(env, policy, task, cfg, seed).build()


def tree_seed(run_seed: int, task: Task) -> int:
    """The seed of a task's tree: a stable hash of the run seed and the task id."""
    return stable_seed(run_seed, "tree", task.id)
