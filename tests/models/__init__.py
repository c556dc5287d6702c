"""Tests of ``ptq_adversary.models``, one file per submodule (``cases`` holds shared models)."""
