"""JumpReLU sparse autoencoder (Rajamanoharan et al., 2024, "Jumping Ahead").

Read next to the paper and ../shared/SPEC.md, top to bottom: the kernel, the two
straight-through estimators, the SAE and its loss (sections 1-3), then the sparse path (the
same loss from the few entries that matter) and the folder format (section 7).

    from jumprelu import JumpReLUSAE
    sae = JumpReLUSAE(d_in=576, d_sae=4608)
    out = sae.loss(x_BD, l0_coefficient=1e-3)   # {"loss", "mse", "l0", ...}
    sae.save("my_sae"); sae = JumpReLUSAE.load("my_sae")

Shape suffixes: B batch rows, D model width (d_in), F latents (d_sae).
`python jumprelu.py` prints a tiny worked example.
"""

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load, save
from torch import nn

# --- SPEC section 2: the kernel and the two straight-through estimators --------------------


def rectangle(u):
    """The rectangle kernel K(u) = 1 if -1/2 < u < 1/2 else 0, in the dtype of u."""
    return (u.abs() < 0.5).to(u.dtype)


def _promoted(z, threshold):
    """z and theta in their common dtype (float32 for bf16 z and float32 theta, also when theta
    is 0-dim, which PyTorch's own promotion would round to bf16)."""
    dtype = torch.promote_types(z.dtype, threshold.dtype)
    return z.to(dtype), threshold.to(dtype)


def _kernel_sum(z, threshold, bandwidth, grad_out):
    """K((z - theta) / eps) * grad_out elementwise and summed over the broadcast rows, both in
    theta's dtype, and theta. Each estimator applies its constant factor (-theta/eps or -1/eps) to
    the sum (the theta-gradient) and, passed on to the input, the opposite factor to the elementwise
    product: the estimator depends on z only through z - theta."""
    z, theta = _promoted(z, threshold)
    g = (rectangle((z - theta) / bandwidth) * grad_out).to(theta.dtype)
    return g, (g.sum_to_size(threshold.shape) if g.shape != threshold.shape else g), theta


