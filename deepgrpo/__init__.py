"""deepgrpo: the backend-agnostic core of DEEP-GRPO (Deep Dense Exploration, arXiv 2602.14169).

Modules: :mod:`~deepgrpo.config` (typed configs), :mod:`~deepgrpo.batch` (data model and the
``Backend`` protocol), :mod:`~deepgrpo.advantages`, :mod:`~deepgrpo.losses`,
:mod:`~deepgrpo.estimators`, :mod:`~deepgrpo.pivots`, :mod:`~deepgrpo.branching`,
:mod:`~deepgrpo.ledger`, :mod:`~deepgrpo.explore` (the exploration step and policy update),
:mod:`~deepgrpo.methods` (named presets), :mod:`~deepgrpo.records` (atomic run records).
"""

__version__ = "0.1.0"

from deepgrpo.advantages import group_advantages, nonzero_advantage
from deepgrpo.batch import AUX, MAIN, Backend, Batch, Rollouts, SampleRequest
from deepgrpo.branching import BranchPlan, CandidateSet, cap_plan, plan_branches
from deepgrpo.config import AdvantageConfig, AlgoConfig, ConfigError, EstimatorConfig, ExploreConfig, LossConfig
from deepgrpo.estimators import (
                             CANDIDATE_FEATURES,
                             LogisticEstimator,
                             PositionLogistic,
                             RecoverabilityEstimator,
                             StateLogistic,
                             make_estimator,
)
from deepgrpo.explore import ExploreResult, explore
from deepgrpo.ledger import BudgetLedger, StepBudget
from deepgrpo.losses import aggregate, clipped_surrogate, dual_stream_loss, kl_penalty
from deepgrpo.methods import METHODS, method_config
from deepgrpo.pivots import candidate_depths, pivot_utility
from deepgrpo.step import STEP_COLUMNS, initial_record, step_record, update_policy

__all__ = [
    "AUX", "MAIN", "AdvantageConfig", "AlgoConfig", "Backend", "Batch", "BranchPlan", "BudgetLedger",
    "CANDIDATE_FEATURES", "CandidateSet", "ConfigError", "EstimatorConfig",
    "ExploreConfig", "ExploreResult", "LogisticEstimator", "LossConfig", "METHODS", "PositionLogistic",
    "RecoverabilityEstimator", "Rollouts", "SampleRequest", "StateLogistic", "StepBudget", "aggregate",
    "candidate_depths", "cap_plan", "clipped_surrogate", "dual_stream_loss", "explore", "group_advantages",
    "kl_penalty", "make_estimator", "method_config", "nonzero_advantage", "pivot_utility", "plan_branches",
    "STEP_COLUMNS", "initial_record", "step_record", "update_policy",
]
