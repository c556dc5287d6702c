"""The analysis tests' shared fixture: one fake run on disk (see :mod:`tests.analysis.fakes`)."""

import pytest

from tests.analysis.fakes import make_fake_run, tiny_dataset


@pytest.fixture(scope="package")
def fake_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run"))
    make_fake_run(run_dir, seed=0, modes=("detrimental",))  # one pair keeps the test fast
    return run_dir, tiny_dataset()