class _JumpReLU(torch.autograd.Function):
    """forward z * H(z - theta); d/dz = H(z - theta); d/dtheta = -(theta/eps) K((z - theta)/eps).
    With ste_to_input, d/dz gains +(theta/eps) K((z - theta)/eps) (Anthropic, January 2025)."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth, ste_to_input=False):
        active = torch.gt(*_promoted(z, threshold))               # H(z - theta): z > theta strictly
        ctx.save_for_backward(z, threshold, active)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return torch.where(active, z, 0)

    @staticmethod
    def backward(ctx, grad_out):
        z, threshold, active = ctx.saved_tensors
        grad_z = torch.where(active, grad_out, 0)                  # the true derivative, no STE
        # In the promoted dtype: float32 thresholds keep a float32 gradient under bf16.
        window, window_sum, theta = _kernel_sum(z, threshold, ctx.bandwidth, grad_out)
        if ctx.ste_to_input:
            grad_z = grad_z + ((theta / ctx.bandwidth) * window).to(grad_z.dtype)
        return grad_z, -(theta / ctx.bandwidth) * window_sum, None, None


class _Step(torch.autograd.Function):
    """forward H(z - theta); d/dz = 0; d/dtheta = -(1/eps) K((z - theta)/eps).
    With ste_to_input, d/dz = +(1/eps) K((z - theta)/eps) (Anthropic, January 2025)."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth, ste_to_input=False):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        # In the promoted dtype (float32 for bf16 z and float32 theta), so that an L0 summed over
        # thousands of latents stays an exact integer.
        return torch.gt(*_promoted(z, threshold)).to(torch.promote_types(z.dtype, threshold.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        z, threshold = ctx.saved_tensors
        window, window_sum, _ = _kernel_sum(z, threshold, ctx.bandwidth, grad_out)
        # None: the paper's L0 term sends no gradient to the pre-activations (d/dz = 0).
        grad_z = ((1.0 / ctx.bandwidth) * window).to(z.dtype) if ctx.ste_to_input else None
        return grad_z, -(1.0 / ctx.bandwidth) * window_sum, None, None


def jumprelu(z, threshold, bandwidth, ste_to_input=False):
    """JumpReLU_theta(z) = z * H(z - theta), with the straight-through estimator for theta.

    `threshold` broadcasts over the leading dimensions of `z`; its gradient is summed back
    to its own shape. `bandwidth` is the kernel width epsilon (a Python float). With
    `ste_to_input` the estimator's gradient also reaches z (SPEC section 3, Anthropic's recipe).
    """
    return _JumpReLU.apply(z, threshold, bandwidth, ste_to_input)


def step(z, threshold, bandwidth, ste_to_input=False):
    """Heaviside H(z - theta) (1 where z > theta strictly), with the estimator for theta only
    (and for z too with `ste_to_input`)."""
    return _Step.apply(z, threshold, bandwidth, ste_to_input)


# --- SPEC sections 1 and 3: the model ------------------------------------------------------


def tied_init(d_in, d_sae, **kw):
    """SPEC section 3: W_dec He-uniform, then unit-norm rows (so the He scale itself does not
    matter); W_enc = W_dec^T, untied afterwards. Returns the parameters (W_dec, W_enc)."""
    W_dec_FD = torch.empty(d_sae, d_in, **kw)
    nn.init.kaiming_uniform_(W_dec_FD)
    W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
    return nn.Parameter(W_dec_FD), nn.Parameter(W_dec_FD.T.clone())


class JumpReLUSAE(nn.Module):
    """A JumpReLU SAE: pre = x @ W_enc + b_enc; f = pre * H(pre - theta); x_hat = f @ W_dec + b_dec.

    The trainable threshold is `log_threshold` (theta = exp(log_threshold) > 0, or exactly 0 for
    an imported SAE whose threshold is 0); autograd through exp supplies the chain-rule factor
    theta in its gradient. With
    `pre_encoder_bias=True` the encoder sees x - b_dec (off by default, as in Gemma Scope).
    `metadata` is free-form provenance (model, layer, site, input_scale) kept in config.json.
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

    def encode(self, x_BD):
        """Feature activations f [.., d_sae]: a latent is active iff its pre-activation > theta."""
        return jumprelu(self.pre_acts(x_BD), self.threshold, self.bandwidth)

    def decode(self, f_BF):
        return f_BF @ self.W_dec + self.b_dec

    def forward(self, x_BD):
        """The reconstruction x_hat."""
        return self.decode(self.encode(x_BD))

    def loss(self, x_BD, l0_coefficient, dead_F=None, *, sparsity="l0", target_l0=None, dead_pull=0.0,
             tanh_scale=4.0, pre_act_coefficient=0.0, ste_to_input=False, sparse=False, batch_mean=torch.mean):
        """SPEC section 2: ||x - x_hat||^2 + lambda * S, averaged over rows, with the rows' L0
        written through `step` on the pre-activations, so that it trains the thresholds only:

            sparsity "l0"            S = L0                    the paper
                     "target_row"    S = (2/K) (L0 - K)^2      Gemma Scope 2, per row (K = target_l0)
                     "target_batch"  (2/K) (mean L0 - K)^2     the same on the batch's mean L0
                     "tanh"          S = sum_i tanh(c f_i ||W_dec,i||)   Anthropic, c = tanh_scale

        The two targets push L0 towards K from both sides. Anthropic's recipe (SPEC section 3) adds
        `pre_act_coefficient` * sum_i ReLU(theta_i - pre_i) ||W_dec,i|| over the latents marked dead
        in the bool mask dead_F [d_sae], and `ste_to_input` passes the estimators' gradient on to
        the pre-activations. With `dead_pull` > 0, the dead latents add dead_pull * log_threshold:
        a dead latent's pre-activations never reach its kernel window, so only this lowers its
        threshold until it fires again. `batch_mean` averages the rows' L0 (torchrun passes the
        mean over every rank's rows). Returns {"loss", "mse", "l0"} plus "x_hat" and "fired"
        (which latents fired on some row), and "f" and "pre" on the dense path.

        `sparse=True` computes the same loss and gradients (up to float rounding) from the kept
        entries only (`sparse_terms`): for x of shape [B, d_in], faster when few latents are
        active; also returns "kept", the fraction of [B, d_sae] entries it kept. The tanh penalty
        and the pre-activation loss are on the dense path only.
        """
        threshold_F = self.threshold
        if sparse and (sparsity == "tanh" or pre_act_coefficient):
            raise ValueError("the tanh penalty and the pre-activation loss need every pre-activation; use the dense path.")
        if sparse:
            out = sparse_terms(self, x_BD, threshold_F, ste_to_input)
        else:
            pre_BF = self.pre_acts(x_BD)
            f_BF = jumprelu(pre_BF, threshold_F, self.bandwidth, ste_to_input)
            out = {"x_hat": self.decode(f_BF), "l0_rows": step(pre_BF, threshold_F, self.bandwidth, ste_to_input).sum(-1),
                   "pre": pre_BF, "f": f_BF, "fired": (f_BF != 0).flatten(0, -2).any(0)}
        mse = (x_BD - out["x_hat"]).pow(2).sum(-1).mean()
        l0_B = out.pop("l0_rows")
        l0 = batch_mean(l0_B)
        if sparsity == "l0":
            penalty = l0_coefficient * l0
        elif sparsity == "target_row":
            penalty = l0_coefficient * ((2.0 / target_l0) * (l0_B - target_l0).pow(2)).mean()
        elif sparsity == "target_batch":
            penalty = l0_coefficient * (2.0 / target_l0) * (l0 - target_l0) ** 2
        elif sparsity == "tanh":
            penalty = l0_coefficient * torch.tanh(tanh_scale * out["f"] * self.W_dec.norm(dim=1)).sum(-1).mean()
        else:
            raise ValueError(f"sparsity must be l0, target_row, target_batch or tanh, not {sparsity!r}.")
        loss = mse + penalty
        if pre_act_coefficient and dead_F is not None and dead_F.any():
            gap_BF = (threshold_F - out["pre"]).relu() * dead_F            # dead latents only
            loss = loss + pre_act_coefficient * (gap_BF * self.W_dec.norm(dim=1)).sum(-1).mean()
        if dead_pull and dead_F is not None and dead_F.any():
            loss = loss + dead_pull * self.log_threshold[dead_F].sum()
        return {"loss": loss, "mse": mse, "l0": l0, **out}

    # --- SPEC section 3: the unit-norm decoder and the input scale --------------------------

    def remove_parallel_decoder_grad_(self):
        """Before the optimiser step: drop the part of each decoder row's gradient along the row."""
        with torch.no_grad():   # in the body, not a decorator: mutmut mutates no decorated function
            if self.W_dec.grad is not None:
                W_FD, g_FD = self.W_dec, self.W_dec.grad
                # g -= (g.W / W.W) W, row by row: the two dot products as einsums and one fused
                # update, three passes over [F, D] instead of nine (4x faster on a CPU).
                along_F = torch.einsum("fd,fd->f", g_FD, W_FD) / torch.einsum("fd,fd->f", W_FD, W_FD)
                g_FD.addcmul_(W_FD, along_F.neg_().unsqueeze(1))

    def normalize_decoder_(self):
        """After the optimiser step: rescale each decoder row to unit norm."""
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    def fold_input_scale_(self, scale):
        """Make weights trained on x * scale take raw x: W_enc * s, W_dec / s, b_dec / s.

        Pre-activations, hence features and thresholds, are unchanged; b_enc too. With the
        pre-encoder bias, (x*s - b_dec) @ W_enc = (x - b_dec/s) @ (s W_enc) holds as well.
        The scale is recorded in metadata["input_scale"] (cumulatively).
        """
        scale = float(scale)
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"The input scale must be a positive finite number, got {scale}.")
        with torch.no_grad():
            self.W_enc.mul_(scale)
            self.W_dec.div_(scale)
            self.b_dec.div_(scale)
        self.metadata["input_scale"] = self.metadata.get("input_scale", 1.0) * scale
        return self

    # --- SPEC section 7: the folder (write_folder and read_folder below) --------------------

    def config(self):
        return {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae,
                "bandwidth": self.bandwidth, "pre_encoder_bias": self.pre_encoder_bias,
                "dtype": "float32", **self.metadata}

    def save(self, folder):
        """Write `config.json` and `sae.safetensors` (float32, Gemma Scope's names W_enc, b_enc,
        W_dec, b_dec, threshold) to `folder`, atomically. The weights are written as they are:
        fold the training input scale in first (`fold_input_scale_`) so that they take raw x."""
        tensors = {name: getattr(self, name) for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
        return write_folder(folder, self.config(), tensors)

    @classmethod
    def load(cls, folder, device=None):
        """Rebuild an SAE from a folder written by `save`; one-sentence ValueError if it cannot."""
        cfg, tensors = read_folder(folder, cls.architecture)
        d_in, d_sae = cfg["d_in"], cfg["d_sae"]          # checked against the file before anything is allocated
        check_shapes(folder, tensors, {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in),
                                       "b_dec": (d_in,), "threshold": (d_sae,)})
        check_thresholds(f"{folder}/{WEIGHTS_NAME}", tensors["threshold"])
        sae = cls(d_in, d_sae, bandwidth=cfg.get("bandwidth", 0.001),
                  pre_encoder_bias=cfg.get("pre_encoder_bias", False), device=device)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).copy_(tensors[name])
            # on the SAE's own device: CUDA's exp can differ from the CPU's in the last bit
            sae.log_threshold.copy_(exact_log(tensors["threshold"].to(sae.log_threshold.device)))
        sae.metadata = metadata_of(cfg, sae.config())
        return sae


