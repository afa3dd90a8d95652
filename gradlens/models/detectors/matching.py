"""One-to-one matching of a set detector's queries to the objects, as mmdetection's Hungarian assigners do it.

``HungarianAssigner`` (Deformable DETR) and ``MaskHungarianAssigner`` (Mask2Former) both hand their cost matrix,
detached and on the CPU, to ``scipy.optimize.linear_sum_assignment``; so does gradlens, with the cost computed in
the same dtype, so that ties are broken exactly as scipy breaks them for the framework.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def hungarian_match(cost: Tensor) -> Tensor:
    """Each query's matched object (``-1``: none) under the minimum-cost one-to-one matching of the ``(queries,
    objects)`` cost."""
    matched = torch.full((cost.shape[0],), -1, dtype=torch.long, device=cost.device)
    if cost.numel() == 0:
        return matched
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    matched[torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(cost.device)] = \
        torch.from_numpy(np.asarray(cols, dtype=np.int64)).to(cost.device)
    return matched
