"""Training-free zero-shot evaluation of the towers of any xvlm method (LaZSL and its DCLIP baseline)."""

from xvlm.zeroshot.lazsl import (
    LaZSL,
    LaZSLOutput,
    descriptor_sentence,
    descriptor_sentences,
    encode_descriptors,
    image_seeds,
    lazsl_scores,
    load_descriptors,
    make_views,
    sample_boxes,
    vision_selection,
)

__all__ = [
    "LaZSL",
    "LaZSLOutput",
    "descriptor_sentence",
    "descriptor_sentences",
    "encode_descriptors",
    "image_seeds",
    "lazsl_scores",
    "load_descriptors",
    "make_views",
    "sample_boxes",
    "vision_selection",
]
