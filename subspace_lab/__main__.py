"""``python -m subspace_lab``: the ``subspace-jax`` command line (:mod:`subspace_lab.cli`)."""

import sys

from subspace_lab.cli import main

sys.exit(main())
