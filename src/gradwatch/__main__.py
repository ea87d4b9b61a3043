"""``python -m gradwatch``: the same as the ``gradwatch`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
