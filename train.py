#!/usr/bin/env python
"""Train one stage of DALL-E 1 (the stage the config names).

    python train.py --config configs/demo_vae.yaml
    python train.py --config configs/demo_dalle.yaml --train.max_steps=2000

See `dalle1 train --help`; this file is the same command.
"""

import sys

from dalle1.cli import main

if __name__ == "__main__":
    sys.exit(main(command_name="train"))
