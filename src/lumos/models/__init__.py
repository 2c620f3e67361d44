"""The Lumos transformer family and weight transfer between heads."""

from lumos.models.lumos_dit import LUMOS_SIZES, LumosDiT, lumos_dit, lumos_dit_config
from lumos.models.transfer import TransferReport, WeightTransferError, transfer_weights

__all__ = [
    "LUMOS_SIZES",
    "LumosDiT",
    "TransferReport",
    "WeightTransferError",
    "lumos_dit",
    "lumos_dit_config",
    "transfer_weights",
]
