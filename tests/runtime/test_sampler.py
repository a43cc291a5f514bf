"""The batched on-device sampler (`fastllava.runtime.sampler`) against argmax and `sample_ref`.

The noise is a deterministic hash of (seed, step, index), so every statistical check below passes or
fails on every run; ALPHA is the chance that a correct sampler would fail a given check, and every
bound is derived from it and the sample count (normal quantile, DKW bound, chi-square p-value).
"""

from __future__ import annotations

import math

import pytest
import torch

from fastllava.runtime.sampler import SamplingBatch, race_scores, sample, sample_ref
from fastllava.runtime.sampling_noise import bits_to_uniform, uniform_noise

ALPHA = 1e-6


def z_two_sided(alpha: float, num_tests: int = 1) -> float:
    """Normal quantile for a two-sided test at level alpha, Bonferroni-corrected over num_tests."""
    return torch.special.ndtri(torch.tensor(1 - alpha / (2 * num_tests), dtype=torch.float64)).item()


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson chi-square of integer counts against probabilities (both (K,), all probs > 0)."""
    n = counts.sum().double()
    expected = n * probs.double()
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    df = torch.tensor((probs.numel() - 1) / 2, dtype=torch.float64)
    return stat.item(), torch.special.gammaincc(df, stat / 2).item()


def assert_same_ids(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    bad = (got != want).nonzero().flatten()
    if bad.numel():
        i = bad[0].item()
        raise AssertionError(f"{what}: {bad.numel()}/{got.numel()} rows differ; first row {i}: "
                             f"got {got[i].item()}, want {want[i].item()}")


def fixed_logits(V: int, B: int, seed: int) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3.0


def sample_rows(logits: torch.Tensor, rows) -> torch.Tensor:
    return sample(logits, SamplingBatch.build(rows, logits.device))


# -- greedy -----------------------------------------------------------------------------------------

def test_greedy_is_argmax_with_lowest_id_on_ties():
    B, V = 9, 37
    logits = fixed_logits(V, B, seed=0)
    ties = [(3, 20), (0, 36), (5, 6), (35, 36), (10, 11)]
    for i, idxs in enumerate(ties):  # an exact tie at the row maximum
        logits[i, list(idxs)] = logits[i].max() + 1.0
    logits[7] = 0.25  # every id tied
    logits[8, 30:] = float("inf")  # ties at +inf
    want_tie = {i: a for i, (a, _) in enumerate(ties)} | {7: 0, 8: 30}
    got = sample_rows(logits, [(0.0, 1.0, 123 + i, i) for i in range(B)])
    assert_same_ids(got, logits.argmax(dim=-1), "greedy vs argmax")
    assert_same_ids(got, sample_ref(logits, 0.0, 1.0, None), "greedy vs sample_ref")
    for i, a in want_tie.items():
        assert got[i].item() == a, f"row {i}: a tie must go to the lowest id {a}, got {got[i].item()}"


def test_mixed_greedy_and_sampled_rows():
    B, V = 16, 64
    logits = fixed_logits(V, B, seed=1)
    logits[0, [4, 9]] = logits[0].max() + 2.0  # a tie in a greedy row
    rows = [(0.0 if i % 2 == 0 else 1.5, 1.0 if i % 4 < 2 else 0.9, 1000 + i, 3 * i)
            for i in range(B)]
    batch = SamplingBatch.build(rows, "cpu")
    assert not batch.all_greedy and batch.any_top_p
    got = sample(logits, batch)
    greedy = torch.tensor([r[0] == 0 for r in rows])
    assert_same_ids(got[greedy], logits.argmax(-1)[greedy], "greedy rows of a mixed batch")
    assert_same_ids(got[~greedy], race_scores(logits, batch).argmax(-1)[~greedy], "sampled rows")
    # High temperature over 8 sampled rows: the draws are not simply the argmax.
    assert (got[~greedy] != logits.argmax(-1)[~greedy]).any(), "sampled rows all equal the argmax"


# -- the noise --------------------------------------------------------------------------------------

def test_bits_to_uniform_covers_all_24_bit_values_strictly_inside():
    m = torch.arange(2**24, dtype=torch.int64)
    u = bits_to_uniform(m)
    assert u.dtype == torch.float32
    assert u[0].item() > 0 and u[-1].item() == 1 - 2**-24, (u[0].item(), u[-1].item())
    steps = u[1:] - u[:-1]
    assert (steps > 0).all(), f"not strictly increasing at m={(steps <= 0).nonzero()[0].item()}"
    err = (u.double() - (m + 1).double() / (2**24 + 1)).abs().max().item()
    assert err <= 2**-25, f"u differs from (m + 1) / (2**24 + 1) by {err}"


def test_noise_is_uniform():
    B, V = 64, 4096
    seeds = torch.arange(B, dtype=torch.int64) * 7919
    steps = torch.arange(B, dtype=torch.int64) % 5
    u = uniform_noise(seeds, steps, V).double().flatten()
    n = u.numel()
    assert u.min().item() > 0 and u.max().item() < 1, (u.min().item(), u.max().item())
    z = z_two_sided(ALPHA)
    mean_tol = z * math.sqrt(1 / (12 * n))
    assert abs(u.mean().item() - 0.5) <= mean_tol, f"mean {u.mean().item()} vs 0.5 ± {mean_tol}"
    # Kolmogorov-Smirnov with the DKW bound: P(sup|F_n - F| > eps) <= 2 exp(-2 n eps^2).
    s = u.sort().values
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum(grid - s, s - (grid - 1 / n)).max().item()
    eps = math.sqrt(math.log(2 / ALPHA) / (2 * n))
    assert ks <= eps, f"KS distance {ks} > DKW bound {eps} (n={n})"
    counts = torch.bincount((u * 64).long(), minlength=64)
    stat, p = chi2_pvalue(counts, torch.full((64,), 1 / 64))
    assert p > ALPHA, f"64-bucket chi-square {stat:.1f}, p={p:.2e}; counts {counts.tolist()}"


def test_noise_is_a_function_of_seed_step_and_index():
    V, s, t = 4096, 0x1234_5678_9ABC, 17
    seeds = torch.tensor([s, s, s ^ 1, s ^ (1 << 40), s ^ (1 << 62), s, s, 0, 2**63 - 1])
    steps = torch.tensor([t, t, t, t, t, t + 1, t + 2**32, t, t])
    u = uniform_noise(seeds, steps, V)
    again = uniform_noise(seeds[[1, 0]].flip(0), steps[[1, 0]], V)  # another call and batch
    assert torch.equal(u[0], u[1]) and torch.equal(u[0], again[0]), "same (seed, step) must repeat"
    for i, what in enumerate(["", "", "seed bit 0", "seed bit 40", "seed bit 62", "step + 1",
                              "step + 2**32", "seed 0", "seed 2**63 - 1"]):
        if what:
            equal = (u[i] == u[0]).sum().item()
            # Independent 24-bit values agree with probability 2**-24 each: ~0.0002 expected.
            assert equal <= 2, f"{what}: {equal}/{V} noise values equal those of the base row"
    unique = torch.unique(u[0]).numel()
    assert unique >= V - 4, f"only {unique} distinct values over {V} indices (~0.5 collisions expected)"


def test_noise_of_consecutive_steps_is_uncorrelated():
    B, V = 64, 1024
    seeds = torch.arange(B, dtype=torch.int64) + 99
    a = uniform_noise(seeds, torch.full((B,), 5), V).double().flatten() - 0.5
    b = uniform_noise(seeds, torch.full((B,), 6), V).double().flatten() - 0.5
    r = ((a * b).mean() / (a.std() * b.std())).item()
    bound = z_two_sided(ALPHA) / math.sqrt(a.numel())
    assert abs(r) <= bound, f"correlation of steps 5 and 6: {r} (bound {bound})"


# -- batch invariance and reproducibility -----------------------------------------------------------

ROWS = [  # (temperature, top_p, seed, step): greedy, plain, top-p, tiny top-p, extreme seeds
    (0.0, 1.0, 11, 0), (0.7, 1.0, 12, 3), (1.3, 0.9, 13, 0), (0.5, 0.3, 14, 8), (1.0, 1.0, 2**63 - 1, 1),
    (0.9, 0.05, 16, 2), (0.0, 0.5, 17, 4), (2.0, 1.0, 0, 0), (1.0, 0.95, 19, 2**40), (0.8, 1.0, 12, 4),
    (1.1, 0.7, 21, 5), (3.0, 1.0, 22, 9),
]


def test_batch_invariance_and_reproducibility():
    V = 997
    logits = fixed_logits(V, len(ROWS), seed=2)
    logits[4, ::3] = float("-inf")  # masked ids must never win
    alone = torch.cat([sample_rows(logits[i:i + 1], [r]) for i, r in enumerate(ROWS)])
    assert logits[4, alone[4]] > float("-inf")
    for perm_seed in range(3):
        perm = torch.randperm(len(ROWS), generator=torch.Generator().manual_seed(perm_seed))
        got = sample_rows(logits[perm], [ROWS[i] for i in perm.tolist()])
        assert_same_ids(got, alone[perm], f"shuffled batch (perm {perm.tolist()}) vs rows alone")
    # Inside a batch padded with other rows (other logits and flags): same ids again.
    other = fixed_logits(V, 5, seed=3)
    mixed = sample_rows(torch.cat([other, logits]), [(1.0, 0.5, 7, 7)] * 5 + ROWS)[5:]
    assert_same_ids(mixed, alone, "rows after 5 other rows vs rows alone")
    assert_same_ids(sample_rows(logits, ROWS), sample_rows(logits, ROWS), "a re-run of the step")


@pytest.mark.parametrize("block_rows", [1, 3, 5, 13])
def test_cpu_row_blocks_give_the_same_ids(monkeypatch, block_rows):
    """On a CPU the sampler runs over blocks of rows (CPU_BLOCK_BYTES): any blocking gives the
    ids of the whole batch in one pass, greedy, top-p and masked rows mixed."""
    from fastllava.runtime import sampler

    V, rows = 997, ROWS + [(0.9, 0.8, 100 + i, i) for i in range(6)]
    logits = fixed_logits(V, len(rows), seed=5)
    logits[4, ::3] = float("-inf")
    whole = sample_rows(logits, rows)   # 8 MiB / (17 x 997) rows per block: one block
    calls = []
    monkeypatch.setattr(sampler, "race_scores",
                        lambda x, b: calls.append(x.shape[0]) or race_scores(x, b))
    monkeypatch.setattr(sampler, "CPU_BLOCK_BYTES", 17 * V * block_rows)
    assert_same_ids(sample_rows(logits, rows), whole, f"blocks of {block_rows} rows")
    n = len(rows)
    assert calls == [block_rows] * (n // block_rows) + ([n % block_rows] if n % block_rows else [])


@pytest.mark.parametrize("tiny_p", [1e-6, 1e-9])  # 1 - 1e-9 rounds to 1 in fp32: all but the kept max drop
def test_top_p_one_rows_ignore_other_rows_top_p_and_tiny_top_p_is_argmax(tiny_p):
    N, V = 200, 32
    logits = fixed_logits(V, 1, seed=4).expand(N, V).contiguous()
    argmax = logits.argmax(-1)
    assert argmax[0].item() != 0, "pick logits whose argmax is not id 0 (argmax of all -inf is 0)"
    free = [(1.0, 1.0, 500 + i, i) for i in range(N)]
    tiny = [(1.0, tiny_p, 500 + i, i) for i in range(N)]
    alone = sample_rows(logits, free)  # any_top_p False: no sort at all
    both = sample_rows(torch.cat([logits, logits]), free + tiny)
    assert_same_ids(both[:N], alone, f"top_p == 1 rows next to top_p = {tiny_p} rows")
    assert_same_ids(both[N:], argmax, f"top_p = {tiny_p} keeps only the argmax")
    # A dominant token has cumulative mass exactly 1.0 in fp32: only "always keep the most likely"
    # saves it from `cum <= 1 - top_p` when 1 - top_p rounds to 1.
    dominant = torch.zeros(N, V)
    dominant[:, 16] = 30.0
    assert_same_ids(sample_rows(dominant, tiny), torch.full((N,), 16), "the most likely id is kept")
    assert (alone != argmax).sum() > N // 10, "top_p == 1 rows must still sample non-argmax ids"


# -- the distribution -------------------------------------------------------------------------------

LOGITS6 = torch.tensor([[1.2, -0.3, 0.4, 2.0, -1.5, 0.9]])
T = 0.7
N_DRAWS = 30_000


def draws(seeds, steps, top_p: float) -> torch.Tensor:
    n = len(seeds)
    batch = SamplingBatch(
        temperature=torch.full((n,), T), top_p=torch.full((n,), top_p),
        seeds=torch.as_tensor(seeds, dtype=torch.int64), steps=torch.as_tensor(steps, dtype=torch.int64),
        all_greedy=False, any_top_p=top_p < 1)
    return sample(LOGITS6.expand(n, -1).contiguous(), batch)


def ref_draws(top_p: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return sample_ref(LOGITS6.expand(N_DRAWS, -1).contiguous(), T, top_p, gen)


def expected_probs(top_p: float) -> torch.Tensor:
    """float64 softmax(logits / T) with transformers' top-p drop, renormalised over the kept set."""
    p = (LOGITS6[0].double() / T).softmax(-1)
    if top_p < 1:
        sp, idx = p.sort()
        cum = sp.cumsum(0)
        margin = (cum - (1 - top_p)).abs().min().item()
        assert margin > 1e-3, f"test logits put a cumulative mass within {margin} of 1 - top_p"
        drop = cum <= 1 - top_p
        drop[-1] = False
        p[idx[drop]] = 0
        p = p / p.sum()
    return p


