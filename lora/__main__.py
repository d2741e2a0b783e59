"""`python -m lora ...` is the `lora` command; torchrun starts training processes this way (-m lora finetune)."""
import sys

from .cli import main

sys.exit(main())
