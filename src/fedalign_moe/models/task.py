"""Task heads on top of a causal MoE language model: classification and multiple choice.

All return logits [B, C] so one training loop (cross-entropy over C) serves every task:
- classification: a linear head on the hidden state of the last real token;
- multiple choice by letters: the LM's own next-token logits for the answer letters after "Answer:",
  i.e. the model scores the letters (the standard MMLU protocol), C = number of letters;
- multiple choice by likelihood: each choice follows the context in its own row, and its score is the
  mean log-probability of its tokens (length-normalised log-likelihood, HellaSwag's protocol).
Inputs are right-padded; the last real token of row b sits at ``attention_mask[b].sum() - 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def last_token_states(hidden_BSH: torch.Tensor, attention_mask_BS: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's last non-padding token, shape [B, H] (right padding)."""
    last_B = attention_mask_BS.long().sum(dim=1).clamp(min=1) - 1
    return hidden_BSH[torch.arange(hidden_BSH.shape[0], device=hidden_BSH.device), last_B]


def add_scoring(model: nn.Module, hidden: int, num_labels: int, label_token_ids: list[int] | None, seed: int) -> None:
    """Give a task model what scores its C classes: the answer letters' token ids (multiple choice; a
    buffer, ``head`` None) or a linear head [C, H] drawn from its own seeded generator, so the head is
    the same for a seed whatever loading the model drew from the global one before."""
    if label_token_ids is not None:
        if len(label_token_ids) != num_labels:
            raise ValueError("one answer token per label is required")
        model.register_buffer("label_token_ids", torch.tensor(label_token_ids), persistent=False)
        model.head = None
    else:
        model.head = nn.Linear(hidden, num_labels)
        nn.init.normal_(model.head.weight, std=0.02, generator=torch.Generator().manual_seed(seed))
        nn.init.zeros_(model.head.bias)


def choice_log_likelihood(hidden_RSH: torch.Tensor, lm_head: nn.Module, input_ids_RS: torch.Tensor,
                          target_mask_RS: torch.Tensor, num_choices: int) -> torch.Tensor:
    """Scores [B, C] of R = B x C rows (example-major): each row's mean log-probability of its target tokens,
    token t predicted from the hidden state at t - 1. The output layer runs on the target positions only
    (a few tokens a row, not S x V logits a row)."""
    predicts_RS = target_mask_RS[:, 1:].bool()  # position s - 1 predicts token s
    h_TH = hidden_RSH[:, :-1][predicts_RS]
    token_T = input_ids_RS[:, 1:][predicts_RS]
    logp_T = torch.log_softmax(lm_head(h_TH).float(), dim=-1).gather(-1, token_T[:, None]).squeeze(-1)
    row_T = torch.arange(input_ids_RS.shape[0], device=input_ids_RS.device)[:, None].expand_as(predicts_RS)[predicts_RS]
    sum_R = torch.zeros(input_ids_RS.shape[0], device=logp_T.device).index_add(0, row_T, logp_T)
    count_R = predicts_RS.sum(1).clamp(min=1)
    return (sum_R / count_R).reshape(-1, num_choices)


class CausalLMTaskModel(nn.Module):
    """Wraps a ``*ForCausalLM`` (its ``.model`` body and ``.lm_head``) into a C-way scorer."""

    def __init__(self, lm: nn.Module, num_labels: int, label_token_ids: list[int] | None = None, seed: int = 0):
        super().__init__()
        self.lm = lm
        self.config = lm.config
        self.frozen_prefix = 0  # no prefix cache for decoders: every layer sits below a trainable router
        self.num_choices = num_labels  # rows a example when choices are scored by their likelihood
        add_scoring(self, lm.config.hidden_size, num_labels, label_token_ids, seed)

    def forward(self, input_ids_BS, attention_mask_BS, prefix_hidden_BSH=None, target_mask_BS=None) -> torch.Tensor:
        out = self.lm.model(input_ids=input_ids_BS, attention_mask=attention_mask_BS, use_cache=False)
        if target_mask_BS is not None:  # rows are (example, choice) pairs: B here is B' x C
            return choice_log_likelihood(out.last_hidden_state, self.lm.lm_head, input_ids_BS, target_mask_BS,
                                         self.num_choices)
        h_BH = last_token_states(out.last_hidden_state, attention_mask_BS)
        if self.head is not None:
            return self.head(h_BH)
        letter_weight_CH = self.lm.lm_head.weight[self.label_token_ids]
        return F.linear(h_BH, letter_weight_CH).float()
