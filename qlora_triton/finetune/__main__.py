"""``python -m qlora_triton.finetune [options]``: the same as ``qlora-triton finetune``."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
