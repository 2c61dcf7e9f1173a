"""Matryoshka training (Bussmann et al., 2025; Nabeshima, 2024), beside the paper (docs/maths.md section 3.3).

The latents are ordered, and nested prefixes of them, m_1 < m_2 < ... < m_n = d_sae, must each
reconstruct x on their own: the SAE's reconstruction error, that of the whole dictionary m_n,
becomes the mean of the errors of every prefix decoded alone:

    L = (1/n) sum_j ||x - (f[:m_j] @ W_dec[:m_j] + b_dec)||^2  +  the SAE's sparsity (and auxiliary) terms

each averaged over the rows, b_dec shared. The mean, not Bussmann et al.'s sum, keeps the sparsity
coefficient's meaning (under Adam, summing is averaging with lambda n times smaller). The first
latents then carry the general features, which a later, more specific latent cannot absorb without
the short prefixes losing them. Only the loss changes: encode, decode, the estimators and the
sparsity terms are the SAE's own, so a Matryoshka JumpReLU SAE is a JumpReLU SAE at inference,
saved, evaluated and exported as one, with its prefixes recorded (metadata "matryoshka").

    import matryoshka, penalties
    loss = matryoshka.loss(penalties.loss, [256, 1024, 4096])       # d_sae 4096
    out = loss(sae, x_BD, 5e-3, dead_F, penalty=penalties.target_batch(32))
    out["prefix_mse"]                                               # the errors of [256, 1024]
"""

import torch


def prefixes(sizes, d_sae):
    """The nested prefix sizes: `sizes` strictly increasing, from 1 to d_sae, with d_sae added last
    where it is missing; a one-sentence ValueError otherwise."""
    sizes = [int(m) for m in sizes]
    if not sizes or sizes != sorted(set(sizes)) or not 1 <= sizes[0] < d_sae or sizes[-1] > d_sae:
        raise ValueError(f"--matryoshka {' '.join(map(str, sizes))} must be prefix sizes in increasing order, each "
                         f"once, the first from 1 to d_sae-1={d_sae - 1}, the last at most d_sae: such as "
                         f"{d_sae // 16} {d_sae // 4} {d_sae}.")
    return sizes if sizes[-1] == d_sae else sizes + [d_sae]


def prefix_errors(x_BD, f_BF, W_dec_FD, b_dec_D, sizes):
    """||x - (f[:m] @ W_dec[:m] + b_dec)||^2 summed over d_in and averaged over the rows, for each m
    of the increasing `sizes`: a [len(sizes)] tensor. The residual is carried from one prefix to the
    next, so all of them cost one decode of the largest."""
    errors, residual_BD, start = [], x_BD - b_dec_D, 0
    for m in sizes:
        residual_BD = residual_BD - f_BF[..., start:m] @ W_dec_FD[start:m]
        errors.append(residual_BD.pow(2).sum(-1).mean())
        start = m
    return torch.stack(errors)


def loss(sae_loss, sizes):
    """`sae_loss(sae, x_BD, ...)`, any SAE's training loss that returns its activations "f" and its
    reconstruction error "mse" (the paper's, penalties.loss on the dense path, Anthropic's,
    BatchTopK's), with that error replaced by the mean of the errors of all the prefixes `sizes`:
    the Matryoshka loss. Its dict gains "prefix_mse", the errors of the proper prefixes."""
    def matryoshka_loss(sae, x_BD, *args, **kwargs):
        out = sae_loss(sae, x_BD, *args, **kwargs)
        errors = prefix_errors(x_BD, out["f"], sae.W_dec, sae.b_dec, sizes)
        return {**out, "loss": out["loss"] - out["mse"] + errors.mean(), "prefix_mse": errors[:-1]}
    return matryoshka_loss
