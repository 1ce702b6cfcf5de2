import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infd import geometry
from infd.errors import InfdError
from infd.geometry import Box, Window

sizes = st.tuples(st.integers(1, 300), st.integers(1, 300))
coords = st.floats(-1.5, 1.5, allow_nan=False)


@st.composite
def boxes(draw):
    y0, x0 = draw(coords), draw(coords)
    height, width = draw(st.floats(1e-3, 2.0)), draw(st.floats(1e-3, 2.0))
    return Box(y0, x0, y0 + height, x0 + width)


def test_full_image_pixel_centers_and_cell():
    ys, xs = geometry.window_centers(Box.full(), (4, 2))
    assert torch.allclose(ys, torch.tensor([-0.75, -0.25, 0.25, 0.75], dtype=torch.float64))
    assert torch.allclose(xs, torch.tensor([-0.5, 0.5], dtype=torch.float64))
    assert geometry.cell_size(Box.full(), (4, 2)) == (0.5, 1.0)


@given(boxes(), sizes)
def test_coord_grid_is_centered_in_box(box, size):
    grid = geometry.coord_grid(box, size).double()
    cy, cx = geometry.cell_size(box, size)
    assert grid.shape == (*size, 2)
    assert math.isclose(grid[0, 0, 0].item(), box.y0 + cy / 2, abs_tol=1e-5)
    assert math.isclose(grid[-1, -1, 1].item(), box.x1 - cx / 2, abs_tol=1e-5)
    if size[0] > 1:
        assert torch.allclose(grid[1:, 0, 0] - grid[:-1, 0, 0], torch.full((size[0] - 1,), cy, dtype=torch.float64), atol=1e-5)


@given(sizes, st.integers(4, 64), st.integers(4, 64))
def test_tiles_cover_grid_exactly_once(size, th, tw):
    covered = torch.zeros(size, dtype=torch.int32)
    for w in geometry.tiles(size, (th, tw)):
        assert 0 < w.height <= th and 0 < w.width <= tw
        covered[w.top : w.top + w.height, w.left : w.left + w.width] += 1
    assert bool((covered == 1).all())


@given(boxes(), sizes, st.data())
def test_tile_centers_equal_whole_grid_centers_bit_for_bit(box, size, data):
    tile = data.draw(st.integers(8, 80))
    halo = data.draw(st.integers(0, 4))
    ys, xs = geometry.window_centers(box, size, halo=halo)
    for w in geometry.tiles(size, tile):
        ty, tx = geometry.window_centers(box, size, w, halo=halo)
        assert torch.equal(ty, ys[w.top : w.top + w.height + 2 * halo])
        assert torch.equal(tx, xs[w.left : w.left + w.width + 2 * halo])


@given(boxes(), sizes, st.data())
def test_window_box_agrees_with_window_centers(box, size, data):
    top = data.draw(st.integers(0, size[0] - 1))
    left = data.draw(st.integers(0, size[1] - 1))
    window = Window(top, left, data.draw(st.integers(1, size[0] - top)), data.draw(st.integers(1, size[1] - left)))
    sub = geometry.window_box(box, size, window)
    ys, xs = geometry.window_centers(box, size, window)
    sub_ys, sub_xs = geometry.window_centers(sub, (window.height, window.width))
    assert torch.allclose(ys, sub_ys, atol=1e-9) and torch.allclose(xs, sub_xs, atol=1e-9)
    assert geometry.cell_size(sub, (window.height, window.width)) == pytest.approx(geometry.cell_size(box, size))


@given(st.tuples(st.integers(2, 400), st.integers(2, 400)), st.data())
def test_crop_box_queries_the_crop_pixels_of_the_image(image_size, data):
    h, w = image_size
    ch, cw = data.draw(st.integers(1, h)), data.draw(st.integers(1, w))
    top, left = data.draw(st.integers(0, h - ch)), data.draw(st.integers(0, w - cw))
    crop = geometry.crop_box(image_size, top, left, (ch, cw))
    whole = geometry.coord_grid(Box.full(), image_size)
    assert torch.allclose(geometry.coord_grid(crop, (ch, cw)), whole[top : top + ch, left : left + cw], atol=1e-5)
    assert geometry.cell_size(crop, (ch, cw)) == pytest.approx((2 / h, 2 / w))


@given(boxes(), st.tuples(st.integers(1, 500), st.integers(1, 500)))
def test_box_pixel_round_trip(box, image_size):
    again = Box.from_pixels(*box.to_pixels(image_size), image_size)
    assert again.as_tuple() == pytest.approx(box.as_tuple(), abs=1e-9)


