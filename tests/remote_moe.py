"""A small causal MoE language model in DeepSeek-MoE-16B's layout, as checkpoint-side modelling code
(``trust_remote_code``): routed experts as a list of gated MLP modules, a softmax ``gate`` holding its [E, H]
weight as a parameter, top-k without renormalisation, shared experts beside them, a dense first layer. Written
from the public description of DeepSeek-MoE's modelling code (its ``DeepseekMoE`` block) for the tests; the
test writes this file into a checkpoint folder with a ``config.json`` whose ``auto_map`` names it."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput


class TinyDeepseekMoEConfig(PretrainedConfig):
    model_type = "tiny_deepseek_moe"

    def __init__(self, vocab_size=512, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                 n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, num_hidden_layers=3,
                 first_k_dense_replace=1, num_attention_heads=4, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.moe_intermediate_size, self.n_routed_experts = moe_intermediate_size, n_routed_experts
        self.num_experts_per_tok, self.n_shared_experts = num_experts_per_tok, n_shared_experts
        self.num_hidden_layers, self.first_k_dense_replace = num_hidden_layers, first_k_dense_replace
        self.num_attention_heads = num_attention_heads
        super().__init__(**kwargs)


class MLP(nn.Module):
    def __init__(self, hidden, inner):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        nn.init.normal_(self.weight, std=0.1)

    def forward(self, hidden_BSH):
        scores_TE = F.linear(hidden_BSH.reshape(-1, hidden_BSH.shape[-1]), self.weight).softmax(-1)
        weight_TK, index_TK = scores_TE.topk(self.top_k, dim=-1)  # no renormalisation, as DeepSeek-MoE-16B
        return index_TK, weight_TK


class DeepseekMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.experts = nn.ModuleList(MLP(config.hidden_size, config.moe_intermediate_size)
                                     for _ in range(config.n_routed_experts))
        self.gate = MoEGate(config)
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden_BSH):
        index_TK, weight_TK = self.gate(hidden_BSH)
        x_TH = hidden_BSH.reshape(-1, hidden_BSH.shape[-1])
        y_TH = torch.zeros_like(x_TH)
        for e, expert in enumerate(self.experts):  # the list is iterated, as the original does
            token_N, slot_N = torch.nonzero(index_TK == e, as_tuple=True)
            if len(token_N):
                y_TH.index_add_(0, token_N, expert(x_TH[token_N]) * weight_TK[token_N, slot_N, None])
        return y_TH.reshape(hidden_BSH.shape) + self.shared_experts(hidden_BSH)


class Layer(nn.Module):
    def __init__(self, config, index):
        super().__init__()
        H, self.heads = config.hidden_size, config.num_attention_heads
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(H), nn.RMSNorm(H)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(H, H, bias=False) for _ in range(4))
        self.mlp = DeepseekMoE(config) if index >= config.first_k_dense_replace else MLP(H, config.intermediate_size)

    def forward(self, h_BSH):
        B, S, H = h_BSH.shape
        x = self.input_layernorm(h_BSH)
        q, k, v = (p(x).view(B, S, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, H)
        h_BSH = h_BSH + self.o_proj(a)
        return h_BSH + self.mlp(self.post_attention_layernorm(h_BSH))


class TinyDeepseekMoEPreTrained(PreTrainedModel):
    config_class = TinyDeepseekMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.05)


class TinyDeepseekMoEModel(TinyDeepseekMoEPreTrained):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, use_cache=None, **kwargs):
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            checkpointed = getattr(self, "gradient_checkpointing", False) and self.training
            h = self._gradient_checkpointing_func(layer.__call__, h) if checkpointed else layer(h)
        return BaseModelOutput(last_hidden_state=self.norm(h))


class TinyDeepseekMoEForCausalLM(TinyDeepseekMoEPreTrained):
    def __init__(self, config):
        super().__init__(config)
        self.model = TinyDeepseekMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, use_cache=None, **kwargs):
        return CausalLMOutput(logits=self.lm_head(self.model(input_ids, attention_mask).last_hidden_state))
