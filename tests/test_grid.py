"""slidefm.grid.coords_to_grid: the single coords -> grid-position utility."""

import numpy as np
import pytest

from slidefm.grid import GridError, coords_to_grid


def cells(*xy):
    return np.array(xy, dtype=np.int64)


def test_non_overlapping_uses_patch_size():
    pos = cells((0, 0), (1, 0), (0, 1), (3, 2))
    g = coords_to_grid(pos * 256 + 1000, patch_size_level0=256)
    assert g.step == 256
    np.testing.assert_array_equal(g.positions, pos)
    assert g.origin == (1000, 1000)


def test_overlap_stride_inferred_from_coordinates():
    # 256-px patches extracted with 64 px overlap: neighbours are 192 px apart, never 256.
    pos = cells((0, 0), (1, 0), (2, 0), (0, 1), (2, 3))
    g = coords_to_grid(pos * 192, patch_size_level0=256)
    assert g.step == 192
    np.testing.assert_array_equal(g.positions, pos)


def test_overlap_attribute_gives_stride_for_single_patch():
    g = coords_to_grid(cells((5000, 7000)), patch_size_level0=512, overlap=64, patch_size=256)
    assert g.step == 512 - 128  # overlap is in target-magnification pixels: 64 * 512/256 at level 0
    np.testing.assert_array_equal(g.positions, [[0, 0]])


def test_shuffled_order_keeps_row_correspondence():
    rng = np.random.default_rng(0)
    pos = np.stack(np.meshgrid(np.arange(6), np.arange(4)), -1).reshape(-1, 2)
    perm = rng.permutation(len(pos))
    g = coords_to_grid(pos[perm] * 512 + 77, patch_size_level0=512)
    np.testing.assert_array_equal(g.positions, pos[perm])


@pytest.mark.parametrize("origin", [(0, 0), (13, 999), (123457, 5), (-300, -1200)])
def test_any_origin(origin):
    pos = cells((0, 0), (2, 1), (4, 4))
    g = coords_to_grid(pos * 224 + np.array(origin), patch_size_level0=224)
    np.testing.assert_array_equal(g.positions, pos)
    assert g.origin == origin


def test_per_slide_patch_sizes_give_same_grid():
    # The same tissue scanned at 20x base (256 px) and 40x base (512 px) must land on the same cells.
    pos = cells((0, 0), (1, 0), (1, 1), (5, 3))
    a = coords_to_grid(pos * 256, patch_size_level0=256)
    b = coords_to_grid(pos * 512 + 40, patch_size_level0=512)
    np.testing.assert_array_equal(a.positions, b.positions)
    assert (a.step, b.step) == (256, 512)


def test_sparse_non_overlapping_does_not_collapse():
    # Every gap is a multiple of 2 patches, so the raw gcd (1024) is twice the stride.
    pos = cells((0, 0), (2, 0), (4, 2), (0, 6))
    g = coords_to_grid(pos * 512, patch_size_level0=512)
    assert g.step == 512
    np.testing.assert_array_equal(g.positions, pos)


def test_duplicates_error():
    with pytest.raises(GridError, match="duplicate"):
        coords_to_grid(cells((0, 0), (256, 0), (0, 0)), patch_size_level0=256)


def test_single_patch():
    g = coords_to_grid(cells((4096, 8192)), patch_size_level0=448)
    assert g.step == 448
    np.testing.assert_array_equal(g.positions, [[0, 0]])
    assert g.origin == (4096, 8192)
    assert g.shape == (1, 1)


def test_off_lattice_coordinates_error():
    with pytest.raises(GridError, match="regular lattice"):
        coords_to_grid(cells((0, 0), (256, 0), (3, 256)), patch_size_level0=256)


def test_float_coords_must_be_integral():
    g = coords_to_grid(np.array([[0.0, 0.0], [256.0, 512.0]]), patch_size_level0=256)
    np.testing.assert_array_equal(g.positions, [[0, 0], [1, 2]])
    with pytest.raises(GridError, match="integer"):
        coords_to_grid(np.array([[0.5, 0.0], [256.0, 512.0]]), patch_size_level0=256)
