"""Laplace posterior: hook-based per-item gradients against brute-force autograd on tiny models."""

from __future__ import annotations

import pytest
import torch

from bayesq_onnx.bayes.laplace import evidence_prior_precision
from helpers import fit_parameters


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(11, 6)
        self.conv = torch.nn.Conv1d(6, 5, kernel_size=3, padding=1)
        self.lin = torch.nn.Linear(5, 4)

    def forward(self, ids):
        h = torch.tanh(self.conv(self.emb(ids).transpose(1, 2))).transpose(1, 2)  # [B, T, 5]
        return self.lin(h).mean(dim=1)                                            # [B, 4]


PARAMS = ["emb.weight", "conv.weight", "lin.weight"]


def _data(seed=0, batches=3, b=4, t=5):
    g = torch.Generator().manual_seed(seed)
    # distinct tokens within an item, so the per-token embedding Fisher is exact
    ids = [torch.stack([torch.randperm(11, generator=g)[:t] for _ in range(b)]) for _ in range(batches)]
    targets = [torch.randn(b, 4, generator=g) for _ in range(batches)]
    return [{"ids": x} for x in ids], targets


def _brute_force(model, batches, targets):
    """Per-item gradients of ½‖f(x) − y‖², stacked: {param: [items, *shape]}."""
    grads = {p: [] for p in PARAMS}
    for batch, tgt in zip(batches, targets):
        for i in range(batch["ids"].shape[0]):
            model.zero_grad()
            out = model(batch["ids"][i:i + 1])
            (0.5 * ((out - tgt[i:i + 1]) ** 2).sum()).backward()
            for p in PARAMS:
                grads[p].append(model.get_parameter(p).grad.detach().clone())
    return {p: torch.stack(v) for p, v in grads.items()}


@pytest.fixture(scope="module")
def setup():
    model = Tiny()
    batches, targets = _data()
    return model, batches, targets, _brute_force(model, batches, targets)


def test_diagonal_fisher_matches_per_item_autograd(setup):
    model, batches, targets, g = setup
    post = fit_parameters(model, batches, PARAMS, input_names=["ids"], fisher="empirical", targets=targets,
                       output_noise=1.0, prior_precision=1.0)
    for p in ["conv.weight", "lin.weight"]:
        torch.testing.assert_close(post[p].fisher_diag, (g[p] ** 2).mean(0), rtol=1e-4, atol=1e-7)
    # embeddings come from per-token squares, exact when no token repeats within an item (as here)
    torch.testing.assert_close(post["emb.weight"].fisher_diag, (g["emb.weight"] ** 2).mean(0), rtol=1e-4, atol=1e-7)
    assert post["lin.weight"].n_data == 12 and post["lin.weight"].prior_precision == 1.0
    torch.testing.assert_close(post["lin.weight"].precision_diag(), 12 * post["lin.weight"].fisher_diag + 1.0)


def test_kfac_factors(setup):
    model, batches, targets, _ = setup
    post = fit_parameters(model, batches, PARAMS, input_names=["ids"], fisher="empirical", targets=targets,
                       curvature="kfac", output_noise=1.0)
    # A of the Linear is the second moment of its inputs over all tokens
    with torch.no_grad():
        h = torch.cat([torch.tanh(model.conv(model.emb(b["ids"]).transpose(1, 2))).transpose(1, 2).reshape(-1, 5)
                       for b in batches])
    torch.testing.assert_close(post["lin.weight"].A, h.T @ h / h.shape[0], rtol=1e-5, atol=1e-7)
    assert post["conv.weight"].A.shape == (18, 18) and post["conv.weight"].G.shape == (5, 5)
    assert post["emb.weight"].A is None  # embeddings: diagonal only
    lin = post["lin.weight"]  # K-FAC's own diagonal stands in for the per-item one (no per-item gradients)
    torch.testing.assert_close(lin.fisher_diag, torch.diag(lin.G)[:, None] * torch.diag(lin.A)[None, :])
    for p in ("conv.weight", "lin.weight"):
        eig = torch.linalg.eigvalsh(post[p].A)
        assert eig.min() > -1e-6  # a second moment is positive semi-definite


def test_lowrank_finds_the_top_directions(setup):
    """With fewer items (8) than sketch columns (rank 3 + 8 oversampling) the range finder is exact."""
    model, batches, targets, g = setup
    post = fit_parameters(model, batches[:2], ["lin.weight"], input_names=["ids"], fisher="empirical",
                       targets=targets[:2], curvature="lowrank", rank=3, output_noise=1.0)["lin.weight"]
    flat = g["lin.weight"][:8].reshape(8, -1)
    ggn = flat.T @ flat / 8
    evals, evecs = torch.linalg.eigh(ggn)
    top = evecs[:, -3:]
    # U Uᵀ has the top-3 eigenvalues of the empirical GGN, and its directions capture that energy
    torch.testing.assert_close(torch.linalg.eigvalsh(post.U @ post.U.T)[-3:], evals[-3:], rtol=1e-2, atol=1e-6)
    basis = torch.linalg.qr(post.U).Q
    captured = torch.trace(basis.T @ ggn @ basis)
    assert float(captured) >= 0.99 * float(evals[-3:].sum())
    assert float(torch.linalg.matrix_norm(top.T @ basis)) ** 2 >= 3 * 0.95  # subspaces nearly coincide


def test_true_fisher_needs_no_labels_and_is_reproducible():
    model = Tiny()
    batches, _ = _data(1)
    a = fit_parameters(model, batches, ["lin.weight"], input_names=["ids"], seed=3)["lin.weight"]
    b = fit_parameters(model, batches, ["lin.weight"], input_names=["ids"], seed=3)["lin.weight"]
    c = fit_parameters(model, batches, ["lin.weight"], input_names=["ids"], seed=4)["lin.weight"]
    torch.testing.assert_close(a.fisher_diag, b.fisher_diag)
    assert not torch.equal(a.fisher_diag, c.fisher_diag)
    assert a.info["output_noise_var"] > 0 and a.prior_precision > 0


def test_more_target_samples_approach_the_ggn():
    """E_ε[(Jᵀε)²] = diag(JᵀJ): many samples of the true Fisher converge to the exact GGN diagonal."""
    model = Tiny()
    batches, _ = _data(2, batches=1, b=2)
    post = fit_parameters(model, batches, ["lin.weight"], input_names=["ids"], samples=1000, output_noise=1.0,
                       prior_precision=1.0)["lin.weight"]
    exact = torch.zeros(4, 5)
    for i in range(2):
        with torch.no_grad():
            h = torch.tanh(model.conv(model.emb(batches[0]["ids"][i:i + 1]).transpose(1, 2))).transpose(1, 2)
        a = h.mean(dim=1)[0]                     # output = W·mean_t(h) + b, so J_W = I ⊗ aᵀ
        exact += (a ** 2)[None, :].expand(4, 5)
    torch.testing.assert_close(post.fisher_diag, exact / 2, rtol=0.2, atol=1e-4)  # ~6 sigma at 1000 samples


def test_evidence_prior_fixed_point():
    w = torch.randn(1000) * 0.1
    lam = torch.rand(1000) * 50
    tau = evidence_prior_precision(w, lam)
    gamma = float((lam / (lam + tau)).sum())
    assert tau == pytest.approx(gamma / float((w.double() ** 2).sum()), rel=1e-5)
    # no data: nothing is determined, the prior goes flat
    assert evidence_prior_precision(w, torch.zeros(1000)) < 1e-6
