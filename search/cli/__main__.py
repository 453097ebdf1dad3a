"""``python -m difftune.search.cli``: the ``difftune`` command."""

import sys

from difftune.search.cli import main

sys.exit(main())
