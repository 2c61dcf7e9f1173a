"""The baselines of the JumpReLU paper (docs/maths.md section 4): ReLU, Gated, TopK and BatchTopK SAEs.

Each class has JumpReLUSAE's interface (jumprelu.py): parameters W_enc [d_in, d_sae],
W_dec [d_sae, d_in], b_dec [d_in] plus its own encoder biases; `pre_acts`, `encode`, `decode`,
`forward`, `loss`, the decoder constraint and `fold_input_scale_`. sae_folder.py saves and loads
any of them, config.json's "architecture" naming the class (`ARCHITECTURES`).

    from baselines import make_sae
    sae = make_sae("topk", d_in=576, d_sae=4608, k=32)
    out = sae.loss(x_BD, None, dead_F)        # {"loss", "mse", "l0", "aux", "fired", "pre", "f", "x_hat"}

Every loss takes the arguments train.py passes, `loss(x_BD, coefficient, dead_F=None)`: ReLU and
Gated use the coefficient (of their L1 term) and no dead mask, TopK and BatchTopK the dead mask (for
AuxK) and no coefficient, since k sets their sparsity. All four start from JumpReLUSAE's
initialisation (the same seed gives the same decoder). Shape suffixes: B batch rows,
D model width (d_in), F latents (d_sae). `python baselines.py` prints a tiny worked example.
"""

import math
import operator

import torch
from torch import nn

from jumprelu import JumpReLUSAE, tied_init


def _mse(x_BD, x_hat_BD):
    """||x - x_hat||^2 summed over d_in, averaged over rows (docs/maths.md section 2)."""
    return (x_BD - x_hat_BD).pow(2).sum(-1).mean()


def _l0(f_BF):
    """Mean over rows of the number of non-zero latents, in float32 (exact for wide SAEs under bf16)."""
    return (f_BF != 0).sum(-1).to(torch.promote_types(f_BF.dtype, torch.float32)).mean()


def _check_k(k, d_sae):
    if isinstance(k, bool) or not hasattr(k, "__index__") or not 1 <= operator.index(k) <= d_sae:
        raise ValueError(f"k must be a whole number from 1 to d_sae={d_sae}, got {k!r}.")
    return operator.index(k)


class _SAE(nn.Module):
    """What the baselines share with JumpReLUSAE: initialisation, decoder and input scale.

    Subclasses set `architecture`, `BIASES` (the names of their [d_sae] encoder parameters) and
    define `pre_acts`, `encode` and `loss`.
    """

    architecture = None
    BIASES = ("b_enc",)

    def __init__(self, d_in, d_sae, *, device=None, dtype=torch.float32):
        super().__init__()
        if d_in < 1 or d_sae < 1:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={d_in}, d_sae={d_sae}.")
        self.d_in, self.d_sae = int(d_in), int(d_sae)
        self.metadata = {}
        kw = dict(device=device, dtype=dtype)
        # docs/maths.md section 3, as in JumpReLUSAE; every bias (and Gated's r_mag) zero.
        self.W_dec, self.W_enc = tied_init(d_in, d_sae, **kw)
        for name in self.BIASES:
            setattr(self, name, nn.Parameter(torch.zeros(d_sae, **kw)))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))

    def decode(self, f_BF):
        return f_BF @ self.W_dec + self.b_dec

    def forward(self, x_BD):
        """The reconstruction x_hat (inference semantics: BatchTopK uses its threshold)."""
        return self.decode(self.encode(x_BD))

    def _result(self, loss, mse, aux, pre_BF, f_BF, x_hat_BD):
        return {"loss": loss, "mse": mse, "l0": _l0(f_BF), "aux": aux, "fired": (f_BF != 0).flatten(0, -2).any(0),
                "pre": pre_BF, "f": f_BF, "x_hat": x_hat_BD}

    # --- docs/maths.md section 3.1: the unit-norm decoder and the input scale ---------------
    # JumpReLUSAE's own methods, shared: they touch only W_enc, W_dec, b_dec and metadata. Folding
    # leaves the features unchanged here too: x @ (s W_enc) = (x s) @ W_enc for ReLU, and
    # (x - b_dec/s) @ (s W_enc) = (x s - b_dec) @ W_enc for the others; the encoder biases, r_mag
    # and BatchTopK's threshold stay as they are. as_input: any floating input, as JumpReLUSAE's.
    as_input = JumpReLUSAE.as_input
    remove_parallel_decoder_grad_ = JumpReLUSAE.remove_parallel_decoder_grad_
    normalize_decoder_ = JumpReLUSAE.normalize_decoder_
    fold_input_scale_ = JumpReLUSAE.fold_input_scale_


