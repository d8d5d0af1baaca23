"""The refined Mask2Former head: MSDeformAttn pixel decoder, refinement, masked-attention decoder."""
from qd_core.head.decoder import MaskedAttentionDecoder, resized_mask_features
from qd_core.head.msda import MSDeformAttn, ms_deform_attn_core
from qd_core.head.pixel_decoder import MSDeformAttnPixelDecoder
from qd_core.head.position import sine_position_encoding
from qd_core.head.refine import Refinement

__all__ = ["MSDeformAttnPixelDecoder", "MSDeformAttn", "ms_deform_attn_core", "Refinement",
           "MaskedAttentionDecoder", "resized_mask_features", "sine_position_encoding"]
