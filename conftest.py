"""pytest configuration: hypothesis profiles, and a tiny offline language model for the tests.

    HYPOTHESIS_PROFILE=ci  (default) deterministic and quick, what CI runs
    HYPOTHESIS_PROFILE=dev many more random examples, for a local run before a change lands
    HYPOTHESIS_PROFILE=mutation  CI's examples without shrinking, for tools/mutation.py
"""

import json
import os

import pytest
import torch
import tqdm
from hypothesis import HealthCheck, Phase, settings

settings.register_profile("ci", max_examples=40, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
# The mutation run (tools/mutation.py): CI's examples, and a failing example is not shrunk, since
# shrinking a mutant's failure costs minutes and the run needs only to know that it failed.
settings.register_profile("mutation", parent=settings.get_profile("ci"), database=None,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# runs/ holds the scripts' outputs, and tools/mutation.py's copies of the tree with their own tests.
collect_ignore = ["runs"]


@pytest.fixture(autouse=True)
def every_progress_bar_is_closed():
    """Every progress bar a test opened is closed when it ends, on every path out, errors included:
    tqdm stacks the bars it thinks are open, so one left behind pushes the next one a line down
    (and in a notebook, every later bar). The bars left open fail the test that left them, and are
    closed, so that no other test sees them."""
    yield
    left = list(tqdm.tqdm._instances)
    for bar in left:
        bar.close()
    assert not left, f"progress bars left open: {[bar.desc for bar in left]}"


TEXT = ("The quick brown fox jumps over the lazy dog. Sparse autoencoders find features in "
        "activations. A JumpReLU latent fires when its pre-activation exceeds its threshold. ") * 3


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 3-layer Llama (d_model 32) and a 300-token BPE tokenizer, saved as a local folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    folder = tmp_path_factory.mktemp("tiny_llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bos_tokenizer(tiny_model, tmp_path_factory):
    """A folder with a BPE tokenizer that prepends <bos> of its own accord, as Gemma's and Llama's do
    (tiny_model's does not, like SmolLM2's), and fits tiny_model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import AutoConfig, PreTrainedTokenizerFast
    folder = tmp_path_factory.mktemp("bos_tokenizer")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    vocab_size = AutoConfig.from_pretrained(tiny_model).vocab_size
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>", "<bos>"]))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def defined_bos_tokenizer(tiny_model, tmp_path_factory):
    """A folder with a BPE tokenizer that defines <bos> as its BOS but does not prepend it, as
    SmolLM2's defines <|im_start|> (id 1) and does not add it; it fits tiny_model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoConfig, PreTrainedTokenizerFast
    folder = tmp_path_factory.mktemp("defined_bos_tokenizer")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    vocab_size = AutoConfig.from_pretrained(tiny_model).vocab_size
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<bos>", "<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "a.txt").write_text(TEXT * 4)
    with open(folder / "b.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"Document {i}. " + TEXT}) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_acts(tiny_model, corpus, tmp_path_factory):
    """A harvested folder of the tiny model's layer-1 residual stream (d_in 32)."""
    import harvest
    out = tmp_path_factory.mktemp("tiny_acts")
    harvest.harvest(out, model_name=str(tiny_model), layer=1, tokens=6000, text=[str(corpus)], context=16,
                    batch_size=8, dtype="float32", heldout_every=5, shard_rows=1000, device="cpu")
    return out
