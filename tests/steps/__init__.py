"""Tests of ``ptq_adversary.steps``, one file per submodule (``cases`` holds shared inputs)."""
