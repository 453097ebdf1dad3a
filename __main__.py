"""``python -m difftune ARGS``: the same as the ``difftune`` command."""

import sys

from difftune.search.cli import main

sys.exit(main())
