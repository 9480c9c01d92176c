"""Structured synthetic attention heads, for tests and benchmarks.

Random Q/K have no structure: every pattern keeps ~ the same mass and sparse methods look either
useless or free. :func:`structured_qkv` builds heads with the shapes trained heads show:

* **slashes**: queries and keys share a per-head content vector and are rotated by rotary position
  embeddings (RoPE), so ``q_i . k_j`` depends on ``i - j``: a strong local window plus periodic
  diagonals from the low-frequency rotary components;
* **verticals**: a few anchor keys (position 0, plus ``num_anchors`` random positions) carry a
  direction that every query also carries, so all queries attend to them (sinks, delimiters);
* **blocks**: the sequence is cut into topics; queries and keys of a topic share a topic vector, so
  query blocks attend to the key blocks of their own topic (and of recalled earlier topics).

Each head mixes the three with its own weights (``kind``: ``"mixed"``, ``"vertical_slash"``,
``"block"``, ``"local"``). Deterministic for a given ``seed``. This is ``profile="legacy"``, the
default, kept byte for byte as it was: the project's tests and benchmark tables use it.

**Its heads are far more diffuse than trained ones.** At 8192 tokens a legacy ``mixed`` row needs
50% of its causal keys for 95% of its attention and puts 0.7% on the first 4 tokens; SmolLM2-135M's
real heads need 7.7% and, in layers 12-29, put 43% on them (the table below).

**Calibrated profile, ``profile="real"``.** Heads fitted to SmolLM2-135M-Instruct's captured
heads at 8192 tokens (``benchmarks/results/real_heads_smollm2_8k.json``, from
``benchmarks/real_heads.py``). Every query head belongs to a group standing for a layer range, in
the proportions of :data:`REAL_GROUPS`: ``early`` (layers 0-2: diffuse, no sink), ``mid`` (3-11:
sharp, content columns, small sink) and ``late`` (12-29: sharp, a strong sink that varies per
head); ``profile="real_early"`` / ``"real_mid"`` / ``"real_late"`` make every head one group. A
logit is the sum of planted terms, each in its own slot of the head dimension: an attention sink
(the first token), a local band, a power-law recency bias from a context vector drifting at every
time scale (with block-shaped fluctuations), RoPE slashes, a per-key salience every query shares
(vertical columns), ``num_anchors`` anchor columns, topic blocks with recall of an earlier topic,
and query-specific content that neighbouring queries share. Per group, the terms' strengths and
the per-head spreads (:data:`REAL_PARAMS`) were fitted by ``benchmarks/fit_synthetic.py`` (a
pattern search; ``benchmarks/results/synthetic_fit_8k.json``) to the real group's oracle statistics
(means, and 10th / 90th percentiles over heads) and to the recall and density of the offline
search's candidates as estimated at inference. Measured at 8192 tokens with SmolLM2's head shape
(9 query / 3 KV heads, head dim 64), 2 seeds (``benchmarks/synthetic_vs_real.py``,
``benchmarks/results/synthetic_vs_real_8k.json``): the share of a row's causal keys holding 90 /
95 / 99% of its attention and the first-4-token mass, means over heads and rows:

| heads | 90% | 95% | 99% | sink |
|---|---|---|---|---|
| legacy ``kind="mixed"`` | 0.363 | 0.502 | 0.756 | 0.007 |
| ``profile="real"`` | 0.046 | 0.083 | 0.209 | 0.301 |
| SmolLM2, all layers | 0.047 | 0.077 | 0.179 | 0.264 |
| ``real_early`` | 0.175 | 0.263 | 0.464 | 0.004 |
| SmolLM2, layers 0-2 | 0.199 | 0.276 | 0.450 | 0.002 |
| ``real_mid`` | 0.039 | 0.071 | 0.182 | 0.020 |
| SmolLM2, layers 3-11 | 0.037 | 0.066 | 0.171 | 0.017 |
| ``real_late`` | 0.022 | 0.048 | 0.153 | 0.543 |
| SmolLM2, layers 12-29 | 0.026 | 0.050 | 0.137 | 0.431 |

Where it still disagrees: the late heads' sinks spread wider over heads (10th / 90th percentile
0.15 / 0.93 against 0.23 / 0.62) and sinks grow at shorter lengths (about 0.65 at 2048 tokens; the
real heads were only measured at 8192); the vertical-slash estimator's slash picks scatter more
than on the real heads (``VS(32, 512)`` keeps 0.37-0.51 of the pairs at 8K against 0.34-0.36), so
densities at fixed slash budgets are pessimistic; a bit less mass lies within 1024 tokens
(``A(64, 1024)`` recall 0.77 / 0.94 against 0.84 / 0.97 in early / late layers). Calibrated on one
small model at one length: Gemma-3-270M's global layers, for one, are more diffuse (95% of the mass
in 16% of the keys, ``real_heads_gemma3_8k.json``).
"""

