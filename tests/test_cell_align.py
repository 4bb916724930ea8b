"""The image-cell / word alignment (train.cell_align): which cells show an object, the targets of a batch, the loss
against a direct computation, and its place in adapt's objective."""

import json
import math

import pytest
import torch

from chatspot_edge.train.cell_align import cell_alignment_loss, cell_targets, cells_covered, word_token_ids


def test_cells_covered_centre_and_overlap():
    assert cells_covered((0.643, 0.575, 0.717, 0.708), (7, 7)) == [4 * 7 + 4]  # a small box: its centre's cell
    assert cells_covered((0.0, 0.0, 1.0, 1.0), (7, 7)) == list(range(49))
    # a box over the corner of four cells, a quarter in each: only the cell of its centre
    assert cells_covered((2 / 7 - 0.05, 2 / 7 - 0.05, 2 / 7 + 0.05, 2 / 7 + 0.05), (7, 7)) == [2 * 7 + 2]
    # two full cells side by side, and a sliver of a third that is under half of the smaller area
    assert cells_covered((1 / 7, 0.0, 3 / 7 + 0.01, 1 / 7), (7, 7)) == [1, 2]
    assert cells_covered((0.0, 0.0, 0.5, 0.5), (2, 4)) == [0, 1]  # a non-square grid: rows x columns


def test_cell_targets_of_a_batch(tiny):
    _, tok = tiny
    ids = word_token_ids(tok)
    assert len(set(ids.values())) == 16 and ids["red"] == tok(" red", add_special_tokens=False)["input_ids"][0]
    recs = [
        {"width": 200, "height": 100, "objects": [
            {"box": [0, 0, 50, 50], "shape": "circle", "color": "red", "size": "large"},
            {"box": [150, 50, 200, 100], "shape": "text", "color": "red", "text": "wind"}]},  # rendered text: no word
        {"width": 100, "height": 100, "objects": [
            {"box": [50, 50, 100, 100], "shape": "cross", "color": "red", "size": "large"}]},
        {"width": 100, "height": 100},  # no objects
    ]
    words, targets = cell_targets(recs, (2, 2), ids)
    assert sorted(words.tolist()) == words.tolist() and set(words.tolist()) == {ids["red"], ids["circle"], ids["cross"]}
    t = {int(w): targets[k] for k, w in enumerate(words)}
    assert t[ids["red"]].tolist() == [[True, False, False, False], [False, False, False, True], [False] * 4]
    assert t[ids["circle"]].tolist() == [[True, False, False, False], [False] * 4, [False] * 4]
    assert t[ids["cross"]].tolist() == [[False] * 4, [False, False, False, True], [False] * 4]
    w0, t0 = cell_targets(recs[2:], (2, 2), ids)
    assert w0.numel() == 0 and tuple(t0.shape) == (0, 1, 4)


def test_cell_alignment_loss_is_the_softmax_over_cells(tiny):
    """Against a direct computation: per word, -log of the softmax mass over all the batch's cells on the cells that
    show it; alike cells score log(cells / positives); a cell moved towards its word lowers the loss, towards
    another cell's word raises it; the gradient reaches the image embeddings (not the LLM blocks)."""
    model, _ = tiny
    emb = model.llm.get_input_embeddings().weight.detach()
    norm = model.llm.get_decoder().norm
    B, N = 2, 4
    words = torch.tensor([501, 502])
    targets = torch.zeros(2, B, N, dtype=torch.bool)
    targets[0, 0, 1] = targets[0, 1, 2] = True  # word 501 in two cells
    targets[1, 1, 3] = True
    base = torch.randn(1, 1, emb.shape[1], generator=torch.Generator().manual_seed(0)).repeat(B, N, 1)
    with torch.no_grad():
        alike = float(cell_alignment_loss(model, base, words, targets))
    assert alike == pytest.approx((math.log(8 / 2) + math.log(8 / 1)) / 2, abs=1e-4)

    x = torch.randn(B, N, emb.shape[1], generator=torch.Generator().manual_seed(1), requires_grad=True)
    got = cell_alignment_loss(model, x, words, targets)
    logits = norm(x.reshape(B * N, -1)) @ emb[words].T  # [8, 2]
    p = torch.softmax(logits, dim=0)
    want = -(torch.log(p[[1, 6], 0].sum()) + torch.log(p[7, 1])) / 2
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    model.zero_grad()
    got.backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.llm.model.layers.parameters())

    def towards(token: int, b: int, n: int) -> torch.Tensor:
        y = base.clone()
        y[b, n] += emb[token] / emb[token].norm() * base[0, 0].norm() * 3
        return y

    with torch.no_grad():
        assert float(cell_alignment_loss(model, towards(502, 1, 3), words, targets)) < alike
        assert float(cell_alignment_loss(model, towards(502, 0, 0), words, targets)) > alike
        zero = cell_alignment_loss(model, base, words[:0], targets[:0])
    assert float(zero) == 0.0


def test_adapt_objective_adds_the_cell_loss(tiny, tmp_path):
    """AnswerLoss(cell_align=w) = the answer loss + w x the cell loss; Batches collate its targets when asked;
    under train.added_rows (the tied table split) the loss reads the same head rows."""
    from chatspot_edge.data import generate, load_split
    from chatspot_edge.model.processor import Processor
    from chatspot_edge.train.adapt import AnswerLoss, Batches
    from chatspot_edge.train.added_rows import AddedRows

    model, tok = tiny
    data = tmp_path / "sw"
    generate(data, seed=5, n_train=6, n_test=2, workers=1)
    records = load_split(data, "train")
    proc = Processor(tok, model.config)
    plain = Batches(records, data, proc, model.config.vision.image_size, 0, 320, 0)
    cells = Batches(records, data, proc, model.config.vision.image_size, 0, 320, 0, word_token_ids(tok))
    a, b = plain.collate([0, 1, 2]), cells.collate([0, 1, 2])
    assert "cell_words" not in a and b["cell_words"].numel() > 0
    assert tuple(b["cell_targets"].shape) == (b["cell_words"].numel(), 3, model.config.vision.grid[0] * model.config.vision.grid[1])
    with torch.no_grad():
        features = model.vision(b["pixels"])
        base, parts0 = AnswerLoss()(model, features, b)
        total, parts = AnswerLoss(cell_align=0.5)(model, features, b)
        cell = cell_alignment_loss(model, model.project(features), b["cell_words"], b["cell_targets"])
        rows = AddedRows(model.llm, model.config.image_token_id)
        try:
            split = cell_alignment_loss(model, model.project(features), b["cell_words"], b["cell_targets"])
        finally:
            rows.merge()
    assert parts0 == {} and parts["cell"] == pytest.approx(float(cell), rel=1e-5)
    assert float(total) == pytest.approx(float(base) + 0.5 * float(cell), rel=1e-5)
    assert float(split) == pytest.approx(float(cell), rel=1e-5)
    with pytest.raises(ValueError, match="cell_words"):
        AnswerLoss(cell_align=1.0)(model, features, a)
    from chatspot_edge.errors import InputError

    with pytest.raises(InputError):
        AnswerLoss(cell_align=-1.0)
    assert json.dumps(AnswerLoss(cell_align=0.5).describe())  # goes into the checkpoint's provenance
