"""The CPU demo (``xtoken demo``): a scaled-down reproduction of X-Token's central claim."""
