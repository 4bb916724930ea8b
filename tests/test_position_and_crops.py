"""2D position of the image tokens, box geometry and region crops of the original image (issue 17)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from chatspot_edge.model.position import BoxGeometry, GridPosition, cell_centres, fourier, loc_rows
from chatspot_edge.model.preprocess import batch_region_crops, region_crops, region_source


def test_cell_centres_are_row_major_and_fourier_is_unique_over_the_image():
    c = cell_centres((2, 3))
    assert np.allclose(c.numpy(), [[1 / 6, 0.25], [0.5, 0.25], [5 / 6, 0.25], [1 / 6, 0.75], [0.5, 0.75], [5 / 6, 0.75]])
    f = fourier(torch.linspace(0, 1, 65)[:, None])
    assert f.shape == (65, 16)
    d = torch.cdist(f, f) + torch.eye(65) * 1e3
    assert d.min() > 0.1  # no two coordinates share a code (the lowest frequency spans the image once)


def test_grid_position_is_added_per_cell(tiny):
    model, _ = tiny
    assert model.config.position_2d and isinstance(model.position, GridPosition)
    px = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb = model.encode_image(px)
        base = model.projector(model.vision(px))
        pos = model.position()
    assert pos.shape == (model.config.num_image_tokens, model.config.hidden_size)
    assert torch.allclose(emb - base, pos.expand(2, -1, -1), atol=1e-6)
    assert (torch.cdist(pos, pos) + torch.eye(len(pos)) * 1e3).min() > 1e-3  # every cell has its own code


def test_2d_position_changes_the_answer_logits(tiny):
    """The same features at other cells give another output (the LLM can tell where a token is)."""
    from chatspot_edge.model.processor import Processor

    model, tok = tiny
    enc = Processor(tok, model.config).encode_prompt("How many shapes are there?")
    px = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        feats = model.projector(model.vision(px))
        with_pos = model(ids, image_embeds=feats + model.position()).logits[0, -1]
        without = model(ids, image_embeds=feats).logits[0, -1]
        moved = model(ids, image_embeds=feats + model.position().flip(0)).logits[0, -1]
    assert (with_pos - without).abs().max() > 1e-4
    assert (with_pos - moved).abs().max() > 1e-4


def test_box_geometry_tells_boxes_apart_and_is_differentiable():
    geo = BoxGeometry(32)
    boxes = torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.6, 0.1, 0.8, 0.3], [0.1, 0.1, 0.5, 0.5], [0.4, 0.4, 0.4, 0.4]],
                         requires_grad=True)
    out = geo(boxes)
    assert out.shape == (4, 32) and torch.isfinite(out).all()  # a point (zero size) is finite too
    assert (torch.cdist(out, out) + torch.eye(4) * 1e3).min() > 1e-4
    out.sum().backward()
    assert torch.isfinite(boxes.grad).all()


@pytest.mark.parametrize("tied", [False, True])
def test_loc_rows_are_smooth_in_k(tied):
    mean = torch.full((64,), 0.1)
    position = GridPosition(64, (7, 7)) if tied else None
    rows = loc_rows(100, mean, scale=0.5, position=position)
    assert rows.shape == (100, 64)
    assert (rows - mean).pow(2).mean(-1).sqrt().allclose(torch.full((100,), 0.5), atol=1e-4)
    cos = torch.nn.functional.cosine_similarity
    d = rows - mean
    near = cos(d[:-1], d[1:]).mean()
    far = cos(d[:25], d[75:]).mean()
    assert near > 0.95 and far < 0.3


# -- region crops -------------------------------------------------------------------------------------------


def _image() -> Image.Image:
    """200 x 100: a red 60 x 20 rectangle at x 20..80, y 40..60; a blue 10 x 30 bar at x 150..160, y 10..40."""
    a = np.full((100, 200, 3), 255, np.uint8)
    a[40:60, 20:80] = (255, 0, 0)
    a[10:40, 150:160] = (0, 0, 255)
    return Image.fromarray(a)


def test_crop_keeps_aspect_and_reads_the_original_pixels():
    img = _image()
    W, H = img.size
    crops = region_crops(img, [[20 / W, 40 / H, 80 / W, 60 / H], [150 / W, 10 / H, 160 / W, 40 / H]], (32, 128))
    assert crops.shape == (2, 32, 128, 4) and crops.dtype == np.uint8
    wide, tall = crops
    # 60 x 20 -> 96 x 32 (the canvas height binds), centred: columns 16..111
    valid = wide[..., 3] == 255
    assert valid.sum(0).nonzero()[0].tolist() == list(range(16, 112)) and valid[:, 16:112].all()
    assert (wide[2:-2, 18:110, :3] == (255, 0, 0)).all()  # the edges blend with the outside (antialiasing)
    assert (wide[~valid] == 0).all()
    # 10 x 30 -> 10.7 x 32 (aspect 1:3 kept), all blue
    cols = np.nonzero((tall[..., 3] == 255).any(0))[0]
    assert len(cols) in (10, 11) and (tall[2:-2, cols[2:-2], :3] == (0, 0, 255)).all()


def test_crop_of_a_point_and_of_a_box_at_the_border():
    img = _image()
    W, H = img.size
    point = region_crops(img, [[50 / W, 50 / H, 50 / W, 50 / H]], (32, 128), point_side=0.2)[0]
    v = point[..., 3] == 255
    assert v.sum(0).nonzero()[0].size == 32 and v.sum(1).nonzero()[0].size == 32  # a square: 20 x 20 px
    assert (point[16, 64, :3] == (255, 0, 0)).all()
    # a box half outside the image: the outside part is padding (validity 0), never an error
    edge = region_crops(img, [[0.0, 0.0, 0.0, 0.0]], (32, 128), point_side=0.2)[0]
    v = edge[..., 3] == 255
    assert 0 < v.sum() < 32 * 32 and not v[0].any() and v[-1, 64:80].all()


def test_crop_is_scale_free_and_batches_follow_their_image():
    """Normalized boxes: the same region of the image at another resolution gives nearly the same crop;
    `batch_region_crops` reads each box from its own image."""
    img = _image()
    big = img.resize((800, 400), Image.Resampling.NEAREST)
    box = [[0.1, 0.4, 0.4, 0.6]]
    a, b = region_crops(img, box)[0], region_crops(big, box)[0]
    assert (a[..., 3] == b[..., 3]).all()
    assert np.abs(a.astype(int) - b.astype(int))[a[..., 3] == 255].mean() < 8
    other = Image.new("RGB", (50, 50), (0, 255, 0))
    both = batch_region_crops([img, other], [[0.1, 0.4, 0.4, 0.6], [0.2, 0.2, 0.6, 0.6], [0.1, 0.4, 0.4, 0.6]],
                              [0, 1, 0])
    assert (both[0] == a).all() and (both[2] == a).all()
    assert (both[1][both[1][..., 3] == 255][:, :3] == (0, 255, 0)).all()  # a flat image: no edges


def test_region_source_caps_only_huge_images():
    small = Image.new("RGB", (640, 480))
    assert region_source(small) is small
    huge = region_source(Image.new("RGB", (6000, 1000)), max_side=2048)
    assert huge.size == (2048, 341)
