"""The seed's entry point: `python finetune.py --model_name_or_path M ...` is `lora finetune ...`."""
import sys

from lora.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
