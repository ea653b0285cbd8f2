"""setok: semantic-equivalent vision tokenization (SeTok / Setokim, ICLR 2025)."""
from .version import __version__

__all__ = ["__version__"]
