"""Tests of ``ptq_adversary.transform``, one file per submodule (``nets`` holds shared models)."""