@pytest.mark.parametrize("vary", ["seed", "step"])
def test_distribution_matches_softmax(vary):
    k = torch.arange(N_DRAWS)
    ids = draws(k + 77, torch.zeros_like(k), 1.0) if vary == "seed" else draws([4242] * N_DRAWS, k, 1.0)
    counts = torch.bincount(ids, minlength=6)
    p = expected_probs(1.0)
    stat, pv = chi2_pvalue(counts, p)
    assert pv > ALPHA, f"varying {vary}: chi2 {stat:.1f} p={pv:.2e}; counts {counts.tolist()} " \
                       f"expected {(p * N_DRAWS).round().tolist()}"
    # The same check rejects the wrong temperature: it has the power to fail.
    wrong = (LOGITS6[0].double() / 1.0).softmax(-1)
    assert chi2_pvalue(counts, wrong)[1] < ALPHA, "chi-square cannot tell T=0.7 from T=1"
    ref_counts = torch.bincount(ref_draws(1.0), minlength=6)
    assert chi2_pvalue(ref_counts, p)[1] > ALPHA, f"sample_ref counts {ref_counts.tolist()}"


def test_top_p_distribution_matches_reference_kept_set():
    top_p = 0.8
    k = torch.arange(N_DRAWS)
    counts = torch.bincount(draws(k * 3 + 1, k % 7, top_p), minlength=6)
    ref_counts = torch.bincount(ref_draws(top_p), minlength=6)
    p = expected_probs(top_p)
    kept = p > 0
    assert 1 < kept.sum() < 6, f"top_p={top_p} should drop some but not all tokens: {p.tolist()}"
    assert torch.equal(ref_counts > 0, kept), f"sample_ref kept set {ref_counts.tolist()} vs {p.tolist()}"
    assert (counts[~kept] == 0).all(), f"dropped ids sampled: counts {counts.tolist()}, kept {kept.tolist()}"
    for name, c in (("sample", counts), ("sample_ref", ref_counts)):
        stat, pv = chi2_pvalue(c[kept], p[kept])
        assert pv > ALPHA, f"{name}: chi2 {stat:.1f} p={pv:.2e}; counts {c.tolist()} " \
                           f"expected {(p * N_DRAWS).round().tolist()}"


