"""bonsai: train a compact CNN on an image dataset it has never seen, fast, and reshape it while it learns.

>>> import bonsai
>>> run = bonsai.fit("path/to/data", budget="5m")  # doctest: +SKIP
>>> run.predict("new_images/").labels[:3]  # doctest: +SKIP
"""

from bonsai.api import Predictions, Run, fit, load
from bonsai.config import FitConfig
from bonsai.errors import BonsaiError, DatasetError
from bonsai.models.arch import PRESETS, ArchSpec, preset

__all__ = ["ArchSpec", "BonsaiError", "DatasetError", "FitConfig", "PRESETS", "Predictions", "Run", "fit", "load", "preset"]
__version__ = "0.1.0"
