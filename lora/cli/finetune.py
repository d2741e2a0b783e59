"""`lora finetune`: train one adapter, in this process or in N processes started through torchrun."""
import argparse

from .. import distributed, train, train_args


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return train_args.add_arguments(p)


def run(args: argparse.Namespace) -> None:
    train.finetune(train_args.config_from_args(args))


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """`lora finetune --nproc_per_node N`: check the flags here, then let torchrun start N processes."""
    train_args.config_from_args(args).check()
    return distributed.launch(args.nproc_per_node, argv)
