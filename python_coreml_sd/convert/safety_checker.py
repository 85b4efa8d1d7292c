"""Safety checker -> Core ML: `clip_input`, `images`, `adjustment` -> `filtered_images`,
`has_nsfw_concepts`, `concept_scores` (Apple's names).

diffusers' forward loops over images in Python and branches on scores; this module computes the
same decision with tensor ops only, so it traces into one static graph.
"""
from collections import OrderedDict

import torch
import torch.nn.functional as F

from ..components import TABLE, Dims
from .common import convert_traced_component, kept_existing, output_path
from .vae import latent_sizes

DESCRIPTIONS = {
    "clip_input": "The decoded image resized and normalized for CLIP (NCHW, the checker's image size)",
    "images": "The decoded images, NHWC, in [0, 1]",
    "adjustment": "Bias added to the special-care scores: higher flags more images",
    "filtered_images": "`images` with every flagged image replaced by black",
    "has_nsfw_concepts": "1 where an image was flagged, else 0",
    "concept_scores": "Scores before thresholding at 0; a score > 0 flags the image",
}


class SafetyChecker(torch.nn.Module):
    def __init__(self, checker):
        super().__init__()
        self.checker = checker

    def forward(self, clip_input, images, adjustment):
        c = self.checker
        embeds = F.normalize(c.visual_projection(c.vision_model(clip_input)[1]))
        special_scores = embeds @ F.normalize(c.special_care_embeds).T - c.special_care_embeds_weights + adjustment
        special_adjustment = (special_scores > 0).any(dim=1, keepdim=True).float() * 0.01
        concept_scores = embeds @ F.normalize(c.concept_embeds).T - c.concept_embeds_weights + special_adjustment
        flagged = (concept_scores > 0).any(dim=1).float()[:, None, None, None]  # (1, 1, 1, 1), as Apple's
        return images * (1.0 - flagged), flagged, concept_scores


def sample_inputs(checker, h, w):
    generator = torch.Generator().manual_seed(0)
    clip_input, images, adjustment = TABLE["safety_checker"].shapes(
        Dims(h, w, clip_image=checker.config.vision_config.image_size))
    return OrderedDict(clip_input=torch.randn(*clip_input, generator=generator),
                       images=torch.rand(*images, generator=generator), adjustment=torch.zeros(adjustment))


def convert_safety_checker(source, options) -> list:
    if kept_existing([output_path(options, "safety_checker")], options, "safety_checker"):
        return [output_path(options, "safety_checker")]
    module = SafetyChecker(source.load_safety_checker()).eval()
    sizes = latent_sizes(source, options)
    inputs = sample_inputs(module.checker, *sizes[0])
    variants = Dims(*sizes[0], clip_image=module.checker.config.vision_config.image_size).variants(sizes)
    # The thresholded outputs flip on tiny differences; the scores before the threshold are what to compare.
    return convert_traced_component(module, inputs, list(TABLE["safety_checker"].outputs),
                                    options, "safety_checker", DESCRIPTIONS, checked_outputs=["concept_scores"],
                                    enumerated=TABLE["safety_checker"].enumerated_shapes(variants))
