"""chatspot-loc-v1 (SPEC 1b) next to chatspot-text-v1: writing and parsing, the tokenizer (Hugging Face and
plain llama.cpp from the exported GGUF), the processor's conversion, the manifest, the runtime and the
evaluation's grounding score in both formats."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from PIL import Image

from chatspot_edge import referring as R
from chatspot_edge.errors import BundleError, InputError
from chatspot_edge.referring import LOC_FORMAT, TEXT, TEXT_FORMAT, ReferringFormat

N = 32
LOC = ReferringFormat(LOC_FORMAT, N)


def _bins(text: str) -> list[int]:
    return [int(k) for k in R._LOC_RE.findall(text)]


# -- writing --------------------------------------------------------------------------------------------------


def test_exact_loc_text():
    # 0.100 * 32 = 3.2 -> 3; 0.200 -> 6.4 -> 6; 0.450 -> 14.4 -> 14; 0.610 -> 19.52 -> 19
    assert R.box(10, 20, 45, 61, 100, 100).write(LOC) == "<box><loc_3><loc_6><loc_14><loc_19></box>"
    assert LOC.write(R.point(41.2, 53.3, 100, 100)) == "<box><loc_13><loc_17></box>"
    assert R.point(41.2, 53.3, 100, 100).write(TEXT) == "<box>[0.412,0.533]</box>"  # text-v1 as before
    poly = R.polygon([(10, 10), (150, 20), (80, 100)], 200, 100)
    assert poly.write(LOC) == "<box><loc_1><loc_3><loc_24><loc_6><loc_12><loc_31></box>"


def test_bins_at_zero_and_one():
    assert R.point(0, 0, 640, 480).write(LOC) == "<box><loc_0><loc_0></box>"
    assert R.point(640, 480, 640, 480).write(LOC) == f"<box><loc_{N - 1}><loc_{N - 1}></box>"  # c = 1 -> N-1, not N
    assert R.box(0, 0, 640, 480, 640, 480).write(LOC) == f"<box><loc_0><loc_0><loc_{N - 1}><loc_{N - 1}></box>"
    assert R.loc_bin(1.0, N) == N - 1 and R.loc_bin(0.0, N) == 0 and R.loc_bin(1 / N, N) == 1
    (p,) = LOC.parse(f"<box><loc_0><loc_{N - 1}></box>")
    assert p.coords == (0.5 / N, (N - 0.5) / N)  # bin k decodes to its centre


def test_same_bin_box_is_widened_not_refused():
    # x 0.100..0.105: both in bin 3 -> 3, 4; y spans bins 3..15 (untouched)
    assert R.box(100, 100, 105, 500, 1000, 1000).write(LOC) == "<box><loc_3><loc_3><loc_4><loc_16></box>"
    # both axes in one bin
    assert R.box(100, 100, 105, 103, 1000, 1000).write(LOC) == "<box><loc_3><loc_3><loc_4><loc_4></box>"
    # in the last bin the box grows towards the previous one
    assert R.box(990, 0, 1000, 500, 1000, 1000).write(LOC) == f"<box><loc_{N - 2}><loc_0><loc_{N - 1}><loc_16></box>"
    # thinner than 1/1000: text-v1 cannot write it, loc-v1 widens it
    thin = R.box(1000, 0, 1000.5, 10, 4000, 4000)
    with pytest.raises(InputError, match="1/1000"):
        thin.text()
    assert thin.write(LOC) == "<box><loc_8><loc_0><loc_9><loc_1></box>"
    # polygon whose points share one x bin: the right-most points move to the next bin
    poly = R.polygon([(100, 0), (101, 500), (102, 900)], 1000, 1000)
    assert _bins(poly.write(LOC))[0::2] == [3, 3, 4]


@st.composite
def image_and_box(draw):
    w, h = draw(st.integers(1, 8000)), draw(st.integers(1, 8000))
    x1, y1 = draw(st.floats(0, w * (1 - 1e-9))), draw(st.floats(0, h * (1 - 1e-9)))
    # down to a billionth of the side: far thinner than a bin (and than text-v1's 1/1000)
    x2, y2 = draw(st.floats(x1 + w * 1e-9, w)), draw(st.floats(y1 + h * 1e-9, h))
    return w, h, (x1, y1, x2, y2)


@given(image_and_box(), st.sampled_from([2, 7, 32, 100, 1000]))
def test_loc_box_round_trip(arg, bins):
    w, h, b = arg
    fmt = ReferringFormat(LOC_FORMAT, bins)
    region = R.box(*b, w, h)
    text = fmt.write(region)
    ks = _bins(text)
    assert text.startswith("<box><loc_") and text.endswith("></box>") and len(ks) == 4
    assert all(0 <= k < bins for k in ks) and ks[2] > ks[0] and ks[3] > ks[1]  # always an extent
    (parsed,) = fmt.parse("Where? " + text + " there.")
    assert parsed.kind == "box"
    for c, k, got in zip(region.coords, ks, parsed.coords):
        if k == R.loc_bin(c, bins):  # not widened: the bin of the coordinate, decoded to its centre
            assert abs(got - c) <= 0.5 / bins + 1e-12
        else:  # widened by one bin
            assert abs(k - R.loc_bin(c, bins)) == 1 and abs(got - c) <= 1.5 / bins + 1e-12


@given(st.integers(1, 5000), st.integers(1, 5000), st.floats(0, 1), st.floats(0, 1))
def test_loc_point_round_trip(w, h, fx, fy):
    (parsed,) = LOC.parse(R.point(fx * w, fy * h, w, h).write(LOC))
    assert parsed.kind == "point"
    assert abs(parsed.coords[0] - fx) <= 0.5 / N + 1e-9 and abs(parsed.coords[1] - fy) <= 0.5 / N + 1e-9


@pytest.mark.parametrize("kind,values", [
    ("box", (50, 10, 40, 20)), ("box", (10, 10, 10, 20)), ("box", (-1, 0, 10, 10)), ("box", (0, 0, 101, 10)),
    ("box", (math.nan, 0, 10, 10)), ("point", (math.inf, 1)), ("point", (1, 2, 3)),
    ("polygon", (1, 1, 2, 2)), ("polygon", (1, 1, 1, 5, 1, 3)), ("polygon", (1, 1, 2, 2, 3)),
])
def test_invalid_regions_refused_in_both_formats(kind, values):
    """One validation: the constructors refuse, whichever format would write the region."""
    with pytest.raises(InputError):
        R.from_pixels(kind, values, 100, 100).write(LOC)
    with pytest.raises(InputError):
        R.from_pixels(kind, values, 100, 100).write(TEXT)


# -- parsing and converting -----------------------------------------------------------------------------------


def test_parse_either_format_in_order_and_skip_malformed():
    text = ("a <box>[0.100,0.200]</box> b <box><loc_1><loc_2><loc_3><loc_4></box> c <box><loc_1></box> "
            f"d <box><loc_{N}><loc_0></box> e <box><loc_01><loc_2></box> f <box><loc_5><loc_6></box>")
    regions = R.parse_regions(text, N)
    assert [r.kind for r in regions] == ["point", "box", "point"]
    assert regions[1].coords == tuple((k + 0.5) / N for k in (1, 2, 3, 4))
    assert R.parse_regions(text) == [regions[0]]  # without the bins, loc regions cannot be decoded
    assert [s[2] is None for s in R.region_spans(text, N)] == [False, False, True, True, False]


def test_convert_between_formats():
    q = "What is in <box>[0.100,0.200,0.450,0.610]</box> next to <box>[0.412,0.533]</box>?"
    loc_q = LOC.convert(q)
    assert loc_q == "What is in <box><loc_3><loc_6><loc_14><loc_19></box> next to <box><loc_13><loc_17></box>?"
    assert LOC.convert(loc_q) == loc_q  # regions already in the format stay as written
    assert TEXT.convert(q) == q
    assert ReferringFormat(LOC_FORMAT, N).convert("no regions here") == "no regions here"
    # loc -> text needs the bins: a text-v1 model cannot read a loc region, so it stays as written
    assert TEXT.convert(loc_q) == loc_q
    with pytest.raises(InputError):  # a region that is not valid as written is refused, not converted
        LOC.convert("<box>[0.500,0.500,0.400,0.600]</box>")
    with pytest.raises(InputError):
        LOC.convert("<box>[1.500,0.500]</box>")


@pytest.mark.parametrize("name,bins", [(LOC_FORMAT, 1), (LOC_FORMAT, None), (LOC_FORMAT, 2.5), (TEXT_FORMAT, 32),
                                       ("chatspot-loc-v2", 32)])
def test_bad_formats(name, bins):
    with pytest.raises(InputError):
        ReferringFormat(name, bins)


def test_format_option():
    assert R.format_option(None, None) is None
    assert R.format_option("loc", None) == ReferringFormat(LOC_FORMAT, R.DEFAULT_BINS)
    assert R.format_option("loc", 16) == R.format_option(None, 16) == ReferringFormat(LOC_FORMAT, 16)
    assert R.format_option("text", None) == TEXT == R.format_option(TEXT_FORMAT, None)
    with pytest.raises(InputError):
        R.format_option("text", 16)
    assert ReferringFormat.from_dict({"format": LOC_FORMAT, "bins": 16, "region_token": True}).to_dict() == \
        {"format": LOC_FORMAT, "bins": 16}
    assert ReferringFormat.from_dict(None) == TEXT


# -- tokenizer, config, embedding hook ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_loc():
    from chatspot_edge.model.presets import build_preset

    return build_preset("tiny", seed=0, referring=LOC)


def test_tokenizer_has_one_id_per_loc_token(tiny_loc):
    model, tok = tiny_loc
    first = model.config.referring["loc_token_id"]
    assert model.config.referring == {"format": LOC_FORMAT, "bins": N, "loc_token_id": first}
    ids = tok(" ".join(R.loc_tokens(N)), add_special_tokens=False)["input_ids"]
    assert [i for i in ids if i >= first] == list(range(first, first + N))
    text = "<box><loc_3><loc_6><loc_14><loc_19></box>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [model.config.box_start_id, first + 3, first + 6, first + 14, first + 19, model.config.box_end_id]
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids, skip_special_tokens=True) == "<loc_3><loc_6><loc_14><loc_19>"  # text, not markup
    assert model.llm.get_input_embeddings().weight.shape[0] == len(tok) == first + N
    assert model.config.text["vocab_size"] == len(tok)


def test_checkpoint_keeps_the_format(tiny_loc, tmp_path):
    from chatspot_edge.model.checkpoint import load_checkpoint, save_checkpoint
    from chatspot_edge.model.loc_tokens import set_referring

    save_checkpoint(*tiny_loc, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["referring"]["format"] == LOC_FORMAT and cfg["referring"]["bins"] == N
    model, tok = load_checkpoint(tmp_path / "ck")
    assert model.config.referring_format == LOC and len(tok) == len(tiny_loc[1])
    assert torch.equal(model.llm.get_input_embeddings().weight, tiny_loc[0].llm.get_input_embeddings().weight)
    set_referring(model, tok, LOC)  # same format: nothing to do
    with pytest.raises(InputError, match="cannot switch"):
        set_referring(model, tok, ReferringFormat(LOC_FORMAT, 16))


def test_text_model_learns_loc_format():
    """A text-v1 model (e.g. a pretrained checkpoint) gets the loc tokens: base rows unchanged, new rows at the
    mean embedding (what the other added tokens start from)."""
    from chatspot_edge.model.loc_tokens import loc_token_ids, set_referring
    from chatspot_edge.model.presets import build_preset

    model, tok = build_preset("tiny", seed=0)
    before = model.llm.get_input_embeddings().weight.detach().clone()
    set_referring(model, tok, LOC)
    after = model.llm.get_input_embeddings().weight
    assert torch.equal(after[:before.shape[0]], before)
    ids = loc_token_ids(model)
    assert torch.allclose(after[ids.start:ids.stop], before.mean(0).expand(N, -1), atol=1e-6)
    assert model.llm.get_output_embeddings().weight is after  # tied head follows


def test_init_loc_embeddings_hook():
    from chatspot_edge.model.loc_tokens import bin_centres, init_loc_embeddings, loc_token_ids
    from chatspot_edge.model.presets import build_preset

    model, _ = build_preset("tiny", seed=0, referring=ReferringFormat(LOC_FORMAT, 8))
    d = model.config.hidden_size
    seen = {}

    def fn(k: torch.Tensor, n: int) -> torch.Tensor:  # e.g. a sinusoid of the bin centre
        seen["k"], seen["n"] = k.tolist(), n
        c = bin_centres(n)[k]
        return torch.stack([torch.sin(c * (i + 1)) for i in range(d)], dim=1)

    init_loc_embeddings(model, fn)
    assert seen == {"k": list(range(8)), "n": 8}
    ids = loc_token_ids(model)
    rows = model.llm.get_input_embeddings().weight[ids.start:ids.stop]
    assert torch.allclose(rows[5, 0], torch.sin(torch.tensor(5.5 / 8)))
    with pytest.raises(ValueError):
        init_loc_embeddings(model, lambda k, n: torch.zeros(n, d + 1))
    text_model, _ = build_preset("tiny", seed=0)
    with pytest.raises(InputError):
        init_loc_embeddings(text_model, fn)


# -- processor: one text-v1 dataset trains either format -----------------------------------------------------


def test_processor_converts_questions_and_answers(tiny_loc):
    from chatspot_edge.model.chatspot import IGNORE_INDEX
    from chatspot_edge.model.presets import build_preset
    from chatspot_edge.model.processor import Processor

    model, tok = tiny_loc
    first = model.config.referring["loc_token_id"]
    conv = [{"from": "human", "value": "<image>\nWhat is in <box>[0.100,0.200,0.450,0.610]</box>?"},
            {"from": "gpt", "value": "It is next to <box>[0.500,0.500,0.750,0.900]</box>."},
            {"from": "human", "value": "Where is the red circle?"},
            {"from": "gpt", "value": "<box>[0.000,0.031,0.999,1.000]</box>"}]
    proc = Processor(tok, model.config)
    enc = proc.encode_conversation(conv)
    answer = [i for i, lab in zip(enc.ids, enc.labels) if lab != IGNORE_INDEX]
    prompt = [i for i, lab in zip(enc.ids, enc.labels) if lab == IGNORE_INDEX]
    assert [i - first for i in answer if i >= first] == [16, 16, 24, 28, 0, 0, 31, 31]  # answers: loc tokens
    assert [i - first for i in prompt if i >= first] == [3, 6, 14, 19]  # the question's region too
    assert "[" not in proc.decode(enc.ids)
    assert enc.boxes == [tuple((k + 0.5) / N for k in (3, 6, 14, 19))]  # the region as the model reads it
    assert proc.encode_prompt(conv[0]["value"]).ids == enc.ids[:len(proc.encode_prompt(conv[0]["value"]).ids)]
    # the same dataset for a text-v1 model: untouched
    text_model, text_tok = build_preset("tiny", seed=0)
    tp = Processor(text_tok, text_model.config)
    assert "<box>[0.500,0.500,0.750,0.900]</box>" in tp.decode(tp.encode_conversation(conv).ids)


# -- GGUF: plain llama.cpp tokenizes each <loc_k> as one token ----------------------------------------------------


@pytest.fixture(scope="module")
def loc_gguf(tiny_loc, tmp_path_factory):
    from chatspot_edge.export.gguf_writer import chatml_template, write_llm_gguf

    model, tok = tiny_loc
    path = tmp_path_factory.mktemp("loc-gguf") / "llm-f32.gguf"
    write_llm_gguf(model.llm, tok, path, "f32", chat_template=chatml_template(model.config.system_prompt))
    return path


@pytest.mark.llama
def test_plain_llama_cpp_tokenizes_loc_tokens_as_single_tokens(tiny_loc, loc_gguf):
    import gguf
    import llama_cpp

    model, tok = tiny_loc
    first = model.config.referring["loc_token_id"]
    reader = gguf.GGUFReader(str(loc_gguf))
    types = reader.get_field(gguf.Keys.Tokenizer.TOKEN_TYPE).contents()
    tokens = reader.get_field(gguf.Keys.Tokenizer.LIST).contents()
    assert tokens[first:first + N] == list(R.loc_tokens(N))
    assert {types[i] for i in range(first, first + N)} == {int(gguf.TokenType.USER_DEFINED)}
    assert types[model.config.box_start_id] == int(gguf.TokenType.CONTROL)  # <box> as before
    llm = llama_cpp.Llama(model_path=str(loc_gguf), vocab_only=True, verbose=False)  # llama.cpp's own tokenizer
    for k in range(N):
        t = R.loc_token(k).encode()
        for special in (False, True):  # USER_DEFINED: one token whether special text is parsed or not
            assert llm.tokenize(t, add_bos=False, special=special) == [first + k]
        assert llm.detokenize([first + k]) == t  # rendered as its text
    q = "What is in <box><loc_3><loc_6><loc_14><loc_19></box> or <box><loc_0><loc_31></box>? x<loc_7>y 0.5"
    assert llm.tokenize(q.encode(), add_bos=False, special=True) == tok(q, add_special_tokens=False)["input_ids"]
    assert llm.detokenize(llm.tokenize(q.encode(), add_bos=False, special=True), special=True) == q.encode()
    assert len(llm.tokenize(b"<loc_32>", add_bos=False, special=True)) > 1  # no bin N


# -- bundle, runtime, evaluation ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spread_loc():
    """A tiny loc model with weights large enough that greedy answers vary (and can contain <loc_k>)."""
    from chatspot_edge.model.presets import build_preset

    model, tok = build_preset("tiny", seed=1, referring=LOC)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else 0.35))
    return model, tok


@pytest.fixture(scope="module")
def loc_bundle(spread_loc, tmp_path_factory):
    from chatspot_edge.export import export_bundle
    from chatspot_edge.model.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("loc-bundle")
    save_checkpoint(*spread_loc, d / "ck")
    return export_bundle(d / "ck", d / "bundle", llm_dtype="f32")


@pytest.mark.llama
def test_manifest_records_format_and_bins(loc_bundle, spread_loc, tmp_path):
    from chatspot_edge.export import verify_bundle

    model, _ = spread_loc
    m = verify_bundle(loc_bundle)
    assert m["referring"]["format"] == LOC_FORMAT and m["referring"]["bins"] == N and m["referring"]["region_token"]
    assert m["special_tokens"]["loc_0"] == model.config.referring["loc_token_id"]
    for i, bad in enumerate(({"format": LOC_FORMAT}, {"format": LOC_FORMAT, "bins": 1},
                             {"format": "chatspot-loc-v9", "bins": N}, {"format": TEXT_FORMAT, "bins": N})):
        b = shutil.copytree(loc_bundle, tmp_path / f"b{i}")
        mm = json.loads((b / "manifest.json").read_text())
        mm["referring"] = {**{k: v for k, v in mm["referring"].items() if k not in ("format", "bins")}, **bad}
        (b / "manifest.json").write_text(json.dumps(mm))
        with pytest.raises(BundleError, match="referring"):
            verify_bundle(b)


def _image(seed=0, size=(200, 120)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _torch_answer(model, tok, img, question, max_new_tokens=10):
    from chatspot_edge.model.preprocess import resize_pixels
    from chatspot_edge.model.processor import Processor

    proc = Processor(tok, model.config)
    enc = proc.encode_prompt(question)
    px = torch.from_numpy(resize_pixels(img, model.config.vision.image_size))[None]
    crops = None
    if enc.boxes and model.config.region_crop == "original":  # crops of the original image, as the runtime reads
        from chatspot_edge.model.preprocess import region_crops

        crops = torch.from_numpy(region_crops(img, enc.boxes, model.config.region_crop_size))
    ids = model.generate([enc.ids], px, [enc.boxes], max_new_tokens=max_new_tokens, stop_ids=proc.stop_ids,
                         crops=crops)[0]
    return proc.decode(ids)


@pytest.mark.llama
def test_runtime_writes_the_bundles_format_and_matches_torch(loc_bundle, spread_loc):
    from chatspot_edge.runtime import Engine

    model, tok = spread_loc
    engine = Engine.load(loc_bundle, threads=2, f32_kv=True, max_sessions=2)
    assert engine.referring == LOC
    img = _image(0)  # 200 x 120
    s = engine.session(img)
    assert s.region_text(box=(20, 24, 90, 73)) == "<box><loc_3><loc_6><loc_14><loc_19></box>"
    assert s.region_text(point=(200, 0)) == "<box><loc_31><loc_0></box>"
    answers = set()
    for q, region in [("What is this?", dict(box=(20, 24, 90, 73))), ("Color?", dict(point=(50, 60))),
                      ("Describe {region}.", dict(polygon=[(10, 10), (150, 20), (80, 100)])), ("Where is it?", {})]:
        ans = s.ask(q, max_tokens=10, stream=False, **region)
        text = s.region_text(**region)
        full = q if text is None else (q.replace("{region}", text) if "{region}" in q else f"{text} {q}")
        assert ans == _torch_answer(model, tok, img, full), q
        answers.add(ans)
    assert len(answers) > 2
    # a question written in text-v1 (a dataset's) is converted by the runtime, as by the torch processor
    q = "What is in <box>[0.100,0.200,0.450,0.610]</box>?"
    assert s.ask_text(q, max_tokens=10) == _torch_answer(model, tok, img, q) == \
        s.ask_text(LOC.convert(q), max_tokens=10)
    with pytest.raises(InputError):
        s.ask_text("What is in <box>[0.500,0.200,0.450,0.610]</box>?")
    engine.close()


@pytest.mark.llama
def test_runtime_refuses_a_manifest_that_lies_about_the_format(tmp_path):
    """A text-v1 GGUF has no <loc_k> tokens: a manifest saying chatspot-loc-v1 is refused at load."""
    from chatspot_edge.export import export_bundle
    from chatspot_edge.export.manifest import write_manifest
    from chatspot_edge.model.checkpoint import save_checkpoint
    from chatspot_edge.model.presets import build_preset
    from chatspot_edge.runtime import Engine

    save_checkpoint(*build_preset("tiny", seed=0), tmp_path / "ck")
    b = export_bundle(tmp_path / "ck", tmp_path / "bundle", llm_dtype="f32")
    m = json.loads((b / "manifest.json").read_text())
    m["referring"].update(format=LOC_FORMAT, bins=N)
    m.pop("files")
    write_manifest(b, m)
    with pytest.raises(BundleError, match="<loc_0>"):
        Engine.load(b)


# -- evaluation: grounding answers in either format -------------------------------------------------------------


def test_grounding_hit_in_both_formats():
    from chatspot_edge.evaluation.protocol import grounding_hit

    # text-v1, 1000 x 1000 image, target (100, 100, 300, 300)
    tgt = (100, 100, 300, 300)
    assert grounding_hit("<box>[0.166,0.100,0.366,0.300]</box>", tgt, 1000, 1000)  # IoU 26800 / 53200 = 0.504
    assert not grounding_hit("<box>[0.168,0.100,0.368,0.300]</box>", tgt, 1000, 1000)  # 26400 / 53600 = 0.493
    # loc-v1, 32 bins on a 320 x 320 image (10 px each, decoded to bin centres), target (100, 100, 200, 200)
    tgt = (100, 100, 200, 200)
    above = "It is at <box><loc_12><loc_10><loc_22><loc_20></box>."  # 125..225 x 105..205: 7125 / 12875 = 0.553
    below = "<box><loc_13><loc_10><loc_22><loc_20></box>"  # 135..225 x 105..205: 6175 / 12825 = 0.481
    assert grounding_hit(above, tgt, 320, 320, bins=N)
    assert not grounding_hit(below, tgt, 320, 320, bins=N)
    assert not grounding_hit(above, tgt, 320, 320)  # a loc answer needs the model's bins
    assert not grounding_hit("<box><loc_12><loc_10></box>", tgt, 320, 320, bins=N)  # a point is no box
    assert not grounding_hit("<box><loc_12><loc_10><loc_40><loc_20></box>", tgt, 320, 320, bins=N)  # no bin 40
    # the first box counts, in either format
    assert grounding_hit(above + " or <box>[0.0,0.0,0.1,0.1]</box>", tgt, 320, 320, bins=N)
    assert not grounding_hit("<box>[0.0,0.0,0.1,0.1]</box> or " + above, tgt, 320, 320, bins=N)


class _Fixed:
    """An answerer with fixed answers, speaking `referring`."""

    def __init__(self, answers, referring=None):
        self.answers = answers
        if referring is not None:
            self.referring = referring

    def answer(self, requests):
        return [self.answers[r.image_key] for r in requests]


def test_evaluate_scores_loc_answers_with_the_answerers_bins():
    from chatspot_edge.evaluation import evaluate

    def record(i, box):
        return {"id": f"r{i}", "image": "x.png", "width": 320, "height": 320, "task": "grounding",
                "objects": [{"box": box, "shape": "circle", "color": "red"}], "target": {"object": 0},
                "conversations": [{"from": "human", "value": "<image>\nWhere is the red circle?"},
                                  {"from": "gpt", "value": R.box(*box, 320, 320).text()}]}

    records = [record(0, [100, 100, 200, 200]), record(1, [100, 100, 200, 200]), record(2, [0, 0, 100, 100])]
    answers = {"r0": "<box><loc_12><loc_10><loc_22><loc_20></box>",  # IoU 0.553
               "r1": "<box><loc_13><loc_10><loc_22><loc_20></box>",  # IoU 0.481
               "r2": "<box>[0.000,0.000,0.310,0.310]</box>"}  # text-v1 answer of the same model: IoU 0.984
    loc = evaluate(_Fixed(answers, LOC), records, lambda r: None)
    assert loc["metrics"]["grounding"] == pytest.approx(2 / 3)
    text = evaluate(_Fixed(answers), records, lambda r: None)  # a text-v1 answerer: loc answers do not parse
    assert text["metrics"]["grounding"] == pytest.approx(1 / 3)


@pytest.mark.llama
def test_bundle_and_checkpoint_answerers_speak_the_models_format(loc_bundle, spread_loc):
    from chatspot_edge.evaluation import make_answerer
    from chatspot_edge.evaluation.answerers import TorchAnswerer

    assert make_answerer(loc_bundle).referring == LOC
    assert TorchAnswerer(*spread_loc).referring == LOC


def test_loc_bins_tool_measures_quantization():
    from chatspot_edge.benchmarks.loc_bins import measure

    objects = [{"box": [17 + 40 * i, 33 + 20 * i, 90 + 50 * i, 101 + 30 * i]} for i in range(5)]
    records = [{"width": 640, "height": 480, "task": "grounding", "target": {"object": j}, "objects": objects}
               for j in range(2)]
    res = measure(records, [4, 32, 1000])
    assert res["counts"] == {"objects": 10, "grounding_targets": 2, "ocr_regions": 0}
    coarse, mid, fine = (res["bins"][n]["objects"] for n in (4, 32, 1000))
    assert coarse["mean_iou"] < mid["mean_iou"] < fine["mean_iou"] and fine["min_iou"] > 0.97
    assert res["bins"][32]["ocr_regions"]["mean_iou"] is None
    assert 0 <= res["bins"][32]["objects_off_0.02_iou_ge_0.5"] <= 1