@settings(max_examples=200)
@given(st.integers(1, 64), st.floats(-1.0, 1.0, allow_nan=False))
def test_feature_lookup_finds_the_feature_containing_the_point(n, y):
    index, offset = geometry.feature_lookup(torch.tensor([y], dtype=torch.float64), n)
    lo = -1 + 2 * index.item() / n
    assert lo - 1e-9 <= y <= lo + 2 / n + 1e-9
    assert -0.5 - 1e-9 <= offset.item() <= 0.5 + 1e-9
    center = lo + 1 / n
    assert math.isclose(offset.item(), (y - center) * n / 2, abs_tol=1e-9)


def test_feature_lookup_clamps_outside_the_image():
    index, offset = geometry.feature_lookup(torch.tensor([-1.3, 1.3], dtype=torch.float64), 4)
    assert index.tolist() == [0, 3]
    assert offset[0] < -0.5 and offset[1] > 0.5


@pytest.mark.parametrize("text,expected", [("2048x1536", (1536, 2048)), ("512", (512, 512)), (" 64 X 32 ", (32, 64))])
def test_parse_size(text, expected):
    assert geometry.parse_size(text) == expected


@pytest.mark.parametrize("text,expected", [("2048x1536", (1536, 2048)), ("2048", 2048), ("7", 7)])
def test_parse_size_request_keeps_one_number_as_a_long_side(text, expected):
    assert geometry.parse_size_request(text) == expected


@given(side=st.integers(1, 100_000), width=st.integers(1, 5000), height=st.integers(1, 5000))
def test_one_number_is_the_long_side_at_the_aspect(side, width, height):
    h, w = geometry.fit_size(side, width / height)
    assert max(h, w) == side and min(h, w) >= 1
    long, short = max(width, height), min(width, height)
    # The short side is the nearest whole number to the exact one (or 1 px).
    assert abs(min(h, w) - max(1.0, side * short / long)) <= 0.5 + 1e-6
    assert (w == side) if width >= height else (h == side)  # the long side is the content's long side
    assert geometry.fit_size((height, width), 3.7) == (height, width)  # WIDTHxHEIGHT is exact, whatever the aspect


@given(side=st.integers(1, 10_000), aspect=st.floats(0.05, 20), box=st.tuples(*[st.floats(-1, 1)] * 4))
def test_a_box_has_its_shape_in_the_image(side, aspect, box):
    y0, x0, y1, x1 = box
    if y1 - y0 < 1e-3 or x1 - x0 < 1e-3:
        return
    h, w = geometry.fit_size(side, aspect, Box(y0, x0, y1, x1))
    assert geometry.fit_size(side, aspect * (x1 - x0) / (y1 - y0)) == (h, w)
    assert geometry.fit_size(side, aspect, Box.full()) == geometry.fit_size(side, aspect)


def test_the_size_rule_examples():
    assert geometry.parse_size("2048", 4 / 3) == (1536, 2048)
    assert geometry.parse_size("2048", 3 / 4) == (2048, 1536)
    assert geometry.parse_size("2048", 16 / 9) == (1152, 2048)
    assert geometry.parse_size("512") == (512, 512)
    assert geometry.fit_size(100, 1000.0) == (1, 100)  # never below one pixel
    with pytest.raises(InfdError, match="positive"):
        geometry.fit_size(100, float("nan"))


def test_latent_aspect():
    assert geometry.latent_aspect({}, (8, 8)) == 1.0
    assert geometry.latent_aspect({}, (8, 16)) == 2.0
    assert geometry.latent_aspect({geometry.ASPECT_KEY: "1.5"}, (8, 8)) == 1.5
    for bad in ("wide", "0", "-1", "inf", "nan"):
        with pytest.raises(InfdError, match="aspect ratio"):
            geometry.latent_aspect({geometry.ASPECT_KEY: bad}, (8, 8))


@pytest.mark.parametrize("text", ["0x10", "-5x5", "abc", "1x2x3", "", "12.5x3"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(InfdError):
        geometry.parse_size(text)


@pytest.mark.parametrize("values", [(0, 0, 0, 1), (0.5, 0, 0.1, 1), (float("nan"), 0, 1, 1), (0, 0, 1, float("inf"))])
def test_empty_or_non_finite_boxes_are_rejected(values):
    with pytest.raises(InfdError):
        Box(*values)


def test_box_parse():
    assert Box.parse("-0.5, -1, 0.5, 1") == Box(-0.5, -1, 0.5, 1)
    with pytest.raises(InfdError):
        Box.parse("1,2,3")


@pytest.mark.parametrize("size", [(0, 4), (4, -1), (2.5, 3)])
def test_check_size_rejects_non_positive_or_fractional(size):
    with pytest.raises(InfdError):
        geometry.check_size(size)
