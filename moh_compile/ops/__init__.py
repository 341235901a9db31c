"""The project's own operators (torch.library custom ops). Importing this registers them."""
from moh_compile.ops.attention import attention, attention_reference
from moh_compile.ops.ffn import ffn, ffn_reference
from moh_compile.ops.moepp import moepp_ffn, moepp_ffn_reference, split_ffn_into_experts

__all__ = ["attention", "attention_reference", "ffn", "ffn_reference", "moepp_ffn", "moepp_ffn_reference",
           "split_ffn_into_experts"]
