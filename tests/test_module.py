import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import TINY_MODEL
from scvi.distributions import NegativeBinomial

from cellplm_scvi import CellPLMModule
from cellplm_scvi._constants import BATCH_KEYS as K
from cellplm_scvi.module import stored_entries
from cellplm_scvi.nn import cpu, nb_reconstruction

SMALL = TINY_MODEL


def dense_counts(tensors, n_genes):
    """``(N, G)`` counts of a minibatch, from its CSR parts."""
    indptr = tensors[K.X_INDPTR].numpy()
    parts = (tensors[K.X_DATA].numpy(), tensors[K.X_INDICES].numpy(), indptr)
    return torch.tensor(sp.csr_matrix(parts, shape=(len(indptr) - 1, n_genes)).toarray())


def make_batch(sizes=(8, 12), n_genes=10, seed=0, measured=None):
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    counts = sp.csr_matrix(rng.poisson(2.0, size=(n, n_genes)).astype(np.float32))
    batch = np.repeat(np.arange(len(sizes)), sizes)
    if measured is None:
        measured = np.ones((len(sizes), n_genes), dtype=bool)
    counts = sp.csr_matrix(counts.toarray() * measured[batch])
    return {
        K.OBS_INDEX: torch.arange(n),
        K.X_INDPTR: torch.tensor(counts.indptr).long(),
        K.X_INDICES: torch.tensor(counts.indices).long(),
        K.X_DATA: torch.tensor(counts.data).float(),
        K.BATCH: torch.tensor(batch).long(),
        K.SEGMENT_PTR: torch.tensor(np.concatenate([[0], np.cumsum(sizes)])).long(),
        K.COORDS: torch.rand(n, 2),
        K.HAS_COORDS: torch.ones(n, dtype=torch.bool),
        K.MEASURED: torch.tensor(measured),
        K.MEASURED_ROW: torch.tensor(batch).long(),
    }


def test_masks_touch_measured_genes_only_and_count_cells_per_tissue():
    measured = np.ones((2, 10), dtype=bool)
    measured[0, :4] = False
    measured[1, 7:] = False
    tensors = make_batch(measured=measured)
    module = CellPLMModule(10, 2, mask_gene_rate=0.9, **SMALL).train()
    for _ in range(20):
        cells, entries = module._mask(tensors)
        assert cells[:8].sum() == 6 and cells[8:].sum() == 9  # int(0.75 * n) per tissue
        per_cell_measured = tensors[K.MEASURED][tensors[K.MEASURED_ROW]]
        assert not (entries & ~per_cell_measured).any()
        assert not entries[~cells].any()
    assert entries.sum() > 0


def test_inference_without_measured_genes_only_where_nothing_is_masked():
    tensors = make_batch()
    module = CellPLMModule(10, 2, **SMALL)
    without = {
        k: v for k, v in module._get_inference_input(tensors).items() if k not in (K.MEASURED, K.MEASURED_ROW)
    }
    with torch.no_grad():
        torch.testing.assert_close(
            module.eval().inference(**without)["z"],
            module.inference(**module._get_inference_input(tensors))["z"],
        )
        with pytest.raises(ValueError, match="measured-gene table"):
            module.train().inference(**without)


def test_masked_entries_are_zero_in_the_input():
    tensors = make_batch()
    module = CellPLMModule(10, 2, **SMALL).train()
    seen = {}
    original = module.embedder.forward

    def spy(indptr, indices, values):
        seen["values"] = values
        return original(indptr, indices, values)

    module.embedder.forward = spy
    torch.manual_seed(3)
    out = module.inference(**module._get_inference_input(tensors))
    rows = torch.repeat_interleave(torch.arange(20), tensors[K.X_INDPTR].diff())
    masked = out["masked_entries"][rows, tensors[K.X_INDICES]]
    assert masked.any()
    assert torch.all(seen["values"][masked] == 0)
    torch.testing.assert_close(seen["values"][~masked], tensors[K.X_DATA][~masked])


def test_no_masking_and_deterministic_output_in_eval():
    tensors = make_batch()
    module = CellPLMModule(10, 2, **SMALL).eval()
    a = module.inference(**module._get_inference_input(tensors))
    b = module.inference(**module._get_inference_input(tensors))
    assert a["masked_cells"] is None
    torch.testing.assert_close(a["z"], b["z"])


def _dense_nb_loss(logits, library, theta, measured, weights, x):
    """The reconstruction formula with scvi-tools' dense negative binomial, for comparison."""
    mu = library * torch.softmax(logits.masked_fill(~measured, -torch.inf), -1)
    nll = -NegativeBinomial(mu=mu, theta=theta).log_prob(x)
    return (torch.where(measured, nll, 0.0) * weights).sum(-1)


