"""Tests of ptq_adversary.analysis, one module per submodule; shared fakes in fakes.py."""
