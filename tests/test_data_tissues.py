import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellplm_scvi.data import (
    TissuePackingSampler,
    build_tissue_index,
    pack_units,
    random_chunks,
    shard_units,
    spatial_tiles,
    split_units,
    stable_cell_keys,
)


def _names(n):
    return np.array([f"c{i}" for i in range(n)])


def _tiles_are_separable(coords, tiles):
    """Every pair of tiles is separated by an axis-aligned line (k-d tiles are boxes)."""
    for a in range(len(tiles)):
        for b in range(a + 1, len(tiles)):
            pa, pb = coords[tiles[a]], coords[tiles[b]]
            separated = any(
                pa[:, ax].max() <= pb[:, ax].min() or pb[:, ax].max() <= pa[:, ax].min() for ax in (0, 1)
            )
            if not separated:
                return False
    return True


def test_small_tissues_are_single_units():
    codes = np.array([0, 1, 0, 1, 2])
    index = build_tissue_index(codes, _names(5), None, max_cells_per_context=10)
    assert index.n_units == 3
    assert [index.unit(u).tolist() for u in range(3)] == [[0, 2], [1, 3], [4]]
    np.testing.assert_array_equal(index.unit_tissue, [0, 1, 2])


def test_large_spatial_tissue_is_tiled_contiguously():
    rng = np.random.default_rng(1)
    coords = rng.uniform(0, 100, size=(1000, 2))
    index = build_tissue_index(np.zeros(1000, int), _names(1000), coords, max_cells_per_context=130)
    sizes = index.unit_sizes
    assert sizes.max() <= 130 and sizes.sum() == 1000
    assert index.n_units == -(-1000 // 130)
    tiles = [index.unit(u) for u in range(index.n_units)]
    assert _tiles_are_separable(coords, tiles)
    np.testing.assert_array_equal(np.sort(index.unit_cells), np.arange(1000))


def test_coordinates_normalised_per_tissue_keep_aspect_ratio():
    coords = np.array([[10.0, 5.0], [30.0, 5.0], [20.0, 15.0], [1000.0, 1000.0], [1001.0, 1002.0]])
    index = build_tissue_index(np.array([0, 0, 0, 1, 1]), _names(5), coords, 10)
    np.testing.assert_allclose(index.tissue_origin, [[10, 5], [1000, 1000]])
    np.testing.assert_allclose(index.tissue_scale, [20.0, 2.0])


def test_chunks_do_not_depend_on_row_order():
    names = _names(500)
    index = build_tissue_index(np.zeros(500, int), names, None, max_cells_per_context=120)
    perm = np.random.default_rng(0).permutation(500)
    permuted = build_tissue_index(np.zeros(500, int), names[perm], None, max_cells_per_context=120)
    as_names = lambda idx, nm: sorted(tuple(sorted(nm[idx.unit(u)])) for u in range(idx.n_units))
    assert as_names(index, names) == as_names(permuted, names[perm])
    assert index.unit_sizes.max() <= 120


def test_stable_keys_depend_on_seed_and_name_only():
    names = _names(50)
    np.testing.assert_array_equal(stable_cell_keys(names, 3), stable_cell_keys(names, 3))
    assert not np.array_equal(stable_cell_keys(names, 3), stable_cell_keys(names, 4))
    np.testing.assert_array_equal(stable_cell_keys(names[::-1], 3), stable_cell_keys(names, 3)[::-1])


def test_restrict_and_units_containing():
    index = build_tissue_index(np.array([0, 0, 1, 1, 1, 2]), _names(6), None, 10)
    sub = index.restrict(np.array([1, 4]))
    assert sub.n_units == 2
    assert [sub.unit(u).tolist() for u in range(2)] == [[1], [4]]
    np.testing.assert_array_equal(index.units_containing(np.array([4, 0])), [0, 1])


def test_pack_units_rejects_oversized_unit():
    with pytest.raises(ValueError, match="does not fit a minibatch of 5 cells"):
        pack_units(np.arange(2), np.array([3, 7]), 5)


def test_split_is_by_tissue_and_single_tissue_is_split_by_tiles():
    codes = np.repeat(np.arange(10), 20)
    index = build_tissue_index(codes, _names(200), None, 100)
    train, val, test = split_units(index, None, _names(200), 0.9, 0.1, seed=0)
    assert len(test) == 0 and len(val) == 20
    assert set(codes[val]).isdisjoint(codes[train])
    single = build_tissue_index(np.zeros(300, int), _names(300), None, 4000)
    coords = np.random.default_rng(0).uniform(size=(300, 2))
    train, val, _ = split_units(single, coords, _names(300), 0.9, 0.1, seed=0)
    assert len(val) == 30 and len(train) == 270
    low, high = coords[val].min(0), coords[val].max(0)
    inside = ((coords[train] > low) & (coords[train] < high)).all(1)
    assert not inside.any()  # the validation cells form one spatial tile


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=40),
    extra=st.integers(0, 100),
    seed=st.integers(0, 1000),
    epoch=st.integers(0, 5),
)
def test_sampler_yields_each_unit_once_within_budget(sizes, extra, seed, epoch):
    sizes = np.array(sizes)
    budget = int(sizes.max()) + extra
    sampler = TissuePackingSampler(sizes, budget, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    flat = [u for b in batches for u in b]
    assert sorted(flat) == list(range(len(sizes)))
    assert all(sizes[b].sum() <= budget for b in batches)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 30), min_size=2, max_size=30), n_replicas=st.integers(2, 4))
