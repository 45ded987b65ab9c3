"""What every Numba module of the cpu backend shares: the jit flavours and one parallel rule.

The threshold lives in `kernels.cpu.PARALLEL_MIN_WORK` (tests lower it to force the prange
loops); it is read at call time because kernels.cpu imports the other cpu modules.
"""

from __future__ import annotations

import numpy as np
from numba import njit

F32 = np.float32
jit = njit(cache=True, fastmath=False)
pjit = njit(cache=True, fastmath=False, parallel=True)


def parallel(work: int) -> bool:
    """Below the threshold thread start-up costs more than the loop saves."""
    from kernels import cpu

    return work >= cpu.PARALLEL_MIN_WORK
