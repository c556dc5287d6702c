"""Tests of ``ptq_adversary.policy``, one file per submodule (``cases`` holds shared budgets)."""