def test_loss_matches_the_documented_formula():
    measured = np.ones((2, 10), dtype=bool)
    measured[1, 5:] = False
    tensors = make_batch(measured=measured)
    module = CellPLMModule(10, 2, full_profile_weight=0.5, **SMALL).train()
    torch.manual_seed(0)
    inf, gen, loss = module(tensors, loss_kwargs={"kl_weight": 0.3})
    cells, entries = inf["masked_cells"], inf["masked_entries"]
    assert gen["px_logits"].shape == (int(cells.sum()), 10)  # only the scored cells are decoded
    x = dense_counts(tensors, 10)[cells]
    meas = tensors[K.MEASURED][tensors[K.MEASURED_ROW]][cells]
    weights = entries[cells].float() + 0.5 * meas.float()
    theta = module.log_dispersion.exp()
    rec = torch.zeros(20).index_put(
        (cells.nonzero()[:, 0],),
        _dense_nb_loss(gen["px_logits"], x.sum(-1, keepdim=True), theta, meas, weights, x),
    )
    kl = module.latent.kl(inf["latent"])
    expected = rec.sum() / cells.sum() + 0.3 * (kl["kl_z"] + kl["kl_y"]).mean()
    torch.testing.assert_close(loss.loss, expected)
    torch.testing.assert_close(loss.reconstruction_loss["reconstruction_loss"], rec)
    assert loss.n_obs_minibatch == 20


@pytest.mark.parametrize("strategy", [False, True], ids=["reference", "cpu-chunks"])
@pytest.mark.parametrize("masked", [False, True])
def test_nb_loss_and_gradients_match_the_dense_formula(masked, strategy, monkeypatch):
    monkeypatch.setattr(cpu._likelihood, "CHUNK_ENTRIES", 25)  # chunks of 2 cells
    torch.manual_seed(0)
    n_cells, n_genes = 7, 12
    x = torch.poisson(torch.rand(n_cells, n_genes) * 3) * (torch.rand(n_cells, n_genes) < 0.6)
    x[3] = 0  # a cell without counts
    measured = torch.rand(n_cells, n_genes) < 0.8
    measured[:, 0] = True
    x = x * measured
    mask = (torch.rand(n_cells, n_genes) < 0.3) & measured if masked else None
    weights = measured.double() if mask is None else mask.double() + 0.7 * measured.double()
    library = x.sum(-1, keepdim=True)
    logits = torch.randn(n_cells, n_genes, dtype=torch.float64, requires_grad=True)
    log_theta = torch.randn(n_genes, dtype=torch.float64, requires_grad=True)
    rows, cols = x.nonzero(as_tuple=True)
    entries = (rows, cols, x[rows, cols].double())
    with cpu.cpu_strategies(strategy):
        got = nb_reconstruction(logits, library.double(), log_theta.exp(), measured, mask, 0.7, entries)
    want = _dense_nb_loss(logits, library.double(), log_theta.exp(), measured, weights, x.double())
    torch.testing.assert_close(got, want)
    upstream = torch.rand(n_cells, dtype=torch.float64)
    grads = torch.autograd.grad((got * upstream).sum(), (logits, log_theta))
    expected = torch.autograd.grad((want * upstream).sum(), (logits, log_theta))
    for g, e in zip(grads, expected, strict=True):
        assert e.abs().max() > 0
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attention": "linear"}, "Unknown attention='linear'"),
        ({"latent": "vq"}, "Unknown latent='vq'"),
        ({"n_hidden": 0}, "n_hidden must be a positive integer"),
        ({"n_hidden": 18}, "divisible by 4"),
        ({"dropout": 1.0}, r"dropout must lie in \[0, 1\)"),
        ({"mask_gene_rate": 1.5}, r"mask_gene_rate must lie in \[0, 1\]"),
    ],
)
def test_bad_module_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CellPLMModule(10, 2, **{**SMALL, **kwargs})


def test_positional_encoding_reaches_the_encoder_and_can_be_switched_off():
    tensors = make_batch()
    on = CellPLMModule(10, 2, **SMALL).eval()
    moved = {**tensors, K.COORDS: tensors[K.COORDS].flip(0)}
    z = on.inference(**on._get_inference_input(tensors))["z"]
    assert not torch.allclose(z, on.inference(**on._get_inference_input(moved))["z"])
    no_coords = {**tensors, K.HAS_COORDS: torch.zeros(20, dtype=torch.bool)}
    moved_no_coords = {**moved, K.HAS_COORDS: torch.zeros(20, dtype=torch.bool)}
    torch.testing.assert_close(
        on.inference(**on._get_inference_input(no_coords))["z"],
        on.inference(**on._get_inference_input(moved_no_coords))["z"],
    )
    off = CellPLMModule(10, 2, use_positional_encoding=False, **SMALL).eval()
    torch.testing.assert_close(
        off.inference(**off._get_inference_input(tensors))["z"],
        off.inference(**off._get_inference_input(moved))["z"],
    )


