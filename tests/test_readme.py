"""The README's Python example runs as written, and does what the README says it does."""

import re

from tests.helpers import REPO


def test_readme_python_examples_run():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 1
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (our own docs)
    ns = namespace
    # The audit example: a linen model, sites derived from its program.
    assert ns["result"].site_names == ("conv2", "head")
    methods = ns["summary"]
    # The certify bracket: exact (2 sites, 5 allocations, no limits), and equal to the
    # exhaustive search's exact worst case; every search is an upper bound of it.
    bracket = ns["bracket"]
    assert bracket["exact"] and bracket["certified_accuracy"] == bracket["accuracy"]
    assert bracket["accuracy"] == methods["exhaustive"]["accuracy"]
    assert sum(bracket["states"].values()) == len(ns["labels"])
    for name in ("uniform", "random_search", "greedy"):
        assert methods[name]["accuracy"] >= methods["exhaustive"]["accuracy"], name
    # The report files it says it writes.
    assert {"json", "methods_csv", "examples_csv", "markdown"} <= set(ns["paths"])
