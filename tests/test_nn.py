import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from cellplm_scvi.nn import (
    CellEncoder,
    FlowAttention,
    GaussianMixtureLatent,
    GeneBagEmbedder,
    LatentOutput,
    NormalLatent,
    Sinusoidal2dEncoding,
    SoftmaxAttention,
    cpu,
)


@pytest.fixture(autouse=True, params=[False, True], ids=["reference", "cpu-strategies"])
def strategies(request):
    """Every test here runs on the reference modules and again with the CPU strategies."""
    with cpu.cpu_strategies(request.param):
        yield request.param


def naive_flow(attn: FlowAttention, x: torch.Tensor) -> torch.Tensor:
    """Flow attention for ONE tissue, written directly from the formulas with dense matrices."""
    n, eps = x.shape[0], attn.eps
    # qkv.weight rows: queries, then keys, then values
    q, k, v = (
        part.view(n, attn.n_heads, -1) for part in F.linear(x, attn.qkv.weight, attn.qkv.bias).chunk(3, 1)
    )
    q, k = torch.sigmoid(q).transpose(0, 1), torch.sigmoid(k).transpose(0, 1)  # (H, n, d)
    v = v.transpose(0, 1)
    incoming = 1.0 / torch.einsum("hnd,hd->hn", q + eps, k.sum(1) + eps)
    outgoing = 1.0 / torch.einsum("hnd,hd->hn", k + eps, q.sum(1) + eps)
    conserved_sink = torch.einsum("hnd,hd->hn", q + eps, (k * outgoing[..., None]).sum(1) + eps)
    conserved_source = torch.einsum("hnd,hd->hn", k + eps, (q * incoming[..., None]).sum(1) + eps).clamp(
        -1, 1
    )
    allocation = torch.sigmoid(conserved_sink)
    competition = torch.softmax(conserved_source, dim=-1) * n
    scores = (q * incoming[..., None]) @ k.transpose(1, 2)  # (H, n, n), the explicit attention matrix
    out = (scores @ (v * competition[..., None])) * allocation[..., None]
    return attn.out(out.transpose(0, 1).reshape(n, -1))


GRAD_MODES = pytest.mark.parametrize(
    "grad_mode", [torch.enable_grad, torch.inference_mode], ids=["autograd", "inference"]
)


def assert_same_values_and_gradients(out: torch.Tensor, expected: torch.Tensor, x: torch.Tensor) -> None:
    """``out`` equals ``expected``, and so do their gradients with respect to ``x`` where autograd ran."""
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if out.requires_grad:
        weights = torch.randn_like(out)
        (grad,) = torch.autograd.grad((out * weights).sum(), x)
        (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-4)


@pytest.fixture
def packed():
    torch.manual_seed(0)
    sizes = [5, 9, 1, 7]
    return torch.randn(sum(sizes), 16), torch.tensor(np.concatenate([[0], np.cumsum(sizes)]))


@GRAD_MODES
def test_flow_attention_matches_naive_formula_per_tissue(packed, grad_mode):
    x, ptr = packed
    attn = FlowAttention(16, 4, eps=0.05)  # an eps large enough for a misplaced one to show
    x = x.clone().requires_grad_(grad_mode is torch.enable_grad)
    with grad_mode():
        out = attn(x, ptr)
    assert out.requires_grad == (grad_mode is torch.enable_grad)
    expected = torch.cat(
        [
            naive_flow(attn, x[start:stop])
            for start, stop in zip(ptr[:-1].tolist(), ptr[1:].tolist(), strict=True)
        ]
    )
    assert_same_values_and_gradients(out, expected, x)


@pytest.mark.parametrize("cls", [FlowAttention, SoftmaxAttention])
def test_packed_tissues_do_not_attend_to_each_other(cls, packed):
    x, ptr = packed
    attn = cls(16, 4)
    out = attn(x, ptr)
    for start, stop in zip(ptr[:-1].tolist(), ptr[1:].tolist(), strict=True):
        alone = attn(x[start:stop], torch.tensor([0, stop - start]))
        torch.testing.assert_close(out[start:stop], alone, atol=1e-6, rtol=1e-5)
    x2 = x.clone()
    x2[5:14] += 3.0  # change tissue 1 only
    out2 = attn(x2, ptr)
    torch.testing.assert_close(out2[:5], out[:5])
    torch.testing.assert_close(out2[14:], out[14:])
    assert not torch.allclose(out2[5:14], out[5:14])


