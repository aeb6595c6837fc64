"""xvlm: fine-tune explainable vision-language models with PyTorch Lightning (``docs/architecture.md``).

Importing the package registers the project's own weights source ``pretrained='shapes'`` (the tiny backbones
built on the Shapes world, :mod:`xvlm.shapes_pretraining`) with :mod:`xvlm.backbones`.
"""

import xvlm.shapes_pretraining  # noqa: F401  (registers pretrained='shapes')
