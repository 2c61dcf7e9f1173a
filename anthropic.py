"""Anthropic's JumpReLU SAE (their January 2025 update), beside the paper's (docs/maths.md section 3.3).

The same model as the paper's, trained differently:
- the sparsity term is lambda * sum_i tanh(c f_i ||W_dec,i||), c = 4, in place of lambda * L0;
- a pre-activation loss lambda_P * sum_i ReLU(theta_i - pre_i) ||W_dec,i|| over the latents
  marked dead pulls their pre-activations up to their thresholds;
- the threshold estimator's gradient reaches the pre-activations as well (`jumprelu_to_input`);
- the bandwidth is wide: 2.0 on inputs scaled to E||x|| = sqrt(d_in);
- the decoder norms are free: unit rows at initialisation only, so the ||W_dec,i|| factors are live.
Their constants (DEFAULTS) are given on inputs scaled to E||x|| = sqrt(d_in); `in_our_units`
converts them to this project's E||x||^2 = 1. Trained, it saves and loads as a JumpReLUSAE:
inference is the paper's.

    from anthropic import AnthropicJumpReLUSAE
    sae = AnthropicJumpReLUSAE(d_in=576, d_sae=4608, bandwidth=0.08)
    out = sae.loss(x_BD, 1e-2, dead_F, tanh_scale=100.0, pre_act_coefficient=1e-7)
"""

import math

import torch

from jumprelu import JumpReLUSAE, _JumpReLU, rectangle, step

# On inputs scaled to E||x|| = sqrt(d_in) (SAELens's jumprelu_sparsity_loss_mode "tanh" with its
# jumprelu_tanh_scale, pre_act_loss_coefficient and jumprelu_ste_to_input).
DEFAULTS = dict(bandwidth=2.0, tanh_scale=4.0, pre_act_coefficient=3e-6)
# The settings' bandwidth that stands for DEFAULTS' 2.0, to be converted to our units by in_our_units
# (a number given by the user is in our units already, and is used as given).
THEIR_BANDWIDTH = "anthropic"


class _JumpReLUToInput(_JumpReLU):
    """The paper's estimator, with the jump's pseudo-derivative passed on to z as well:
    d/dz = H(z - theta) + (theta/eps) K((z - theta)/eps), since the estimator depends on z only
    through z - theta; d/dtheta as in the paper."""

    @staticmethod
    def backward(ctx, grad_out):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = rectangle((z - threshold) / eps) * grad_out               # once, for z and theta both
        grad_z = torch.where(z > threshold, grad_out, 0) + ((threshold / eps) * window).to(grad_out.dtype)
        return grad_z, -(threshold / eps) * window.sum_to_size(threshold.shape), None


def jumprelu_to_input(z, threshold, bandwidth):
    """`jumprelu.jumprelu` with the estimator's gradient reaching z too."""
    return _JumpReLUToInput.apply(z, threshold, bandwidth)


class AnthropicJumpReLUSAE(JumpReLUSAE):
    """A JumpReLUSAE with Anthropic's training loss and free decoder norms: the rows start at unit
    norm (the paper's initialisation) and then train freely, so that the ||W_dec,i|| factors in the
    loss are live. Weighting each latent's penalties by its decoder norm is what stops the model from
    shrinking f and growing W_dec, as for the ReLU baseline: the decoder-row projection and
    renormalisation that train.py calls every step are no-ops here."""

    def loss(self, x_BD, l0_coefficient, dead_F=None, *, tanh_scale=DEFAULTS["tanh_scale"],
             pre_act_coefficient=DEFAULTS["pre_act_coefficient"]):
        """||x - x_hat||^2 + lambda sum_i tanh(c f_i ||W_dec,i||) + lambda_P sum_i ReLU(theta_i - pre_i)
        ||W_dec,i|| over the latents the bool mask dead_F [d_sae] marks dead, each averaged over the
        rows. "l0" (through `step`) is reported, not penalised. Returns the paper's dict and "fired"."""
        threshold_F = self.threshold
        pre_BF = self.pre_acts(x_BD)
        f_BF = jumprelu_to_input(pre_BF, threshold_F, self.bandwidth)
        x_hat_BD = self.decode(f_BF)
        l0 = step(pre_BF, threshold_F, self.bandwidth).sum(-1).mean()
        mse = (x_BD - x_hat_BD).pow(2).sum(-1).mean()
        total = mse + l0_coefficient * torch.tanh(tanh_scale * f_BF * self.W_dec.norm(dim=1)).sum(-1).mean()
        if pre_act_coefficient and dead_F is not None and dead_F.any():
            gap_BF = (threshold_F - pre_BF).relu() * dead_F                 # dead latents only
            total = total + pre_act_coefficient * (gap_BF * self.W_dec.norm(dim=1)).sum(-1).mean()
        return {"loss": total, "mse": mse, "l0": l0, "pre": pre_BF, "f": f_BF, "x_hat": x_hat_BD,
                "fired": (f_BF != 0).flatten(0, -2).any(0)}

    def remove_parallel_decoder_grad_(self):
        """No-op: the decoder norms are free (the norm-weighted penalties replace the constraint)."""

    def normalize_decoder_(self):
        """No-op: the decoder norms are free (the norm-weighted penalties replace the constraint)."""


def in_our_units(settings, x_ND):
    """`settings` with Anthropic's constants converted to inputs x_ND scaled to E||x||^2 = 1
    (docs/maths.md section 3.3): their inputs are r x, r = sqrt(d_in) / E||x||. The SAE that maps
    our x to theirs keeps W_enc and W_dec, hence the decoder norms, and scales b_enc, b_dec,
    thresholds, pre-activations and f by r, the squared error by r^2: the tanh scale becomes c r
    and the pre-activation coefficient lambda_P / r; the bandwidth, where it is THEIR_BANDWIDTH
    (the recipe's own), 2.0 / r. A bandwidth given as a number is already in our units and stays."""
    r = math.sqrt(x_ND.shape[1]) / x_ND.norm(dim=1).mean().item()
    bandwidth = DEFAULTS["bandwidth"] / r if settings["bandwidth"] == THEIR_BANDWIDTH else settings["bandwidth"]
    return {**settings, "bandwidth": bandwidth, "tanh_scale": settings["tanh_scale"] * r,
            "pre_act_coefficient": settings["pre_act_coefficient"] / r}
