"""Shared helpers of the kernels tests (a uniquely named module, not conftest)."""

import torch


def reference(q, k, v, mask, scale=None):
    """Float64 attention restricted to ``mask [B|1, H|1, Nq, Nk]``; rows with no key give 0."""
    b, hq, nq, d = q.shape
    g = hq // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    kk = k.double().repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    return p @ vv


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
