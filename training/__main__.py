"""``python -m training [CONFIG] [--key value ...]``: same as ``haf-train``."""

from .cli import train_main

train_main()
