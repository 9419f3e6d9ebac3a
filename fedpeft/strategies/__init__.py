"""fedpeft's aggregation methods, one module each, on a shared Flower strategy base."""

from fedpeft.strategies.base import LowRankStrategy
from fedpeft.strategies.fed_sb import FedSB
from fedpeft.strategies.fedavg import FedAvgLoRA
from fedpeft.strategies.fedex_lora import FedExLoRA
from fedpeft.strategies.fedmomentum import FedMomentum
from fedpeft.strategies.fedrot_lora import FedRotLoRA
from fedpeft.strategies.fedsa_lora import FedSALoRA
from fedpeft.strategies.fedsvd import FedSVD
from fedpeft.strategies.ffa_lora import FFALoRA
from fedpeft.strategies.flexlora import FlexLoRA
from fedpeft.strategies.flora import FLoRA
from fedpeft.strategies.hetlora import HetLoRA
from fedpeft.strategies.lora_fair import LoRAFAIR
from fedpeft.strategies.rolora import RoLoRA
from fedpeft.strategies.round_stats import RoundStats

#: strategy config name -> class; each class declares its own `name`
STRATEGIES: dict[str, type[LowRankStrategy]] = {
    cls.name: cls
    for cls in (
        FedAvgLoRA,
        FFALoRA,
        FedSVD,
        LoRAFAIR,
        FLoRA,
        FedSB,
        FedExLoRA,
        FlexLoRA,
        RoLoRA,
        FedSALoRA,
        HetLoRA,
        FedRotLoRA,
        FedMomentum,
    )
}

__all__ = [
    "STRATEGIES",
    "FFALoRA",
    "FLoRA",
    "FlexLoRA",
    "FedSB",
    "FedAvgLoRA",
    "FedExLoRA",
    "FedMomentum",
    "FedRotLoRA",
    "FedSALoRA",
    "FedSVD",
    "HetLoRA",
    "LoRAFAIR",
    "LowRankStrategy",
    "RoLoRA",
    "RoundStats",
]
