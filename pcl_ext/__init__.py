"""pcl_ext: fused kernels for Prototypical Contrastive Learning (PCL) in PyTorch."""
import torch

from ._build_info import TORCH_MIN as _TORCH_MIN, VERSION as __version__

# The compiled ops use only the LibTorch stable ABI of torch _TORCH_MIN: any newer torch loads
# them, an older one lacks symbols they need.
if torch.__version__ < _TORCH_MIN:
    raise ImportError(f"pcl_ext needs torch >= {_TORCH_MIN}, but torch {torch.__version__} is "
                      "installed; upgrade torch")
try:
    from . import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as exc:
    raise ImportError(f"pcl_ext's compiled ops failed to load ({exc}); reinstall pcl_ext with "
                      "`pip install .`") from exc

from . import reference  # noqa: E402
from .ops import (concentration, info_nce, info_nce_with_accuracy, momentum_update_,  # noqa: E402
                  proto_nce, sample_negatives)
from .cluster import ClusterResult, cluster  # noqa: E402
from .queue import RingQueue  # noqa: E402
from .loss import ProtoNCELoss  # noqa: E402
from .contrastive import NTXentLoss, SymmetricInfoNCELoss, cpc_info_nce  # noqa: E402

__all__ = ["ClusterResult", "NTXentLoss", "ProtoNCELoss", "RingQueue", "SymmetricInfoNCELoss",
           "cluster", "concentration", "cpc_info_nce", "info_nce", "info_nce_with_accuracy",
           "momentum_update_", "proto_nce", "reference", "sample_negatives"]
