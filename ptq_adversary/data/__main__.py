"""``python -m ptq_adversary.data``: see `ptq_adversary.data.cli`."""

import sys

from ptq_adversary.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
