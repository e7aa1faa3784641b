"""nanoseek: the DeepSeek-V3 / DeepSeek-R1 system in one readable PyTorch codebase."""

from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.io.hf import load_pretrained, save_pretrained
from nanoseek.model import Transformer

__all__ = ["ModelConfig", "Transformer", "load_pretrained", "save_pretrained", "NanoseekError"]
__version__ = "0.1.0"
