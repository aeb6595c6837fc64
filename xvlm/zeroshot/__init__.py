"""Training-free zero-shot evaluation of the towers of any xvlm method (LaZSL and its DCLIP baseline).

The descriptor sentence builder lives in :mod:`xvlm.prompts` and is re-exported here.
"""

from xvlm.prompts import descriptor_sentence, descriptor_sentences, encode_descriptors
from xvlm.zeroshot import lazsl
from xvlm.zeroshot.lazsl import *  # noqa: F403 (the public names are lazsl.__all__)

__all__ = [*lazsl.__all__, "descriptor_sentence", "descriptor_sentences", "encode_descriptors"]
