"""lora-pytorch: LoRA finetuning for Hugging Face causal LMs, and one base model serving many tasks."""
from .checkpoint import Adapter, load_adapter, read_adapter, save_adapter
from .errors import LoraError
from .export import export_gguf_adapter, export_gguf_merged, export_merged, export_ollama, read_gguf_adapter
from .inject import find_targets, inject, lora_layers, lora_parameters, mark_only_lora_as_trainable, merge_and_unload
from .layers import LoraLayer
from .models import DEFAULT_MODEL, load_model
from .multitask import MultiTaskModel
from .train import finetune
from .train_args import finetune_args
from .train_config import TrainConfig

__all__ = ["Adapter", "DEFAULT_MODEL", "LoraError", "LoraLayer", "MultiTaskModel", "TrainConfig", "export_gguf_adapter",
           "export_gguf_merged", "export_merged", "export_ollama", "find_targets", "finetune", "finetune_args",
           "inject", "load_adapter", "load_model", "lora_layers", "lora_parameters", "mark_only_lora_as_trainable",
           "merge_and_unload", "read_adapter", "read_gguf_adapter", "save_adapter"]
