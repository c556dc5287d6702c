"""The README's Python examples run as written."""

import re

from conftest import REPO


def test_readme_python_examples_run():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (our own docs)
    # The library example's shapes, and the custom model's bits interface.
    assert namespace["q_pbc"].shape == (16, 8, 10)
    tiny = namespace["Tiny"](namespace["nnx"].Rngs(0))
    jnp, models = namespace["jnp"], namespace["models"]
    g, p, r = models.split_model(tiny)
    logits, _ = models.apply_model(g, p, r, jnp.ones((2, 8, 8, 1)), jnp.full((2, 2), 3))
    assert logits.shape == (2, 10)