def test_renamed_arguments_still_work_with_a_warning():
    with pytest.warns(FutureWarning, match="latent='gmvae' is now called latent='released_gmm'"):
        module = CellPLMModule(10, 2, latent="gmvae", **SMALL)
    assert module.latent_kind == "released_gmm"
    layout = {"n_gene_table": 12, "gene_rows": list(range(2, 12)), "n_datasets": 3}
    with pytest.warns(FutureWarning, match="replaced by released_layout"):
        old = CellPLMModule(
            10,
            2,
            decoder_batch_injection="hidden",
            decoder_bottleneck=128,
            n_pretrained_datasets=3,
            n_gene_table=12,
            gene_rows=layout["gene_rows"],
            **SMALL,
        )
    new = CellPLMModule(10, 2, released_layout=layout, **SMALL)
    assert old.state_dict().keys() == new.state_dict().keys()
    assert old.decoder.batch_injection == "hidden" and old.decoder.logit_range is not None
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['likelihood'\]"):
        CellPLMModule(10, 2, likelihood="nb", **SMALL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_step_under_bfloat16_autocast_matches_float32(seed):
    tensors = make_batch(seed=seed)
    torch.manual_seed(seed)
    module = CellPLMModule(10, 2, **SMALL).train()
    losses, grads = [], []
    for autocast in (False, True):
        torch.manual_seed(0)  # same masks and dropout
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = module(tensors)[2].loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None]))
        module.zero_grad()
    assert losses[1].dtype == torch.float32
    torch.testing.assert_close(losses[1], losses[0], rtol=0.05, atol=0.0)
    assert torch.isfinite(grads[1]).all() and grads[1].numel() == grads[0].numel()
    # bfloat16 rounding in every layer of a small random model: same direction, not the same values
    # (five random models: cosine similarity 0.70 to 0.98)
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.5


def test_stored_entries_are_the_csr_entries_of_the_chosen_cells():
    counts = sp.random(30, 15, density=0.3, random_state=4, format="csr") * 10
    counts[7] = 0  # a chosen cell without entries
    counts = sp.csr_matrix(counts)
    tensors = {
        K.X_INDPTR: torch.tensor(counts.indptr).long(),
        K.X_INDICES: torch.tensor(counts.indices).long(),
        K.X_DATA: torch.tensor(counts.data).float(),
    }
    cells = torch.tensor([0, 3, 7, 8, 21, 29])
    rows, cols, values = stored_entries(tensors, cells)
    chosen = counts[cells.numpy()].tocoo()
    assert torch.equal(rows, torch.tensor(chosen.row).long())
    assert torch.equal(cols, torch.tensor(chosen.col).long())
    torch.testing.assert_close(values, torch.tensor(chosen.data).float())


def test_tissues_of_one_cell_are_masked_at_the_rate_on_average_and_train():
    sizes = (1,) * 400
    tensors = make_batch(sizes=sizes)
    module = CellPLMModule(10, len(sizes), **SMALL).train()
    torch.manual_seed(0)
    masked_cells, _ = module._mask(tensors)
    assert abs(masked_cells.float().mean().item() - 0.75) < 5 * (0.75 * 0.25 / len(sizes)) ** 0.5
    loss = module(tensors)[2].loss
    assert torch.isfinite(loss)
    few = make_batch(sizes=(1, 1))  # a minibatch may mask no cell at all
    module.mask_cell_rate = 0.0001
    assert torch.isfinite(module(few)[2].loss)


def test_the_batch_enters_every_decoder_block_by_default_or_only_the_latent():
    every = CellPLMModule(10, 3, **SMALL)
    assert every.decoder.batch_injection == "hidden" and not hasattr(every.decoder, "batch_embedding")
    latent = CellPLMModule(10, 3, batch_in_decoder="latent", **SMALL)
    assert latent.decoder.batch_injection == "latent" and latent.decoder.logit_range is None
    z = torch.randn(1, SMALL["n_latent"]).expand(3, -1)
    with torch.no_grad():
        same_z = every.decoder(z, torch.tensor([0, 1, 2]))
    assert not torch.allclose(same_z[0], same_z[1])  # the batch changes the output
    with pytest.raises(ValueError, match="Unknown batch_in_decoder='input'"):
        CellPLMModule(10, 3, batch_in_decoder="input", **SMALL)
