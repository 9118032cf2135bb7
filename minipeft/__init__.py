"""minipeft: a from-scratch, tested reference implementation of parameter-efficient fine-tuning.

The public names follow Hugging Face PEFT where the concept exists there, so what is learned here
transfers: LoraConfig, get_peft_model, PeftModel.from_pretrained, merge_and_unload,
print_trainable_parameters.
"""
from .adapter import AdapterConfig
from .checkpoint import load_pretrained, save_pretrained
from .config import PRESETS, ModelConfig
from .generation import generate
from .linear4bit import Linear4bit, quantize_model
from .lora import LoraConfig
from .model import KVCache, Transformer
from .nf4 import dequantize_nf4, quantize_nf4
from .peft_model import PeftModel, full_finetune, get_peft_model
from .prompt_learning import PrefixTuningConfig, PromptTuningConfig
from .tokenizer import load_tokenizer
from .train_config import TrainConfig
from .trainer import Trainer

__all__ = ["ModelConfig", "PRESETS", "Transformer", "KVCache", "generate", "load_pretrained", "save_pretrained",
           "load_tokenizer", "LoraConfig", "AdapterConfig", "PrefixTuningConfig", "PromptTuningConfig",
           "get_peft_model", "PeftModel", "full_finetune", "quantize_nf4", "dequantize_nf4", "Linear4bit",
           "quantize_model", "TrainConfig", "Trainer"]
