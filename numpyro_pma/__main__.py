"""``python -m numpyro_pma``: the same as the ``numpyro-pma`` command."""

import sys

from numpyro_pma.cli import main

sys.exit(main())