# --- The sparse path: the same loss and gradients from the entries that can matter ----------
#
# With L0 ~ 50 of 65,536 latents almost every entry of f is zero, and an entry whose
# pre-activation lies below its kernel window contributes nothing to the loss or to any
# gradient: not to x_hat (f = 0), not to d/dpre (H = 0), not to d/dtheta (K = 0). Only the
# encoder's matmul has to be dense; the decoder and every backward product need only the kept
# entries, pre > theta - 3/4 epsilon: every active latent, every one inside its window (which
# reaches epsilon/2 below theta), and a quarter bandwidth of room for rounding (enough while
# |pre|, |theta| and |b_enc| stay under 2^20 epsilon, as they do on inputs scaled to
# E||x||^2 = 1). On the kept entries the estimators are the ones above.


def sparse_terms(sae, x_BD, threshold_F, ste_to_input=False):
    """x_hat, the rows' L0 and the fired latents from the kept entries: embedding bags over W_dec's rows."""
    if x_BD.dim() != 2:
        raise ValueError(f"the sparse path takes a batch of rows [B, d_in], not shape {list(x_BD.shape)}.")
    B = x_BD.shape[0]
    x_in_BD = x_BD - sae.b_dec if sae.pre_encoder_bias else x_BD
    floor_F = (threshold_F - 0.75 * sae.bandwidth).detach()
    pre_S, rows_S, cols_S = _KeptPre.apply(x_in_BD, sae.W_enc, sae.b_enc, floor_F)
    # index_select, not threshold_F[cols_S]: the latter's CPU backward accumulates in parallel,
    # in a varying order, so two identical steps gave different threshold gradients.
    theta_S = threshold_F.index_select(0, cols_S)
    f_S = jumprelu(pre_S, theta_S, sae.bandwidth, ste_to_input)
    on_S = step(pre_S, theta_S, sae.bandwidth, ste_to_input)
    # In the weights' dtype also under autocast (CUDA's embedding_bag has no bf16 gradient for
    # the per-row weights f): float32 gathers, more exact than the dense path's bf16 matmul.
    x_hat_BD = torch.nn.functional.embedding_bag(
        cols_S, sae.W_dec, _starts(rows_S, B), mode="sum", per_sample_weights=f_S.to(sae.W_dec.dtype)) + sae.b_dec
    l0_B = torch.zeros(B, dtype=on_S.dtype, device=on_S.device).index_add(0, rows_S, on_S)
    fired_F = torch.zeros(sae.d_sae, dtype=torch.bool, device=cols_S.device)
    fired_F[cols_S[f_S.detach() != 0]] = True
    return {"x_hat": x_hat_BD, "l0_rows": l0_B, "fired": fired_F, "kept": rows_S.numel() / (B * sae.d_sae)}