# -- no host sync -----------------------------------------------------------------------------------

def test_sample_never_reads_tensor_values_on_the_host(monkeypatch):
    V = 128
    logits = fixed_logits(V, len(ROWS), seed=5)
    mixed = SamplingBatch.build(ROWS, "cpu")
    greedy = SamplingBatch.build([(0.0, 1.0, i, 0) for i in range(len(ROWS))], "cpu")
    plain = SamplingBatch.build([(1.0, 1.0, i, 0) for i in range(len(ROWS))], "cpu")
    want = [sample(logits, b) for b in (mixed, greedy, plain)]

    def refuse(*args, **kwargs):
        raise AssertionError("host sync: a tensor value was read on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    with pytest.raises(AssertionError, match="host sync"):
        bool(torch.tensor(True))  # the patch is live
    got = [sample(logits, b) for b in (mixed, greedy, plain)]
    monkeypatch.undo()
    for g, w, what in zip(got, want, ("mixed", "greedy", "plain")):
        assert_same_ids(g, w, f"{what} batch under the no-sync patch")


def test_build_rejects_bad_rows():
    for row, field in [((-0.1, 1.0, 0, 0), "temperature"), ((float("nan"), 1.0, 0, 0), "temperature"),
                       ((1.0, 0.0, 0, 0), "top_p"), ((1.0, 1.5, 0, 0), "top_p"),
                       ((1.0, 1.0, -1, 0), "seed"), ((1.0, 1.0, 2**63, 0), "seed"),
                       ((1.0, 1.0, 0, -1), "step")]:
        with pytest.raises(ValueError, match=rf"rows\[1\]: {field}"):
            SamplingBatch.build([(1.0, 1.0, 0, 0), row], "cpu")
    with pytest.raises(ValueError, match="logits must be"):
        sample(torch.zeros(2, 5, dtype=torch.float16), SamplingBatch.build([(1.0, 1.0, 0, 0)] * 2, "cpu"))
    with pytest.raises(ValueError, match="batch.temperature"):
        sample(torch.zeros(3, 5), SamplingBatch.build([(1.0, 1.0, 0, 0)] * 2, "cpu"))


# -- CUDA -------------------------------------------------------------------------------------------

def gpu_rows(n: int):
    """n rows cycling through ROWS' parameters with distinct seeds."""
    return [(t, p, (seed + 1000 * i) % 2**63, step) for i, (t, p, seed, step) in
            ((i, ROWS[i % len(ROWS)]) for i in range(n))]


@pytest.mark.gpu
def test_cuda_matches_cpu_and_is_batch_invariant():
    dev, B, V = torch.device("cuda"), 48, 32000
    rows = gpu_rows(B)
    logits = fixed_logits(V, B, seed=6)
    cpu_batch, gpu_batch = SamplingBatch.build(rows, "cpu"), SamplingBatch.build(rows, dev)
    noise_cpu = uniform_noise(cpu_batch.seeds, cpu_batch.steps, V)
    noise_gpu = uniform_noise(gpu_batch.seeds, gpu_batch.steps, V).cpu()
    bad = (noise_cpu != noise_gpu).sum().item()
    assert bad == 0, f"noise differs between CPU and CUDA in {bad}/{noise_cpu.numel()} values"
    cpu_ids, gpu_ids = sample(logits, cpu_batch), sample(logits.to(dev), gpu_batch).cpu()
    greedy = cpu_batch.temperature == 0
    assert_same_ids(gpu_ids[greedy], cpu_ids[greedy], "greedy rows, CUDA vs CPU")
    # log() may differ by an ulp between devices: compare races that were not that close.
    top2 = race_scores(logits, cpu_batch).topk(2, dim=-1).values
    clear = ~greedy & (top2[:, 0] - top2[:, 1] > 1e-5)
    assert clear.sum() >= B // 2, f"only {clear.sum().item()} clear races"
    assert_same_ids(gpu_ids[clear], cpu_ids[clear], "sampled rows, CUDA vs CPU")
    # Per-row kernels (sort, softmax, cumsum) must not depend on how many rows the batch has.
    g = logits.to(dev)
    alone = torch.cat([sample_rows(g[i:i + 1], [r]) for i, r in enumerate(rows)]).cpu()
    assert_same_ids(gpu_ids, alone, "CUDA batch of 48 vs rows alone")
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(0))
    shuffled = sample_rows(g[perm.to(dev)], [rows[i] for i in perm.tolist()]).cpu()
    assert_same_ids(shuffled, gpu_ids[perm], "CUDA shuffled batch")


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    dev, B, V = torch.device("cuda"), 16, 32000
    rows = gpu_rows(B)
    first = SamplingBatch.build(rows, dev)
    static = SamplingBatch(*(t.clone() for t in (first.temperature, first.top_p, first.seeds,
                                                  first.steps)), all_greedy=False, any_top_p=True)
    static_logits = fixed_logits(V, B, seed=7).to(dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture, as CUDA-graph capture requires
        for _ in range(2):
            sample(static_logits, static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sample(static_logits, static)
    for step in range(3):  # new logits and the next step's parameters, copied into the buffers
        rows = [(t, p, seed, s + 1) for t, p, seed, s in rows]
        new = SamplingBatch.build(rows, dev)
        logits = fixed_logits(V, B, seed=8 + step).to(dev)
        static_logits.copy_(logits)
        for name in ("temperature", "top_p", "seeds", "steps"):
            getattr(static, name).copy_(getattr(new, name))
        graph.replay()
        assert_same_ids(out.cpu(), sample(logits, new).cpu(), f"graph replay {step} vs eager")
