"""The vision-language model: one file per part (nanoVLM style).

layers.py (attention, MLP, norms, RoPE, the checkpointable block), vision.py (ViT), text.py
(embedding + text encoder with fusion), decoder.py (causal captioning decoder), losses.py (ITC, MLM,
captioning), vl_model.py (VLModel, which wires them together). Sizes: vltrain/model_math.py.
"""

from vltrain.model.vl_model import VLModel

__all__ = ["VLModel"]
