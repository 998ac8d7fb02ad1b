"""HF <-> megatron-core checkpoint conversion: key tables, TP slicing, model sources.

Pure functions: nothing here creates process groups or builds megatron models.
"""

from spd_megatron.convert.hf_mcore import hf_to_mcore, mcore_to_hf, merge_qkv, split_qkv
from spd_megatron.convert.shard import (
    check_tp_compatible,
    global_to_local_key,
    local_to_global_key,
    shard_for_tp,
    unshard_tp,
)

__all__ = [
    "check_tp_compatible",
    "global_to_local_key",
    "hf_to_mcore",
    "local_to_global_key",
    "mcore_to_hf",
    "merge_qkv",
    "shard_for_tp",
    "split_qkv",
    "unshard_tp",
]
