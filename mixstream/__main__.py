"""``python -m mixstream``: the ``mixstream`` command (also what Composer's launcher runs with
``composer -n N -m mixstream train RECIPE``)."""

import sys

from mixstream.cli import main

sys.exit(main())
