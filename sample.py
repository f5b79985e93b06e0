#!/usr/bin/env python
"""Sample images from a trained model folder.

    python sample.py --model outputs/demo/dalle/model --prompt "a red circle" --num-images 4 --seed 0 --out outputs/samples

See `dalle1 sample --help`; this file is the same command.
"""

import sys

from dalle1.cli import main

if __name__ == "__main__":
    sys.exit(main(command_name="sample"))
