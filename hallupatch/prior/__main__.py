"""``python -m hallupatch.prior``: see :mod:`hallupatch.prior.cli`."""
import sys

from hallupatch.prior.cli import main

sys.exit(main())
