"""The CPU dropout keeps each element with probability 1 - p and scales the kept ones, like F.dropout."""

import pytest
import torch

from instructblip_core.config import QFormerConfig
from instructblip_core.dropout import Dropout, dropout
from instructblip_core.qformer import QFormerMultiHeadAttention


def test_kept_share_scaling_and_gradient_follow_p():
    torch.manual_seed(0)
    x = torch.ones(200, 500, requires_grad=True)
    y = dropout(x, 0.1, True)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.9, abs=0.005)  # 100,000 draws: SE 0.001
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.9))


def test_eval_mode_and_p_zero_are_the_identity_and_the_module_keeps_nn_dropout_state():
    x = torch.randn(4, 8)
    assert dropout(x, 0.5, False) is x and dropout(x, 0.0, True) is x
    module = Dropout(0.3)
    assert isinstance(module, torch.nn.Dropout) and module.p == 0.3
    module.eval()
    assert torch.equal(module(x), x)
    module.train()
    assert (module(torch.ones(1000)) == 0).float().mean().item() == pytest.approx(0.3, abs=0.05)


def test_attention_dropout_on_the_cpu_drops_weights_as_sdpa_would():
    config = QFormerConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32, attention_probs_dropout_prob=0.5)
    attention = QFormerMultiHeadAttention(config)
    x = torch.randn(3, 5, 16)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    attention.eval()
    reference, _ = attention(x, mask=mask)  # SDPA, no dropout
    _, weights = attention(x, mask=mask, need_weights=True)
    assert weights[0, :, :, 3:].abs().max() == 0  # masked keys get no weight
    attention.train()
    torch.manual_seed(0)
    dropped, _ = attention(x, mask=mask)
    assert not torch.allclose(dropped, reference)
    # Averaged over many masks, dropout changes nothing in expectation.
    mean = torch.stack([attention(x, mask=mask)[0] for _ in range(400)]).mean(0)
    assert torch.allclose(mean, reference, atol=0.15)
