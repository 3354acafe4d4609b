"""Sample grids: layout of the fixed latents."""


def test_conditional_grid_has_one_row_per_class():
    """The fixed sample latents put exactly one class in each grid row (2 classes here)."""
    from distgan.sampling import fixed_latents, grid_layout

    n, per_row = grid_layout(64, 2)
    assert (n, per_row) == (64, 32)
    n, per_row = grid_layout(64, 11)  # twemoji: 11 classes
    _, c = fixed_latents(n, 8, 11, 0, "cpu")
    assert n == 55 and per_row == 5
    assert [set(c[i:i + per_row].tolist()) for i in range(0, n, per_row)] == [{k} for k in range(11)]
    assert grid_layout(64, 0) == (64, 8)
