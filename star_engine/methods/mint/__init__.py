from .config import MintConfig
from .method import MintMethod

__all__ = ["MintConfig", "MintMethod"]
