"""``python -m xtoken_nemo ...``: the ``xtoken`` command."""

import sys

from xtoken_nemo.cli import main

if __name__ == "__main__":
    sys.exit(main())
