"""Each CPU strategy gives its reference module's result (and gradients) to float rounding."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import TINY_MODEL
from test_module import make_batch

from cellplm_scvi import CellPLMModule
from cellplm_scvi.nn import CellEncoder, FlowAttention, GeneBagEmbedder, cpu

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _ptr(sizes) -> torch.Tensor:
    return torch.tensor(np.concatenate([[0], np.cumsum(sizes)]))


def _reference(f, *args):
    with cpu.cpu_strategies(False):
        return f(*args)


FLOW_PATHS = {  # loop_threshold, SQUARE_BELOW_CELLS_PER_TISSUE, block_rows
    "tissue-by-tissue": (0, 0, 10**9),
    "tissue-by-tissue-in-blocks-of-2": (0, 0, 2),
    "packed-contexts": (10**9, 0, 10**9),
    "packed-squares": (10**9, 10**9, 10**9),
}


@pytest.mark.parametrize("path", FLOW_PATHS)
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference"])
def test_flow_attention_paths_equal_the_reference(path, grad, monkeypatch):
    loop, square, rows = FLOW_PATHS[path]
    monkeypatch.setattr(cpu._attention, "loop_threshold", lambda n_hidden: loop)
    monkeypatch.setattr(cpu._attention, "SQUARE_BELOW_CELLS_PER_TISSUE", square)
    monkeypatch.setattr(cpu._attention, "block_rows", lambda n_hidden: rows)
    torch.manual_seed(0)
    attn = FlowAttention(16, 4, eps=0.05)
    x, ptr = torch.randn(22, 16, requires_grad=grad), _ptr([5, 9, 1, 7])
    with torch.set_grad_enabled(grad):
        out = attn(x, ptr)
        expected = _reference(attn, x, ptr)
    torch.testing.assert_close(out, expected, **TOL)
    if grad:
        weights = torch.randn_like(out)
        got = torch.autograd.grad((out * weights).sum(), [x, *attn.parameters()])
        want = torch.autograd.grad((expected * weights).sum(), [x, *attn.parameters()])
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("sizes", "squares"),
    [([5, 9, 1, 7], True), ([40, 40], False), ([100] + [1] * 20, False), ([12] * 50, True)],
    ids=["small", "large", "one-large-among-small", "many-equal"],
)
def test_flow_attention_contracts_through_scores_only_for_small_similar_tissues(sizes, squares):
    assert cpu._attention.contracts_through_scores(_ptr(sizes)) == squares


@pytest.mark.parametrize("attention", ["flow", "softmax"])
@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference"])
def test_encoder_in_blocks_equals_the_reference_and_leaves_its_input_alone(attention, grad_mode, monkeypatch):
    monkeypatch.setattr(cpu._attention, "block_rows", lambda n_hidden: 64)
    torch.manual_seed(0)
    sizes = [300, 7, 1, 450, 40]  # two tissues span several blocks, small ones share blocks
    x, ptr = torch.randn(sum(sizes), 16), _ptr(sizes)
    encoder = CellEncoder(16, 3, 4, 0.1, attention).eval()
    x_before = x.clone()
    with grad_mode():
        assert cpu.encoder_in_blocks_applies(encoder, x)
        blocked = encoder(x, ptr)
        reference = _reference(encoder, x, ptr)
    torch.testing.assert_close(blocked, reference, **TOL)
    assert torch.equal(x, x_before)


def test_encoder_runs_in_blocks_only_in_evaluation_on_a_cpu_without_autograd_or_autocast(monkeypatch):
    monkeypatch.setattr(cpu._attention, "block_rows", lambda n_hidden: 8)
    encoder = CellEncoder(16, 1, 4, 0.1, "flow")
    x = torch.randn(9, 16)
    with torch.no_grad():
        assert not cpu.encoder_in_blocks_applies(encoder.train(), x)
        assert cpu.encoder_in_blocks_applies(encoder.eval(), x)
        assert not cpu.encoder_in_blocks_applies(encoder, x[:8])  # one block
        assert not cpu.encoder_in_blocks_applies(encoder, x.to("meta"))  # CPUs only
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not cpu.encoder_in_blocks_applies(encoder, x)
        with cpu.cpu_strategies(False):
            assert not cpu.encoder_in_blocks_applies(encoder, x)
    assert not cpu.encoder_in_blocks_applies(encoder, x)  # autograd


def _counts(n_cells, n_genes, density, seed):
    rng = np.random.default_rng(seed)
    matrix = sp.random(n_cells, n_genes, density=density, random_state=seed, format="csr")
    matrix.data = rng.integers(1, 30, matrix.nnz).astype(np.float32)
    matrix[1] = 0  # a cell without counts
    matrix = sp.csr_matrix(matrix)
    return torch.tensor(matrix.indptr).long(), torch.tensor(matrix.indices).long(), torch.tensor(matrix.data)


@pytest.mark.parametrize("subset", [False, True], ids=["all-rows", "gene-subset"])
@pytest.mark.parametrize("density", [0.02, 0.6], ids=["sparse-bag", "dense-product"])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference"])
def test_gene_bag_paths_equal_the_reference(subset, density, grad):
    """A 9,000-row table is read in blocks of 32 columns without gradients: 3 blocks at D = 96."""
    torch.manual_seed(0)
    n_table, n_inputs = 9000, 300
    rows = torch.randperm(n_table)[:n_inputs] if subset else None
    emb = GeneBagEmbedder(n_table, 96, gene_rows=rows)
    batch = _counts(40, n_inputs if subset else n_table, density, seed=2)
    with torch.set_grad_enabled(grad):
        out = emb(*batch)
        expected = _reference(emb, *batch)
    torch.testing.assert_close(out, expected, **TOL)
    if grad:
        weights = torch.randn_like(out)
        (got,) = torch.autograd.grad((out * weights).sum(), emb.genes.weight)
        (want,) = torch.autograd.grad((expected * weights).sum(), emb.genes.weight)
        torch.testing.assert_close(got, want, **TOL)


def test_gene_bag_picks_the_dense_product_by_density_and_mode():
    assert cpu._embedder.dense_threshold(128, training=True) == 0.04
    assert cpu._embedder.dense_threshold(1024, training=False) == pytest.approx(0.3734, abs=1e-4)
    assert cpu._embedder.block_columns(2000) == 128  # 1,000 KB
    assert cpu._embedder.block_columns(20_000) == 32  # the floor


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_module_forward_loss_and_gradients_equal_the_reference(mode):
    tensors = make_batch(sizes=(8, 12, 3))
    torch.manual_seed(0)
    module = CellPLMModule(10, 3, **TINY_MODEL).train()
    module(tensors)  # the first training step places the mixture components (a random draw)
    module.train(mode == "train")
    results = []
    for strategies in (True, False):
        torch.manual_seed(1)  # same masks and dropout
        with cpu.cpu_strategies(strategies):
            inference, _, loss = module(tensors)
        grads = torch.autograd.grad(
            loss.loss, [p for p in module.parameters() if p.requires_grad], allow_unused=True
        )
        results.append((inference["z"], loss.loss, grads))
    (z, loss, grads), (z_ref, loss_ref, grads_ref) = results
    torch.testing.assert_close(z, z_ref, **TOL)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        if g_ref is not None:
            torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)


def test_the_switch_names_the_strategies_and_refuses_others():
    assert cpu.enabled_strategies() == cpu.STRATEGIES
    with cpu.cpu_strategies(["gene_bag"]):
        assert cpu.enabled_strategies() == ("gene_bag",)
        with cpu.cpu_strategies(False):
            assert cpu.enabled_strategies() == ()
        assert cpu.enabled_strategies() == ("gene_bag",)
    assert cpu.enabled_strategies() == cpu.STRATEGIES
    with pytest.raises(ValueError, match=r"Unknown CPU strategies \['fast_gelu'\]"):
        cpu.use_cpu_strategies(["fast_gelu"])
