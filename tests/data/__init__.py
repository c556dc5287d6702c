"""Tests of ptq_adversary.data, one module per submodule."""
