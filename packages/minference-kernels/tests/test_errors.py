"""Bad input gets a clear error naming the argument; never a silent wrong answer."""

import minference_kernels as mk
import pytest
import torch

q = torch.randn(1, 4, 70, 64)
k = torch.randn(1, 2, 70, 64)
v = torch.randn(1, 2, 70, 64)
VI = torch.zeros(1, 4, 3, dtype=torch.long)
SI = torch.zeros(1, 4, 2, dtype=torch.long)


@pytest.mark.parametrize(
    "args,exc,words",
    [
        ((q[0], k, v), ValueError, "q must be 4-D"),
        ((q, k, v[..., :32]), ValueError, "v shape"),
        (
            (q, torch.randn(1, 3, 70, 64), torch.randn(1, 3, 70, 64)),
            ValueError,
            "multiple of key/value heads",
        ),
        ((q.double(), k.double(), v.double()), TypeError, "q must be float16"),
        ((q, k.half(), v.half()), TypeError, "k has dtype"),
        ((q, k[..., :10, :], v[..., :10, :]), ValueError, "last Nq <= Nk"),
        ((torch.randn(2, 4, 70, 64), k, v), ValueError, "batch"),
        ((q, k[..., :32], v[..., :32]), ValueError, "head dim"),
        ((q.int(), k, v), TypeError, "q must be float16"),
        (([1.0], k, v), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_shape_dtype_errors(args, exc, words):
    with pytest.raises(exc, match=words):
        mk.dense_attention(*args)
    with pytest.raises(exc, match=words):
        mk.vertical_slash_attention(*args, VI, SI)


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs(name, bad):
    t = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    t[name][0, 0, 5, 3] = bad
    with pytest.raises(ValueError, match=f"{name} contains"):
        mk.sparse_prefill(t["q"], t["k"], t["v"], [mk.HeadPattern.dense()] * 4)


def test_index_errors():
    with pytest.raises(
        ValueError, match=r"vertical_indices holds 70, outside the valid range \[0, 69\]"
    ):
        mk.vertical_slash_attention(q, k, v, VI + 70, SI)
    with pytest.raises(ValueError, match=r"slash_indices holds -1"):
        mk.vertical_slash_attention(q, k, v, VI, SI - 1)
    with pytest.raises(TypeError, match="slash_indices must be an integer tensor"):
        mk.vertical_slash_attention(q, k, v, VI, SI.float())
    with pytest.raises(ValueError, match=r"vertical_indices must start with \[B=1, Hq=4\]"):
        mk.vertical_slash_attention(q, k, v, VI[:, :2], SI)
    with pytest.raises(ValueError, match="vertical_indices must be 3-D"):
        mk.vertical_slash_attention(q, k, v, VI[0], SI)
    bi = torch.zeros(1, 4, 2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"block_indices holds 2"):
        mk.block_sparse_attention(q, k, v, bi + 2)
    with pytest.raises(ValueError, match=r"block_indices holds -2"):
        mk.block_sparse_attention(q, k, v, bi - 2)
    with pytest.raises(ValueError, match="block_indices dim 2 must be 2"):
        mk.block_sparse_attention(q, k, v, bi[:, :, :1])
    with pytest.raises(ValueError, match="block_size must be a positive multiple of 64"):
        mk.block_sparse_attention(q, k, v, bi, block_size=48)


def test_scalar_errors():
    with pytest.raises(ValueError, match="window_tokens must be >= 1"):
        mk.streaming_attention(q, k, v, 4, 0)
    with pytest.raises(TypeError, match="sink_tokens must be an int"):
        mk.streaming_attention(q, k, v, 4.0, 8)
    with pytest.raises(ValueError, match="scale must be a positive"):
        mk.dense_attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="last_q must be <= 128"):
        mk.estimate_vertical_slash(q, k, 4, 4, last_q=500)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        mk.estimate_block_sparse(q, k, 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        mk.dense_attention(q, k, v, backend="cuda")


def test_head_pattern_errors():
    with pytest.raises(ValueError, match="heads has 3 patterns but q has 4"):
        mk.sparse_prefill(q, k, v, [mk.HeadPattern.dense()] * 3)
    with pytest.raises(TypeError, match=r"heads\[1\] must be a HeadPattern"):
        mk.sparse_prefill(q, k, v, [mk.HeadPattern.dense(), "dense"] * 2)
    with pytest.raises(ValueError, match="kind must be one of"):
        mk.HeadPattern("sparse")
    with pytest.raises(ValueError, match="num_vertical must be >= 0"):
        mk.HeadPattern.vertical_slash(-1, 5)
    with pytest.raises(ValueError, match="block_size must be a positive multiple of 64"):
        mk.HeadPattern.block_sparse(4, 100)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        mk.dense_attention(q, k, v, backend="triton")


def test_import_has_no_side_effects():
    import subprocess
    import sys

    code = "import sys, minference_kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("where", [0, 1, 517, -1])
@pytest.mark.parametrize("strided", [False, True])
def test_check_finite_in_slices(monkeypatch, where, strided):
    """Large tensors are scanned in slices (bounded temporary); every slice is still checked."""
    from minference_kernels import _validate

    monkeypatch.setattr(_validate, "_FINITE_CHUNK", 64)
    x = torch.randn(2, 3, 37, 8)
    if strided:
        x = x.transpose(1, 2)  # [2, 37, 3, 8] view, not contiguous
    _validate.check_finite("q", x)  # finite: no error
    flat_idx = where % x.numel()
    idx = torch.unravel_index(torch.tensor(flat_idx), x.shape)
    for bad, word in ((float("nan"), "NaN"), (float("inf"), "Inf")):
        y = x.clone()
        y[tuple(int(i) for i in idx)] = bad
        with pytest.raises(ValueError, match=f"q contains {word}"):
            _validate.check_finite("q", y)
