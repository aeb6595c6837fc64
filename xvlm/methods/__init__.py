"""Training methods: one ``LightningModule`` per method, all sharing :class:`xvlm.methods.base.XVLMModule`."""

from xvlm.methods.base import XVLMModule
from xvlm.methods.clip import CLIPFineTune
from xvlm.methods.ecor import ECOR
from xvlm.methods.lico import LICO
from xvlm.methods.msci import MSCI
from xvlm.methods.svip import SVIP

__all__ = ["XVLMModule", "CLIPFineTune", "ECOR", "LICO", "MSCI", "SVIP"]
