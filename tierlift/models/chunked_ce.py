"""Cross-entropy over a large vocabulary without an fp32 copy of the logits.

``F.cross_entropy(logits.float(), ...)`` on ``[tokens, vocab]`` logits holds, at its peak,
the compute-dtype logits, their fp32 copy and the fp32 log-softmax autograd saves for
backward (10 bytes per logit with bf16 logits), and in backward an fp32 gradient beside
that log-softmax.  At seq 32768 with a 32000-token vocabulary that is ~10 GiB; at 131072,
~40 GiB -- the largest single activation of a long-context step.

``chunked_cross_entropy`` computes the same sum in fp32, ``rows_per_chunk`` rows at a
time: forward keeps only the logits (which the model made anyway) and one fp32
log-sum-exp per row; backward recomputes each chunk's softmax from the logits and writes
the gradient in the logits' dtype (as the ``.float()`` cast's backward would).  Peak: the
logits, their gradient and one fp32 chunk.  The maths is the same as
log_softmax + nll_loss; only the order of the final sum differs (per chunk, then across
chunks), so results agree with ``F.cross_entropy`` to fp32 rounding.

Sync points: none (no host reads; the ignored-row mask stays on the device).
"""

from __future__ import annotations

import torch

__all__ = ["chunked_cross_entropy", "CHUNK_BYTES"]

CHUNK_BYTES = 256 << 20  # fp32 bytes of one chunk's working copy: large enough for full-speed kernels


def _rows(n_rows: int, vocab: int, chunk_bytes: int) -> int:
    return max(1, min(n_rows, chunk_bytes // (4 * max(vocab, 1))))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk_bytes: int):
        n, vocab = logits.shape
        rows = _rows(n, vocab, chunk_bytes)
        work = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for fp64 logits
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        lse = torch.empty(n, dtype=work, device=logits.device)
        total = torch.zeros((), dtype=work, device=logits.device)
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            x = logits[lo:hi].to(work)
            lse[lo:hi] = torch.logsumexp(x, dim=-1)
            picked = x.gather(1, safe[lo:hi, None]).squeeze(1)
            total += torch.where(valid[lo:hi], lse[lo:hi] - picked, torch.zeros_like(picked)).sum()
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.rows = rows
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, safe, valid, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = grad_total.to(lse.dtype)
        for lo in range(0, logits.shape[0], ctx.rows):
            hi = min(logits.shape[0], lo + ctx.rows)
            p = torch.exp(logits[lo:hi].to(lse.dtype) - lse[lo:hi, None])  # softmax of the chunk
            p.scatter_add_(1, safe[lo:hi, None], torch.full((hi - lo, 1), -1.0, dtype=p.dtype, device=p.device))
            p.mul_((valid[lo:hi].to(p.dtype) * scale)[:, None])
            grad[lo:hi] = p.to(grad.dtype)
        return grad, None, None, None


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                          chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Sum over rows of ``-log softmax(logits[r])[targets[r]]`` for rows whose target is not
    ``ignore_index``, in fp32 (fp64 for fp64 logits), as a 0-d tensor.  ``logits``: ``[rows, vocab]``, any float
    dtype; ``targets``: ``[rows]`` integer class indices."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"chunked_cross_entropy wants logits [rows, vocab] and targets [rows]; got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    return _ChunkedCrossEntropy.apply(logits, targets, ignore_index, chunk_bytes)
