"""Simulator backend: token-tree MDP with controllable recoverability.

Modules: :mod:`~sims.spec` (``TokenTreeSpec``, the drawn ``ProblemSet``), :mod:`~sims.policy`
(tabular logits / shared weights on random features), :mod:`~sims.optim` (Adam, SGD),
:mod:`~sims.sampler` (vectorised sampling and status replay), :mod:`~sims.oracle` (exact
P(success | prefix), pass@k), :mod:`~sims.backend` (``SimBackend``, the core's Backend
protocol), :mod:`~sims.runner` (training loop on the core), :mod:`~sims.env` (gymnasium
``deepgrpo/TokenTree-v0``, registered on import of ``sims``), :mod:`~sims.compare`
(equal-budget comparison), :mod:`~sims.figure` (its SVG figure), :mod:`~sims.memory` (the
memory a run needs, checked before anything is allocated), :mod:`~sims.cli`
(``deepgrpo sim run|compare``).
"""

from sims.env import ENV_ID
from sims.env import register as _register_env

_register_env()

__all__ = ["ENV_ID"]
