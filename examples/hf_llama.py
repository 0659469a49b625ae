"""An HF ``transformers`` Llama built from a config (no weights are downloaded).

    memfit analyze examples/hf_llama.py          # small config, real-size math in a second
    memfit analyze examples/hf_llama.py:llama_7b # a Llama-2-7B-sized config, on fake tensors
    memfit plan examples/hf_llama.py:llama3_8b --device-memory 80GB --device h100 --report plan.html

The model is given ``labels``, so it returns an output whose ``.loss`` memfit differentiates.
"""

from __future__ import annotations

import torch


def _llama(batch: int, seq: int, dtype: torch.dtype = torch.float32, **cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    defaults = dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=max(2048, seq),
        attn_implementation="sdpa",
        use_cache=False,
    )
    defaults.update(cfg)
    attn = defaults.pop("attn_implementation")
    config = LlamaConfig(**defaults)
    config._attn_implementation = attn
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype (a .to() after the fact cannot swap fake parameters)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq))
    return model, {"input_ids": input_ids, "labels": input_ids.clone()}


def factory(batch: int = 2, seq: int = 256, **cfg):
    """A 4-layer, 256-wide Llama with grouped-query attention: (model, {"input_ids", "labels"})."""
    return _llama(batch, seq, **cfg)


def small():
    """A tiny Llama for tests: 2 layers, 64 wide, 64 tokens."""
    return _llama(2, 64, vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


def llama_7b():
    """Llama-2-7B's shapes (32 layers, 4096 wide, 11008 MLP, 32k vocab), batch 1 x 4096 tokens."""
    return _llama(1, 4096, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def llama3_8b():
    """Llama-3-8B's shapes (32 layers, 4096 wide, 14336 MLP, 8 KV heads, 128k vocab) in bf16, batch 1 x 8192
    tokens: 15 GiB of parameters, 30 GiB of AdamW state (in the parameters' dtype, as torch keeps it)."""
    return _llama(1, 8192, dtype=torch.bfloat16, vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0)


if __name__ == "__main__":
    import memfit
    from memfit.measurement import to_loss

    model, inputs = factory()
    compiled = torch.compile(model, backend=memfit.backend(inner="eager"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        loss = to_loss(compiled(**inputs))
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}")
