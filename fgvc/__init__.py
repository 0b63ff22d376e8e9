"""fgvc: fine-grained visual classification with the FixRes recipe.

The library behind each command, importable from here (loaded on first use: ``import fgvc`` stays light)::

    import logging, fgvc
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # fgvc's progress lines; a library adds no handler
    cfg = fgvc.resolve_run_config("recipes/cub.yaml", {"model.arch": "resnet50", "stage1.epochs": 5})
    fgvc.run_stage1(cfg)                                    # fgvc stage1 --recipe recipes/cub.yaml ...
    fgvc.run_stage2(cfg.run_dir(), {})                      # fgvc stage2 (at the recipe's stage2.res, 672)
    result = fgvc.run_predict(cfg.run_dir(), split="test")  # fgvc predict: result.probs is a Probabilities
    fgvc.write_submission(result.probs, "generic", "submissions/cub.csv")
"""

import os
import random
from importlib import import_module
from typing import Any

# albumentations checks PyPI for a newer release on import; fgvc runs offline (clusters, Kaggle kernels).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from fgvc.errors import FgvcError

__version__ = "0.1.0"

# name -> (module, attribute): one function per command, the config model, the probability file. Prediction is
# run_predict: the name `fgvc.predict` is its module's.
_PUBLIC = {
    "RunConfig": ("fgvc.config", "RunConfig"),
    "resolve_run_config": ("fgvc.recipe", "resolve_run_config"),
    "load_recipe": ("fgvc.recipe", "load_recipe"),
    "run_stage1": ("fgvc.engine.stage", "run_stage1"),
    "run_stage2": ("fgvc.engine.stage", "run_stage2"),
    "sweep": ("fgvc.engine.sweep", "sweep"),
    "run_predict": ("fgvc.predict", "predict"),
    "train_recipe": ("fgvc.pipeline", "train_recipe"),
    "ensemble_recipe": ("fgvc.pipeline", "ensemble_recipe"),
    "Probabilities": ("fgvc.probs", "Probabilities"),
    "write_submission": ("fgvc.submission", "write_submission"),
    "validate_submission_file": ("fgvc.submission", "validate_submission_file"),
    "check_dataset": ("fgvc.datasets.check", "check_dataset"),
    "run_demo": ("fgvc.demo", "run_demo"),
}
__all__ = ["FgvcError", "__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    """Import a public name's module when it is first used (torch loads only then).

    Python's random generator is restored afterwards: a dependency draws from it on import (``rich.style``), and a
    caller that seeded it before the first call would otherwise get another sequence than on a rerun.
    """
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fgvc' has no attribute '{name}'")
    module, attribute = _PUBLIC[name]
    python_rng = random.getstate()
    try:
        value = getattr(import_module(module), attribute)
    finally:
        random.setstate(python_rng)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
