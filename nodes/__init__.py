"""Thin V3 node classes: validate inputs, call engine/ and attention/, return outputs."""

from .edit_sampler import EditSampler
from .injection import SelfAttentionInjection
from .inversion import DDIMInversion, InversionReconstruct
from .masks import AdaptiveMask, InstantMask
from .regulation import AttentionRegulation
from .toy_loader import ToyModelLoader
from .uniform_attention import UniformAttention

NODES = [DDIMInversion, InversionReconstruct, UniformAttention, SelfAttentionInjection, EditSampler, InstantMask, AdaptiveMask,
         ToyModelLoader, AttentionRegulation]
