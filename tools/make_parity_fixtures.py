#!/usr/bin/env python3
"""Parity fixtures for switchyard-engine, made with transformers' own model classes:
DeepseekV3ForCausalLM and DeepseekV2ForCausalLM (MLA, sigmoid / softmax group-limited gates),
and LlamaForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM, Gemma3ForCausalLM,
MistralForCausalLM, MixtralForCausalLM (GQA / MQA / MHA, QK-Norm, sliding windows, llama3 RoPE
scaling, Gemma's norms and soft-capping, softmax top-k gates with and without renormalisation).

For each tiny random config this writes a checkpoint in the layout the published models ship
with (one tensor per routed expert: `mlp.experts.{e}.gate_proj.weight`, ..., and Mixtral's
`block_sparse_moe.experts.{e}.w1.weight`, ...) and the reference outputs of transformers (eager
attention, float32):

  reference.json                 prompt ids, 16 greedy ids (EOS stopping off), per MoE layer
                                 the experts each prompt token chose and their weights
  reference_logits.safetensors   `logits`, f32 [prompt_len, vocab]

The init makes bugs visible: linear weights N(0, 1/fan_in), embeddings N(0, 1), norm scales
uniform in [0.8, 1.2] (Gemma stores scale - 1: uniform in [-0.2, 0.2]), a nonzero routing bias. (transformers' default 0.02 init gives nearly
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
                          DeepseekV3ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          MixtralConfig, MixtralForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)

ARCHS = {
    "v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
    "v2": (DeepseekV2Config, DeepseekV2ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "mixtral": (MixtralConfig, MixtralForCausalLM),
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
    # Llama 3.2: GQA 4:2, llama3 frequency scaling with an original context short enough that
    # all three bands (kept, blended, divided) occur at head_dim 16; tied embeddings; the
    # original `rope_theta` + `rope_scaling` schema.
    "llama_gqa_llama3_rope": dict(
        arch="llama",
        config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
            max_position_embeddings=4096,
            rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0,
                                 low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64),
        ),
        schema="original",
        tie=True,
        seed=11,
    ),
    # Qwen3: QK-Norm, GQA, the second layer sliding (use_sliding_window, max_window_layers 1).
    "qwen3_qknorm_sliding": dict(
        arch="qwen3",
        config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24,
            max_position_embeddings=4096, use_sliding_window=True, sliding_window=6,
            max_window_layers=1,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
        schema="transformers5",
        seed=12,
    ),
    # Qwen3-MoE: softmax top-k without renormalisation, a dense first layer (mlp_only_layers).
    "qwen3_moe_softmax_topk": dict(
        arch="qwen3_moe",
        config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_experts=16, num_experts_per_tok=4, norm_topk_prob=False,
            decoder_sparse_step=1, mlp_only_layers=[0], max_position_embeddings=4096,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
        schema="transformers5",
        seed=13,
    ),
    # Gemma 3: MQA, 2 local : 1 global with a local theta, (1 + w) norms before and after
    # attention and FFN, √hidden embedding scale, GeGLU, query_pre_attn_scalar, final logit
    # soft-cap, tied embeddings. (attn_logit_softcapping is set to show it is ignored: Gemma 3
    # in transformers never applies it.)
    "gemma3_local_global": dict(
        arch="gemma3",
        config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16,
            max_position_embeddings=4096, sliding_window=5,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=24, attn_logit_softcapping=6.0,
            final_logit_softcapping=12.0,
            rope_parameters={
                "full_attention": dict(rope_type="default", rope_theta=1000000.0),
                "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
            },
        ),
        schema="transformers5",
        tie=True,
        seed=14,
    ),
    # Mistral: MHA, a uniform sliding window shorter than prompt + generation.
    "mistral_sliding_window": dict(
        arch="mistral",
        config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, head_dim=16,
            max_position_embeddings=4096, sliding_window=7,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        schema="original",
        seed=15,
    ),
    # Mixtral: 8 experts, top 2, softmax then renormalised; `block_sparse_moe` / w1 w2 w3 names.
    "mixtral_top2": dict(
        arch="mixtral",
        config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
            num_experts_per_tok=2, max_position_embeddings=4096, sliding_window=None,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
        schema="transformers5",
        seed=16,
    ),
}

PROMPT_LEN = 12
GREEDY_STEPS = 16


def init_weights(model, generator, norm_offset=False):
    """Visible-bug init (see module doc)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                lo, hi = (-0.2, 0.2) if norm_offset else (0.8, 1.2)
                p.copy_(torch.empty_like(p).uniform_(lo, hi, generator=generator))
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


def hub_layout_state_dict(model, mixtral=False, tied=False):
    """transformers 5 fuses routed experts into 3-D tensors; the published checkpoints store one
    2-D tensor per expert (Mixtral under `block_sparse_moe`, as w1 = gate, w3 = up, w2 = down).
    Write the Hub layout. Tied embeddings have no `lm_head.weight`."""
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    out = {}
    sd = model.state_dict()
    for name, t in sd.items():
        t = t.detach().contiguous().to(torch.float32).clone()
        if tied and name == "lm_head.weight":
            continue
        if mixtral and ".mlp." in name:
            name = name.replace(".mlp.", ".block_sparse_moe.")
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.{gate}.weight"] = t[e, :inter].clone()
                out[f"{prefix}{e}.{up}.weight"] = t[e, inter:].clone()
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.{down}.weight"] = t[e].clone()
        else:
            out[name] = t
    return out


def original_schema(config_dict):
    """Rewrites transformers-5 `rope_parameters` as the top-level `rope_theta` and
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
    arch = spec.get("arch", "v3")
    config_cls, model_cls = ARCHS[arch]
    tied = spec.get("tie", False)
    config = config_cls(**spec["config"], bos_token_id=0, eos_token_id=1,
                        tie_word_embeddings=tied)
    config._attn_implementation = "eager"
    model = model_cls(config).to(torch.float32).eval()
    init_weights(model, generator, norm_offset=arch == "gemma3")

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
    if spec["schema"] in ("deepseek", "original"):
        config_dict = original_schema(config_dict)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
    save_file(hub_layout_state_dict(model, mixtral=arch == "mixtral", tied=tied),
              os.path.join(d, "model.safetensors"),
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
    ap.add_argument("--only", default=None, help="comma-separated fixture names to (re)make")
    args = ap.parse_args()
    torch.set_num_threads(1)
    only = set(args.only.split(",")) if args.only else None
    for name, spec in CONFIGS.items():
        if only is None or name in only:
            make(name, spec, args.out)


if __name__ == "__main__":
    main()
