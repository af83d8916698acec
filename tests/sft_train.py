"""``python sft_train.py CONFIG [--key=value ...]``: train a config with the SFT runner (not an ``ebft`` command;
the multi-process tests launch it like ``ebft train``)."""

import logging
import sys

from ebft.config import load_config
from ebft.sft.runner import mode
from ebft.train.loop import train

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the loop's log lines, as `ebft train` shows them
    train(load_config(sys.argv[1], sys.argv[2:]), mode())
