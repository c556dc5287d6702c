"""Test-session set-up: quiet progress bars. Shared helpers live in ``tests/helpers.py``."""

import os

os.environ.setdefault("TQDM_DISABLE", "1")
