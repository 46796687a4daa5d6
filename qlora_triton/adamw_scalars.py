"""The per-step scalars of one AdamW update, computed on the host.

The Triton kernel, the plain-torch reference and the optimizer all take this one
container, so the bias corrections are computed in exactly one place and in the
same precision as ``torch.optim.AdamW`` (Python floats, i.e. float64, from the
step count; the kernel receives them as fp32 scalars, as torch's CPU kernels
do with Python scalars).
"""

from __future__ import annotations

import dataclasses

# Elements per absmax block of PagedAdamW8bit's moments (as bitsandbytes' 8-bit
# optimizers); the optimizer, its kernel and the reference all read it here.
STATE_BLOCKSIZE = 256


@dataclasses.dataclass(frozen=True)
class AdamWScalars:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: float  # 1.0 for the first update (torch keeps the count as an fp32 tensor)

    @property
    def decay(self) -> float:
        """Decoupled weight decay factor, applied to the parameter first."""
        return 1 - self.lr * self.weight_decay

    @property
    def step_size(self) -> float:
        """``lr / (1 - beta1**step)``: lr with the first-moment bias correction."""
        return self.lr / (1 - self.beta1**self.step)

    @property
    def bias_correction2_sqrt(self) -> float:
        return (1 - self.beta2**self.step) ** 0.5
