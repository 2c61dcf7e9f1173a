"""SAELens's own loader reads what formats.save_saelens writes, with the same features.

An interoperability check against the real SAELens, kept out of the default test run because
sae-lens is not a dependency of this project (and pulls in many):

    pip install sae-lens && python -m pytest interop_saelens.py
"""

import pytest
import torch

import baselines
import formats
from test_formats import VARIANTS


@pytest.mark.parametrize("arch, kwargs", VARIANTS)
def test_saelens_own_loader_reads_what_we_write(tmp_path, arch, kwargs):
    import sae_lens
    g = torch.Generator().manual_seed(0)
    sae = baselines.make_sae(arch, 8, 32, k=4, **kwargs)
    with torch.no_grad():
        for name, q in sae.named_parameters():
            q.copy_(torch.randn(q.shape, generator=g) * 0.3 - (1.0 if name == "log_threshold" else 0.0))
        if arch == "batchtopk":
            sae.threshold.fill_(0.4)
    formats.save_saelens(sae, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    x = torch.randn(100, 8, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), sae(x), rtol=1e-5, atol=1e-5)
