"""`python -m pikv_jax.cli ARGS`, the same as the `pikv` console script."""

import sys

from pikv_jax.cli.main import main

sys.exit(main())
