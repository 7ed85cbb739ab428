"""Your own text for sentence encoders (``hf:<dir>`` without a task, ``minilm``): .txt / .jsonl ``calib`` and
``data`` files, how they are drawn and refused; sentence-transformers heads read from ``modules.json``
(pooling modes, Dense, Normalize), checked against hand computations and through the ONNX export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import run

from bayesq_onnx.cli import main
from bayesq_onnx.config import CompileConfig
from bayesq_onnx.errors import UserError
from bayesq_onnx.models import load_model
from bayesq_onnx.models.base import SourceOptions
from bayesq_onnx.models.minilm import SentenceEmbedder, model_dir
from bayesq_onnx.models.sentence_transformers import read_head
from bayesq_onnx.models.text import pydoc_sentences, read_texts
from bayesq_onnx.pipeline import compile_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ("river mountain quiet green house music city light stone window garden paper winter morning story "
         "friend ocean bridge forest market yellow small old bright").split()


def _texts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct lowercase sentences the uncased MiniLM tokenizer decodes back exactly."""
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        out[" ".join(rng.choice(WORDS, size=int(rng.integers(3, 10))))] = None
    return list(out)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, tok) -> Path:
    """A 2-layer BERT encoder with the MiniLM tokenizer, as save_pretrained writes it (no modules.json)."""
    from transformers import BertConfig, BertModel

    directory = tmp_path_factory.mktemp("enc")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=160)
    BertModel(config).eval().save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def _st_dir(encoder_dir: Path, target: Path, modules: list[tuple[str, str]], pooling: dict | None = None) -> Path:
    """A copy of ``encoder_dir`` with a modules.json of ``(type, folder)`` entries (after the Transformer) and
    the Pooling config ``pooling``."""
    target.mkdir()
    for f in encoder_dir.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    listing = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    for i, (kind, folder) in enumerate(modules, 1):
        listing.append({"idx": i, "name": str(i), "path": folder, "type": f"sentence_transformers.models.{kind}"})
        if kind == "Pooling":
            (target / folder).mkdir()
            (target / folder / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    (target / "modules.json").write_text(json.dumps(listing))
    return target


def _decoded(batches, tok) -> list[str]:
    """The texts a bundle's tokenized batches hold."""
    return [tok.decode(ids[mask.astype(bool)], skip_special_tokens=True)
            for b in batches for ids, mask in zip(b["input_ids"], b["attention_mask"])]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _options(**kw) -> SourceOptions:
    kw.setdefault("calib_size", 8)
    kw.setdefault("eval_size", 16)
    return SourceOptions(latency_batch=2, latency_seq=16, **kw)


# ---- drawing calibration and evaluation texts ---------------------------------------------------------

def test_data_alone_gives_disjoint_draws_from_the_file(encoder_dir, tok, tmp_path):
    texts = _texts(40)
    data = _write(tmp_path / "mine.txt", [texts[0], "", *texts, "   ", texts[3]])  # blanks and repeats
    bundle = load_model(f"hf:{encoder_dir}", _options(data=data))
    calib, evaluation = _decoded(bundle.calibration, tok), _decoded(bundle.evaluation, tok)
    assert len(calib) == 8 and len(evaluation) == 16 and len(set(calib + evaluation)) == 24
    assert set(calib) <= set(texts) and set(evaluation) <= set(texts)
    info = bundle.info
    assert info["calibration_items"] == 8 and info["evaluation_items"] == 16 and "data_note" not in info
    assert str(data) in info["data"] and "40 texts, 2 repeated line(s) dropped" in info["data"]
    assert "disjoint" in info["data"] and info["pooling"] == "mean, normalized (default: no modules.json)"

    same = load_model(f"hf:{encoder_dir}", _options(data=data))
    other = load_model(f"hf:{encoder_dir}", _options(data=data, seed=1))
    assert _decoded(same.calibration, tok) == calib and _decoded(same.evaluation, tok) == evaluation
    # the compile seed moves the calibration sample, never the held-out evaluation texts
    assert set(_decoded(other.calibration, tok)) != set(calib) and _decoded(other.evaluation, tok) == evaluation
    assert not set(_decoded(other.calibration, tok)) & set(evaluation)


def test_jsonl_calib_and_txt_data_each_from_its_file(encoder_dir, tok, tmp_path):
    calib_texts, eval_texts = _texts(12, seed=1), _texts(30, seed=2)
    lines = [json.dumps({"text": t, "id": i}) if i % 2 else json.dumps(t) for i, t in enumerate(calib_texts)]
    calib = _write(tmp_path / "calib.jsonl", lines[:5] + [""] + lines[5:])
    data = _write(tmp_path / "eval.txt", eval_texts)
    bundle = load_model(f"hf:{encoder_dir}", _options(calib=calib, data=data, calib_size=20))
    assert sorted(_decoded(bundle.calibration, tok)) == sorted(calib_texts)  # all 12: fewer than asked
    evaluation = _decoded(bundle.evaluation, tok)
    assert len(evaluation) == 16 and set(evaluation) <= set(eval_texts)
    info = bundle.info
    assert info["calibration_items"] == 12 and info["evaluation_items"] == 16
    assert info["data"].startswith(f"calibration: {calib} (12 texts); evaluation: {data} (30 texts)")
    assert info["data_note"] == f"{calib} holds 12 texts, fewer than the 20 calibration asked: all are used"


def test_calib_alone_evaluates_on_the_corpus(encoder_dir, tok, tmp_path):
    texts = _texts(10)
    calib = _write(tmp_path / "c.txt", texts)
    bundle = load_model(f"hf:{encoder_dir}", _options(calib=calib))
    calibration = _decoded(bundle.calibration, tok)
    assert len(calibration) == 8 and set(calibration) <= set(texts)
    assert bundle.info["evaluation_items"] == 16 and not set(_decoded(bundle.evaluation, tok)) & set(texts)
    assert bundle.info["data"] == (f"calibration: {calib} (10 texts); evaluation: pydoc_data.topics sentences "
                                   f"({len(pydoc_sentences())} in corpus)")
    other = load_model(f"hf:{encoder_dir}", _options(calib=calib, seed=1))
    assert set(_decoded(other.calibration, tok)) != set(calibration)  # the seed draws the calibration sample
    assert _decoded(other.evaluation, tok) == _decoded(bundle.evaluation, tok)


def test_a_short_file_is_split_in_proportion(encoder_dir, tok, tmp_path):
    data = _write(tmp_path / "few.txt", _texts(10))
    bundle = load_model(f"hf:{encoder_dir}", _options(data=data, calib_size=256, eval_size=1024))
    assert bundle.info["calibration_items"] == 2 and bundle.info["evaluation_items"] == 8  # 10 · 256/1280
    assert bundle.info["data_note"].startswith(f"{data} holds 10 texts, fewer than the 256 calibration + 1024")
    assert not set(_decoded(bundle.calibration, tok)) & set(_decoded(bundle.evaluation, tok))


def test_minilm_takes_your_own_text(tok, tmp_path):
    texts = _texts(30)
    bundle = load_model("minilm", _options(data=_write(tmp_path / "mine.jsonl", [json.dumps(t) for t in texts])))
    assert set(_decoded(bundle.calibration + bundle.evaluation, tok)) <= set(texts)
    assert bundle.info["calibration_items"] == 8 and "mine.jsonl (30 texts)" in bundle.info["data"]
    assert bundle.info["pooling"] == "mean, normalized (modules.json)"


def test_reading_txt_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_bytes("\ufeff  first text \r\n\r\nsecond\tone\n  \nfirst text\n".encode())
    assert read_texts(txt, "data").texts == ["first text", "second\tone"]  # BOM, CRLF, blanks, a repeat
    assert read_texts(txt, "data").repeats == 1
    jsonl = tmp_path / "a.JSONL"
    jsonl.write_text('{"text": " one ", "label": 3}\n\n"two"\n{"text": "  "}\n"line\\nbreak"\n')
    assert read_texts(jsonl, "calib").texts == ["one", "two", "line\nbreak"]


# ---- refused files --------------------------------------------------------------------------------------

BAD_FILES = {
    "missing": (None, "no such file"),
    "empty.txt": ("\n  \n\n", "holds no texts"),
    "bad.jsonl": ('{"text": "fine"}\n\n{"text": oops}\n', "line 3: not valid JSON"),
    "notext.jsonl": ('"fine"\n{"body": "x"}\n', 'line 2: no text; each line must be a JSON object with a "text"'),
    "number.jsonl": ("7\n", "line 1: no text"),
    "texts.csv": ("a,b\n", "must be a .txt file (one text per non-empty line) or a .jsonl file"),
    "latin1.txt": (b"ok\nna\xefve\n", "line 2: not UTF-8 text"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
@pytest.mark.parametrize("field", ["calib", "data"])
def test_bad_text_files_are_one_line_errors(tmp_path, name, field):
    content, needle = BAD_FILES[name]
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as err:
        read_texts(path, field)
    message = str(err.value)
    assert needle in message and str(path) in message and "\n" not in message
    assert message.startswith(f"`{field}` ") and "--" not in message


def test_too_few_texts(encoder_dir, tmp_path):
    two = _write(tmp_path / "two.txt", ["one text", "another text"])
    with pytest.raises(UserError, match=r"two.txt holds 2 text\(s\); disjoint calibration and evaluation draws need "
                                        "at least 3"):
        load_model(f"hf:{encoder_dir}", _options(data=two))
    one = _write(tmp_path / "one.txt", ["just one"])
    with pytest.raises(UserError, match="one.txt holds 1 text; evaluation compares at least 2"):
        load_model(f"hf:{encoder_dir}", _options(calib=two, data=one))
    with pytest.raises(UserError, match="is an encoder: `data` must be a .txt or .jsonl file of texts, not a dir"):
        load_model(f"hf:{encoder_dir}", _options(data=tmp_path))
    with pytest.raises(UserError, match=f"`calib` must be a .txt file .* {tmp_path} is a directory"):
        load_model("minilm", _options(calib=tmp_path))


def test_cli_bad_calib_file_exits_2_with_one_line(encoder_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compile", f"hf:{encoder_dir}", "--calib", str(bad), "--out", str(out)],
                           catch_exceptions=False)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and f"{bad} line 2: not valid JSON" in lines[-1], r.stderr
    assert all("execution provider" in line for line in lines[:-1]) and len(lines) <= 2, r.stderr
    assert "Traceback" not in r.output and not out.exists()


# ---- sentence-transformers heads ------------------------------------------------------------------------

def _batch(tok, texts: list[str], side: str = "right") -> dict[str, torch.Tensor]:
    tok.padding_side = side
    try:
        enc = tok(texts, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = "right"
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _hidden(encoder_dir: Path, batch) -> torch.Tensor:
    from transformers import AutoModel

    with torch.no_grad():
        return AutoModel.from_pretrained(encoder_dir).eval()(**batch).last_hidden_state


def test_modules_json_cls_pooling_without_normalize(encoder_dir, tok, tmp_path):
    st = _st_dir(encoder_dir, tmp_path / "st", [("Pooling", "1_Pooling")],
                 {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    data = _write(tmp_path / "d.txt", _texts(20))
    bundle = load_model(f"hf:{st}", _options(data=data))
    assert bundle.info["pooling"] == "cls (modules.json)"
    batch = _batch(tok, _texts(5, seed=3))
    with torch.no_grad():
        got = bundle.module(**batch)
    torch.testing.assert_close(got, _hidden(encoder_dir, batch)[:, 0], atol=1e-5, rtol=0)
    assert not torch.allclose(got.norm(dim=-1), torch.ones(5))  # not normalized


def test_default_head_is_mean_pooled_and_normalized(encoder_dir, tok, tmp_path):
    bundle = load_model(f"hf:{encoder_dir}", _options(data=_write(tmp_path / "d.txt", _texts(20))))
    batch = _batch(tok, _texts(5, seed=3))
    hidden, mask = _hidden(encoder_dir, batch), batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    with torch.no_grad():
        got = bundle.module(**batch)
    torch.testing.assert_close(got, mean / mean.norm(dim=-1, keepdim=True), atol=1e-5, rtol=0)


def test_bundled_minilm_head_is_mean_and_normalize():
    head = read_head(model_dir(), "minilm")
    assert head.pooling == ("mean",) and head.normalize and head.dense == () and head.origin == "modules.json"


def _by_hand(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One pooling mode, item by item over the attended positions."""
    rows = []
    for h, m in zip(hidden, mask.bool()):
        idx = torch.nonzero(m).flatten()
        rows.append({"cls": h[0], "max": h[idx].max(0).values, "mean": h[idx].mean(0),
                     "mean_sqrt_len": h[idx].sum(0) / len(idx) ** 0.5,
                     "weightedmean": ((idx + 1).unsqueeze(-1) * h[idx]).sum(0) / (idx + 1).sum(),
                     "lasttoken": h[idx[-1]]}[mode])
    return torch.stack(rows)


def test_every_pooling_mode_dense_and_normalize_match_by_hand_and_through_onnx(encoder_dir, tok, tmp_path):
    """All six modes on (concatenated in sentence-transformers' order), a Tanh Dense layer, then Normalize:
    equal to the item-by-item computation, left-padded too, and after the ONNX export (other batch shape)."""
    from safetensors.torch import save_file

    from bayesq_onnx.export import fp32_model

    keys = ["cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken"]
    st = _st_dir(encoder_dir, tmp_path / "st", [("Pooling", "1_Pooling"), ("Dense", "2_Dense"),
                                                ("Normalize", "3_Normalize")],
                 {f"pooling_mode_{k}": True for k in keys})
    (st / "2_Dense").mkdir()
    (st / "2_Dense" / "config.json").write_text(json.dumps({
        "in_features": 6 * 32, "out_features": 16, "bias": True,
        "activation_function": "torch.nn.modules.activation.Tanh"}))
    torch.manual_seed(1)
    weight, bias = torch.randn(16, 6 * 32) * 0.1, torch.randn(16) * 0.1
    save_file({"linear.weight": weight, "linear.bias": bias}, st / "2_Dense" / "model.safetensors")
    bundle = load_model(f"hf:{st}", _options(data=_write(tmp_path / "d.txt", _texts(20))))
    assert bundle.info["pooling"] == ("cls+max+mean+mean_sqrt_len+weightedmean+lasttoken, dense 192->16 Tanh, "
                                      "normalized (modules.json)")
    for side in ("right", "left"):
        batch = _batch(tok, _texts(5, seed=4), side)
        hidden, mask = _hidden(encoder_dir, batch), batch["attention_mask"]
        pooled = torch.cat([_by_hand(hidden, mask, m) for m in SentenceEmbedder.MODES], dim=-1)
        dense = torch.tanh(pooled @ weight.T + bias)
        with torch.no_grad():
            got = bundle.module(**batch)
        torch.testing.assert_close(got, dense / dense.norm(dim=-1, keepdim=True), atol=1e-5, rtol=0, msg=side)

    batch = _batch(tok, _texts(3, seed=5))  # a batch shape the export example did not have
    with torch.no_grad():
        want = bundle.module(**batch).numpy()
    model, _ = fp32_model(bundle)  # replaces bundle.module by its traced program
    np.testing.assert_allclose(run(model, {k: v.numpy() for k, v in batch.items()}), want, atol=1e-5)


@pytest.mark.parametrize("modules,pooling,needle", [
    ([("Pooling", "1_Pooling"), ("LayerNorm", "2_LayerNorm")], {"pooling_mode_mean_tokens": True},
     "lists sentence_transformers.models.LayerNorm, which is not supported"),
    ([("Pooling", "1_Pooling")], {"pooling_mode_mean_tokens": False}, "turns on no pooling mode"),
    ([("Normalize", "1"), ("Pooling", "2_Pooling")], {"pooling_mode_mean_tokens": True},
     "lists Transformer, Normalize, Pooling; supported: Transformer, Pooling"),
])
def test_unsupported_heads_are_one_line_errors(encoder_dir, tmp_path, modules, pooling, needle):
    st = _st_dir(encoder_dir, tmp_path / "st", modules, pooling)
    with pytest.raises(UserError) as err:
        load_model(f"hf:{st}", _options(data=_write(tmp_path / "d.txt", _texts(20))))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_dense_with_an_unsupported_activation(encoder_dir, tmp_path):
    st = _st_dir(encoder_dir, tmp_path / "st", [("Pooling", "1_Pooling"), ("Dense", "2_Dense")],
                 {"pooling_mode_mean_tokens": True})
    (st / "2_Dense").mkdir()
    (st / "2_Dense" / "config.json").write_text(json.dumps({
        "in_features": 32, "out_features": 8, "activation_function": "mypkg.Swish"}))
    with pytest.raises(UserError, match="Dense activation mypkg.Swish is not supported"):
        read_head(st, "hf:st")


# ---- end to end -----------------------------------------------------------------------------------------

def test_compile_on_your_own_text(encoder_dir, tmp_path):
    data = _write(tmp_path / "mine.txt", _texts(24))
    report = compile_model(CompileConfig(model=f"hf:{encoder_dir}", data=data, method="rtn", bits=8,
                                         out=tmp_path / "out", calib_size=8, eval_size=8, latency_runs=2,
                                         memory_loads=1,
                                         latency_batch=2, latency_seq=16)).report
    assert str(data) in report["model"]["data"] and report["model"]["calibration_items"] == 8
    assert report["fidelity"]["items"] == 8 and report["fidelity"]["cosine_mean"] > 0.99
    assert report["model"]["pooling"] == "mean, normalized (default: no modules.json)"
