"""``python -m kubetune.cli``: the ``kubetune`` command (the plain Argo Workflow's step containers run this)."""

import sys

from kubetune.cli import main

sys.exit(main())
