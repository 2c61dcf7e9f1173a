"""JumpReLU sparse autoencoder (Rajamanoharan et al., 2024, "Jumping Ahead"): the paper, and only the paper.

Read it next to the paper and docs/maths.md, top to bottom: the rectangle kernel, the two
straight-through estimators, the SAE and its loss (docs/maths.md sections 1-3). What came after
the paper lives beside this file and reuses its pieces: the later recipes' penalties
(penalties.py), Anthropic's variant (anthropic.py), Matryoshka training (matryoshka.py), the
sparse path (sparse.py), the baselines (baselines.py) and the folder format (sae_folder.py).

    from jumprelu import JumpReLUSAE
    sae = JumpReLUSAE(d_in=576, d_sae=4608)
    out = sae.loss(x_BD, l0_coefficient=1e-3)   # {"loss", "mse", "l0", "pre", "f", "x_hat"}
    out["loss"].backward()

Shape suffixes: B batch rows, D model width (d_in), F latents (d_sae).
`python jumprelu.py` prints a tiny worked example.
"""

import math

import numpy as np
import torch
from torch import nn

# --- docs/maths.md section 2: the kernel and the two straight-through estimators ---------------


def rectangle(u):
    """The rectangle kernel K(u) = 1 if -1/2 < u < 1/2 else 0, in the dtype of u."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """forward z * H(z - theta); d/dz = H(z - theta); d/dtheta = -(theta/eps) K((z - theta)/eps)."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return torch.where(z > threshold, z, 0)                     # H(z - theta): z > theta strictly

    @staticmethod
    def backward(ctx, grad_out):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = torch.where(z > threshold, grad_out, 0)           # the true derivative: no estimator on z
        # theta is shared by the rows it broadcasts over: the kernel terms are summed back to its
        # shape, in the wider of the two dtypes (float32 for bf16 z), then scaled per latent.
        window = (rectangle((z - threshold) / eps) * grad_out).sum_to_size(threshold.shape)
        return grad_z, -(threshold / eps) * window, None


