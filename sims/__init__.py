"""Simulator backend: token-tree MDP with controllable recoverability."""