class ReLUSAE(_SAE):
    """docs/maths.md section 4: f = ReLU(x @ W_enc + b_enc); loss = MSE + lambda * sum_i f_i * ||W_dec,i||.

    The decoder is not held at unit norm: weighting each latent's L1 by its decoder norm already
    stops the model from shrinking f and growing W_dec (Anthropic, April 2024 update), so
    `remove_parallel_decoder_grad_` and `normalize_decoder_` are no-ops here.
    """

    architecture = "relu"

    def pre_acts(self, x_BD):
        return x_BD @ self.W_enc + self.b_enc

    def encode(self, x_BD):
        return self.pre_acts(self.as_input(x_BD)).relu()

    def loss(self, x_BD, l1_coefficient, dead_F=None):
        """MSE + lambda * mean over rows of sum_i f_i ||W_dec,i||; "aux" is 0 (dead_F is not used)."""
        pre_BF = self.pre_acts(x_BD)
        f_BF = pre_BF.relu()
        x_hat_BD = self.decode(f_BF)
        mse = _mse(x_BD, x_hat_BD)
        l1 = (f_BF * self.W_dec.norm(dim=1)).sum(-1).mean()
        return self._result(mse + l1_coefficient * l1, mse, mse.new_zeros(()), pre_BF, f_BF, x_hat_BD)

    def remove_parallel_decoder_grad_(self):
        """No-op: the norm-weighted L1 replaces the unit-norm constraint."""

    def normalize_decoder_(self):
        """No-op: the norm-weighted L1 replaces the unit-norm constraint."""


class GatedSAE(_SAE):
    """docs/maths.md section 4 (Rajamanoharan et al., 2024, "Gated SAEs"): f = H(pi_gate) * ReLU(pi_mag).

    The gate decides which latents fire, the magnitude path how strongly; the two share W_enc,
    the magnitude path rescaling each column by exp(r_mag). Parameters b_gate, b_mag, r_mag
    start at 0.
    """

    architecture = "gated"
    BIASES = ("b_gate", "b_mag", "r_mag")

    def pre_acts(self, x_BD):
        """The gate pre-activations pi_gate."""
        return (x_BD - self.b_dec) @ self.W_enc + self.b_gate

    def _gate_and_features(self, x_BD):
        """(pi_gate, f) with f = H(pi_gate) * ReLU(pi_mag)."""
        # pi_gate = (x - b_dec) @ W_enc + b_gate; pi_mag = (x - b_dec) @ (W_enc * exp(r_mag)) + b_mag,
        # computed as ((x - b_dec) @ W_enc) * exp(r_mag) + b_mag to share the one matmul.
        hW_BF = (x_BD - self.b_dec) @ self.W_enc
        gate_BF, mag_BF = hW_BF + self.b_gate, hW_BF * self.r_mag.exp() + self.b_mag
        return gate_BF, torch.where(gate_BF > 0, mag_BF.relu(), 0)

    def encode(self, x_BD):
        return self._gate_and_features(self.as_input(x_BD))[1]

    def loss(self, x_BD, l1_coefficient, dead_F=None):
        """MSE + lambda * sum_i ReLU(pi_gate)_i ||W_dec,i|| + aux, each averaged over rows (dead_F is not used).

        aux = ||x - x_hat_frozen(ReLU(pi_gate))||^2 decodes the gate's own activations with a
        detached W_dec and b_dec: H passes no gradient, so this is what teaches the gate which
        latents to open, without pulling the decoder towards the gate's magnitudes. b_dec still
        gets its gradient through the encoder's input x - b_dec, as in the paper.
        """
        gate_BF, f_BF = self._gate_and_features(x_BD)
        x_hat_BD = self.decode(f_BF)
        mse = _mse(x_BD, x_hat_BD)
        gate_f_BF = gate_BF.relu()
        l1 = (gate_f_BF * self.W_dec.norm(dim=1)).sum(-1).mean()
        aux = _mse(x_BD, gate_f_BF @ self.W_dec.detach() + self.b_dec.detach())
        return self._result(mse + l1_coefficient * l1 + aux, mse, aux, gate_BF, f_BF, x_hat_BD)


def topk_relu(pre_BF, k):
    """TopK (docs/maths.md section 4): ReLU of the k largest pre-activations in each row, zero elsewhere."""
    values_BK, indices_BK = pre_BF.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre_BF).scatter(-1, indices_BK, values_BK.relu())