class _Step(torch.autograd.Function):
    """forward H(z - theta); d/dz = 0; d/dtheta = -(1/eps) K((z - theta)/eps)."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        # In the wider dtype (float32 for bf16 z), so that an L0 summed over thousands of latents
        # stays an exact integer.
        return (z > threshold).to(torch.promote_types(z.dtype, threshold.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = (rectangle((z - threshold) / eps) * grad_out).sum_to_size(threshold.shape)
        return None, -(1.0 / eps) * window, None                   # None: the L0 term trains theta alone


def jumprelu(z, threshold, bandwidth):
    """JumpReLU_theta(z) = z * H(z - theta), with the straight-through estimator for theta.

    `threshold` broadcasts over the leading dimensions of `z` (it has z's last dimension); its
    gradient is summed back to its own shape. `bandwidth` is the kernel width epsilon, a float.
    """
    return _JumpReLU.apply(z, threshold, bandwidth)


def step(z, threshold, bandwidth):
    """Heaviside H(z - theta), 1 where z > theta strictly, with the estimator for theta only."""
    return _Step.apply(z, threshold, bandwidth)


# --- docs/maths.md sections 1 and 3: the model --------------------------------------------------


def tied_init(d_in, d_sae, **kw):
    """docs/maths.md section 3.1: W_dec He-uniform, then unit-norm rows (so the He scale itself
    does not matter); W_enc = W_dec^T, untied afterwards. Returns the parameters (W_dec, W_enc)."""
    W_dec_FD = torch.empty(d_sae, d_in, **kw)
    nn.init.kaiming_uniform_(W_dec_FD)
    W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
    return nn.Parameter(W_dec_FD), nn.Parameter(W_dec_FD.T.clone())


class JumpReLUSAE(nn.Module):
    """A JumpReLU SAE: pre = x @ W_enc + b_enc; f = pre * H(pre - theta); x_hat = f @ W_dec + b_dec.

    The trainable threshold is `log_threshold` (theta = exp(log_threshold) > 0, or exactly 0 for
    an imported SAE whose threshold is 0); autograd through exp supplies the chain-rule factor
    theta in its gradient. With `pre_encoder_bias=True` the encoder sees x - b_dec (off by
    default, as in Gemma Scope). `metadata` is provenance (model, layer, site, input scale)
    that the folder format keeps in config.json.
    """

    architecture = "jumprelu"

    def __init__(self, d_in, d_sae, *, bandwidth=0.001, threshold_init=0.001,
                 pre_encoder_bias=False, device=None, dtype=torch.float32):
        super().__init__()
        if d_in < 1 or d_sae < 1:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={d_in}, d_sae={d_sae}.")
        if not bandwidth > 0 or not threshold_init > 0:
            raise ValueError(f"bandwidth and threshold_init must be positive, got {bandwidth} and {threshold_init}.")
        self.d_in, self.d_sae = int(d_in), int(d_sae)
        self.bandwidth = float(bandwidth)
        self.pre_encoder_bias = bool(pre_encoder_bias)
        self.metadata = {}
        kw = dict(device=device, dtype=dtype)
        self.W_dec, self.W_enc = tied_init(d_in, d_sae, **kw)     # zero biases; theta = 0.001 below
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        # Thresholds are at least float32 whatever the model dtype: in bf16 their Adam
        # updates (a factor of about exp(lr) per step) would round away.
        self.log_threshold = nn.Parameter(torch.full(
            (d_sae,), math.log(threshold_init), device=device, dtype=torch.promote_types(dtype, torch.float32)))

    @property
    def threshold(self):
        """theta = exp(log_threshold), shape [d_sae], float32 (float64 in a float64 model)."""
        return self.log_threshold.exp()

    def pre_acts(self, x_BD):
        """Encoder pre-activations x @ W_enc + b_enc (or (x - b_dec) @ W_enc + b_enc)."""
        if self.pre_encoder_bias:
            x_BD = x_BD - self.b_dec
        return x_BD @ self.W_enc + self.b_enc

    def as_input(self, x_BD):
        """x as this SAE takes it: any floating tensor or NumPy array (a read-only float16 shard,
        say; copied, as torch shares no read-only memory), cast to the SAE's dtype and device."""
        if not torch.is_tensor(x_BD):
            x_BD = torch.from_numpy(np.array(x_BD))
        return x_BD.to(self.W_enc.device, self.W_enc.dtype)

    def encode(self, x_BD):
        """Feature activations f [.., d_sae] of x (as_input: any floating input): a latent is
        active iff its pre-activation > theta."""
        return jumprelu(self.pre_acts(self.as_input(x_BD)), self.threshold, self.bandwidth)

    def decode(self, f_BF):
        return f_BF @ self.W_dec + self.b_dec

    def forward(self, x_BD):
        """The reconstruction x_hat."""
        return self.decode(self.encode(x_BD))

    def loss(self, x_BD, l0_coefficient):
        """docs/maths.md section 2: L = ||x - x_hat||^2 + lambda ||f||_0, each averaged over the rows.

        The L0 is `step` on the pre-activations, not a function of f, so that it trains the
        thresholds only. Returns the total, its two terms, and the forward pass's tensors.
        """
        threshold_F = self.threshold
        pre_BF = self.pre_acts(x_BD)
        f_BF = jumprelu(pre_BF, threshold_F, self.bandwidth)
        x_hat_BD = self.decode(f_BF)
        mse = (x_BD - x_hat_BD).pow(2).sum(-1).mean()
        l0 = step(pre_BF, threshold_F, self.bandwidth).sum(-1).mean()
        return {"loss": mse + l0_coefficient * l0, "mse": mse, "l0": l0, "pre": pre_BF, "f": f_BF, "x_hat": x_hat_BD}

    # --- docs/maths.md section 3.1: the unit-norm decoder and the input scale ------------------

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self):
        """Before the optimiser step: drop the part of each decoder row's gradient along the row."""
        if self.W_dec.grad is None:
            return
        W_FD, g_FD = self.W_dec, self.W_dec.grad
        # g -= (g.W / W.W) W, row by row: the two dot products as einsums and one fused update,
        # three passes over [F, D] instead of nine (4x faster on a CPU).
        along_F = torch.einsum("fd,fd->f", g_FD, W_FD) / torch.einsum("fd,fd->f", W_FD, W_FD)
        g_FD.addcmul_(W_FD, along_F.neg_().unsqueeze(1))

    @torch.no_grad()
    def normalize_decoder_(self):
        """After the optimiser step: rescale each decoder row to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def fold_input_scale_(self, scale):
        """Make weights trained on x * scale take raw x: W_enc * s, W_dec / s, b_dec / s.

        Pre-activations, hence features and thresholds, are unchanged; b_enc too. With the
        pre-encoder bias, (x*s - b_dec) @ W_enc = (x - b_dec/s) @ (s W_enc) holds as well.
        The scale is recorded in metadata["input_scale"] (cumulatively).
        """
        scale = float(scale)
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"The input scale must be a positive finite number, got {scale}.")
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)
        self.metadata["input_scale"] = self.metadata.get("input_scale", 1.0) * scale
        return self


if __name__ == "__main__":
    torch.manual_seed(0)
    sae = JumpReLUSAE(d_in=8, d_sae=32, bandwidth=0.05, threshold_init=0.1)
    x_BD = torch.randn(4, 8) / math.sqrt(8)
    out = sae.loss(x_BD, l0_coefficient=1e-2)
    out["loss"].backward()
    print(f"loss {out['loss'].item():.4f}  mse {out['mse'].item():.4f}  l0 {out['l0'].item():.2f}")
    print(f"|grad log_threshold| = {sae.log_threshold.grad.norm().item():.4f}")
