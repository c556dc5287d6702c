"""Tests of ptq_adversary.training: the loop, the checks and the trainers."""
