"""``python -m ptq_adversary.report``: the report command (:func:`ptq_adversary.report.main`)."""

import sys

from ptq_adversary.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
