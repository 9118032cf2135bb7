"""minipeft: a from-scratch, tested reference implementation of parameter-efficient fine-tuning."""
from .checkpoint import load_pretrained, save_pretrained
from .config import PRESETS, ModelConfig
from .generation import generate
from .model import KVCache, Transformer

__all__ = ["ModelConfig", "PRESETS", "Transformer", "KVCache", "generate", "load_pretrained", "save_pretrained"]
