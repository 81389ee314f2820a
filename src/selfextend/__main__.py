"""``python -m selfextend`` (and ``torchrun -m selfextend``): the command line."""

import sys

from .cli import main

sys.exit(main())
