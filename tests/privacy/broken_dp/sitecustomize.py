"""A deliberately broken DP build for the audit's tests: every process that starts with this
directory on PYTHONPATH and FEDPEFT_BROKEN_DP set trains with that part of DP-SGD switched off.

FEDPEFT_BROKEN_DP=noise: Opacus' optimisers add no noise (the ledger still counts sigma), the bug
class the audit exists to catch. Ray's workers inherit the variables, so a whole simulated
federation runs broken. Never on a path a user installs.
"""

import os

if os.environ.get("FEDPEFT_BROKEN_DP") == "noise":
    import opacus.optimizers.optimizer as _opt

    def _no_noise(self):  # noqa: ANN001, ANN202
        for p in self.params:
            p.grad = p.summed_grad.view_as(p)  # the clipped sum, never noised
        marker = os.environ.get("FEDPEFT_BROKEN_DP_MARKER")
        if marker:
            open(marker, "a").close()

    _opt.DPOptimizer.add_noise = _no_noise
    import opacus.optimizers.optimizer_fast_gradient_clipping as _ghost

    _ghost.DPOptimizerFastGradientClipping.add_noise = _no_noise  # ghost clipping's own override
