#!/usr/bin/env python3
"""Parity fixtures for switchyard-engine, made with transformers' own DeepseekV3ForCausalLM
(and DeepseekV2ForCausalLM for the softmax-gated V2 family).

For each tiny random config this writes a checkpoint in the Hugging Face layout DeepSeek-V3
ships with (one tensor per routed expert: `mlp.experts.{e}.gate_proj.weight`, ...) and the
reference outputs of transformers (eager attention, float32):

  reference.json                 prompt ids, 16 greedy ids (EOS stopping off), per MoE layer
                                 the experts each prompt token chose and their weights
  reference_logits.safetensors   `logits`, f32 [prompt_len, vocab]

The init makes bugs visible: linear weights N(0, 1/fan_in), embeddings N(0, 1), norm scales
uniform in [0.8, 1.2], a nonzero routing bias. (transformers' default 0.02 init gives nearly
uniform attention and flat logits, which hide mistakes.)

Re-run:  python3 tools/make_parity_fixtures.py --out tests/fixtures/parity
Needs torch, transformers (5.x) and safetensors from PyPI; nothing is downloaded from a hub.
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config,
                          DeepseekV3ForCausalLM)

ARCHS = {
    "v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
    "v2": (DeepseekV2Config, DeepseekV2ForCausalLM),
}

# Three shapes that between them cover: q_lora_rank and direct q_proj, plain RoPE and YaRN,
# group-limited routing with different limits and none, with and without leading dense layers,
# YaRN's cos/sin attention factor (mscale != mscale_all_dim),
# and both config.json schemas (transformers-5 `rope_parameters`, DeepSeek's `rope_scaling`).
CONFIGS = {
    "qlora_yarn_groups": dict(
        config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
            num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
            topk_group=2, n_shared_experts=1, q_lora_rank=32, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5,
            norm_topk_prob=True, max_position_embeddings=4096 * 4,
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                 original_max_position_embeddings=4096, beta_fast=32.0,
                                 beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        ),
        schema="transformers5",
        seed=1,
    ),
    "qproj_plain_nogroups": dict(
        config=dict(
            vocab_size=256, hidden_size=48, intermediate_size=96, moe_intermediate_size=24,
            num_hidden_layers=2, first_k_dense_replace=0, num_attention_heads=2,
            num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
            topk_group=1, n_shared_experts=2, q_lora_rank=None, kv_lora_rank=24,
            qk_nope_head_dim=12, qk_rope_head_dim=4, v_head_dim=8, routed_scaling_factor=1.0,
            norm_topk_prob=False, max_position_embeddings=2048,
            rope_parameters=dict(rope_type="default", rope_theta=5000.0),
        ),
        schema="transformers5",
        seed=2,
    ),
    "qlora_yarn_two_dense_deepseek_schema": dict(
        config=dict(
            vocab_size=320, hidden_size=64, intermediate_size=112, moe_intermediate_size=16,
            num_hidden_layers=4, first_k_dense_replace=2, num_attention_heads=4,
            num_key_value_heads=4, n_routed_experts=24, num_experts_per_tok=6, n_group=8,
            topk_group=3, n_shared_experts=1, q_lora_rank=24, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, routed_scaling_factor=2.0,
            norm_topk_prob=True, max_position_embeddings=4096 * 40,
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0,
                                 original_max_position_embeddings=4096, beta_fast=32.0,
                                 beta_slow=1.0, mscale=0.8, mscale_all_dim=1.0),
        ),
        schema="deepseek",
        seed=3,
    ),
    # DeepSeek-V2 family: softmax gate, no correction bias, no renormalisation.
    "v2_softmax_group_limited": dict(
        arch="v2",
        config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
            num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=3, n_group=4,
            topk_group=2, topk_method="group_limited_greedy", n_shared_experts=2,
            q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, routed_scaling_factor=1.5, norm_topk_prob=False,
            max_position_embeddings=2048,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        schema="deepseek",
        seed=4,
    ),
    "v2_lite_greedy": dict(
        arch="v2",
        config=dict(
            vocab_size=256, hidden_size=48, intermediate_size=96, moe_intermediate_size=16,
            num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2,
            num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
            topk_group=1, topk_method="greedy", n_shared_experts=1, q_lora_rank=None,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            routed_scaling_factor=1.0, norm_topk_prob=False, max_position_embeddings=2048,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        schema="transformers5",
        seed=5,
    ),
}

PROMPT_LEN = 12
GREEDY_STEPS = 16


def init_weights(model, generator):
    """Visible-bug init (see module doc)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(torch.empty_like(p).uniform_(0.8, 1.2, generator=generator))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
            elif name.endswith("experts.gate_up_proj"):  # [E, 2I, H]
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
            elif name.endswith("experts.down_proj"):  # [E, H, I]
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
            elif p.dim() == 2:  # [out, in]
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
            else:
                raise ValueError(f"no init rule for {name} {tuple(p.shape)}")
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.empty_like(b).uniform_(0.0, 0.1, generator=generator))


