"""``python -m xtoken_nemo.cli ...``: the ``xtoken`` command (the form the sbatch node script runs)."""

import sys

from xtoken_nemo.cli import main

if __name__ == "__main__":
    sys.exit(main())
