"""``python -m fusionnet``: the same as the ``fusionnet`` command."""

import sys

from fusionnet.cli.main import main

sys.exit(main())
