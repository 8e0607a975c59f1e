from .config import SgdConfig
from .method import SgdMethod

__all__ = ["SgdConfig", "SgdMethod"]
