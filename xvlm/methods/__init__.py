"""Training methods: one ``LightningModule`` per method, all sharing :class:`xvlm.methods.base.XVLMModule`."""

from xvlm.methods.base import XVLMModule
from xvlm.methods.clip import CLIPFineTune

__all__ = ["XVLMModule", "CLIPFineTune"]