def hub_layout_state_dict(model):
    """transformers 5 fuses routed experts into 3-D tensors; DeepSeek-V3 on the Hub (and every
    real checkpoint) stores one 2-D tensor per expert. Write the Hub layout."""
    out = {}
    sd = model.state_dict()
    for name, t in sd.items():
        t = t.detach().contiguous().to(torch.float32)
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:].clone()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[name] = t
    return out


def deepseek_schema(config_dict):
    """Rewrites transformers-5 `rope_parameters` as DeepSeek's top-level `rope_theta` and
    `rope_scaling`, the schema of the config.json files published with the models."""
    rp = config_dict.pop("rope_parameters")
    config_dict["rope_theta"] = rp["rope_theta"]
    if rp.get("rope_type", "default") == "default":
        config_dict["rope_scaling"] = None
    else:
        scaling = {k: v for k, v in rp.items() if k not in ("rope_theta", "rope_type")}
        scaling["type"] = rp["rope_type"]
        config_dict["rope_scaling"] = scaling
    return config_dict


def make(name, spec, out_dir):
    torch.manual_seed(spec["seed"])
    generator = torch.Generator().manual_seed(spec["seed"])
    config_cls, model_cls = ARCHS[spec.get("arch", "v3")]
    config = config_cls(**spec["config"], bos_token_id=0, eos_token_id=1,
                        tie_word_embeddings=False)
    config._attn_implementation = "eager"
    model = model_cls(config).to(torch.float32).eval()
    init_weights(model, generator)

    prompt = torch.randint(2, config.vocab_size, (1, PROMPT_LEN), generator=generator)
    chosen = {}

    def hook(layer):
        def record(_module, _inputs, output):
            _, weights, indices = output
            order = torch.argsort(indices, dim=-1)
            chosen.setdefault(layer, []).append(
                (torch.gather(indices, 1, order).tolist(), torch.gather(weights, 1, order).tolist()))
        return record

    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(hook(i))

    with torch.no_grad():
        logits = model(prompt).logits[0].contiguous()  # [prompt_len, vocab]
        experts = {str(l): v[0][0] for l, v in chosen.items()}
        weights = {str(l): v[0][1] for l, v in chosen.items()}
        ids = prompt.clone()
        greedy, margins = [], []
        for _ in range(GREEDY_STEPS):
            step = model(ids).logits[0, -1]
            top2 = torch.topk(step, 2).values
            margins.append(float(top2[0] - top2[1]))
            nxt = int(torch.argmax(step))
            greedy.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    # A near-tie would make the greedy ids depend on float rounding, not on correctness.
    if min(margins) < 1e-3:
        raise SystemExit(f"{name}: greedy margin {min(margins)} too small; pick another seed")
    spread = float(logits.std())
    if spread < 0.5:
        raise SystemExit(f"{name}: logits std {spread} too flat to catch bugs")

    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    config_dict = json.loads(config.to_json_string(use_diff=False))
    config_dict.pop("_attn_implementation", None)
    if spec["schema"] == "deepseek":
        config_dict = deepseek_schema(config_dict)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
    save_file(hub_layout_state_dict(model), os.path.join(d, "model.safetensors"),
              metadata={"format": "pt"})
    save_file({"logits": logits}, os.path.join(d, "reference_logits.safetensors"))
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump({
            "source": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
                      f"{model_cls.__name__}, eager attention, float32",
            "prompt_ids": prompt[0].tolist(),
            "greedy_ids": greedy,
            "min_greedy_margin": min(margins),
            "experts": experts,
            "expert_weights": weights,
        }, f, indent=1)
    size = sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d))
    print(f"{name}: {size / 1e6:.2f} MB, logits std {spread:.2f}, min greedy margin {min(margins):.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/parity")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name, spec in CONFIGS.items():
        make(name, spec, args.out)


if __name__ == "__main__":
    main()
