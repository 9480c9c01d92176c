"""Shared helpers of the kernels tests (a uniquely named module, not conftest)."""

import os

import torch

#: where the tests that honour it put their tensors: ``MINFERENCE_TEST_DEVICE=cuda`` runs them on
#: a GPU with the compiled Triton kernels (``tests/gpu`` does so); default ``cpu``
DEVICE = torch.device(os.environ.get("MINFERENCE_TEST_DEVICE", "cpu"))


def reference(q, k, v, mask, scale=None, softcap=None):
    """Float64 attention restricted to ``mask [B|1, H|1, Nq, Nk]``; rows with no key give 0.
    ``softcap``: logits ``softcap * tanh(logit / softcap)`` before the mask (Gemma 2)."""
    b, hq, nq, d = q.shape
    g = hq // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    mask = mask.to(q.device)
    kk = k.double().repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    return p @ vv


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


# --------------------------------------------------------------------------------------------
# property-based testing: hypothesis profiles and a real count of the cases each process checked

import atexit  # noqa: E402
import json  # noqa: E402
from collections import Counter  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

PROFILE = os.environ.get("MINFERENCE_HYPOTHESIS_PROFILE", "ci")
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
# ci: few examples, derandomized (the same cases every run), no example database written
settings.register_profile(
    "ci", deadline=None, derandomize=True, database=None, suppress_health_check=_SLOW_OK
)
# fuzz: many random examples (seeded per run; hypothesis prints the seed of a failure)
settings.register_profile("fuzz", deadline=None, print_blob=True, suppress_health_check=_SLOW_OK)
settings.load_profile(PROFILE)
FUZZ = PROFILE == "fuzz"


def examples(ci: int, fuzz: int):
    """``@examples(ci, fuzz)``: the number of hypothesis examples of a test under each profile."""
    return settings(max_examples=fuzz if FUZZ else ci)


CASES: Counter = Counter()


def checked(name: str) -> None:
    """Count one fully checked case (call at the end of a property test's body)."""
    CASES[name] += 1


@atexit.register
def _write_cases() -> None:
    # MINFERENCE_CASES_FILE: append one JSON line per pytest process, read back by `nox -s fuzz`
    path = os.environ.get("MINFERENCE_CASES_FILE")
    if path and CASES:
        label = "triton-interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "torch"
        with open(path, "a") as f:
            f.write(json.dumps({"path": label, "cases": dict(CASES)}) + "\n")


def logit_bound(q, k, scale=None) -> float:
    """``scale * max |q_i| * max |k_j|``: the largest possible logit. Float32 logits carry an absolute
    error of about ``eps32 * bound``, so the attainable accuracy of any float32 kernel degrades with
    it (the float64 reference does not): tolerances grow by ``1e-6 * bound``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return float(scale * q.double().norm(dim=-1).max() * k.double().norm(dim=-1).max())


def check_rows(out, ref, mask, dtype, name="", bound=0.0):
    """Row-wise comparison with the float64 reference ``ref`` over ``mask``: rows with no key are
    exactly zero; every other row is within the dtype's tolerance relative to the row (a single
    wrong row of a large output cannot hide in a global norm). ``bound``: :func:`logit_bound`."""
    assert out.shape == ref.shape, name
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    empty = ~mask.any(-1).expand(out.shape[:-1])
    if bool(empty.any()):
        assert bool((out[empty] == 0).all()), f"{name}: a row with no key is not zero"
    o, r = out.double()[~empty], ref[~empty]
    if o.numel() == 0:
        return 0.0
    tol = TOL[dtype] + 1e-6 * bound
    num = (o - r).norm(dim=-1)
    # floor: an output row that is a near-cancelling average has a small norm but its error is
    # bounded by the values' scale, not by its own norm
    den = r.norm(dim=-1).clamp_min(0.1 * r.norm(dim=-1).mean().clamp_min(1e-30))
    worst = float((num / den).max())
    assert worst < 4 * tol, f"{name}: worst row rel err {worst:.2e} (tol {4 * tol:.1e})"
    glob = rel_err(out, ref)
    assert glob < tol, f"{name}: rel err {glob:.2e} (tol {tol:.1e})"
    return worst
