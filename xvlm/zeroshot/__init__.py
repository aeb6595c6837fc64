"""Training-free zero-shot evaluation of the towers of any xvlm method (LaZSL and its DCLIP baseline)."""

from xvlm.zeroshot import lazsl
from xvlm.zeroshot.lazsl import *  # noqa: F403 (the public names are lazsl.__all__)

__all__ = list(lazsl.__all__)
