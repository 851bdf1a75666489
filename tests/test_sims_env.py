"""The gymnasium environment deepgrpo/TokenTree-v0."""

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import sims  # noqa: F401  (registers the environment)
from deepgrpo import ConfigError
from sims.env import ENV_ID, TokenTreeEnv
from sims.oracle import ExactOracle
from sims.policy import TokenTreePolicy
from sims.spec import DERAILED, ON_TRACK, TokenTreeSpec


@pytest.mark.parametrize("kwargs", [{}, {"recovery": "constant", "depth": 5, "vocab_size": 3},
                                    {"render_mode": "ansi", "problem": 2}])
def test_check_env_passes(kwargs):
    env = gymnasium.make(ENV_ID, **kwargs)
    check_env(env.unwrapped)
    env.close()


def test_registered_on_import_of_sims():
    assert ENV_ID in gymnasium.registry
    env = gymnasium.make(ENV_ID, depth=4)
    assert isinstance(env.unwrapped, TokenTreeEnv) and env.action_space.n == TokenTreeSpec().vocab_size


def test_episode_follows_the_chain_rules():
    env = TokenTreeEnv(depth=6, recovery="fatal")
    correct = env.problems.correct
    obs, info = env.reset(seed=0, options={"problem": 3})
    assert obs.tolist() == [3, 0, ON_TRACK] and info["first_error"] == 6
    total = 0.0
    for t in range(6):  # all correct -> reward 1 at the end only
        obs, r, term, trunc, info = env.step(int(correct[3, t]))
        total += r
        assert term == (t == 5) and not trunc and obs[2] == ON_TRACK
    assert total == 1.0
    obs, _ = env.reset(options={"problem": 3})
    env.step((int(correct[3, 0]) + 1) % env.problems.V)  # one wrong token is fatal
    for t in range(1, 6):
        obs, r, term, _, info = env.step(int(correct[3, t]))
    assert obs[2] == DERAILED and r == 0.0 and term and info["first_error"] == 0
    with pytest.raises(RuntimeError):
        env.step(0)


def test_info_reports_the_exact_base_success_probability():
    spec = TokenTreeSpec(depth=6, recovery="decay", recovery_prob=0.4)
    env = TokenTreeEnv(spec)
    W = ExactOracle(env.problems, TokenTreePolicy(env.problems)).table()
    _, info = env.reset(options={"problem": 1})
    assert info["p_success_base"] == pytest.approx(float(W[1, 0, ON_TRACK]), abs=1e-6)
    obs, *_, info = env.step((int(env.problems.correct[1, 0]) + 1) % env.problems.V)
    assert info["p_success_base"] == pytest.approx(float(W[1, 1, DERAILED]), abs=1e-6) and 0 < info["p_success_base"]


def test_random_problem_per_episode_is_seeded():
    env = TokenTreeEnv()
    a = [env.reset(seed=7)[0][0]] + [env.reset()[0][0] for _ in range(5)]
    b = [env.reset(seed=7)[0][0]] + [env.reset()[0][0] for _ in range(5)]
    assert a == b and len(set(a)) > 1
    assert np.all([0 <= p < env.problems.n for p in a])


def test_bad_spec_in_the_env_is_a_config_error():
    with pytest.raises(ConfigError, match="vocab_size"):
        gymnasium.make(ENV_ID, vocab_size=1)


def test_variable_length_episodes_end_at_their_problems_length():
    check_env(gymnasium.make(ENV_ID, depth=9, min_depth=3, seed=3).unwrapped)
    env = TokenTreeEnv(depth=9, min_depth=3, n_problems=12, n_heldout=4, seed=3)
    lengths = env.problems.lengths
    assert env.observation_space.nvec.tolist() == [16, 10, 2] and len(set(lengths.tolist())) > 2
    W = ExactOracle(env.problems, TokenTreePolicy(env.problems)).table()
    for p in range(16):
        L = int(lengths[p])
        obs, info = env.reset(options={"problem": p})
        assert info["length"] == L and info["first_error"] == L
        assert info["p_success_base"] == pytest.approx(float(W[p, 0, ON_TRACK]), abs=1e-6)
        for t in range(L):
            obs, r, term, trunc, info = env.step(int(env.problems.correct[p, t]))
            assert term == (t == L - 1) and r == (1.0 if t == L - 1 else 0.0)
        with pytest.raises(RuntimeError):
            env.step(0)


def test_the_env_plays_the_problem_set_of_its_run_seed():
    a, b = TokenTreeEnv(run_seed=0), TokenTreeEnv(run_seed=1)
    assert not np.array_equal(a.problems.correct.numpy(), b.problems.correct.numpy())
    assert np.array_equal(TokenTreeEnv(run_seed=0).problems.correct.numpy(), a.problems.correct.numpy())
    assert np.array_equal(TokenTreeEnv(run_seed=1, seed=a.problems.seed).problems.correct.numpy(),
                          a.problems.correct.numpy())


@pytest.mark.parametrize("action", [True, False, 2.5, 1.0, np.float64(1.0), "1", None, np.array([1]), 4, -1])
def test_actions_outside_the_action_space_are_refused(action):
    env = TokenTreeEnv(depth=4)
    env.reset(seed=0, options={"problem": 0})
    with pytest.raises(ValueError, match=r"action = .* is invalid: expected an integer in \[0, 4\)"):
        env.step(action)
    assert env._t == 0  # nothing was played
    for ok in (1, np.int64(2), np.array(3)):  # integers of any kind are actions
        env.step(ok)


@pytest.mark.parametrize("problem", [2.5, True, "3", 99, -1])
def test_problem_ids_must_be_integers_in_range(problem):
    n = TokenTreeSpec().n_problems + TokenTreeSpec().n_heldout
    with pytest.raises(ValueError, match=rf"problem'?\]? = .* is invalid: expected an integer in \[0, {n}\)"):
        TokenTreeEnv(problem=problem)
    env = TokenTreeEnv()
    with pytest.raises(ValueError, match=r"options\['problem'\] = .* is invalid"):
        env.reset(options={"problem": problem})
    assert env.reset(options={"problem": np.int64(3)})[0][0] == 3


def test_unknown_reset_options_are_refused():
    env = TokenTreeEnv()
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'problm'; expected only 'problem'"):
        env.reset(seed=0, options={"problm": 3})
    assert env.reset(seed=0, options={})[1]["length"] == TokenTreeSpec().depth