@GRAD_MODES
def test_softmax_attention_equals_block_diagonal_mask(packed, grad_mode):
    x, ptr = packed
    x = x.clone().requires_grad_(grad_mode is torch.enable_grad)
    attn = SoftmaxAttention(16, 4)
    seg = torch.repeat_interleave(torch.arange(4), ptr.diff())
    mask = seg[:, None] == seg[None, :]
    with grad_mode():
        out = attn(x, ptr)
        q, k, v = (t.transpose(0, 1)[None] for t in attn.heads(x))
        expected = (
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[0].transpose(0, 1).reshape(len(x), -1)
        )
        expected = attn.out(expected)
    assert_same_values_and_gradients(out, expected, x)


def test_encoder_is_permutation_equivariant_within_tissue(packed):
    x, ptr = packed
    enc = CellEncoder(16, 2, 4, 0.0, "flow").eval()
    perm = torch.cat([torch.randperm(5), 5 + torch.randperm(9), torch.tensor([14]), 15 + torch.randperm(7)])
    torch.testing.assert_close(enc(x, ptr)[perm], enc(x[perm], ptr), atol=1e-5, rtol=1e-5)


def transformer_layer_formula(layer, x: torch.Tensor, ptr: torch.Tensor) -> torch.Tensor:
    """``x + drop(Attn(LN(x)))`` then ``+ FF(LN(.))``, from the layer's own submodules."""
    h = x + layer.attention_dropout(layer.attention(layer.norm1(x), ptr))
    return h + layer.feed_forward(layer.norm2(h))


@pytest.mark.parametrize(
    "grad_mode",
    [torch.enable_grad, torch.no_grad, torch.inference_mode],
    ids=["autograd", "no_grad", "inference"],
)
def test_transformer_layer_matches_its_formula_and_leaves_its_input_alone(packed, grad_mode):
    x, ptr = packed
    layer = CellEncoder(16, 1, 4, 0.1, "flow").layers[0].eval()
    x_before = x.clone()
    with grad_mode():
        out = layer(x, ptr)
    torch.testing.assert_close(out, transformer_layer_formula(layer, x, ptr), atol=1e-6, rtol=1e-5)
    assert torch.equal(x, x_before)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x, ptr).dtype == torch.float32  # the residual stream keeps its dtype


def test_transformer_layer_in_training_matches_its_formula_with_dropout_and_gradients(packed):
    x, ptr = packed
    x = x.clone().requires_grad_(True)
    layer = CellEncoder(16, 1, 4, 0.3, "flow").layers[0].train()
    torch.manual_seed(1)
    out = layer(x, ptr)
    torch.manual_seed(1)
    expected = transformer_layer_formula(layer, x, ptr)  # same masks, drawn in the same order
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    # rate 0 in training, with autograd
    no_dropout = CellEncoder(16, 1, 4, 0.0, "flow").layers[0].train()
    weights = torch.randn(len(x), 16)
    grads = [
        torch.autograd.grad((f(x) * weights).sum(), [x, *no_dropout.parameters()])
        for f in (lambda v: no_dropout(v, ptr), lambda v: transformer_layer_formula(no_dropout, v, ptr))
    ]
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_attention_loads_state_dicts_with_separate_query_key_value_maps(packed):
    x, ptr = packed
    encoder = CellEncoder(16, 2, 4, 0.0, "flow").eval()
    legacy = encoder.state_dict()
    for i in range(2):
        prefix = f"layers.{i}.attention."
        for p in ("weight", "bias"):
            blocks = legacy.pop(f"{prefix}qkv.{p}").chunk(3)
            for name, block in zip(("query", "key", "value"), blocks, strict=True):
                legacy[f"{prefix}{name}.{p}"] = block.clone()
    fresh = CellEncoder(16, 2, 4, 0.0, "flow").eval()
    fresh.load_state_dict(legacy)  # strict: every key accounted for
    torch.testing.assert_close(fresh(x, ptr), encoder(x, ptr))


