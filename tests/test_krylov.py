"""The top-k solver: the same k directions as the full decomposition, on random and degenerate spectra."""

import functools

import pytest
import torch

from vlora import LoRAAdapter, LoRALayer, SharedSubspace
from vlora_core import basis as basis_math
from vlora_core import compress, krylov, quality
from vlora_core.gauge import canonical_factors
from vlora_core.methods import get_method


def _data(spectrum, R: int, D: int, seed: int = 0) -> torch.Tensor:
    """X (R, D) = U·diag(spectrum)·Vᵀ with random orthonormal U, V (float64 until the end)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(spectrum, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(R, len(s), generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(D, len(s), generator=gen, dtype=torch.float64))[0]
    return ((U * s) @ V.T).float()


def _sin_angles(V: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Sines of the principal angles between the row spaces of V (k, D) and reference (k, D), float64.

    Sines, not arccos of cosines: a cosine of 1 - 1e-8 is lost in float32 rounding (its angle is 1.4e-4)."""
    V, P = V.double(), torch.linalg.qr(reference.double().T)[0].T  # P orthonormal rows
    return torch.linalg.svdvals(V - (V @ P.T) @ P)


def _reference(X: torch.Tensor, centred: bool):
    Xd = X.double() - (X.double().mean(dim=0) if centred else 0)
    _, S, Vh = torch.linalg.svd(Xd, full_matrices=False)
    return S, Vh


SPECTRA = {
    # name: (singular values, R, D, k)
    "random gaussian rows < cols": (None, 300, 500, 8),
    "random gaussian rows > cols, decaying columns": ("decay", 700, 300, 12),
    "repeated values inside the top k": ([5.0] * 3 + [3.0] * 4 + [2.0] + [1.0] * 40, 200, 400, 8),
    "one cluster of 64 near-equal values (like real adapters)": (
        list(torch.linspace(1.0, 0.45, 64)) + [0.02] * 100,
        400,
        600,
        8,
    ),
    "a 1 % gap at k": ([1.0 - 0.01 * i for i in range(16)] + [0.3] * 50, 250, 300, 8),
    "rank below k": ([4.0, 2.0, 1.0], 250, 300, 8),
    "flat tail of exactly equal values": ([9.0, 7.0, 5.0, 3.0] + [1.0] * 120, 200, 300, 4),
    "zero data": ([0.0], 220, 300, 6),
}


def _matrix(name: str) -> tuple[torch.Tensor, int]:
    spectrum, R, D, k = SPECTRA[name]
    if spectrum is None or spectrum == "decay":
        X = torch.randn(R, D, generator=torch.Generator().manual_seed(1))
        X = X if spectrum is None else X * 0.97 ** torch.arange(D)
    else:
        X = _data(spectrum, R, D)
    assert krylov.cheaper_than_dense(R, D, k)  # every case takes the Krylov path (or its dense fallback)
    return X, k


@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize("name", list(SPECTRA))
def test_a_fixed_k_fit_equals_the_full_decomposition(name, centred):
    """fit_many with max_k (Krylov, dense where it does not converge) against float64 SVD of the same data."""
    X, k = _matrix(name)
    basis, loadings = basis_math.fit_many(X[None, :, None], centre=centred, max_k=k)[0]
    S, Vh = _reference(X, centred)
    kept = basis.k
    assert kept == int((S[:k] > 1e-6 * S[0]).sum()) if S[0] > 0 else kept == 0
    if kept:  # the same subspace as the full SVD's, direction by direction
        assert _sin_angles(basis.components, Vh[:kept]).max() <= 1e-4
        assert (basis.components @ basis.components.T - torch.eye(kept)).abs().max() <= 1e-5
    assert torch.allclose(basis.spectrum[:k].double(), S[:k], rtol=1e-5, atol=1e-6 * max(S[0].item(), 1e-30))
    assert basis.total_energy == pytest.approx((S**2).sum().item(), rel=1e-5, abs=1e-12)
    Xc = X - (X.mean(dim=0) if centred else 0)
    assert torch.allclose(loadings[:, 0], Xc @ basis.components.T, rtol=0, atol=1e-4 * max(S[0].item(), 1e-30))


@pytest.mark.parametrize("name", [n for n in SPECTRA if "random" not in n])
def test_krylov_converges_where_the_spectrum_has_a_gap(name):
    """Structured spectra converge within the subspace budget (random ones may not: then the dense path runs)."""
    X, k = _matrix(name)
    assert bool(krylov.top_svd(X[None], k).converged.all())


