import pytest

from deepgrpo.config import (AdvantageConfig, AlgoConfig, ConfigError, EstimatorConfig, ExploreConfig,
                             LossConfig)
from deepgrpo.methods import METHODS, method_config


def test_reference_defaults():
    c = AlgoConfig()
    assert (c.explore.G, c.explore.K, c.explore.gamma, c.explore.n_pivots) == (8, 8, 2.0, 1)
    assert c.loss.lam == 1.0 and c.loss.clip_low == 0.2 and c.loss.clip_high == 0.2
    assert c.loss.kl_estimator == "k3" and c.loss.kl_coef == 1e-4
    assert c.estimator.buffer_size == 10_000 and c.estimator.min_per_class == 10
    assert c.advantage.scale_std is False and c.advantage.drop_zero is True


@pytest.mark.parametrize("cls, field, value, fragment", [
    (ExploreConfig, "G", 1, "[2, inf)"),
    (ExploreConfig, "K", 1, "[2, inf)"),
    (ExploreConfig, "K", 2.5, "integer"),
    (ExploreConfig, "gamma", -1.0, "[0.0, inf)"),
    (ExploreConfig, "strategy", "deeper", "deep"),
    (ExploreConfig, "n_pivots", True, "integer"),
    (LossConfig, "clip_low", 1.0, "[0.0, 1.0)"),
    (LossConfig, "dual_clip", 1.0, "(1.0, inf)"),
    (LossConfig, "aggregation", "mean", "token-mean"),
    (LossConfig, "kl_estimator", "k4", "k3"),
    (LossConfig, "lam", float("nan"), "[0.0, inf)"),
    (EstimatorConfig, "buffer_size", 0, "[1, inf)"),
    (EstimatorConfig, "kind", "oracle", "position"),
    (AdvantageConfig, "std_eps", 0.0, "(0.0, inf)"),
])
def test_invalid_values_name_field_value_and_range(cls, field, value, fragment):
    with pytest.raises(ConfigError) as e:
        cls(**{field: value})
    msg = str(e.value)
    assert f"{cls.__name__}.{field}" in msg and repr(value) in msg and fragment in msg


def test_roundtrip_and_unknown_keys():
    c = method_config("deep-grpo", K=4, lam=0.5, kind="state")
    assert AlgoConfig.from_dict(c.to_dict()) == c
    assert (c.explore.K, c.loss.lam, c.estimator.kind) == (4, 0.5, "state")
    with pytest.raises(ConfigError, match="unknown field"):
        AlgoConfig.from_dict({"explore": {"GG": 3}})
    with pytest.raises(ConfigError, match="not a setting of AlgoConfig"):
        method_config("grpo", nope=1)
    with pytest.raises(ConfigError, match="method = 'ppo'"):
        method_config("ppo")


def test_methods_cover_required_names():
    for name in ["grpo", "drgrpo", "deep-grpo", "deep-random", "deep-depth-only",
                 "tree-surprisal", "tree-lowprob", "tree-uniform"]:
        assert name in METHODS
    assert method_config("grpo", G=64).explore.strategy == "root"
    assert method_config("drgrpo").loss.aggregation == "seq-mean-token-sum-norm"
