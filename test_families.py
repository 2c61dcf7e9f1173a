"""Tests for harvest.py on the main model families: Llama (SmolLM), Gemma 2, GPT-2, GPT-NeoX (Pythia), Qwen2.

harvest.py finds the decoder layers and their attention and MLP blocks without a table of names.
For a tiny random model of each family, built from its transformers config (nothing is
downloaded), the three sites must be the tensors the family's own code computes: resid is the
decoder layer's output, output_hidden_states[layer + 1] for any layer but the last (whose entry
is after the final norm); mlp and attn are the outputs of the modules named in FAMILIES, read in
transformers/models/<family>/modeling_<family>.py. Every comparison with the model's own forward
pass is exact: the same operations on the same inputs.

    python -m pytest test_families.py
"""

import functools

import numpy as np
import pytest
import torch
from transformers import (AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
                          GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import acts
import harvest


V = 300       # the vocabulary of the tokenizer conftest.py trains
TINY = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            bos_token_id=1, eos_token_id=1, pad_token_id=0)

# family: (model, path of the decoder layers, attention and MLP attribute of a layer, final norm).
# The decoder layers of each family (modeling_<family>.py):
#   llama, qwen2  h += self_attn(input_layernorm(h)); h += mlp(post_attention_layernorm(h))
#   gemma2        h += post_attention_layernorm(self_attn(input_layernorm(h)));
#                 h += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
#   gpt2          h += attn(ln_1(h)); h += mlp(ln_2(h))
#   gpt_neox      parallel (Pythia): h = h + attention(input_layernorm(h)) + mlp(post_attention_layernorm(h));
#                 sequential: a = h + attention(input_layernorm(h)); h = a + mlp(post_attention_layernorm(a))
FAMILIES = {
    "llama": (lambda: LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=2)),
              "model.layers", "self_attn", "mlp", "model.norm"),
    # Gemma 2's sites are its post-norms' outputs: what it adds to the residual stream.
    "gemma2": (lambda: Gemma2ForCausalLM(Gemma2Config(**TINY, num_key_value_heads=2, head_dim=8)),
               "model.layers", "post_attention_layernorm", "post_feedforward_layernorm", "model.norm"),
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_inner=64,
                                                n_positions=64, bos_token_id=1, eos_token_id=1)),
             "transformer.h", "attn", "mlp", "transformer.ln_f"),
    "gpt_neox": (lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**TINY, max_position_embeddings=64,
                                                          use_parallel_residual=True)),
                 "gpt_neox.layers", "attention", "mlp", "gpt_neox.final_layer_norm"),
    "gpt_neox_sequential": (lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**TINY, max_position_embeddings=64,
                                                                     use_parallel_residual=False)),
                            "gpt_neox.layers", "attention", "mlp", "gpt_neox.final_layer_norm"),
    "qwen2": (lambda: Qwen2ForCausalLM(Qwen2Config(**TINY, num_key_value_heads=2)),
              "model.layers", "self_attn", "mlp", "model.norm"),
}
LAYER = 1     # not the last of 3: its hidden_states entry is the layer's own output


@functools.cache
def tiny(name):
    """The family's tiny model in eval mode. Every parameter gets random noise on top of the
    family's initialisation, so that no bias is 0 and no norm weight 1."""
    torch.manual_seed(0)
    model = FAMILIES[name][0]().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(params=list(FAMILIES))
def family(request):
    """(name, model, (layers, attn, mlp, final norm))."""
    return request.param, tiny(request.param), FAMILIES[request.param][1:]


def ids():
    return torch.randint(2, V, (3, 12), generator=torch.Generator().manual_seed(1))