def test_a_tie_at_k_keeps_the_optimal_energy():
    """σ_k = σ_k+1: no k-subspace is 'the' one; any it returns must still capture the largest energy."""
    X = _data([3.0, 2.0, 1.0, 1.0, 1.0, 0.1], 150, 200)
    top = krylov.top_svd(X[None], 3)
    captured = (X.double() @ top.Vh[0].double().T).pow(2).sum().item()
    assert captured == pytest.approx(9.0 + 4.0 + 1.0, rel=1e-5)


def test_batches_are_layers_of_their_own_and_the_result_is_deterministic():
    X = torch.stack(
        [_data(torch.rand(40, generator=torch.Generator().manual_seed(i)) + 0.1, 160, 240, i) for i in range(3)]
    )
    one, two = krylov.top_svd(X, 6), krylov.top_svd(X, 6)
    assert torch.equal(one.Vh, two.Vh) and torch.equal(one.loadings, two.loadings)
    for i in range(3):
        alone = krylov.top_svd(X[i : i + 1], 6)
        assert _sin_angles(one.Vh[i], alone.Vh[0]).max() <= 1e-5


def test_layers_that_do_not_converge_go_the_dense_way(monkeypatch):
    X = _data(list(torch.linspace(1.0, 0.5, 60)) + [0.01] * 40, 256, 320)[None].reshape(1, 32, 8, 320)
    dense = basis_math._fit_dense(X.reshape(1, 256, 320), 32, 8, False, 1e-6, 8)[0]
    monkeypatch.setattr(krylov, "TOL", 0.0)  # no residual is ever small enough
    monkeypatch.setattr(krylov, "top_svd", functools.partial(krylov.top_svd, max_dim=48))  # nor is the space full
    assert not bool(krylov.top_svd(X.reshape(1, 256, 320), 8).converged.any())
    fitted, loadings = basis_math.fit_many(X, centre=False, max_k=8)[0]
    assert torch.equal(fitted.components, dense[0].components) and torch.equal(loadings, dense[1])


@pytest.mark.parametrize(
    "rows, dim, k, expected",
    [(512, 1024, 8, True), (2048, 1024, 8, True), (128, 1024, 8, False), (32, 16384, 8, False), (128, 16384, 8, False)],
)
def test_the_cost_model_picks_krylov_for_the_rank_basis_only(rows, dim, k, expected):
    """The rank basis at N = 32 and 128 (r = 16, d = 1024), not at N = 8; the flat basis at N = 32 and 128."""
    assert krylov.cheaper_than_dense(rows, dim, k) is expected


def _adapters(n: int = 26, d: int = 256, r: int = 8, layers: int = 2) -> list[LoRAAdapter]:
    """In-memory adapters big enough for the Krylov path (N·r = 208 rank vectors of length 256), with a
    shared structure (a mixture of 3 templates plus noise) like trained adapters."""
    gen = torch.Generator().manual_seed(7)
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(layers)]
    templates = {n_: (torch.randn(3, r, d, generator=gen), torch.randn(3, d, r, generator=gen)) for n_ in names}
    out = []
    for t in range(n):
        w = torch.randn(3, generator=gen)
        layer = {}
        for name, (tA, tB) in templates.items():
            A = torch.einsum("t,trd->rd", w, tA) + 0.05 * torch.randn(r, d, generator=gen)
            B = torch.einsum("t,tdr->dr", w, tB) + 0.05 * torch.randn(d, r, generator=gen)
            layer[name] = LoRALayer(A=A / d**0.5, B=B / r**0.5, scaling=2.0)
        out.append(LoRAAdapter(f"task{t}", {"r": r, "lora_alpha": 2 * r, "peft_type": "LORA"}, layer))
    return out