from __future__ import annotations

import torch


def _rope(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    d = x.shape[-1]
    half = d // 2
    inv = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = pos[:, None].float() * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
    if d % 2:
        out = torch.cat([out, x[..., -1:]], -1)
    return out


#: ``profile`` names :func:`structured_qkv` takes.
PROFILES = ("legacy", "real", "real_early", "real_mid", "real_late")
#: The calibrated profile's head groups and how many of SmolLM2-135M's 30 layers each stands for
#: (layers 0-2, 3-11, 12-29); ``profile="real"`` gives each query head one group in these
#: proportions.
REAL_GROUPS = {"early": 3, "mid": 9, "late": 18}
#: Fitted per group (logit units, i.e. after the ``1/sqrt(head_dim)`` scale): ``sink`` the first
#: token's logit (tokens 1-3 get half) and ``sink_spread`` its per-head normal spread; ``band`` the
#: local band's logit at distance 0, falling as ``exp(-distance / band_width)``; ``recency`` the
#: logit of a drifting context vector shared by queries and keys, which falls about like
#: ``recency * (1 - ln(distance) / ln(65536))`` on average (a power-law recency bias) with
#: block-shaped fluctuations; ``slash`` a RoPE term (flat energy over the rotary frequencies, base
#: 10000): periodic diagonals;
#: ``salience`` the std of a per-key logit that every query of a head shares (vertical columns);
#: ``noise`` the std of the query-specific content logits and ``smooth_q`` their correlation
#: length over queries in tokens, rounded (neighbouring queries attend alike); ``topic`` the same-topic bonus;
#: ``anchor`` the logit of the ``num_anchors`` anchor columns; ``spread`` the per-head log-normal
#: spread of the sharpness (every term but the sink).
REAL_PARAMS: dict[str, dict[str, float]] = {
    "early": dict(sink=0.0, sink_spread=2.25, band=5.0, band_width=2.6, recency=3.0, slash=1.0,
                  salience=0.75, noise=0.5, smooth_q=56.8889, topic=1.75, anchor=1.0, spread=0.3),
    "mid": dict(sink=3.0, sink_spread=2.5, band=5.0, band_width=0.9615, recency=4.0, slash=1.0,
                salience=2.75, noise=0.75, smooth_q=96.0, topic=2.0, anchor=3.0, spread=0.2),
    "late": dict(sink=13.0, sink_spread=2.25, band=4.0, band_width=0.5, recency=6.0, slash=2.0,
                 salience=0.25, noise=1.5, smooth_q=10.6667, topic=1.25, anchor=3.0, spread=0.15),
}  # fmt: skip


def _profile_groups(profile: str, heads_q: int, seed: int) -> list[str]:
    """Each query head's group: one group for ``real_<group>``; for ``real`` the groups in
    :data:`REAL_GROUPS` proportions (largest remainder), shuffled by ``seed``."""
    if profile != "real":
        return [profile.removeprefix("real_")] * heads_q
    total = sum(REAL_GROUPS.values())
    exact = {k: heads_q * w / total for k, w in REAL_GROUPS.items()}
    count = {k: int(x) for k, x in exact.items()}
    rest = sorted(REAL_GROUPS, key=lambda k: count[k] - exact[k])[: heads_q - sum(count.values())]
    for k in rest:
        count[k] += 1
    out = [k for k in REAL_GROUPS for _ in range(count[k])]
    perm = torch.randperm(heads_q, generator=torch.Generator().manual_seed(seed + 7_777_777))
    return [out[i] for i in perm.tolist()]


def _smooth(x: torch.Tensor, width: int) -> torch.Tensor:
    """Moving average of ``width`` along dim -2 (positions), rescaled to unit variance."""
    if width <= 1:
        return x
    lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
    y = x.reshape(-1, n, c).transpose(1, 2).reshape(-1, 1, n)
    y = torch.nn.functional.pad(y, (width - 1, 0), mode="replicate")
    y = torch.nn.functional.avg_pool1d(y, width, stride=1) * width**0.5
    return y.reshape(-1, c, n).transpose(1, 2).reshape(*lead, n, c)


def _stratified_normal(groups: list[str], g: torch.Generator) -> torch.Tensor:
    """One standard normal deviate per head, stratified within each group: the ``m`` heads of a
    group get one uniform draw in each of the ``m`` equal-probability strata, in random order."""
    out = torch.zeros(len(groups))
    for name in dict.fromkeys(groups):
        hs = [h for h, x in enumerate(groups) if x == name]
        m = len(hs)
        u = (
            torch.randperm(m, generator=g).double()
            + torch.rand(m, generator=g, dtype=torch.float64)
        ) / m
        out[hs] = torch.special.ndtri(u.clamp(1e-6, 1 - 1e-6)).float()
    return out


def _drift(batch: int, heads: int, n: int, dim: int, g: torch.Generator) -> torch.Tensor:
    """``[batch, heads, n, dim]`` unit-variance Gaussian features that vary at the time scales
    2, 8, ..., 32768: per scale, independent values at knots ``scale`` apart (random offset),
    linearly interpolated; the scales are summed with equal weight."""
    scales = [2 * 4**s for s in range(8)]
    pos = torch.arange(n, dtype=torch.float64)
    out = torch.zeros(batch, heads, n, dim)
    for tau in scales:
        knots = int((n + tau) // tau) + 2
        vals = torch.randn(batch, heads, knots, dim, generator=g)
        x = (pos + float(torch.rand((), generator=g)) * tau) / tau
        k0 = x.floor().long()
        f = (x - k0).float()[:, None]
        norm = ((1 - f) ** 2 + f**2).sqrt()
        out += ((1 - f) * vals[:, :, k0] + f * vals[:, :, k0 + 1]) / norm
    return out / len(scales) ** 0.5


def _real_qkv(
    batch: int,
    heads_q: int,
    heads_kv: int,
    n: int,
    head_dim: int,
    *,
    groups: list[str],
    params: dict[str, dict[str, float]],
    num_anchors: int,
    topic_len: int,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The calibrated generator. q and k are built in logit units from disjoint slots (sink,
    anchors, salience, topics, RoPE recency, content), so ``q_i . k_j / sqrt(head_dim)`` is the sum
    of the planted terms; heads narrower than 32 get a random projection of the slots."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    d = head_dim
    dv = max(d, 32)
    dt = dv // 8  # topic slot
    dr = 2 * (dv // 8)  # RoPE slot (coordinate pairs)
    dd = dv // 4  # drift slot
    dn = dv - 3 - dt - dr - dd  # content slot
    o_t, o_r, o_d, o_n = 3, 3 + dt, 3 + dt + dr, 3 + dt + dr + dd
    grp = heads_q // heads_kv
    pos = torch.arange(n)
    ph = [params[x] for x in groups]
    col = lambda key: torch.tensor([p[key] for p in ph], dtype=torch.float32)
    # per query head: a log-normal sharpness scales every term but the sink; its normal deviates
    # and the sink's are stratified within each group (one per quantile stratum, shuffled)
    sharp = torch.exp(col("spread") * _stratified_normal(groups, g))
    sink = col("sink") + col("sink_spread") * _stratified_normal(groups, g)
    per_q = lambda t: t[None, :, None, None]

    kx = torch.zeros(batch, heads_kv, n, dv)
    qx = torch.zeros(batch, heads_q, n, dv)
    # slot 0, sink: the first token, half on tokens 1-3
    kx[:, :, 0, 0] = 1.0
    kx[:, :, 1:4, 0] = 0.5
    qx[..., 0] = sink[None, :, None]
    # slot 1, anchors: num_anchors random columns per KV head, strength 0.75-1
    for h in range(heads_kv):
        a = torch.randperm(n, generator=g)[:num_anchors]
        kx[:, h, a, 1] = 0.75 + 0.25 * torch.rand(len(a), generator=g)
    qx[..., 1] = (col("anchor") * sharp)[None, :, None]
    # slot 2, salience: a per-key logit shared by the queries of a head (vertical columns)
    kx[..., 2] = r(batch, heads_kv, n)
    qx[..., 2] = (col("salience") * sharp)[None, :, None]
    # topics: queries attend to their topic's keys and recall one earlier topic
    n_topics = max(1, -(-n // topic_len))
    topics = r(batch, heads_kv, n_topics, dt)
    topics = topics / topics.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    topic_of = (pos // topic_len).clamp(max=n_topics - 1)
    recall = (topic_of - 1 - (topic_of * 7) % 3).clamp(min=0)
    kx[..., o_t:o_r] = topics[:, :, topic_of]
    tq = topics.repeat_interleave(grp, 1)
    qx[..., o_t:o_r] = per_q(col("topic") * sharp) * (tq[:, :, topic_of] + 0.8 * tq[:, :, recall])
    # RoPE slashes: unit energy per rotary frequency (random phase), rotated by position
    phase = 2 * torch.pi * torch.rand(batch, heads_kv, 1, dr // 2, generator=g)
    c = torch.cat([phase.cos(), phase.sin()], -1) / max(dr // 2, 1) ** 0.5
    kx[..., o_r:o_d] = _rope(c + 0.3 / dr**0.5 * r(batch, heads_kv, n, dr), pos)
    qc = c.repeat_interleave(grp, 1) + 0.3 / dr**0.5 * r(batch, heads_q, n, dr)
    qx[..., o_r:o_d] = per_q(col("slash") * sharp) * _rope(qc, pos)
    # drift (recency): a context vector that wanders at every time scale 2, 8, ..., 32768
    # tokens; u_i . u_j ~ 1 - ln(distance) / ln(65536), with block-shaped fluctuations
    u = _drift(batch, heads_kv, n, dd, g) / dd**0.5
    kx[..., o_d:o_n] = u
    qx[..., o_d:o_n] = per_q(col("recency") * sharp) * u.repeat_interleave(grp, 1)
    # content: key latents z (|z| ~ 1); a query is a decaying sum of the latents of its own
    # recent tokens (the local band) plus query-specific features, smooth over smooth_q queries
    z = r(batch, heads_kv, n, dn) / dn**0.5
    kx[..., o_n:] = z
    band = col("band") * sharp
    noise = col("noise") * sharp
    for h, p in enumerate(ph):
        width = max(p["band_width"], 1e-3)
        taps = min(n, 1 + int(4 * width))
        w = torch.exp(-torch.arange(taps, dtype=torch.float32) / width)
        zh = torch.nn.functional.pad(z[:, h // grp].transpose(1, 2), (taps - 1, 0))
        loc = (
            torch.nn.functional.conv1d(zh.reshape(-1, 1, n + taps - 1), w.flip(0)[None, None])
            .reshape(batch, dn, n)
            .transpose(1, 2)
        )
        xi = _smooth(r(batch, n, dn), max(1, round(p["smooth_q"])))
        qx[:, h, :, o_n:] = band[h] * loc + noise[h] * xi
    if dv > d:
        proj = r(dv, d) / d**0.5
        kx, qx = kx @ proj, qx @ proj
    q = qx.mul_(d**0.5 * temperature)
    v = r(batch, heads_kv, n, d)
    return (
        q.to(device=device, dtype=dtype).contiguous(),
        kx.to(device=device, dtype=dtype).contiguous(),
        v.to(device=device, dtype=dtype).contiguous(),
    )


def structured_qkv(
    batch: int = 1,
    heads_q: int = 4,
    heads_kv: int = 2,
    n: int = 1024,
    head_dim: int = 64,
    *,
    kind: str = "mixed",
    num_anchors: int = 8,
    topic_len: int = 512,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    temperature: float = 1.0,
    profile: str = "legacy",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``q [B, Hq, n, D]``, ``k, v [B, Hkv, n, D]`` with planted structure (see module doc).

    ``profile="legacy"`` (the default) is the original generator, unchanged; ``"real"`` (and
    ``"real_early"`` / ``"real_mid"`` / ``"real_late"``) the one calibrated against captured heads
    (module doc). The calibrated profiles take ``kind="mixed"`` only (their heads draw their own
    mix); ``num_anchors`` and ``topic_len`` place their anchor columns and topics, and
    ``temperature`` scales their logits (1: as calibrated). Any batch, head counts (``heads_q`` a
    multiple of ``heads_kv``), length, head dim (below 32 the slots are randomly projected down),
    dtype and device; computed in float32 on the CPU, then converted.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    if kind not in ("mixed", "vertical_slash", "block", "local"):
        raise ValueError(f"unknown kind {kind!r}")
    if profile != "legacy":
        if kind != "mixed":
            raise ValueError(f"profile {profile!r} takes kind='mixed' only, got {kind!r}")
        return _real_qkv(
            batch, heads_q, heads_kv, n, head_dim,
            groups=_profile_groups(profile, heads_q, seed),
            params=REAL_PARAMS,
            num_anchors=num_anchors,
            topic_len=topic_len,
            dtype=dtype,
            device=device,
            seed=seed,
            temperature=temperature,
        )  # fmt: skip
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    d = head_dim
    scale_noise = 0.3
    pos = torch.arange(n)
    w_slash, w_vert, w_block = {
        "mixed": (1.0, 1.0, 1.0),
        "vertical_slash": (1.2, 1.2, 0.0),
        "block": (0.3, 0.4, 1.6),
        "local": (1.4, 0.0, 0.0),
    }[kind]
    # per KV head content; queries of the group share it (GQA heads look alike, as in real models)
    content = r(batch, heads_kv, 1, d) * 0.9
    anchor_dir = r(batch, heads_kv, 1, d)
    anchor_dir = anchor_dir / anchor_dir.norm(dim=-1, keepdim=True) * d**0.5
    anchors = torch.cat(
        [torch.zeros(1, dtype=torch.long), torch.randperm(n, generator=g)[:num_anchors]]
    )
    n_topics = max(1, -(-n // topic_len))
    topics = r(batch, heads_kv, n_topics, d)
    topics = topics / topics.norm(dim=-1, keepdim=True) * d**0.5
    topic_of = (pos // topic_len).clamp(max=n_topics - 1)
    # queries of a late topic recall one earlier topic
    recall = (topic_of - 1 - (topic_of * 7) % 3).clamp(min=0)

    k = content + scale_noise * r(batch, heads_kv, n, d)
    k = w_slash * _rope(k, pos)
    k = k + w_block * 0.35 * topics[:, :, topic_of]
    k[:, :, anchors] = k[:, :, anchors] + w_vert * 0.6 * anchor_dir

    grp = heads_q // heads_kv
    qc = content.repeat_interleave(grp, 1) + scale_noise * r(batch, heads_q, n, d)
    q = w_slash * _rope(qc, pos)
    tq = topics.repeat_interleave(grp, 1)
    q = q + w_block * 0.35 * (tq[:, :, topic_of] + 0.8 * tq[:, :, recall])
    q = q + w_vert * 0.6 * anchor_dir.repeat_interleave(grp, 1)
    v = r(batch, heads_kv, n, d)
    # temperature: scores ~ O(d) before the 1/sqrt(d) scale; keep softmax peaked but finite
    q = q * temperature
    return (
        q.to(device=device, dtype=dtype).contiguous(),
        k.to(device=device, dtype=dtype).contiguous(),
        v.to(device=device, dtype=dtype).contiguous(),
    )
