"""chunked_cross_entropy equals F.cross_entropy (fp32) in value and gradient, with ignored
rows, several chunks and bf16 logits, and holds no fp32 copy of the logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tierlift.models.chunked_ce import chunked_cross_entropy
from tierlift.models.layers import aligned_lm_loss


def _case(dtype, rows=37, vocab=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[::5] = -100
    return logits, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_bytes", [4 * 53 * 4, 1 << 20])  # 4 rows per chunk (10 chunks), one chunk
def test_value_and_grad_match_cross_entropy(dtype, chunk_bytes):
    logits, targets = _case(dtype)
    ref_in = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_in.float(), targets, ignore_index=-100, reduction="sum")
    ref.backward(torch.tensor(0.7))
    out = chunked_cross_entropy(logits, targets, chunk_bytes=chunk_bytes)
    out.backward(torch.tensor(0.7))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-5)
    assert logits.grad.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=0)
    torch.testing.assert_close(logits.grad, ref_in.grad, **tol)
    assert torch.all(logits.grad[::5] == 0)  # ignored rows get no gradient


def test_gradcheck_float64():
    logits, targets = _case(torch.float64, rows=9, vocab=7)
    assert torch.autograd.gradcheck(lambda x: chunked_cross_entropy(x, targets, chunk_bytes=2 * 7 * 4),
                                    (logits,), eps=1e-6, atol=1e-6)


def test_all_ignored_gives_zero_loss_and_zero_grad():
    logits, targets = _case(torch.float32)
    targets[:] = -100
    loss = aligned_lm_loss(logits[None], targets[None])
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(logits.grad == 0)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="logits \\[rows, vocab\\]"):
        chunked_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))


def test_saves_the_logits_not_an_fp32_copy():
    """What autograd keeps for backward: the bf16 logits themselves plus one fp32 per row."""
    logits, targets = _case(torch.bfloat16, rows=64, vocab=1000)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        chunked_cross_entropy(logits, targets, chunk_bytes=16 * 1000 * 4)
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16
    assert sum(t.numel() * t.element_size() for t in saved) < logits.numel() * 2 + 64 * 4 * 4
