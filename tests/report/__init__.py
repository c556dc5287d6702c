"""Tests of ptq_adversary.report, one module per submodule."""
