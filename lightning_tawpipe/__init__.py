"""lightning_tawpipe: TawPipe topology-aware weight pipeline parallelism for PyTorch Lightning and LitGPT.

Importing the package registers the strategy names ``"tawpipe"`` (and the ``"weipipe"`` ablation preset) in
Lightning's ``StrategyRegistry``, so ``Trainer(strategy="tawpipe")`` works; registration is idempotent.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_tawpipe.checkpoint_io import CheckpointError, TawPipeCheckpointIO
from lightning_tawpipe.precision import TawPipePrecision
from lightning_tawpipe.strategy import TawPipeStrategy
from lightning_tawpipe.topology import Topology
from lightning_tawpipe.fabric import TawPipeFabricStrategy  # noqa: E402  importing registers it with lightning.fabric

__all__ = ["CheckpointError", "TawPipeCheckpointIO", "TawPipeFabricStrategy", "TawPipePrecision", "TawPipeStrategy",
           "Topology", "register"]
__version__ = "0.1.0"


def register() -> None:
    """Register ``"tawpipe"`` and ``"weipipe"`` with Lightning (safe to call any number of times)."""
    if TawPipeStrategy.strategy_name not in StrategyRegistry:
        TawPipeStrategy.register_strategies(StrategyRegistry)


register()