def test_shards_are_disjoint_balanced_and_cover_all(sizes, n_replicas):
    sizes = np.array(sizes)
    order = np.random.default_rng(0).permutation(len(sizes))
    shards = shard_units(order, sizes, n_replicas)
    flat = np.concatenate(shards)
    assert sorted(flat.tolist()) == list(range(len(sizes)))
    loads = [sizes[s].sum() for s in shards]
    assert max(loads) - min(loads) <= sizes.max()  # LPT bound


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 400), max_cells=st.integers(1, 120), seed=st.integers(0, 50))
def test_tiles_are_contiguous_and_bounded(n, max_cells, seed):
    coords = np.random.default_rng(seed).normal(size=(n, 2))
    keys = stable_cell_keys(_names(n), seed)
    tiles = spatial_tiles(coords, keys, max_cells)
    assert max(len(t) for t in tiles) <= max_cells
    assert sorted(np.concatenate(tiles).tolist()) == list(range(n))
    if len(tiles) <= 12:
        assert _tiles_are_separable(coords, tiles)


def test_random_chunks_nearly_equal():
    chunks = random_chunks(stable_cell_keys(_names(1001), 0), 100)
    assert len(chunks) == 11
    assert {len(c) for c in chunks} <= {91, 90}


@settings(max_examples=40, deadline=None)
@given(
    tissue_sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    max_cells=st.integers(5, 60),
    extra=st.integers(0, 60),
    spatial=st.booleans(),
    seed=st.integers(0, 100),
)
def test_token_sets_cover_every_cell_once_within_budget(tissue_sizes, max_cells, extra, spatial, seed):
    import scipy.sparse as sp
    import torch

    from cellplm_scvi._constants import BATCH_KEYS
    from cellplm_scvi.data import TissueData, TokenSetDataset

    rng = np.random.default_rng(seed)
    codes = rng.permutation(np.repeat(np.arange(len(tissue_sizes)), tissue_sizes))
    n = len(codes)
    coords = rng.uniform(0, 10, size=(n, 2)) if spatial else None
    index = build_tissue_index(codes, _names(n), coords, max_cells)
    counts = sp.random(n, 7, density=0.4, random_state=seed, format="csr", dtype=np.float32)
    data = TissueData(counts, np.zeros(n, np.int64), coords, index, n_batch=1)
    dataset = TokenSetDataset(data, index)
    budget = max_cells + extra
    sampler = TissuePackingSampler(index.unit_sizes, budget, shuffle=True, seed=seed)
    seen = []
    for units in sampler:
        batch = dataset[units]
        cells = batch[BATCH_KEYS.OBS_INDEX].numpy()
        ptr = batch[BATCH_KEYS.SEGMENT_PTR].numpy()
        assert len(cells) <= budget and ptr[-1] == len(cells)
        for start, stop in zip(ptr[:-1], ptr[1:], strict=True):  # a segment is one tissue (one unit)
            assert len(set(codes[cells[start:stop]])) == 1
        dense = np.zeros((len(cells), 7), np.float32)
        rows = np.repeat(np.arange(len(cells)), np.diff(batch[BATCH_KEYS.X_INDPTR].numpy()))
        dense[rows, batch[BATCH_KEYS.X_INDICES].numpy()] = batch[BATCH_KEYS.X_DATA].numpy()
        np.testing.assert_array_equal(dense, counts[cells].toarray())
        if spatial:
            normalised = batch[BATCH_KEYS.COORDS].numpy()
            assert normalised.min() >= -1e-6 and normalised.max() <= 1 + 1e-6
        seen.append(cells)
        assert isinstance(batch[BATCH_KEYS.HAS_COORDS], torch.Tensor)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(n))


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=6), seed=st.integers(0, 100))
def test_packed_tissues_never_share_attention(sizes, seed):
    import torch

    from cellplm_scvi.nn import CellEncoder

    torch.manual_seed(seed)
    encoder = CellEncoder(8, 2, 2, 0.0, "flow").eval()
    x = torch.randn(sum(sizes), 8)
    ptr = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]))
    packed = encoder(x, ptr)
    for start, stop in zip(ptr[:-1].tolist(), ptr[1:].tolist(), strict=True):
        alone = encoder(x[start:stop], torch.tensor([0, stop - start]))
        torch.testing.assert_close(packed[start:stop], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [np.arange(30), np.arange(5, 17), np.array([3, 1, 8, 2]), np.array([4])])
