import math

import pytest
from hypothesis import given, strategies as st

from chatspot_edge import referring as R
from chatspot_edge.errors import InputError

sizes = st.integers(min_value=1, max_value=8000)


@st.composite
def image_and_box(draw):
    w, h = draw(sizes), draw(sizes)
    x1 = draw(st.floats(0, w * 0.98))
    y1 = draw(st.floats(0, h * 0.98))
    x2 = draw(st.floats(x1 + w * 0.002, w))
    y2 = draw(st.floats(y1 + h * 0.002, h))
    return w, h, (x1, y1, x2, y2)


@given(image_and_box())
def test_box_round_trip(arg):
    w, h, b = arg
    region = R.box(*b, w, h)
    text = region.text()
    assert text.startswith("<box>[") and text.endswith("]</box>") and " " not in text
    numbers = text[len("<box>["):-len("]</box>")].split(",")
    assert len(numbers) == 4 and all(len(n.split(".")[1]) == 3 for n in numbers)
    (parsed,) = R.parse_regions("What is in " + text + "?")
    assert parsed.kind == "box"
    back = parsed.to_pixels(w, h)
    for got, want, side in zip(back, b, (w, h, w, h)):
        assert abs(got - want) <= 0.0005 * side + 1e-9


@given(sizes, sizes, st.floats(0, 1), st.floats(0, 1))
def test_point_round_trip(w, h, fx, fy):
    region = R.point(fx * w, fy * h, w, h)
    (parsed,) = R.parse_regions(region.text())
    assert parsed.kind == "point"
    assert abs(parsed.coords[0] - fx) <= 0.0005 + 1e-12 and abs(parsed.coords[1] - fy) <= 0.0005 + 1e-12


@given(sizes, sizes, st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=3, max_size=12))
def test_polygon_round_trip(w, h, pts):
    try:
        text = R.polygon([(x * w, y * h) for x, y in pts], w, h).text()
    except InputError:  # only a polygon that is a line at 3 decimals is refused
        xs, ys = [round(p[0], 3) for p in pts], [round(p[1], 3) for p in pts]
        assert max(xs) - min(xs) <= 0.001 + 1e-9 or max(ys) - min(ys) <= 0.001 + 1e-9
        return
    (parsed,) = R.parse_regions(text)
    assert parsed.kind == "polygon" and len(parsed.coords) == 2 * len(pts)
    x1, y1, x2, y2 = parsed.bbox()
    assert x2 > x1 and y2 > y1  # what is written has an extent in both axes
    for got, (x, y) in zip(zip(parsed.coords[0::2], parsed.coords[1::2]), pts):
        assert abs(got[0] - x) <= 0.0005 + 1e-9 and abs(got[1] - y) <= 0.0005 + 1e-9


def test_exact_text():
    assert R.box(10, 20, 45, 61, 100, 100).text() == "<box>[0.100,0.200,0.450,0.610]</box>"
    assert R.point(41.2, 53.3, 100, 100).text() == "<box>[0.412,0.533]</box>"


@pytest.mark.parametrize("args", [
    (50, 10, 40, 20),             # x2 < x1
    (10, 10, 10, 20),             # zero width
    (10, 10, 20, 10),             # zero height
    (-1, 0, 10, 10),              # outside
    (0, 0, 101, 10),              # outside
    (math.nan, 0, 10, 10),
    (0, 0, math.inf, 10),
])
def test_box_rejections(args):
    with pytest.raises(InputError):
        R.box(*args, 100, 100)


def test_clip_only_when_asked():
    with pytest.raises(InputError):
        R.box(-5, -5, 50, 50, 100, 100)
    assert R.box(-5, -5, 50, 50, 100, 100, clip=True).coords == (0.0, 0.0, 0.5, 0.5)


def test_polygon_rejections():
    with pytest.raises(InputError):
        R.polygon([(1, 1), (2, 2)], 10, 10)
    with pytest.raises(InputError):
        R.polygon([1, 1, 2, 2, 3], 10, 10)
    with pytest.raises(InputError):
        R.polygon([(1, 1), (1, 5), (1, 3)], 10, 10)  # all on one vertical line: no extent
    with pytest.raises(InputError):  # found by hypothesis: a height of 4.5e-131 would be written as a line
        R.polygon([(0.0, 0.0), (0.0, 0.0), (1.0, 4.4770794981773434e-131)], 1, 1).text()
    # a diagonal stroke is a valid scribble (its bounding box has an area)
    assert R.polygon([(1, 1), (2, 2), (3, 3)], 10, 10).kind == "polygon"


def test_bad_image_size_and_numbers():
    with pytest.raises(InputError):
        R.point(1, 1, 0, 10)
    with pytest.raises(InputError):
        R.parse_numbers("1,a", "box")
    with pytest.raises(InputError):
        R.from_pixels("box", [1, 2, 3], 10, 10)


def test_parse_skips_malformed():
    assert R.parse_regions("<box>[0.1]</box> <box>[a,b]</box> <box>[0.100,0.200]</box>")[0].coords == (0.1, 0.2)
