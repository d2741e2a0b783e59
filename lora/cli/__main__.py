"""`python -m lora.cli`: the same as the `lora` command."""
import sys

from . import main

sys.exit(main())
