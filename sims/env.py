"""The token-tree MDP as a standard gymnasium environment, ``deepgrpo/TokenTree-v0``.

One episode = one chain of one problem p: L_p actions (tokens in 0..V-1; L_p = T = depth unless
``min_depth`` is set), reward 1 at the last step iff the chain ends on track (see
:mod:`sims.spec` for the dynamics), 0 otherwise. Problems are the whole drawn set, training
and held-out (``n_problems + n_heldout``); the set is the one of run seed ``run_seed`` unless
the spec pins ``seed``.

Observation: ``MultiDiscrete([n_problems + n_heldout, T + 1, 2])`` = (problem, step, status)
with status 0 = on track, 1 = derailed. Action: ``Discrete(V)``: an integer (Python or numpy,
not a bool) in [0, V); anything else is a ValueError, as is a problem id that is not an integer
in range or a :meth:`~TokenTreeEnv.reset` option other than ``problem``.
``info`` holds ``first_error`` (first wrong step so far, L_p if none), ``length`` (L_p) and
``p_success_base``, the exact P(success | state) under the spec's pre-trained policy (from the
oracle).

    import gymnasium, sims
    env = gymnasium.make("deepgrpo/TokenTree-v0", depth=8, recovery="constant")
    obs, info = env.reset(seed=0, options={"problem": 3})
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces

from sims.oracle import success_table
from sims.spec import DERAILED, ON_TRACK, TokenTreeSpec

ENV_ID = "deepgrpo/TokenTree-v0"

RESET_OPTIONS = ("problem",)
"""The keys :meth:`TokenTreeEnv.reset` understands in ``options``."""


def _integer(value: Any) -> int | None:
    """``value`` as an int if it is an integer (a Python or numpy integer, or a 0-d integer
    array; never a bool, whose True/False are not token or problem ids), else None."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return None
    return int(value)


def _problem_id(value: Any, n: int, name: str) -> int:
    """``value`` as a problem id in [0, n), else a ValueError naming ``name``."""
    p = _integer(value)
    if p is None or not 0 <= p < n:
        raise ValueError(f"{name} = {value!r} is invalid: expected an integer in [0, {n})")
    return p


class TokenTreeEnv(gymnasium.Env):
    """Gymnasium environment of a :class:`~sims.spec.TokenTreeSpec` problem set.

    Args:
        spec: the spec (None: the default spec, updated with ``spec_fields``).
        problem: always play this problem (None: draw one per episode with the env's RNG,
            or take ``options["problem"]`` of :meth:`reset`).
        render_mode: None or ``"ansi"``.
        run_seed: the run seed whose problem set is played (ignored when the spec pins ``seed``).
        **spec_fields: overrides of :class:`TokenTreeSpec` fields (validated).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, spec: TokenTreeSpec | None = None, problem: int | None = None,
                 render_mode: str | None = None, run_seed: int = 0, **spec_fields: Any) -> None:
        base = spec.to_dict() if spec is not None else {}
        self.spec_ = TokenTreeSpec.from_dict({**base, **spec_fields})
        self.problems = self.spec_.build(run_seed=run_seed)
        n, T, V = self.problems.n, self.problems.T, self.problems.V
        fixed = None if problem is None else _problem_id(problem, n, "problem")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode = {render_mode!r} is invalid: expected None or 'ansi'")
        self.fixed_problem = fixed
        self.render_mode = render_mode
        self.observation_space = spaces.MultiDiscrete([n, T + 1, 2])
        self.action_space = spaces.Discrete(V)
        self._correct = self.problems.correct.numpy()  # [n, T]
        self._lengths = self.problems.lengths.numpy()  # [n]
        self._allowed = self.problems.recovery_allowed.numpy()  # [T]
        q = np.stack([self.problems.p_correct.numpy(), self.problems.p_recover.numpy()], axis=2)  # [n, T, 2]
        self._value = success_table(self.problems, torch.from_numpy(q)).numpy()  # [n, T+1, 2]
        self._problem, self._t, self._status, self._first_error = 0, 0, ON_TRACK, T
        self._tokens: list[int] = []

    def _obs(self) -> np.ndarray:
        return np.array([self._problem, self._t, self._status], dtype=np.int64)

    def _info(self) -> dict[str, Any]:
        return {"first_error": self._first_error, "length": int(self._lengths[self._problem]),
                "p_success_base": float(self._value[self._problem, self._t, self._status])}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start an episode: of ``options["problem"]`` if given, else of the fixed problem, else
        of one drawn with the env's RNG (seeded by ``seed``). Other option keys are errors."""
        unknown = sorted(set(options or {}) - set(RESET_OPTIONS), key=str)
        if unknown:
            raise ValueError(f"options = {options!r} is invalid: unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"expected only {', '.join(map(repr, RESET_OPTIONS))}")
        super().reset(seed=seed)
        if options and "problem" in options:
            p = _problem_id(options["problem"], self.problems.n, "options['problem']")
        elif self.fixed_problem is not None:
            p = self.fixed_problem
        else:
            p = int(self.np_random.integers(self.problems.n))
        self._problem, self._t, self._status = p, 0, ON_TRACK
        self._first_error = int(self._lengths[p])
        self._tokens = []
        return self._obs(), self._info()

    def step(self, action):
        T = int(self._lengths[self._problem])  # this problem's length
        if self._t >= T:
            raise RuntimeError("step() called on a finished episode: call reset() first")
        a = _integer(action)
        if a is None or not self.action_space.contains(a):
            raise ValueError(f"action = {action!r} is invalid: expected an integer in [0, {self.problems.V}) "
                             f"(the action space Discrete({self.problems.V}))")
        ok = a == int(self._correct[self._problem, self._t])
        if not ok and self._first_error == T:
            self._first_error = self._t
        on = ok and (self._status == ON_TRACK or bool(self._allowed[self._t]))
        self._status = ON_TRACK if on else DERAILED
        self._tokens.append(a)
        self._t += 1
        terminated = self._t == T
        reward = 1.0 if terminated and self._status == ON_TRACK else 0.0
        return self._obs(), reward, terminated, False, self._info()

    def render(self):
        if self.render_mode == "ansi":
            status = "on-track" if self._status == ON_TRACK else "derailed"
            length = int(self._lengths[self._problem])
            return f"problem {self._problem} step {self._t}/{length} {status} tokens {self._tokens}\n"
        return None


def register() -> None:
    """Register :data:`ENV_ID` with gymnasium (idempotent)."""
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point="sims.env:TokenTreeEnv")
