"""``torch.compile(model, fullgraph=True)`` of a tiny Hugging Face Llama (GQA 4/2, built from a
config) with ``attn_implementation="attncc"``: one graph, no break, in eval (with padding) and in
a training step, matching the eager ``sdpa`` model. The attention runs as the
``attncc::attention`` library op, so dynamo never traces attncc's Python."""

import pytest
import torch

pytest.importorskip("transformers")
import transformers as tf

from attncc.integrations.transformers import register

SMALL = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module", autouse=True)
def registered():
    register("attncc")


def model():
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL))


def batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (2, 10), generator=gen)
    keep = torch.ones(2, 10, dtype=torch.long)
    keep[1, :2] = 0  # left padding
    return ids, keep


def test_compiled_eval_with_padding_matches_sdpa():
    m = model().eval()
    ids, keep = batch()
    m.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = m(input_ids=ids, attention_mask=keep).logits
    m.set_attn_implementation("attncc")
    torch._dynamo.reset()
    explain = torch._dynamo.explain(m)(input_ids=ids, attention_mask=keep)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    targets = {str(n.target) for g in explain.graphs for n in g.graph.nodes}
    assert "attncc.attention.default" in targets
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(input_ids=ids, attention_mask=keep).logits
    real = keep.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_compiled_training_step_matches_eager():
    grads = {}
    for impl in ("sdpa", "attncc"):
        m = model().train()
        m.set_attn_implementation(impl)
        ids, _ = batch()
        torch._dynamo.reset()
        run = torch.compile(m, fullgraph=True, backend="aot_eager") if impl == "attncc" else m
        out = run(input_ids=ids).logits
        torch.nn.functional.cross_entropy(out.flatten(0, 1), ids.flatten()).backward()
        grads[impl] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert grads["sdpa"].keys() == grads["attncc"].keys()
    for n, g in grads["sdpa"].items():
        torch.testing.assert_close(grads["attncc"][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_sdpa_drop_in_and_module_compile_fullgraph():
    from attncc.integrations.torch import AttnccAttention

    spec = {"attncc": 1, "name": "alibi", "score_mod": "score - slope[h] * (q_idx - kv_idx)",
            "inputs": {"slope": {"shape": ["heads"], "dtype": "float32"}}}
    attn = AttnccAttention(spec, is_causal=True, slope=torch.tensor([0.5, 0.25, 0.125, 0.0625]))
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 9, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 2, 9, 8, generator=gen, requires_grad=True) for _ in range(2))
    torch._dynamo.reset()
    explain = torch._dynamo.explain(attn)(q, k, v)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    got = torch.compile(attn, fullgraph=True, backend="aot_eager")(q, k, v)
    got.sum().backward()
    grads = [x.grad.clone() for x in (q, k, v, attn.slope)]
    for x in (q, k, v, attn.slope):
        x.grad = None
    want = attn(q, k, v)
    want.sum().backward()
    torch.testing.assert_close(got, want)
    for g, x in zip(grads, (q, k, v, attn.slope), strict=True):
        torch.testing.assert_close(g, x.grad)
