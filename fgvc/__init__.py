"""fgvc: fine-grained visual classification with the FixRes recipe."""

import os

# albumentations checks PyPI for a newer release on import; fgvc runs offline (clusters, Kaggle kernels).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from fgvc.errors import FgvcError

__version__ = "0.1.0"
__all__ = ["FgvcError", "__version__"]
