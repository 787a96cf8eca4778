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
    # Without the check, an identical pair is a collision: both rows keep a cell.
    g = coords_to_grid(cells((0, 0), (256, 0), (0, 0)), patch_size_level0=256, check_duplicates=False)
    assert g.collided == 1 and len(np.unique(g.positions, axis=0)) == 3


def test_single_patch():
    g = coords_to_grid(cells((4096, 8192)), patch_size_level0=448)
    assert g.step == 448
    np.testing.assert_array_equal(g.positions, [[0, 0]])
    assert g.origin == (4096, 8192)
    assert g.shape == (1, 1)


def test_off_lattice_patch_snaps_to_nearest_cell():
    # Formerly "not on a regular lattice": a patch 3 px off the lattice (another contour's origin) snaps.
    g = coords_to_grid(cells((0, 0), (256, 0), (3, 256)), patch_size_level0=256)
    assert (g.step, g.source, g.snapped, g.collided) == (256, "attribute", 1, 0)
    np.testing.assert_array_equal(g.positions, [[0, 0], [1, 0], [0, 1]])


def test_exact_duplicates_error_names_rows():
    with pytest.raises(GridError, match=r"patch rows 0 and 2 at \(0, 0\)"):
        coords_to_grid(cells((0, 0), (256, 0), (0, 0)), patch_size_level0=256)


def two_contours(offset, step=512):
    """Two 4x3 tissue contours, the second tiled from an origin ``offset`` px off the first lattice."""
    a = np.stack(np.meshgrid(np.arange(4), np.arange(3)), -1).reshape(-1, 2) * step + 1000
    b = np.stack(np.meshgrid(np.arange(4), np.arange(3)), -1).reshape(-1, 2) * step + 1000 + np.array([6 * step, 0]) + np.array(offset)
    return np.concatenate([a, b])


@pytest.mark.parametrize("offset", [(1, 2), (3, 0), (0, 4), (17, 250), (255, 255)])
def test_multi_contour_no_gcd_collapse(offset):
    c = two_contours(offset)
    old_gcd = np.gcd.reduce(np.concatenate([np.diff(np.unique(c[:, a])) for a in (0, 1)]))
    assert old_gcd < 512  # what the old rule took as the stride
    for kw in ({}, {"patch_size_level0": 512}):  # measured alone, and declared
        g = coords_to_grid(c, **kw)
        assert g.step == 512, kw
        assert g.shape == (10, 3) and g.collided == 0 and g.snapped == 12
        assert g.neighbour_share == 1.0 and g.problems() == []
        np.testing.assert_array_equal(g.positions[12:] - g.positions[:12], np.tile([6, 0], (12, 1)))


def test_collision_keeps_every_row_and_moves_the_farther_patch():
    # Rows 1 and 2 snap to the same cell (1, 0); row 2 is 40 px off, row 1 on the lattice: row 2 moves.
    c = cells((0, 0), (512, 0), (552, 0), (0, 512))
    g = coords_to_grid(c, patch_size_level0=512)
    assert g.collided == 1 and g.snapped == 1
    assert len(np.unique(g.positions, axis=0)) == 4  # cells stay unique, no row dropped
    np.testing.assert_array_equal(g.positions[[0, 1, 3]], [[0, 0], [1, 0], [0, 1]])
    np.testing.assert_array_equal(g.positions[2], [2, 0])  # nearest free cell to x=552/512=1.08, y=0
    # Equal distances: the first row in file order keeps the cell.
    g = coords_to_grid(cells((0, 0), (512 + 10, 0), (512 - 10, 0)), patch_size_level0=512)
    rel = g.positions - g.positions[0]
    np.testing.assert_array_equal(rel[1], [1, 0])
    # Row 2 (x = 0.98 cells) goes to the nearest free cell: (1, -1) and (1, 1) tie, the lower row wins;
    # the grid then starts at row 0 again (row 0's patch is now at (0, 1)).
    np.testing.assert_array_equal(rel[2], [1, -1])
    np.testing.assert_array_equal(g.positions, [[0, 1], [1, 1], [1, 0]])
    assert g.collided == 1 and g.origin == (0, -512)


def test_clam_and_trident_attributes_give_stride():
    c = two_contours((5, 9), step=1024)
    clam = {"patch_size": 512, "patch_level": 0, "downsample": np.array([2.0, 2.0])}
    g = coords_to_grid(c, attrs=clam)
    assert (g.step, g.source, g.footprint) == (1024, "clam", 1024)
    trident = {"patch_size": 256, "target_magnification": 20, "level0_magnification": 40, "overlap": 0}
    g = coords_to_grid(np.array([[0, 0], [512, 0], [0, 512]]), attrs=trident)
    assert (g.step, g.source, g.footprint) == (512, "trident", 512)
    ov = {**trident, "overlap": 64}
    g = coords_to_grid(np.array([[7, 7]]), attrs=ov)  # one patch: only the declared geometry can tell
    assert (g.step, g.source, g.footprint) == (512 - 128, "trident", 512)
    # patch_size_level0 wins over CLAM's attributes when both are present.
    g = coords_to_grid(c, attrs={**clam, "patch_size_level0": 1024})
    assert g.source == "attribute"


def test_coordinates_overrule_contradicting_declaration():
    # Declared 512, but the scanner's true pixel size put neighbours 506 px apart.
    pos = np.stack(np.meshgrid(np.arange(30), np.arange(20)), -1).reshape(-1, 2)
    g = coords_to_grid(pos * 506 + 3, patch_size_level0=512)
    assert (g.step, g.source, g.declared_step) == (506, "inferred", 512)
    np.testing.assert_array_equal(g.positions, pos)
    assert g.collided == 0


def test_collapsed_grid_is_implausible():
    # Coordinates that do not come from one tiling (e.g. jittered centres): no patch has a neighbour.
    rng = np.random.default_rng(0)
    c = rng.choice(200_000, size=(300, 2), replace=False)
    g = coords_to_grid(c)
    assert any("implausible grid" in p and "neighbouring patch" in p for p in g.problems())
    # A stride far below the declared patch size.
    pos = np.stack(np.meshgrid(np.arange(10), np.arange(10)), -1).reshape(-1, 2)
    g = coords_to_grid(pos * 4, patch_size_level0=512)
    assert g.step == 4 and any("far below the patch size 512" in p for p in g.problems())


def test_float_coords_must_be_integral():
    g = coords_to_grid(np.array([[0.0, 0.0], [256.0, 512.0]]), patch_size_level0=256)
    np.testing.assert_array_equal(g.positions, [[0, 0], [1, 2]])
    with pytest.raises(GridError, match="integer"):
        coords_to_grid(np.array([[0.5, 0.0], [256.0, 512.0]]), patch_size_level0=256)
