"""attncc.integrations.transformers: tiny random models (no downloads) against attn_implementation
"eager": logits, greedy generation with the KV cache, and one training step's gradients."""

import copy

import pytest
import torch

pytest.importorskip("transformers")
import transformers as tf

from attncc.errors import InputError
from attncc.integrations.transformers import (
    AttnccMask,
    attention_function,
    mask_function,
    register,
)
from attncc.reference import attend
from attncc.spec.load import load_spec

VOCAB = 61
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64)


def llama():
    return tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, num_key_value_heads=2))


def mistral():
    return tf.MistralForCausalLM(tf.MistralConfig(**SMALL, num_key_value_heads=2,
                                                  sliding_window=4))


def gemma2():
    cfg = tf.Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=8, sliding_window=4,
                          attn_logit_softcapping=0.5, final_logit_softcapping=None,
                          query_pre_attn_scalar=12, layer_types=["sliding_attention",
                                                                 "full_attention"])
    return tf.Gemma2ForCausalLM(cfg)


def gpt2():
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, attn_pdrop=0.0,
                        resid_pdrop=0.0, embd_pdrop=0.0)
    return tf.GPT2LMHeadModel(cfg)


def bert():
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tf.BertForMaskedLM(cfg)


DECODERS = {"llama_gqa": llama, "mistral_sliding": mistral, "gemma2_softcap": gemma2,
            "gpt2": gpt2}
MODELS = {**DECODERS, "bert_padding": bert}


@pytest.fixture(scope="module", autouse=True)
def registered():
    register("attncc")


def batch(name, seq=10):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, seq), generator=gen)
    keep = torch.ones(2, seq, dtype=torch.long)
    if name == "bert_padding":
        keep[1, seq - 3:] = 0  # right padding, as an encoder batch has it
    else:
        keep[1, :2] = 0  # left padding, as generate() has it
    return ids, keep


def build(name):
    torch.manual_seed(0)
    return MODELS[name]().eval()