def test_rank_basis_at_fixed_k_is_the_full_decomposition_cut_at_k(tmp_path):
    adapters = _adapters()
    assert krylov.cheaper_than_dense(26 * 8, 256, 6)  # this data takes the Krylov path
    direct = SharedSubspace.from_adapters(adapters, num_components=6, method="rank")
    full = SharedSubspace.decompose(adapters, method="rank")
    cut = full.truncated(6)
    cut.measure_against(full)
    for name, sides in direct.bases.items():
        for side, b in sides.items():
            other = cut.bases[name][side]
            assert _sin_angles(b.components, other.components).max() <= 1e-4
            assert torch.allclose(b.spectrum, other.spectrum[:6], rtol=1e-5)
            assert b.total_energy == pytest.approx(other.total_energy, rel=1e-5)
            assert b.variance_explained() == pytest.approx(other.variance_explained(), rel=1e-5)
    assert quality.task_errors(direct) == pytest.approx(quality.task_errors(cut), rel=1e-4)
    direct.save(tmp_path / "store")
    loaded = SharedSubspace.load(tmp_path / "store")
    for name, sides in loaded.bases.items():
        for side, b in sides.items():
            assert b.energy == direct.bases[name][side].energy
            assert b.variance_explained() == direct.bases[name][side].variance_explained()


def test_incremental_add_keeps_the_unformed_energy_unexplained():
    adapters = _adapters(n=27)
    store = SharedSubspace.from_adapters(adapters[:26], num_components=6, method="rank")
    before = {n: {s: b.total_energy for s, b in sides.items()} for n, sides in store.bases.items()}
    store.add(adapters[26], incremental=True)
    for name, sides in store.bases.items():
        for side, b in sides.items():
            assert b.total_energy > before[name][side]  # the new task's energy joins
            assert b.variance_explained() < 1.0  # what the 6 directions never held stays unexplained


@pytest.mark.parametrize("name", list(SPECTRA))
def test_a_hint_changes_the_work_not_the_subspace(name):
    """A hint (the subspace size the previous batch converged at) that is too small, right or too large gives the
    same k directions as no hint, converged as far as without one; top_svd records where it ended."""
    X, k = _matrix(name)
    S, Vh = _reference(X, False)
    kept = int((S[:k] > 1e-6 * S[0]).sum()) if S[0] > 0 else 0
    plain = krylov.top_svd(X[None], k)
    b = krylov.block_size(k)
    for dim in (b, plain.dim, plain.dim + 2 * b):
        hint = krylov.Hint(dim)
        hinted = krylov.top_svd(X[None], k, hint=hint)
        assert hint.dim == hinted.dim >= min(dim, plain.dim)
        assert bool(hinted.converged.all()) == bool(plain.converged.all())
        if kept and bool(hinted.converged.all()):
            assert _sin_angles(hinted.Vh[0, :kept], Vh[:kept]).max() <= 1e-4
            assert torch.allclose(hinted.S[0].double(), S[:k], rtol=1e-5, atol=1e-6 * S[0].item())


def test_one_hint_per_side_and_shape_carries_from_batch_to_batch(monkeypatch):
    """compress.fit hands each side's hint from one batch of layers to the next, and every batch converges."""
    seen = []
    top_svd = krylov.top_svd

    def spy(X, k, centred=False, max_dim=None, hint=None):
        before = hint.dim
        out = top_svd(X, k, centred, max_dim, hint)
        seen.append((id(hint), before, hint.dim, bool(out.converged.all())))
        return out

    monkeypatch.setattr(krylov, "top_svd", spy)
    monkeypatch.setattr(compress, "_BATCH_NUMBERS", 26 * 2 * 8 * 256)  # one layer per batch: 4 batches
    SharedSubspace.from_adapters(_adapters(layers=4), num_components=6, method="rank")
    assert len(seen) == 8 and len({h for h, *_ in seen}) == 2  # A and B: one hint each
    for side in {h for h, *_ in seen}:
        calls = [s for s in seen if s[0] == side]
        assert calls[0][1] == 0 and all(c[1] == p[2] for p, c in zip(calls, calls[1:]))  # handed on
    assert all(ok for *_, ok in seen)


def test_the_rank_basis_gauges_into_contiguous_columns():
    """canonical_factors(columns=True): the same factors, laid out so that each rank vector is a contiguous row."""
    gen = torch.Generator().manual_seed(3)
    A, B = torch.randn(5, 8, 96, generator=gen), torch.randn(5, 64, 8, generator=gen)
    scaling = torch.rand(5, generator=gen) + 0.5
    plain, columns = canonical_factors(A, B, scaling), canonical_factors(A, B, scaling, columns=True)
    for F, G in zip(plain, columns):
        assert G.shape == F.shape and G.mT.is_contiguous()
        assert torch.allclose(F, G, rtol=1e-5, atol=1e-6 * F.abs().max().item())
    assert get_method("rank").columns and not get_method("flat").columns