class _KeptPre(torch.autograd.Function):
    """pre = x @ W_enc + b_enc at the entries where pre > floor (per latent), as values and their
    (row, latent) indices in row-major order. Backward: grad W_enc[:, j] = sum over the kept rows b
    of grad[b, j] * x[b] and grad x[b] = sum over its kept latents j of grad[b, j] * W_enc[:, j],
    both as embedding bags (weighted sums of gathered rows), never a dense [B, F] product."""

    @staticmethod
    def forward(ctx, x_BD, W_enc_DF, b_enc_F, floor_F):
        mm_BF = x_BD @ W_enc_DF                                   # bf16 under autocast, as in pre_acts
        # mm + b > floor, without a [B, F] sum; a rounding step here is far inside the margin.
        rows_S, cols_S = (mm_BF > (floor_F - b_enc_F)).nonzero(as_tuple=True)
        pre_S = mm_BF[rows_S, cols_S] + b_enc_F[cols_S]           # the same sum as pre_acts
        ctx.save_for_backward(x_BD, W_enc_DF, rows_S, cols_S)
        ctx.mark_non_differentiable(rows_S, cols_S)
        return pre_S, rows_S, cols_S

    @staticmethod
    def backward(ctx, grad_S, _rows, _cols):
        x_BD, W_enc_DF, rows_S, cols_S = ctx.saved_tensors
        B, F = x_BD.shape[0], W_enc_DF.shape[1]
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(F, dtype=grad_S.dtype, device=grad_S.device).index_add_(0, cols_S, grad_S)
        # Each bag's weights in the dtype of the rows it sums (under autocast a bf16 W_enc and
        # float32 x); autograd casts each gradient back to its input's dtype.
        if ctx.needs_input_grad[0]:                               # x - b_dec with the pre-encoder bias
            grad_x = torch.nn.functional.embedding_bag(
                cols_S, W_enc_DF.t().contiguous(), _starts(rows_S, B), mode="sum",
                per_sample_weights=grad_S.to(W_enc_DF.dtype))
        if ctx.needs_input_grad[1]:
            order_S = torch.argsort(cols_S, stable=True)
            grad_W = torch.nn.functional.embedding_bag(
                rows_S[order_S], x_BD, _starts(cols_S[order_S], F), mode="sum",
                per_sample_weights=grad_S.to(x_BD.dtype)[order_S]).t()
        return grad_x, grad_W, grad_b, None


