import pytest

from deepgrpo.config import AdvantageConfig, AlgoConfig, ConfigError, EstimatorConfig, ExploreConfig, LossConfig
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
    (EstimatorConfig, "kind", "crystal-ball", "position"),
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


@pytest.mark.parametrize("strategy", ["max-surprisal", "low-prob", "uniform"])
def test_dispersed_plans_with_one_continuation_points_are_rejected(strategy):
    """M = 8 cut points with K = 8 would give each point one continuation: a group of one has
    advantage 0, so the plan would spend budget and learn nothing (the issue's degenerate case)."""
    with pytest.raises(ConfigError) as e:
        ExploreConfig(strategy=strategy, K=8, n_cut_points=8)
    msg = str(e.value)
    assert e.value.field == "n_cut_points" and "n_cut_points = 8" in msg and "K = 8" in msg and "[1, 4]" in msg
    with pytest.raises(ConfigError, match="n_cut_points = 3"):
        ExploreConfig(strategy=strategy, K=4, n_cut_points=3)  # 4 over 3 points: one gets a single continuation
    with pytest.raises(ConfigError, match=r"ExploreConfig\.K = 1"):
        ExploreConfig(strategy=strategy, K=1, n_cut_points=1)
    for M, K, n_pivots in ((4, 8, 1), (1, 2, 1), (8, 8, 2), (5, 11, 1)):
        ExploreConfig(strategy=strategy, K=K, n_cut_points=M, n_pivots=n_pivots)  # >= 2 per point
    with pytest.raises(ConfigError, match="n_cut_points"):
        method_config("tree-uniform", n_cut_points=8)
    # the dense strategies and GRPO do not use n_cut_points
    assert method_config("deep-grpo", n_cut_points=8).explore.n_cut_points == 8
    assert method_config("grpo", K=1).explore.K == 1


def test_tree_advantage_option_is_a_boolean_of_the_advantage_config():
    assert AdvantageConfig().tree is False and method_config("tree-surprisal", tree=True).advantage.tree is True
    with pytest.raises(ConfigError, match=r"AdvantageConfig\.tree = 'yes'"):
        AdvantageConfig(tree="yes")
