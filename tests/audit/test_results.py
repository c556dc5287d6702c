"""ptq_adversary.audit.results: the ranking puts vulnerable examples first, then the robust ones,
then those wrong in full precision."""

from tests.audit import cases


def test_ranking_orders_vulnerable_then_robust_then_wrong_in_fp():
    r = cases.hand_built_result(cases.FP, cases.VUL, cases.LOSS)
    assert r.ranking().tolist() == [3, 0, 1, 5, 2, 4]