def _starts(sorted_S, n):
    """Where each of the values 0..n-1 starts in a sorted index vector: the bags' offsets."""
    return torch.searchsorted(sorted_S, torch.arange(n, device=sorted_S.device, dtype=sorted_S.dtype))


# --- SPEC section 7: the folder format, shared by every architecture ------------------------

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "sae.safetensors"


def exact_log(threshold_F):
    """float32 log(theta) whose exp() on the same device gives theta back exactly: save/load is exact.

    A log computed in float64 and rounded misses by one float32 step for about 1 in 10^4
    thresholds; a few nudges to the neighbouring floats find the exact one where it exists.
    theta = 0 gives -inf, and exp(-inf) = 0.
    """
    threshold_F = threshold_F.float()
    log_F = threshold_F.double().log().float()
    for toward in (math.inf, -math.inf):
        candidate_F = log_F
        for _ in range(4):
            candidate_F = torch.nextafter(candidate_F, torch.full_like(candidate_F, toward))
            fix = (log_F.exp() != threshold_F) & (candidate_F.exp() == threshold_F)
            log_F = torch.where(fix, candidate_F, log_F)
    return log_F


def check_thresholds(where, threshold_F):
    """A threshold is 0 or more: theta = 0 (log_threshold = -inf, exactly 0 again through exp) is a
    latent that fires on any positive pre-activation, as SAELens 6.48 and later trains them, where
    the threshold is projected onto theta >= 0. Our own training keeps theta > 0."""
    bad = int((~(threshold_F >= 0)).sum())
    if bad:
        raise ValueError(f"{where} has {bad} threshold{'s' * (bad != 1)} below 0 or NaN, which no JumpReLU SAE holds; "
                         "the file is damaged or not a JumpReLU SAE.")


def metadata_of(cfg, own):
    """A folder's provenance: the config.json entries that are not the SAE's own settings."""
    return {k: v for k, v in cfg.items() if k not in own}


def _write_tmp(path, write):
    """write(file) into `path`.tmp and flush it to disk; the temporary file is removed if that fails."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path, write):
    """Call write(file) on a temporary file next to `path`, flush it to disk, then rename it over
    `path`: a reader sees the old file or the new one, never half of one. If writing fails (a full
    disk, an exception) the temporary file is removed and `path` is untouched."""
    os.replace(_write_tmp(path, write), path)
    return Path(path)


def folder_digest(weights, config):
    """sha256 over the weights file's bytes and config.json's other entries (canonical JSON)."""
    body = json.dumps({k: v for k, v in config.items() if k != "sha256"}, sort_keys=True)
    return hashlib.sha256(weights + body.encode()).hexdigest()


def write_folder(folder, config, tensors):
    """Write `sae.safetensors` (tensors as float32) and `config.json` to `folder`. Both are written
    to temporary files first, then renamed: a full disk leaves the old folder as it was. config.json
    records a sha256 over both (`folder_digest`), which `read_folder` checks."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}
    data = save(tensors, metadata={"architecture": config["architecture"]})
    config = {**config, "sha256": folder_digest(data, config)}
    tmp_weights = _write_tmp(folder / WEIGHTS_NAME, lambda f: f.write(data))
    try:
        tmp_config = _write_tmp(folder / CONFIG_NAME, lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()))
    except BaseException:
        tmp_weights.unlink(missing_ok=True)
        raise
    os.replace(tmp_weights, folder / WEIGHTS_NAME)
    os.replace(tmp_config, folder / CONFIG_NAME)
    return folder