def logits(model, impl, ids, keep):
    model.set_attn_implementation(impl)
    return model(input_ids=ids, attention_mask=keep).logits


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_match_eager(name):
    model = build(name)
    ids, keep = batch(name)
    with torch.no_grad():
        want = logits(model, "eager", ids, keep)
        got = logits(model, "attncc", ids, keep)
    real = keep.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_greedy_generate_matches_eager(name):
    model = build(name)
    ids, keep = batch(name, seq=6)
    kwargs = dict(attention_mask=keep, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.set_attn_implementation("eager")
    want = model.generate(ids, **kwargs)
    model.set_attn_implementation("attncc")
    got = model.generate(ids, **kwargs)
    assert got.shape == want.shape and got.shape[1] > 6
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_step_gradients_match_eager(name):
    model = build(name).train()
    ids, keep = batch(name)
    grads = {}
    for impl in ("eager", "attncc"):
        model.zero_grad()
        out = logits(model, impl, ids, keep)
        real = keep.bool()
        loss = torch.nn.functional.cross_entropy(out[real], ids[real])
        loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()
                       if p.grad is not None}
    assert grads["eager"].keys() == grads["attncc"].keys()
    assert any(g.abs().sum() > 0 for g in grads["attncc"].values())
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["attncc"][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_spec_replaces_the_pattern():
    """A Llama running a sliding-window spec equals the same weights as an eager Mistral."""
    register("attncc_window", spec={
        "attncc": 1, "name": "window4",
        "mask": "kv_idx <= q_idx + seq_k - seq_q and q_idx + seq_k - seq_q - kv_idx < 4"})
    torch.manual_seed(0)
    lm = llama().eval()
    ms = mistral().eval()
    ms.load_state_dict(lm.state_dict())
    ids, keep = batch("llama_gqa")
    with torch.no_grad():
        want = logits(ms, "eager", ids, keep)
        got = logits(lm, "attncc_window", ids, keep)
    real = keep.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    lm.set_attn_implementation("attncc_window")
    ms.set_attn_implementation("eager")
    kwargs = dict(attention_mask=keep[:, :6], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(lm.generate(ids[:, :6], **kwargs), ms.generate(ids[:, :6], **kwargs))


def qkv(seq_q=7, seq_k=7):
    gen = torch.Generator().manual_seed(3)
    return (torch.randn(2, 4, seq_q, 8, generator=gen, dtype=torch.float64),
            torch.randn(2, 2, seq_k, 8, generator=gen, dtype=torch.float64),
            torch.randn(2, 2, seq_k, 8, generator=gen, dtype=torch.float64))


def test_spec_inputs_scale_and_padding_reach_the_kernel():
    spec = {"attncc": 1, "name": "alibi", "score_mod": "score - slope[h] * (q_idx - kv_idx)",
            "mask": "kv_idx <= q_idx", "inputs": {"slope": {"shape": ["heads"],
                                                           "dtype": "float64"}}}
    slope = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    fn = attention_function(spec, inputs={"slope": slope})
    q, k, v = qkv()
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, :2] = False
    mask = AttnccMask(causal=True, window=None, shift=0, keep=keep)
    out, weights = fn(None, q, k, v, mask, scaling=0.3)
    assert weights is None and out.shape == (2, 7, 4, 8)
    with_keep = load_spec({**spec, "scale": "0.3",
                           "mask": "kv_idx <= q_idx and hf_keep[b, kv_idx]",
                           "inputs": {**spec["inputs"],
                                      "hf_keep": {"shape": ["batch", "seq_k"], "dtype": "bool"}}})
    want = attend(with_keep, q, k, v, {"slope": slope, "hf_keep": keep})
    torch.testing.assert_close(out.transpose(1, 2), want)


def test_unrecognised_mask_falls_back_to_a_dense_input():
    def chunks_of_three(b, h, q_idx, kv_idx):
        return (q_idx // 3) == (kv_idx // 3)

    mask = mask_function(2, 7, 7, mask_function=chunks_of_three)
    assert mask.allowed is not None and mask.allowed.shape == (2, 7, 7)
    q, k, v = qkv()
    out, _ = attention_function()(None, q, k, v, mask)
    dense = (torch.arange(7)[:, None] // 3) == (torch.arange(7)[None, :] // 3)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense,
                                                            enable_gqa=True)
    torch.testing.assert_close(out.transpose(1, 2), want)


def test_recognised_masks_need_no_dense_tensor():
    from transformers import masking_utils as mu

    causal = mask_function(2, 3, 9, q_offset=6, mask_function=mu.causal_mask_function)
    assert (causal.causal, causal.window, causal.shift, causal.allowed) == (True, None, 6, None)
    window = mask_function(1, 5, 5, mask_function=mu.sliding_window_causal_mask_function(3))
    assert (window.causal, window.window) == (True, 3)
    both = mask_function(1, 5, 5, mask_function=mu.sliding_window_bidirectional_mask_function(2))
    assert (both.causal, both.window) == (False, 2)
    pad = torch.tensor([[1, 1, 1, 0, 0]])
    padded = mask_function(1, 5, 5, mask_function=mu.bidirectional_mask_function,
                           attention_mask=pad)
    assert padded.keep.tolist() == [[True, True, True, False, False]]


def test_decoding_window_matches_dense_mask():
    """seq_q < seq_k with a cache shift that is not seq_k - seq_q (a sliding cache offset)."""
    from transformers import masking_utils as mu

    fn = mu.sliding_window_causal_mask_function(3)
    ours = mask_function(2, 2, 6, q_offset=5, kv_offset=1, mask_function=fn)
    dense = mu.sdpa_mask(2, 2, 6, q_offset=5, kv_offset=1, mask_function=fn,
                         allow_is_causal_skip=False)
    q, k, v = qkv(2, 6)
    out, _ = attention_function()(None, q, k, v, ours)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense,
                                                            enable_gqa=True)
    torch.testing.assert_close(out.transpose(1, 2), want)


def test_user_mistakes_are_one_line_errors():
    with pytest.raises(InputError, match="dropout"):
        attention_function()(None, *qkv(), None, dropout=0.1)
    with pytest.raises(InputError, match="transformers' own"):
        register("sdpa")
    with pytest.raises(InputError, match="hf_"):
        attention_function(inputs={"hf_keep": torch.ones(1)})


def test_set_attn_implementation_switches_back_and_forth():
    model = build("llama_gqa")
    copy_ = copy.deepcopy(model)
    ids, keep = batch("llama_gqa")
    with torch.no_grad():
        a = logits(model, "attncc", ids, keep)
        b = logits(copy_, "sdpa", ids, keep)
    assert model.config._attn_implementation == "attncc"
    real = keep.bool()
    torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-5)
