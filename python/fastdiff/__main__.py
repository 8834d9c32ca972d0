"""``python -m fastdiff``: the ``fastdiff`` command (:func:`fastdiff.cli.main`)."""

import sys

from fastdiff.cli import main

sys.exit(main())
