"""``python -m hallupatch.eval``: see :mod:`hallupatch.eval.cli`."""
import sys

from hallupatch.eval.cli import main

sys.exit(main())
