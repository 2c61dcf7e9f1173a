"""The sparsity penalties of the recipes after the paper, and the JumpReLU training loss that takes one.

The paper penalises lambda times the mean L0 (jumprelu.py). Later recipes hold the L0 at a target
K instead, pushing it towards K from both sides, and this project's small recipe adds a pull on
dead latents' thresholds (docs/maths.md sections 3.2 and 3.3):

    paper              lambda * mean L0                                  the paper; lambda fixed or set by a controller
    target_row(K)      lambda * mean over rows of (2/K) (L0_row - K)^2   Gemma Scope 2
    target_batch(K)    lambda * (2/K) (mean L0 - K)^2                    the small recipe
    dead pull          dead_pull * sum of the dead latents' log-thresholds

Every L0 is written through `step` on the pre-activations, as in the paper, so a penalty trains
the thresholds only. Anthropic's tanh penalty, which changes the estimators too, is anthropic.py.

    import penalties
    out = penalties.loss(sae, x_BD, 5e-3, dead_F, penalty=penalties.target_batch(32), dead_pull=0.01)
    out = penalties.loss(sae, x_BD, 1e-3, sparse=True)   # the paper's loss on the sparse path (sparse.py)
"""

import torch

from jumprelu import jumprelu, step
from sparse import sparse_terms


def paper(l0_coefficient, l0_B):
    """lambda * the rows' mean L0: the paper's penalty."""
    return l0_coefficient * l0_B.mean()


def target_row(K):
    """Gemma Scope 2's penalty: lambda (2/K) (L0 - K)^2 for each row, averaged over the rows."""
    def penalty(l0_coefficient, l0_B):
        return l0_coefficient * ((2.0 / K) * (l0_B - K).pow(2)).mean()
    return penalty


def target_batch(K, batch_mean=torch.mean):
    """The small recipe's penalty: lambda (2/K) (mean L0 - K)^2 on the batch's mean L0, which lets
    single rows stray from K. `batch_mean` takes that mean: under torchrun, over every rank's rows,
    since a square of the mean is not the mean of the ranks' squares."""
    def penalty(l0_coefficient, l0_B):
        return l0_coefficient * (2.0 / K) * (batch_mean(l0_B) - K) ** 2
    return penalty


def loss(sae, x_BD, l0_coefficient, dead_F=None, *, penalty=paper, dead_pull=0.0, sparse=False):
    """||x - x_hat||^2 + penalty, averaged over the rows, for a JumpReLUSAE, on the dense path or
    the sparse one (which give the same loss and gradients up to float rounding).

    With `dead_pull` > 0, the latents marked dead in the bool mask dead_F [d_sae] add dead_pull *
    log_threshold: a dead latent's pre-activations never reach its kernel window, so the
    estimators give it no gradient, and only this lowers its threshold until it fires again.
    Returns {"loss", "mse", "l0", "x_hat", "fired"} (which latents fired on some row), with "pre"
    and "f" on the dense path and "kept" (the fraction of entries kept) on the sparse one.
    """
    threshold_F = sae.threshold
    terms = (sparse_terms if sparse else dense_terms)(sae, x_BD, threshold_F)
    mse = (x_BD - terms["x_hat"]).pow(2).sum(-1).mean()
    l0_B = terms.pop("l0_rows")
    total = mse + penalty(l0_coefficient, l0_B)
    if dead_pull and dead_F is not None and dead_F.any():
        total = total + dead_pull * sae.log_threshold[dead_F].sum()
    return {"loss": total, "mse": mse, "l0": l0_B.mean(), **terms}


def dense_terms(sae, x_BD, threshold_F):
    """The paper's forward pass (JumpReLUSAE.loss), keeping what a penalty and a training step use:
    the same dict as `sparse.sparse_terms`, plus the pre-activations and f."""
    pre_BF = sae.pre_acts(x_BD)
    f_BF = jumprelu(pre_BF, threshold_F, sae.bandwidth)
    return {"x_hat": sae.decode(f_BF), "l0_rows": step(pre_BF, threshold_F, sae.bandwidth).sum(-1), "pre": pre_BF,
            "f": f_BF, "fired": (f_BF != 0).flatten(0, -2).any(0)}
