"""Random-weight `transformers.Qwen2ForCausalLM` / `Qwen3ForCausalLM` checkpoints: the
independent reference."""

from __future__ import annotations

import dataclasses

from jaxrlvr.models import Qwen2Config


def hf_config(cfg: Qwen2Config):
    import transformers

    d = cfg.to_hf_dict()
    d.pop("architectures"), d.pop("model_type"), d.pop("dtype")
    return (transformers.Qwen3Config if cfg.model_type == "qwen3" else transformers.Qwen2Config)(
        **d
    )


def random_hf_model(cfg: Qwen2Config, seed: int = 0):
    """A float32 `Qwen2ForCausalLM` (`Qwen3ForCausalLM` for a qwen3 config) with every
    parameter random (biases and norms, Qwen3's q/k norms, too)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = (
        transformers.Qwen3ForCausalLM
        if cfg.model_type == "qwen3"
        else transformers.Qwen2ForCausalLM
    )
    model = cls(hf_config(cfg)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def save_random_hf_checkpoint(cfg: Qwen2Config, path, seed: int = 0, **save_kw):
    model = random_hf_model(cfg, seed)
    model.save_pretrained(path, **save_kw)
    return model


def torch_logits(model, ids, attention_mask=None):
    import torch

    with torch.no_grad():
        mask = None if attention_mask is None else torch.tensor(attention_mask)
        return model(torch.tensor(ids), attention_mask=mask).logits.float().numpy()


TEST_CONFIGS = {
    "tied-gqa": dict(),
    "untied-mha": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "untied-mqa-theta1e6": dict(
        num_attention_heads=8, num_key_value_heads=1, tie_word_embeddings=False,
        rope_theta=1e6, num_hidden_layers=3,
    ),
    # Qwen3: q/k RMSNorm per head, no q/k/v bias, head_dim 32 != hidden / heads = 16.
    "qwen3-untied-gqa": dict(
        model_type="qwen3", attention_bias=False, head_dim_=32, tie_word_embeddings=False,
    ),
}  # fmt: skip


def tiny(**kw) -> Qwen2Config:
    from jaxrlvr.models import preset

    return dataclasses.replace(preset("tiny"), **kw)