def outputs_of(model, modules, ids_BT):
    """The outputs of `modules` (the first element of a tuple) in one full forward pass, with our own hooks."""
    got = {}
    handles = [m.register_forward_hook(lambda mod, inp, out, key=key: got.__setitem__(
        key, out[0] if isinstance(out, tuple) else out)) for key, m in modules.items()]
    try:
        with torch.no_grad():
            hidden = model(ids_BT, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    return got, hidden


def test_layers_and_sites_are_the_family_modules(family):
    name, model, (layers, attn, mlp, _) = family
    assert harvest.decoder_layers(model) is model.get_submodule(layers)
    block = model.get_submodule(f"{layers}.{LAYER}")
    for site, module, path in (("resid", block, f"{layers}.{LAYER}"), ("attn", getattr(block, attn), f"{layers}.{LAYER}.{attn}"),
                               ("mlp", getattr(block, mlp), f"{layers}.{LAYER}.{mlp}")):
        assert harvest.hook_module(model, LAYER, site) is module
        assert harvest.hook_name(model, module) == path


def test_resid_is_the_decoder_layer_output(family):
    name, model, (layers, _, _, final_norm) = family
    x = ids()
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states
    assert len(hidden) == 4                                 # the embeddings, then one per layer
    for layer in (0, 1):
        assert torch.equal(harvest.SiteReader(model, [(layer, "resid")])(x)[0], hidden[layer + 1]), layer
    # The last entry is after the final norm; the site is before it, like every other layer's.
    last = harvest.SiteReader(model, [(2, "resid")])(x)[0]
    assert not torch.allclose(last, hidden[3])
    with torch.no_grad():
        assert torch.equal(model.get_submodule(final_norm)(last), hidden[3])


def test_attn_and_mlp_are_the_sub_block_outputs(family):
    name, model, (layers, attn, mlp, _) = family
    x = ids()
    block = model.get_submodule(f"{layers}.{LAYER}")
    got, _ = outputs_of(model, {"attn": getattr(block, attn), "mlp": getattr(block, mlp)}, x)
    for site in ("attn", "mlp"):
        out = harvest.SiteReader(model, [(LAYER, site)])(x)[0]
        assert out.shape == (3, 12, 32) and out.abs().sum() > 0
        assert torch.equal(out, got[site]), site


@pytest.mark.parametrize("name", list(FAMILIES))
def test_attn_and_mlp_sites_add_up_to_the_residual_update(name):
    """hook_module's contract: the sub-blocks' outputs "before they are added to the residual
    stream", so resid(layer) - resid(layer - 1) = attn + mlp (in parallel and sequential GPT-NeoX alike)."""
    model, x = tiny(name), ids()
    update = harvest.SiteReader(model, [(LAYER, "resid")])(x)[0] - harvest.SiteReader(model, [(LAYER - 1, "resid")])(x)[0]
    attn_out, mlp_out = (harvest.SiteReader(model, [(LAYER, site)])(x)[0] for site in ("attn", "mlp"))
    torch.testing.assert_close(attn_out + mlp_out, update, rtol=1e-5, atol=1e-5)


def test_gemma2_adds_the_post_normed_sub_block_outputs():
    """What Gemma 2 adds to the residual stream is self_attn's and mlp's outputs passed through
    its post-norms (the outputs of post_attention_layernorm and post_feedforward_layernorm)."""
    model, x = tiny("gemma2"), ids()
    block = model.model.layers[LAYER]
    got, hidden = outputs_of(model, {"attn": block.self_attn, "mlp": block.mlp}, x)
    update, attn_out, mlp_out = hidden[LAYER + 1] - hidden[LAYER], got["attn"], got["mlp"]
    with torch.no_grad():
        added = block.post_attention_layernorm(attn_out) + block.post_feedforward_layernorm(mlp_out)
    torch.testing.assert_close(added, update, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(attn_out + mlp_out, update, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("site", ["attn", "mlp"])
def test_harvest_writes_the_site_of_a_saved_model_folder(family, site, tiny_model, bos_tokenizer, corpus, tmp_path):
    """harvest.harvest end to end on the family saved as a local folder. Gemma's and Llama's
    tokenizers prepend BOS, so theirs here does too, and every window must start with it."""
    name, model, (layers, attn, mlp, _) = family
    folder = tmp_path / name
    model.save_pretrained(folder)
    adds_bos = name in ("gemma2", "llama")
    tokenizer = AutoTokenizer.from_pretrained(bos_tokenizer if adds_bos else tiny_model)
    tokenizer.save_pretrained(folder)
    m = harvest.harvest(tmp_path / "acts", model_name=str(folder), layer=LAYER, site=site, tokens=300,
                        text=[str(corpus)], context=16, batch_size=4, dtype="float32", heldout_every=5,
                        device="cpu")
    assert (m["d_in"], m["layer"], m["site"]) == (32, LAYER, site)
    assert m["hook"] == f"{layers}.{LAYER}.{attn if site == 'attn' else mlp}"
    assert m["bos"] == (tokenizer.bos_token_id if adds_bos else None)
    _, shards = acts.open_split(tmp_path / "acts", "train")
    rows = np.concatenate([a for a, _ in shards])
    windows = torch.from_numpy(np.concatenate([t for _, t in shards])).long()
    if adds_bos:
        assert (windows[:, 0] == tokenizer.bos_token_id).all()
    reloaded, _ = harvest.load_model(str(folder), "cpu", torch.float32)
    got, _ = outputs_of(reloaded, {site: reloaded.get_submodule(m["hook"])}, windows)
    # Other batch sizes than harvest's: equal up to float32 rounding.
    np.testing.assert_allclose(rows, got[site][:, 1:].reshape(-1, 32).numpy(), rtol=1e-5, atol=1e-6)
