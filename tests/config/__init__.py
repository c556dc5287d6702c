"""Tests of ptq_adversary.config and of the config files."""