@GRAD_MODES
def test_gene_bag_embedder_equals_dense_log1p_matmul(grad_mode):
    rng = np.random.default_rng(0)
    counts = sp.random(
        20, 30, density=0.2, random_state=0, format="csr", data_rvs=lambda n: rng.integers(1, 50, n)
    )
    counts[3] = 0  # an empty cell
    counts = sp.csr_matrix(counts)
    emb = GeneBagEmbedder(30, 8)
    with grad_mode():
        out = emb(
            torch.tensor(counts.indptr).long(),
            torch.tensor(counts.indices).long(),
            torch.tensor(counts.data).float(),
        )
    expected = torch.log1p(torch.tensor(counts.toarray()).float()) @ emb.genes.weight
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.all(out[3] == 0)


def test_gene_bag_embedder_maps_a_gene_subset_to_table_rows():
    emb = GeneBagEmbedder(10, 4, gene_rows=torch.tensor([7, 2]))
    out = emb(torch.tensor([0, 2, 2]), torch.tensor([0, 1]), torch.tensor([math.e - 1, 0.0]))
    torch.testing.assert_close(out[0], emb.genes.weight[7])
    torch.testing.assert_close(out[1], torch.zeros(4))


def test_gene_bag_embedder_of_cells_without_counts_is_zero():
    emb = GeneBagEmbedder(10, 4)
    out = emb(torch.tensor([0, 0, 0]), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert torch.equal(out, torch.zeros(2, 4))


def test_positional_encoding_channels_and_placeholder():
    pe = Sinusoidal2dEncoding(8, grid=100)
    coords = torch.tensor([[0.5, 0.25], [0.1, 0.9]])
    out = pe(coords, torch.tensor([True, False]), torch.tensor([[2.0], [3.0]]))
    bx = math.trunc((1.02 * 0.5 - 0.01) * 100)  # 50
    by = math.trunc((1.02 * 0.25 - 0.01) * 100)  # 24
    freqs = [1.0, 10000 ** (-2 / 4)]
    expected = []
    for b in (by, bx):  # first half: y, second half: x
        for w in freqs:
            expected += [math.sin(b * w), math.cos(b * w)]
    torch.testing.assert_close(
        out[0], torch.tensor(expected) * 0.1 * 2.0, atol=1e-6, rtol=1e-6
    )  # gain * size
    torch.testing.assert_close(out[1], pe.missing.detach())
    with pytest.raises(ValueError, match="divisible by 4"):
        Sinusoidal2dEncoding(6)


def test_gaussian_mixture_kl_is_analytic_expectation():
    torch.manual_seed(0)
    layer = GaussianMixtureLatent(6, 3, 4)
    with torch.no_grad():
        layer.component_log_scales.normal_(0, 0.3)
        layer.component_logits.normal_()
    mu, sigma = torch.randn(5, 3), torch.rand(5, 3) + 0.2
    out = LatentOutput(Normal(mu, sigma), mu, layer.classifier(mu))
    kl = layer.kl(out)
    q_y = torch.softmax(layer.classifier(mu), -1)
    per_component = torch.stack(
        [
            kl_divergence(
                Normal(mu, sigma), Normal(layer.component_means[k], layer.component_log_scales[k].exp())
            ).sum(-1)
            for k in range(4)
        ],
        dim=-1,
    )
    torch.testing.assert_close(kl["kl_z"], (q_y * per_component).sum(-1), atol=1e-5, rtol=1e-5)
    p_y = torch.softmax(layer.component_logits, -1)
    torch.testing.assert_close(kl["kl_y"], (q_y * (q_y.log() - p_y.log())).sum(-1), atol=1e-6, rtol=1e-5)


def test_latents_are_deterministic_in_eval_and_sampled_in_training():
    layer = NormalLatent(6, 3)
    h = torch.randn(4, 6)
    layer.eval()
    torch.testing.assert_close(layer(h).z, layer(h).z)
    torch.testing.assert_close(layer(h).z, layer(h).qz.loc)
    layer.train()
    assert not torch.allclose(layer(h).z, layer(h).z)
    kl = layer.kl(LatentOutput(Normal(torch.zeros(2, 3), torch.ones(2, 3)), torch.zeros(2, 3)))["kl_z"]
    torch.testing.assert_close(kl, torch.zeros(2))
