from .config import LoraConfig
from .method import LoraMethod

__all__ = ["LoraConfig", "LoraMethod"]
