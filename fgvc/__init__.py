"""fgvc: fine-grained visual classification with the FixRes recipe."""

from fgvc.errors import FgvcError

__version__ = "0.1.0"
__all__ = ["FgvcError", "__version__"]
