"""Thin V3 node classes: validate inputs, call engine/ and attention/, return outputs."""

from .adaptive_mask import AdaptiveMask
from .edit_sampler import EditSampler
from .injection import SelfAttentionInjection
from .instant_mask import InstantMask
from .instant_mask_estimate import InstantMaskEstimate
from .inversion import DDIMInversion, InversionReconstruct
from .prompts import EditPrompts
from .regulation import AttentionRegulation
from .toy_loader import ToyModelLoader
from .uniform_attention import UniformAttention

NODES = [DDIMInversion, InversionReconstruct, UniformAttention, SelfAttentionInjection, EditSampler, InstantMask, AdaptiveMask,
         ToyModelLoader, AttentionRegulation, InstantMaskEstimate, EditPrompts]
