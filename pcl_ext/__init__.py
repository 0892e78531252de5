"""pcl_ext: fused kernels for Prototypical Contrastive Learning (PCL) in PyTorch."""
import torch

from ._build_info import TORCH_VERSION as _BUILT_WITH, VERSION as __version__

if torch.__version__ != _BUILT_WITH:
    raise ImportError(
        f"pcl_ext was compiled against torch {_BUILT_WITH} but torch {torch.__version__} is "
        "installed; rebuild it with `pip install --no-build-isolation .` in this environment")
try:
    from . import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as exc:  # an ABI mismatch shows up here as undefined symbols
    raise ImportError(f"pcl_ext's compiled ops failed to load ({exc}); rebuild with "
                      "`pip install --no-build-isolation .` against the installed torch") from exc

from . import reference  # noqa: E402
from .ops import concentration, momentum_update_, proto_nce, sample_negatives  # noqa: E402
from .cluster import ClusterResult, cluster  # noqa: E402
from .queue import RingQueue  # noqa: E402
from .loss import ProtoNCELoss  # noqa: E402

__all__ = ["ClusterResult", "ProtoNCELoss", "RingQueue", "cluster", "concentration",
           "momentum_update_", "proto_nce", "reference", "sample_negatives"]
