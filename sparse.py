"""The sparse path: JumpReLU's training terms computed from the few entries that can matter.

With L0 ~ 50 of 65,536 latents almost every entry of f is zero, and an entry whose pre-activation
lies below its kernel window contributes nothing to the loss or to any gradient: not to x_hat
(f = 0), not to d/dpre (H = 0), not to d/dtheta (K = 0). Only the encoder's matmul has to be
dense; the decoder and every backward product need only the kept entries, pre > theta - 3/4
epsilon: every active latent, every one inside its window (which reaches epsilon/2 below theta),
and a quarter bandwidth of room for rounding, enough while |pre|, |theta| and |b_enc| stay under
2^20 epsilon, as they do on inputs scaled to E||x||^2 = 1 (docs/maths.md section 3.4). On the
kept entries the estimators are the paper's (jumprelu.py).

    from sparse import sparse_terms
    terms = sparse_terms(sae, x_BD, sae.threshold)    # {"x_hat", "l0_rows", "fired", "kept"}

penalties.py's `loss(..., sparse=True)` trains on it; `penalties.dense_terms` is its dense twin,
and the tests hold the two to the same loss and gradients.
"""

import torch

from jumprelu import jumprelu, step


def sparse_terms(sae, x_BD, threshold_F):
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
    f_S = jumprelu(pre_S, theta_S, sae.bandwidth)
    on_S = step(pre_S, theta_S, sae.bandwidth)
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
