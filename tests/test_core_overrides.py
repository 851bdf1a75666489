"""The one typed override path (deepgrpo.overrides) and the generated command-line options
(deepgrpo.flags): conversion by annotation, dotted keys, ConfigError attributes, layering."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepgrpo.config import AdvantageConfig, AlgoConfig, ConfigError, EstimatorConfig, ExploreConfig, LossConfig
from deepgrpo.methods import method_config
from deepgrpo.overrides import apply_overrides, coerce, from_dict, leaves, resolve_key, short_names


@pytest.mark.parametrize("text,value", [("true", True), ("On", True), ("YES", True), ("1", True),
                                        ("false", False), ("off", False), ("No", False), ("0", False)])
def test_booleans_accept_the_six_word_pairs(text, value):
    assert coerce("AdvantageConfig", "scale_std", bool, text) is value


@pytest.mark.parametrize("text", ["", "2", "truthy", "none", "0.0", "y"])
def test_booleans_reject_anything_else(text):
    with pytest.raises(ConfigError) as e:
        coerce("AdvantageConfig", "scale_std", bool, text)
    assert (e.value.owner, e.value.field, e.value.value) == ("AdvantageConfig", "scale_std", text)
    assert "boolean" in e.value.allowed


def test_scale_std_off_is_false_not_a_truthy_string():
    # before the typed path, --set scale_std=off turned std scaling *on*
    assert method_config("grpo", scale_std="off").advantage.scale_std is False
    assert method_config("grpo", scale_std="on").advantage.scale_std is True


@pytest.mark.parametrize("value,expected", [("8", 8), ("8.0", 8), (8.0, 8), (8, 8), (" 16 ", 16)])
def test_integers_convert_integral_values(value, expected):
    cfg = method_config("grpo", G=value)
    assert cfg.explore.G == expected and type(cfg.explore.G) is int


@pytest.mark.parametrize("value", ["8.5", 8.5, "inf", "nan", "eight", True, "1e400"])
def test_integers_reject_the_rest_naming_the_field(value):
    with pytest.raises(ConfigError) as e:
        method_config("grpo", G=value)
    assert e.value.owner == "ExploreConfig" and e.value.field == "G" and "ExploreConfig.G" in str(e.value)


def test_optional_fields_accept_none_and_nested_sections_dotted_keys():
    cfg = method_config("deep-grpo", {"loss.dual_clip": "none", "explore.aux_budget": "NULL", "loss.lam": "0.5"})
    assert cfg.loss.dual_clip is None and cfg.explore.aux_budget is None and cfg.loss.lam == 0.5
    cfg = apply_overrides(AlgoConfig(), {"dual_clip": "2.5", "estimator.kind": "state"})
    assert cfg.loss.dual_clip == 2.5 and cfg.estimator.kind == "state"


def test_unknown_and_ambiguous_keys():
    with pytest.raises(ConfigError, match="not a setting of AlgoConfig"):
        apply_overrides(AlgoConfig(), {"explore.nope": 1})
    from sims.cli import SimRunSettings
    # 'seed' only names spec.seed in the simulator's tree; a dotted tail is exact
    assert resolve_key(SimRunSettings, "spec.seed").key == "spec.seed"
    from llm.cli import LLMTrainSettings
    with pytest.raises(ConfigError, match="ambiguous"):
        resolve_key(LLMTrainSettings, "max_response_tokens")
    names = short_names(leaves(LLMTrainSettings))
    assert names["seed"].key == "train.seed" and names["eval_seed"].key == "train.eval.seed"
    assert names["sampling_temperature"].key == "train.sampling.temperature"


def test_from_dict_is_strict_for_every_config():
    from llm.trainer import TrainConfig
    from sims.runner import RunnerConfig
    from sims.spec import TokenTreeSpec
    for cls in (AlgoConfig, TokenTreeSpec, RunnerConfig, TrainConfig):
        with pytest.raises(ConfigError) as e:
            from_dict(cls, {"no_such_field": 1})
        assert e.value.field == "no_such_field"
    with pytest.raises(ConfigError):
        TrainConfig.from_dict({"model": "m", "bogus": 3})  # a ConfigError, not a TypeError
    t = TrainConfig.from_dict({"model": "m", "betas": [0.8, 0.9], "sampling": {"temperature": "0.7"}})
    assert t.betas == (0.8, 0.9) and t.sampling.temperature == 0.7


NUMERIC_FIELDS = [(cls, leaf.name) for cls in (ExploreConfig, AdvantageConfig, LossConfig, EstimatorConfig)
                  for leaf in leaves(cls) if "float" in str(leaf.type) or "int" in str(leaf.type)]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(NUMERIC_FIELDS), st.sampled_from([math.inf, -math.inf, math.nan, "inf", "-inf", "nan"]))
def test_non_finite_values_are_rejected_with_the_fields_name(field, value):
    cls, name = field
    with pytest.raises(ConfigError) as e:
        from_dict(cls, {name: value})
    assert e.value.field == name and name in str(e.value)


@settings(max_examples=60, deadline=None)
@given(st.integers(-10**6, 0))
def test_out_of_range_group_sizes_are_rejected(n):
    """Also: G = 1 or K = 1 would form groups of one, whose advantage is 0 by construction."""
    for name in ("G", "K", "n_pivots"):  # G and K: >= 2 (a group of one carries no signal)
        with pytest.raises(ConfigError) as e:
            from_dict(ExploreConfig, {name: n})
        assert e.value.field == name and ("[1, inf)" if name == "n_pivots" else "[2, inf)") in e.value.allowed


# -- the simulator's command line -------------------------------------------------------------


def _sim(argv, capsys):
    from sims.cli import main
    code = main(argv)
    return code, capsys.readouterr()


def test_sim_run_set_scale_std_off_is_recorded_false_and_g_8_0_runs_with_8(tmp_path, capsys, one_torch_thread):
    out = tmp_path / "r"
    code, _ = _sim(["run", "--method", "grpo", "--steps", "1", "--n-problems", "4", "--set", "scale_std=off",
                    "--set", "G=8.0", "--no-progress", "--out", str(out)], capsys)
    assert code == 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["algo"]["advantage"]["scale_std"] is False
    assert rec["config"]["algo"]["explore"]["G"] == 8 and rec["budget"]["rollouts"] == 4 * 8


def test_sim_run_g_8_5_is_one_line_naming_g_exit_2_nothing_written(tmp_path, capsys):
    out = tmp_path / "r"
    code, cap = _sim(["run", "--method", "grpo", "--set", "G=8.5", "--out", str(out)], capsys)
    err = cap.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "G = '8.5'" in err[0] and "--set" in err[0]
    assert not out.exists()


def test_sim_run_layering_preset_file_flags_set(tmp_path, capsys, one_torch_thread):
    # drgrpo's preset sets aggregation; the file overrides it and sets K and lam; a flag overrides
    # lam; --set overrides the flag's K
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: drgrpo\nseed: 4\naggregation: token-mean\nalgo:\n  loss: {lam: 0.3}\n"
                   "spec: {depth: 5, n_problems: 4}\nrunner: {steps: 1}\nK: 2\n")
    out = tmp_path / "r"
    code, cap = _sim(["run", "--config", str(cfg), "--lam", "0.7", "--K", "3", "--set", "K=5", "--no-progress",
                      "--out", str(out)], capsys)
    assert code == 0, cap.err
    rec = json.loads((out / "run.json").read_text())
    algo = rec["config"]["algo"]
    assert rec["method"] == "drgrpo" and rec["seed"] == 4 and rec["config"]["spec"]["depth"] == 5
    assert algo["explore"]["strategy"] == "root"  # from the preset
    assert algo["loss"]["aggregation"] == "token-mean"  # the file beats the preset
    assert algo["loss"]["lam"] == 0.7  # a flag beats the file
    assert algo["explore"]["K"] == 5  # --set beats a flag


def test_every_field_of_every_command_has_a_flag_with_help():
    from llm.cli import OPTIONS
    from sims.cli import COMPARE_OPTIONS, RUN_OPTIONS
    for options in (RUN_OPTIONS, COMPARE_OPTIONS, *OPTIONS.values()):
        for leaf in leaves(options.cls):
            if leaf.key in options.hidden:
                continue
            assert options.flag(leaf).startswith("--") and options.flag(leaf) != "--set", leaf.key
            assert leaf.doc, f"{options.cls.__name__}: {leaf.key} has no description in its docstring"


def test_groups_of_one_are_rejected_not_silently_wasted():
    for kw, field in ((dict(G=1), "G"), (dict(K=1), "K")):
        with pytest.raises(ConfigError) as e:
            method_config("deep-grpo", **kw)
        assert e.value.field == field and "[2, inf)" in str(e.value)
    assert method_config("grpo", G=2).explore.G == 2


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", float("inf")])
def test_non_finite_rates_are_rejected_in_the_backends_configs_too(value):
    from llm.trainer import TrainConfig
    from sims.runner import RunnerConfig
    for cls, field in ((TrainConfig, "lr"), (RunnerConfig, "lr"), (TrainConfig, "max_grad_norm")):
        with pytest.raises(ConfigError) as e:
            from_dict(cls, {field: value})
        assert e.value.field == field