def read_config(folder):
    """config.json of an SAE folder, as a dict, with one-sentence errors for a missing or damaged one."""
    check_files(folder, (CONFIG_NAME, WEIGHTS_NAME), "an SAE folder written by this project")
    return read_json_object(Path(folder) / CONFIG_NAME, "re-save or restore the folder")


def check_files(folder, names, kind):
    """One-sentence errors unless `folder` is a folder that holds the files `names` (a `kind`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; pass the folder that holds {' and '.join(names)}.")
    for name in names:
        if not (folder / name).is_file():
            raise ValueError(f"{folder} has no {name}; it is not {kind}.")


def read_json_object(path, remedy):
    """The JSON object in the file at `path`; a one-sentence ValueError, ending in `remedy`, when it
    is not valid JSON or holds something else."""
    try:
        obj = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {remedy}.") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(obj).__name__}; {remedy}.")
    return obj


def read_folder(folder, architecture):
    """Read an SAE folder's config.json and float32 tensors, checking the architecture."""
    folder = Path(folder)
    cfg = read_config(folder)
    found = cfg.get("architecture")
    if found != architecture:
        raise ValueError(f"{folder} holds a {found!r} SAE, not a {architecture!r} one; load it with the class for {found!r}.")
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool) or cfg[key] < 1:
            raise ValueError(f"{folder}/{CONFIG_NAME} has no valid {key!r} (a positive integer); it is damaged.")
    # The entries that shape the computation, when present, must have their types.
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    checks = {"bandwidth": number, "pre_encoder_bias": lambda v: isinstance(v, bool),
              "k": lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= cfg["d_sae"]}
    for key, ok in checks.items():
        if key in cfg and not ok(cfg[key]):
            raise ValueError(f"{folder}/{CONFIG_NAME} has an invalid {key!r} ({cfg[key]!r}); it is damaged.")
    data = (folder / WEIGHTS_NAME).read_bytes()
    digest = cfg.pop("sha256", None)           # absent in folders written by other tools
    if digest is not None and folder_digest(data, cfg) != digest:
        raise ValueError(f"{folder} does not match the sha256 in its {CONFIG_NAME} (a file was damaged or edited); "
                         "restore it, or delete the sha256 entry to load it as it is.")
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{folder}/{WEIGHTS_NAME} cannot be read as safetensors ({str(e)[:80]}); "
                         "it is truncated or damaged.") from None
    wrong = [name for name, t in tensors.items() if t.dtype != torch.float32]
    if wrong:
        raise ValueError(f"{folder}/{WEIGHTS_NAME} holds {wrong[0]} as {tensors[wrong[0]].dtype}, not float32; it is damaged.")
    return cfg, tensors


def check_shapes(folder, tensors, expected):
    """One-sentence errors for missing tensors or shapes that disagree with config.json."""
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"{folder}/{WEIGHTS_NAME} has no tensor {name!r}; the file is incomplete.")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{folder}/{WEIGHTS_NAME} holds {name} of shape {list(tensors[name].shape)}, "
                             f"but config.json implies {list(shape)}; the folder is inconsistent.")


if __name__ == "__main__":
    torch.manual_seed(0)
    sae = JumpReLUSAE(d_in=8, d_sae=32, bandwidth=0.05, threshold_init=0.1)
    x_BD = torch.randn(4, 8) / math.sqrt(8)
    out = sae.loss(x_BD, l0_coefficient=1e-2)
    out["loss"].backward()
    print(f"loss {out['loss'].item():.4f}  mse {out['mse'].item():.4f}  l0 {out['l0'].item():.2f}")
    print(f"|grad log_threshold| = {sae.log_threshold.grad.norm().item():.4f}")
