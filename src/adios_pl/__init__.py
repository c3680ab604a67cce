"""adios-pl: ADIOS (adversarial masking for self-supervised learning) for PyTorch Lightning.

- [0] ADIOS, 2022, https://arxiv.org/abs/2201.13100
"""

from adios_pl.module import ADIOSModule

__version__ = "0.1.0"
__all__ = ["ADIOSModule", "__version__"]