def test_read_rows_matches_indexing_and_never_shares_the_input(rows):
    import scipy.sparse as sp

    from cellplm_scvi.data import read_rows

    counts = sp.random(30, 9, density=0.3, random_state=0, format="csr", dtype=np.float32)
    for matrix in (counts, counts.toarray()):
        block = read_rows(matrix, rows)
        assert block.dtype == np.float32
        np.testing.assert_array_equal(block.toarray(), counts.toarray()[rows])
        block.data[:] = -1  # writing to the result leaves the input alone
        assert counts.data.min() >= 0


@pytest.mark.parametrize("rows", [np.arange(30), np.arange(5, 17), np.array([3, 1, 8, 2]), np.array([4])])
def test_csr_parts_are_the_rows_in_minibatch_dtypes_and_never_share_the_input(rows):
    import scipy.sparse as sp

    from cellplm_scvi.data import csr_parts

    counts = sp.random(30, 9, density=0.3, random_state=0, format="csr", dtype=np.float64)
    for matrix in (counts, counts.toarray()):
        indptr, indices, values = csr_parts(matrix, rows)
        assert (indptr.dtype, indices.dtype, values.dtype) == (np.int64, np.int64, np.float32)
        block = sp.csr_matrix((values, indices, indptr), shape=(len(rows), 9))
        np.testing.assert_allclose(block.toarray(), counts.toarray()[rows], rtol=1e-6)
        indices[:] = 0  # writing to the parts leaves the input alone
        values[:] = -1
        assert counts.data.min() >= 0 and counts.indices.max() > 0


@pytest.mark.parametrize("layout", ["batches_concatenated", "batches_interleaved"])
def test_measured_genes_are_the_genes_seen_in_each_batch(layout, monkeypatch):
    import scipy.sparse as sp

    from cellplm_scvi.data import _token_sets, measured_genes

    monkeypatch.setattr(_token_sets, "VALUES_PER_PASS", 13)  # a batch's entries read in many stretches

    rng = np.random.default_rng(1)
    codes = np.repeat(np.arange(4), 50)
    if layout == "batches_interleaved":
        codes = rng.permutation(codes)
    dense = rng.poisson(0.05, size=(200, 40)).astype(np.float32)
    dense[codes == 2, :10] = 0  # genes 0-9 not measured in batch 2
    counts = sp.csr_matrix(dense)
    counts.data[::7] = 0  # explicitly stored zeros do not count as measured
    expected = np.stack([(counts.toarray()[codes == b] != 0).any(0) for b in range(4)])
    assert not expected[2, :10].any() and expected.any(1).all()
    for matrix in (counts, counts.toarray()):
        np.testing.assert_array_equal(measured_genes(matrix, codes, 4, chunk=64), expected)
