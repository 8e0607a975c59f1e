from .config import StarConfig
from .method import StarMethod

__all__ = ["StarConfig", "StarMethod"]
