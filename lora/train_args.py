"""The finetune flags: argparse flags made from TrainConfig's fields, and parsed flags back into a TrainConfig."""
import argparse
import typing
from dataclasses import MISSING, fields
from typing import Any

from .train_config import TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One flag per TrainConfig field, with its name, type, default, choices and help."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        kind = hints[f.name]
        options: dict[str, Any] = {"help": f.metadata["help"] or None}
        if f.metadata["choices"]:
            options["choices"] = list(f.metadata["choices"])
        if f.default is MISSING:
            options["required"] = True
        else:
            options["default"] = f.default
        if kind is bool:
            options["action"] = "store_true"
        elif kind == bool | None:
            options["action"] = argparse.BooleanOptionalAction  # --evaluate / --no-evaluate / not given
        else:
            options["type"] = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
        p.add_argument(f"--{f.name}", **options)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed flags (other attributes, such as the subcommand's name, are left out)."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def finetune_args(**kwargs: Any) -> TrainConfig:  # noqa: ANN401 - any setting's value
    """The finetune settings for library use: lora.finetune(finetune_args(model_name_or_path=..., ...)).

    Takes the flags' names without dashes; the three required ones are model_name_or_path,
    target_modules_path and train_data_path.
    """
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"unknown finetune argument {unknown[0]!r}")
    missing = [f.name for f in fields(TrainConfig) if f.default is MISSING and f.name not in kwargs]
    if missing:
        raise TypeError(f"finetune_args needs {', '.join(missing)}")
    return TrainConfig(**kwargs)