def batch_topk_relu(pre_BF, k):
    """BatchTopK: ReLU of the k * B largest pre-activations of the whole batch of B rows, zero elsewhere."""
    pre_N = pre_BF.reshape(-1)
    values, indices = pre_N.topk(k * (pre_N.numel() // pre_BF.shape[-1]), sorted=False)
    return torch.zeros_like(pre_N).scatter(0, indices, values.relu()).reshape(pre_BF.shape)


def rows_mean(t_N):
    """The mean over the rows (dim 0); train.py's global_mean takes it over every torchrun rank's rows."""
    return t_N.mean(0)


def auxk(sae, x_BD, x_hat_BD, pre_BF, dead_F, batch_mean=rows_mean):
    """AuxK (Gao et al., 2024): ||e - e_hat||^2 / ||e - mean(e)||^2, each averaged over the batch's
    rows by `batch_mean`, where e = x - x_hat.detach() and e_hat = f_aux @ W_dec from the k_aux =
    min(d_in // 2, #dead) largest pre-activations (ReLU'd) among the dead latents of each row. 0 when
    no latent is dead, or when the residual has no variance to normalise by.

    The normalisation by the residual's variance is their code's. e_hat has no bias, as in their
    paper, so AuxK reaches b_dec only through the encoder's input x - b_dec. Their code differs
    there: it decodes the dead latents with the bias, which keeps its gradient, against e plus the
    detached bias; the value is the same, but the gradient also pulls b_dec towards mean(e - e_hat)."""
    zero = pre_BF.new_zeros(())
    if dead_F is None:
        return zero
    if dead_F.dtype != torch.bool or tuple(dead_F.shape) != (sae.d_sae,):
        raise ValueError(f"dead_F must be a bool tensor of shape [{sae.d_sae}], "
                         f"got {dead_F.dtype} {list(dead_F.shape)}.")
    k_aux = min(sae.d_in // 2, int(dead_F.sum()))
    if k_aux == 0:
        return zero
    f_aux_BF = topk_relu(torch.where(dead_F, pre_BF, -math.inf), k_aux)
    e_ND = (x_BD - x_hat_BD.detach()).flatten(0, -2)
    e_variance = batch_mean((e_ND - batch_mean(e_ND)).pow(2).sum(-1))
    if not e_variance > 0:                  # one row, or a residual the same on every row: nothing to normalise by
        return zero
    return batch_mean((e_ND - (f_aux_BF @ sae.W_dec).flatten(0, -2)).pow(2).sum(-1)) / e_variance


def topk_loss(x_BD, x_hat_BD, aux, aux_coefficient, batch_mean=rows_mean):
    """Gao et al.'s loss, MSE / Var(x) + c * AuxK, times Var(x): the MSE in the units of the other
    architectures' losses (Adam is blind to the constant factor), and AuxK against the residual's
    own variance, about 1/FVU stronger than a raw MSE would make it. Var(x) is the batch's, detached."""
    mse = _mse(x_BD, x_hat_BD)
    x_ND = x_BD.flatten(0, -2)
    var_x = batch_mean((x_ND - batch_mean(x_ND)).pow(2).sum(-1)).detach()
    return mse + aux_coefficient * var_x * aux, mse


class TopKSAE(_SAE):
    """docs/maths.md section 4 (Gao et al., 2024): f = ReLU(TopK((x - b_dec) @ W_enc + b_enc)), k per row."""

    architecture = "topk"

    def __init__(self, d_in, d_sae, k, *, device=None, dtype=torch.float32):
        super().__init__(d_in, d_sae, device=device, dtype=dtype)
        self.k = _check_k(k, self.d_sae)

    def pre_acts(self, x_BD):
        return (x_BD - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x_BD):
        return topk_relu(self.pre_acts(self.as_input(x_BD)), self.k)

    def loss(self, x_BD, coefficient=None, dead_F=None, aux_coefficient=1 / 32, *, batch_mean=rows_mean):
        """MSE + aux_coefficient * AuxK on the latents where the bool mask dead_F [d_sae] is True.

        dead_F marks the latents that have not fired for a window of tokens; the caller keeps
        that count (train.py does). Without it, "aux" is 0 and the loss is the MSE. `coefficient`
        is not used: k sets the sparsity. `batch_mean` takes AuxK's and Var(x)'s means over the
        rows (torchrun passes the mean over every rank's rows).
        """
        pre_BF = self.pre_acts(x_BD)
        f_BF = topk_relu(pre_BF, self.k)
        x_hat_BD = self.decode(f_BF)
        aux = auxk(self, x_BD, x_hat_BD, pre_BF, dead_F, batch_mean)
        return self._result(*topk_loss(x_BD, x_hat_BD, aux, aux_coefficient, batch_mean), aux, pre_BF, f_BF, x_hat_BD)


class BatchTopKSAE(TopKSAE):
    """BatchTopK (Bussmann et al., 2024): TopK's encoder, but training keeps the k * B largest
    pre-activations of the whole batch, and inference a single global threshold.

    The threshold (a 0-dim buffer, saved with the weights) is, as Bussmann et al. define it, the
    expected smallest positive activation that training keeps, a property of the trained SAE:
    `calibrate_threshold_` sets it from the final weights, the mean of that minimum over
    training batches (train.py does so after the last step). During training every `loss` call
    moves a running estimate there unless `update_threshold=False`: the batch's minimum on the
    first call, then threshold <- 0.99 threshold + 0.01 min_kept, SAELens's rate (its
    topk_threshold_lr 0.01, from a start at 0). dictionary_learning's trainer starts from the
    minimum as here, but only after step 1,000, and then keeps 0.999 of the old value. The estimate
    lags behind the weights and came out biased high (held-out L0 19.5 for k = 25), so it is only a
    value to log. It starts at -1, meaning "not estimated yet": until then, `encode` is a plain ReLU.
    """

    architecture = "batchtopk"

    def __init__(self, d_in, d_sae, k, *, device=None, dtype=torch.float32):
        super().__init__(d_in, d_sae, k, device=device, dtype=dtype)
        # At least float32 whatever the model dtype, like JumpReLUSAE's thresholds.
        threshold_dtype = torch.promote_types(dtype, torch.float32)
        self.register_buffer("threshold", torch.tensor(-1.0, device=device, dtype=threshold_dtype))

    def encode(self, x_BD):
        """Inference: f = pre where pre > threshold (strictly) and pre > 0, else 0; no batch dependence."""
        pre_BF = self.pre_acts(self.as_input(x_BD))
        return torch.where(pre_BF.to(self.threshold.dtype) > self.threshold, pre_BF.relu(), 0)

    def loss(self, x_BD, coefficient=None, dead_F=None, aux_coefficient=1 / 32, *, update_threshold=True):
        """The training forward (k * B largest over the batch): MSE + aux_coefficient * AuxK."""
        pre_BF = self.pre_acts(x_BD)
        f_BF = batch_topk_relu(pre_BF, self.k)
        if update_threshold:
            self.update_threshold_(f_BF)
        x_hat_BD = self.decode(f_BF)
        aux = auxk(self, x_BD, x_hat_BD, pre_BF, dead_F)
        return self._result(*topk_loss(x_BD, x_hat_BD, aux, aux_coefficient), aux, pre_BF, f_BF, x_hat_BD)

    @torch.no_grad()
    def update_threshold_(self, f_BF):
        """threshold <- min kept (first update) or 0.99 threshold + 0.01 min kept; no GPU sync."""
        min_kept = torch.where(f_BF > 0, f_BF, math.inf).min().to(self.threshold.dtype)   # inf: none kept
        t = self.threshold
        new = torch.where(t < 0, min_kept, 0.99 * t + 0.01 * min_kept)
        t.copy_(torch.where(min_kept.isfinite(), new, t))

    @torch.no_grad()
    def calibrate_threshold_(self, batches):
        """threshold <- the mean over `batches` (an iterable of [B, d_in] inputs) of the smallest
        positive activation that the training forward keeps; returns it. Batches that keep nothing
        positive are skipped; with none left, the threshold is unchanged."""
        mins = [f_BF[f_BF > 0].min() for f_BF in (batch_topk_relu(self.pre_acts(x_BD), self.k) for x_BD in batches)
                if (f_BF > 0).any()]
        if mins:
            self.threshold.copy_(torch.stack(mins).mean())
        return self.threshold.item()


ARCHITECTURES = {"jumprelu": JumpReLUSAE, "relu": ReLUSAE, "gated": GatedSAE, "topk": TopKSAE,
                 "batchtopk": BatchTopKSAE}


def make_sae(arch, d_in, d_sae, k=None, device=None, **kwargs):
    """A new SAE of architecture `arch`; `k` is required for topk and batchtopk and ignored by the others.

    Other keyword arguments go to the class (bandwidth, threshold_init, dtype, ...).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown SAE architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}.")
    if arch in ("topk", "batchtopk"):
        if k is None:
            raise ValueError(f"A {arch} SAE needs k, the number of active latents per row.")
        return ARCHITECTURES[arch](d_in, d_sae, k, device=device, **kwargs)
    return ARCHITECTURES[arch](d_in, d_sae, device=device, **kwargs)


if __name__ == "__main__":
    torch.manual_seed(0)
    x_BD = torch.randn(64, 8) / math.sqrt(8)
    dead_F = torch.arange(32) % 4 == 0
    for arch in ("relu", "gated", "topk", "batchtopk"):
        sae = make_sae(arch, 8, 32, k=4)
        out = sae.loss(x_BD, 1e-2, dead_F)
        out["loss"].backward()
        print(f"{arch:>9}: loss {out['loss'].item():.4f}  mse {out['mse'].item():.4f}  "
              f"aux {out['aux'].item():.4f}  l0 {out['l0'].item():.2f}")
