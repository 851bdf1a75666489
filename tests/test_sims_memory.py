"""The simulator's memory rule (sims/memory.py): a run's biggest allocations are estimated from
its sizes, and sizes over the limit are refused at once with an error naming the size."""

import time

import pytest

from deepgrpo import ConfigError
from deepgrpo.methods import method_config
from sims import memory
from sims.env import TokenTreeEnv
from sims.runner import RunnerConfig, train
from sims.spec import TokenTreeSpec

GB = 10**9


def test_the_estimate_follows_the_sizes():
    spec, runner = TokenTreeSpec(), RunnerConfig()
    tables, rollouts = memory.footprint(spec, runner, method_config("grpo"))
    entries = (32 + 16) * 12 * 2 * 4
    assert tables.bytes == entries * memory.TABLE_ENTRY_BYTES + 48 * memory.PROBLEM_BYTES
    assert rollouts.bytes == 16 * 8 * 12 * memory.ROW_STEP_BYTES  # batch x G rows of depth steps
    deep = memory.footprint(spec, runner, method_config("deep-grpo"))[1]
    assert deep.bytes == 9 * rollouts.bytes  # every chain may fail and branch n_pivots x K = 8 times
    capped = memory.footprint(spec, runner, method_config("deep-grpo", aux_budget=8))[1]
    assert capped.bytes == 16 * (8 + 8) * 12 * memory.ROW_STEP_BYTES
    features = memory.footprint(spec, RunnerConfig(policy="features", feature_dim=100), None)
    assert features[1].bytes == entries * 100 * memory.FEATURE_BYTES
    assert memory.memory_limit() == int(memory.MEMORY_FRACTION * memory.physical_memory()) > 0


@pytest.mark.parametrize("spec,runner,algo,owner,field", [
    ({}, {}, {"G": 10**6}, "ExploreConfig", "G"),  # the audit's --G 1000000: 49 GB of rollouts
    ({"depth": 10**6}, None, None, "TokenTreeSpec", "depth"),
    ({"vocab_size": 10**7}, None, None, "TokenTreeSpec", "vocab_size"),
    ({"n_problems": 10**8}, {"batch_problems": 4}, {}, "TokenTreeSpec", "n_problems"),
    ({}, {"batch_problems": 10**8}, {}, None, None),  # a batch is never larger than the problem set
])
def test_sizes_over_the_limit_are_refused_naming_the_size(spec, runner, algo, owner, field):
    args = (TokenTreeSpec(**spec), None if runner is None else RunnerConfig(**runner),
            None if algo is None else method_config("grpo", **algo))
    if owner is None:
        memory.check_fits(*args, limit=20 * GB)
        return
    with pytest.raises(ConfigError) as e:
        memory.check_fits(*args, limit=20 * GB)
    assert (e.value.owner, e.value.field) == (owner, field)
    assert "fits in memory" in str(e.value) and "20.0 GB limit" in str(e.value)


def test_train_and_the_env_refuse_at_once_before_allocating():
    t = time.perf_counter()
    with pytest.raises(ConfigError, match="ExploreConfig.G = 1000000000 is invalid: expected a size that fits"):
        train(TokenTreeSpec(), method_config("grpo", G=10**9), RunnerConfig(steps=1))
    with pytest.raises(ConfigError, match="TokenTreeSpec.depth = 1000000000 is invalid"):
        TokenTreeEnv(depth=10**9)
    with pytest.raises(ConfigError, match="TokenTreeSpec.n_heldout"):
        TokenTreeSpec(n_heldout=10**10).build()
    assert time.perf_counter() - t < 1.0
