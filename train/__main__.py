"""``python -m train [--config F] [--resume] [--out DIR] [--overwrite] [--device cpu|cuda] [key=value ...]`` and
``python -m train teacher ...``; see ``train.run``."""
import sys

from train.run import main

if __name__ == "__main__":
    sys.exit(main())
