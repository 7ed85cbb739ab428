"""``hf:<dir>`` and GLUE: TSV parsing, label mapping, the official metrics, an end-to-end compile of a tiny
BERT classifier and encoder built here, and bad input through the CLI (one ``error:`` line, exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bayesq_onnx.cli import main
from bayesq_onnx.config import CompileConfig
from bayesq_onnx.errors import UserError
from bayesq_onnx.models import glue, load_model
from bayesq_onnx.models.base import SourceOptions
from bayesq_onnx.pipeline import compile_model

WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ra", "si", "tu", "vo", "ze")
         for b in ("b", "d", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "x", "z", "f", "h", "j", "w",
                   "y", "c")]  # 200 words
WORDS += ["the", "a", "good", "bad", "movie", "film", "is", "was", "not", "very", "what", "how", "why",
          "question", "answer", "same", "other", "man", "woman", "dog", "cat", "runs", "sits"]


def _sentence(rng: np.random.Generator, lo: int = 3, hi: int = 12) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))


def _write(path: Path, rows: list[list[str]], header: list[str] | None = None, bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def _glue(root: Path, seed: int = 0) -> dict[str, Path]:
    """Tiny GLUE dirs in the official layouts (SST-2, MRPC with a BOM, headerless CoLA, MNLI, STS-B)."""
    rng = np.random.default_rng(seed)
    dirs = {}
    for name, n in (("train", 24), ("dev", 12)):
        s = lambda: _sentence(rng)
        _write(root / "SST-2" / f"{name}.tsv", [[s() + ' "', str(i % 2)] for i in range(n)], ["sentence", "label"])
        _write(root / "MRPC" / f"{name}.tsv", [[str(i % 2), str(100 + i), str(200 + i), s(), s()] for i in range(n)],
               ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], bom=True)
        _write(root / "CoLA" / f"{name}.tsv", [["gj04", str(i % 2), "*" if i % 2 == 0 else "", s()]
                                               for i in range(n)])
        mnli = name if name == "train" else "dev_matched"
        labels = ("entailment", "neutral", "contradiction")
        _write(root / "MNLI" / f"{mnli}.tsv",
               [[str(i), str(i), f"{i}e", "fiction", "(x)", "(y)", "(X)", "(Y)", s(), s(), labels[i % 3],
                 labels[i % 3]] for i in range(n)],
               ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"])
        _write(root / "STS-B" / f"{name}.tsv",
               [[str(i), "main-news", "2012", "0001", str(i), s(), s(), f"{(i * 0.37) % 5:.3f}"] for i in range(n)],
               ["index", "genre", "filename", "year", "old_index", "sentence1", "sentence2", "score"])
    for t in ("SST-2", "MRPC", "CoLA", "MNLI", "STS-B"):
        dirs[t] = root / t
    return dirs


def _tokenizer(directory: Path):
    from transformers import BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", '"', "*"] + WORDS) + "\n")
    return BertTokenizer(vocab=str(vocab))


def _bert_config(**kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(WORDS) + 7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=160, **kw)


def _save(directory: Path, model) -> Path:
    tok = _tokenizer(directory)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import BertForSequenceClassification, BertModel

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    models = {n: _save(root / f"cls{n}", BertForSequenceClassification(_bert_config(num_labels=n)).eval())
              for n in (1, 2, 3)}
    models["enc"] = _save(root / "enc", BertModel(_bert_config()).eval())
    return {"models": models, "glue": _glue(root / "glue"), "root": root}


# ---- tasks, parsing, labels ---------------------------------------------------------------------------

def test_task_names_and_aliases():
    assert glue.get_task("glue:SST-2").name == "sst2"
    assert glue.get_task("glue:sts-b").name == "stsb"
    assert glue.get_task("glue:mnli").dev_file == "dev_matched.tsv"
    assert glue.get_task("glue:mnli-mm").dev_file == "dev_mismatched.tsv"
    assert {t.headline for t in glue.TASKS.values()} == {"matthews", "accuracy", "f1", "pearson"}
    assert glue.TASKS["cola"].headline == "matthews" and glue.TASKS["qqp"].headline == "f1"
    with pytest.raises(UserError, match=r"unknown GLUE task 'sst5'.*glue:cola, glue:sst2"):
        glue.get_task("glue:sst5")
    with pytest.raises(UserError, match="GLUE task, one of"):
        glue.get_task("superglue:boolq")


def test_reads_each_layout(assets):
    g = assets["glue"]
    sst = glue.read_split(glue.TASKS["sst2"], g["SST-2"], "train")
    assert len(sst) == 24 and len(sst.texts[0]) == 1 and sst.texts[0][0].endswith(' "')  # stray quote kept
    mrpc = glue.read_split(glue.TASKS["mrpc"], g["MRPC"], "dev")  # header behind a BOM
    assert len(mrpc) == 12 and len(mrpc.texts[0]) == 2 and mrpc.labels[:2] == ["0", "1"]
    cola = glue.read_split(glue.TASKS["cola"], g["CoLA"], "train")  # no header: all 24 lines are items
    assert len(cola) == 24 and cola.labels[:2] == ["0", "1"] and " " in cola.texts[0][0]
    mnli = glue.read_split(glue.TASKS["mnli"], g["MNLI"], "dev")
    assert mnli.path.name == "dev_matched.tsv" and mnli.labels[:3] == ["entailment", "neutral", "contradiction"]
    sts = glue.read_split(glue.TASKS["stsb"], g["STS-B"], "dev")
    y = glue.encode_labels(glue.TASKS["stsb"], sts, {})
    assert y.dtype == np.float32 and y[1] == pytest.approx(0.37)


def test_qqp_short_rows_are_skipped_and_counted(tmp_path):
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    _write(tmp_path / "train.tsv", [["1", "1", "2", "how is it", "how", "1"], ["2", "3", "4", "broken"],
                                    ["3", "5", "6", "a b", "c d", "0"]], header)
    split = glue.read_split(glue.TASKS["qqp"], tmp_path, "train")
    assert len(split) == 2 and split.skipped == 1


def test_label_mapping():
    mnli = glue.TASKS["mnli"]
    mapping, origin = glue.label_order(mnli, {"CONTRADICTION": 0, "NEUTRAL": 1, "ENTAILMENT": 2})
    assert origin == "model" and mapping == {"entailment": 2, "neutral": 1, "contradiction": 0}
    mapping, origin = glue.label_order(mnli, {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2})
    assert origin == "glue" and mapping == {"entailment": 0, "neutral": 1, "contradiction": 2}
    mapping, _ = glue.label_order(glue.TASKS["rte"], {"not entailment": 0, "entailment": 1})
    assert mapping == {"entailment": 1, "not_entailment": 0}
    split = glue.GlueSplit(Path("x.tsv"), [("a", "b")] * 3, ["neutral", "contradiction", "entailment"])
    assert glue.encode_labels(mnli, split, glue.label_order(mnli, None)[0]).tolist() == [1, 2, 0]


@pytest.mark.parametrize("task,files,needle", [
    ("mrpc", "SST-2", "expected a header with columns Quality, #1 ID"),
    ("cola", "SST-2", "4 tab-separated columns and no header"),
    ("sst2", "CoLA", "expected a header with columns sentence, label"),
    ("stsb", "MNLI", "expected a header with columns sentence1, sentence2, score"),
])
def test_wrong_layout_names_the_expected_header(assets, task, files, needle):
    with pytest.raises(UserError, match=needle):
        glue.read_split(glue.TASKS[task], assets["glue"][files], "train")


def test_missing_empty_and_bad_labels(tmp_path):
    mnli = glue.TASKS["mnli"]
    with pytest.raises(UserError, match="needs `data` DIR"):
        glue.read_split(mnli, None, "dev")
    with pytest.raises(UserError, match="not a directory"):
        glue.read_split(mnli, tmp_path / "nope", "dev")
    with pytest.raises(UserError, match="no dev_matched.tsv for glue:mnli"):
        glue.read_split(mnli, tmp_path, "dev")
    _write(tmp_path / "train.tsv", [], ["sentence", "label"])
    with pytest.raises(UserError, match="has no items"):
        glue.read_split(glue.TASKS["sst2"], tmp_path, "train")
    _write(tmp_path / "dev.tsv", [["fine", "1"], ["odd", "positive"]], ["sentence", "label"])
    split = glue.read_split(glue.TASKS["sst2"], tmp_path, "dev")
    with pytest.raises(UserError, match=r"item 2 has label 'positive'.*\(0, 1\)"):
        glue.encode_labels(glue.TASKS["sst2"], split, {})
    bad = glue.GlueSplit(tmp_path / "dev.tsv", [("a", "b")], ["maybe"])
    with pytest.raises(UserError, match="entailment, neutral, contradiction"):
        glue.encode_labels(mnli, bad, glue.label_order(mnli, None)[0])


# ---- metrics -------------------------------------------------------------------------------------------

def test_metrics_known_values():
    labels, pred = np.array([1, 0, 1, 0]), np.array([1, 1, 1, 0])
    assert glue.accuracy(pred, labels) == 0.75
    assert glue.f1_score(pred, labels) == pytest.approx(0.8)  # precision 2/3, recall 1
    # TP 2, FP 1, TN 1, FN 0: (2·1 − 1·0) / sqrt(3·2·2·1)
    assert glue.matthews_corrcoef(pred, labels) == pytest.approx(2 / np.sqrt(12))
    assert glue.matthews_corrcoef(np.array([1, 0, 1, 1]), np.array([1, 1, 1, 0])) == pytest.approx(-1 / 3)
    assert glue.matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert glue.matthews_corrcoef(np.ones(4, int), labels) == 0.0  # undefined: one class predicted
    assert glue.f1_score(np.zeros(3, int), np.zeros(3, int)) == 0.0
    three = np.array([0, 1, 2, 0, 1, 2])
    assert glue.matthews_corrcoef(three, three) == pytest.approx(1.0)
    # Pearson of (1,2,3) and (1,2,4): cov 3 over sqrt(2 · 42/9)
    assert glue.pearson(np.array([1.0, 2, 3]), np.array([1.0, 2, 4])) == pytest.approx(9 / np.sqrt(84))
    assert glue.spearman(np.array([1.0, 2, 3]), np.array([1.0, 2, 4])) == pytest.approx(1.0)
    assert glue.spearman(np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4])) == pytest.approx(0.8)  # 1 − 6·2/60
    assert np.isnan(glue.pearson(np.ones(3), np.array([1.0, 2, 3])))


def test_glue_metric_closure():
    metric = glue.glue_metric(glue.TASKS["mrpc"], np.array([1, 0, 1, 0]))
    ref = np.array([[0, 1], [1, 0], [0, 1], [1, 0]], dtype=np.float32)   # perfect
    cand = np.array([[0, 1], [0, 1], [0, 1], [1, 0]], dtype=np.float32)  # one false positive
    m = metric(ref, cand)
    assert m["f1"] == pytest.approx(0.8) and m["accuracy"] == 0.75 and m["f1_fp32"] == 1.0
    assert m["f1_drop_points"] == pytest.approx(20.0) and m["agreement"] == 0.75 and m["items"] == 4
    sts = glue.glue_metric(glue.TASKS["stsb"], np.array([0.0, 1, 2, 4], dtype=np.float32))
    m = sts(np.array([[0.0], [1], [2], [4]]), np.array([[0.0], [1], [2], [3]]))
    assert m["pearson_fp32"] == pytest.approx(1.0) and m["spearman"] == pytest.approx(1.0)
    assert m["pearson"] < 1 and m["score_max_abs_diff"] == pytest.approx(1.0) and "agreement" not in m
    cola = glue.glue_metric(glue.TASKS["cola"], np.array([1, 0, 1, 0]))(ref, cand)
    assert cola["matthews"] == pytest.approx(2 / np.sqrt(12)) and cola["matthews_fp32"] == pytest.approx(1.0)


# ---- bundles and compiles -----------------------------------------------------------------------------

def _options(assets, task, data, **kw):
    kw.setdefault("calib_size", 8)
    kw.setdefault("eval_size", 8)
    return SourceOptions(task=task, data=assets["glue"][data], latency_batch=2, latency_seq=16, **kw)


def test_stsb_and_mnli_bundles(assets):
    sts = load_model(f"hf:{assets['models'][1]}", _options(assets, "glue:stsb", "STS-B", calib_size=20))
    assert sts.likelihood == "gaussian" and sts.headline == "pearson"
    assert sts.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert [t.shape for t in sts.calibration_targets] == [(20, 1)] and sts.calibration_targets[0].dtype == np.float32
    assert sts.info["calibration_items"] == 20 and sts.info["evaluation_items"] == 8 and sts.info["dev_items"] == 12
    assert sts.latency_feed["input_ids"].shape == (2, 16)
    mnli = load_model(f"hf:{assets['models'][3]}", _options(assets, "glue:mnli", "MNLI", eval_size=100))
    assert mnli.likelihood == "categorical" and mnli.calibration_targets[0].dtype == np.int64
    assert mnli.info["evaluation_items"] == 12 and mnli.info["label_order"] == "glue"
    # batches are sorted by length: token counts never decrease within a batch
    lengths = mnli.evaluation[0]["attention_mask"].sum(1)
    assert (np.diff(lengths) >= 0).all()


def test_compile_sst2_end_to_end(assets, tmp_path):
    model_dir, data = assets["models"][2], assets["glue"]["SST-2"]
    out = tmp_path / "out"
    result = compile_model(CompileConfig(model=f"hf:{model_dir}", task="glue:sst2", data=data, method="rtn", bits=8,
                                         out=out, calib_size=8, eval_size=8, latency_runs=2,
                                         memory_loads=1, latency_batch=2,
                                         latency_seq=16))
    report = json.loads((out / "report.json").read_text())
    assert report["headline"]["metric"] == "accuracy"
    f = report["fidelity"]
    assert f["items"] == 8 and {"accuracy", "accuracy_fp32", "accuracy_drop_points", "agreement"} <= set(f)
    assert report["model"]["task"] == "glue:sst2" and report["model"]["evaluation_items"] == 8
    assert report["latency"]["feed"] == "input_ids 2×16, attention_mask 2×16, token_type_ids 2×16"
    # 2×6 linear + head, and (scope all) the word and position tables; the token-type table is under min_size
    assert report["export"]["max_abs_diff"] < 1e-4 and report["bits"]["quantized_tensors"] == 15
    assert result.report["headline"]["value"] == f["accuracy"]
    # the FP32 figure equals plain transformers on the same dev items in file order (labels stay aligned)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    split = glue.read_split(glue.TASKS["sst2"], data, "dev")
    idx = glue.sample(len(split), 8, 0)
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForSequenceClassification.from_pretrained(model_dir)
    enc = tok([split.texts[i][0] for i in idx], padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        pred = model.eval()(**enc).logits.argmax(1).numpy()
    assert f["accuracy_fp32"] == pytest.approx(glue.accuracy(pred, np.array([int(split.labels[i]) for i in idx])))


def test_compile_encoder_gives_embedding_fidelity(assets, tmp_path):
    report = compile_model(CompileConfig(model=f"hf:{assets['models']['enc']}", method="rtn", bits=8,
                                         out=tmp_path / "out", calib_size=8, eval_size=8, latency_runs=2,
                                         memory_loads=1,
                                         latency_batch=2, latency_seq=16)).report
    assert report["headline"]["metric"] == "cosine_mean" and report["fidelity"]["cosine_mean"] > 0.99
    assert report["model"]["architecture"] == "BertModel" and report["fidelity"]["items"] == 8


# ---- bad input through the CLI ------------------------------------------------------------------------

def _bad_dirs(assets) -> dict[str, Path]:
    root = assets["root"] / "bad"
    if not root.exists():
        root.mkdir()
        (root / "empty").mkdir()
        cls = assets["models"][2]
        for name, drop in (("noweights", "model.safetensors"), ("notok", None)):
            d = root / name
            d.mkdir()
            for f in cls.iterdir():
                keep = f.name != drop if drop else f.name not in ("vocab.txt", "tokenizer.json", "tokenizer_config.json")
                if keep:
                    (d / f.name).write_bytes(f.read_bytes())
        _write(root / "badlabel" / "train.tsv", [["ok", "1"], ["no", "yes"]], ["sentence", "label"])
        _write(root / "badlabel" / "dev.tsv", [["ok", "1"]], ["sentence", "label"])
    return {p.name: p for p in root.iterdir()}


@pytest.mark.parametrize("case,needle", [
    ("no-dir", "no such directory"),
    ("no-config", "no config.json"),
    ("no-weights", "no weights in"),
    ("no-tokenizer", "no tokenizer in"),
    ("no-task", "is a sequence classifier (BertForSequenceClassification); pass"),
    ("no-data", "--task glue:sst2 needs --data DIR"),
    ("unknown-task", "unknown GLUE task 'sst9'"),
    ("wrong-columns", "expected a header with columns sentence, label"),
    ("missing-dev", "no dev_matched.tsv for glue:mnli"),
    ("num-labels", "has 2 output label(s) but glue:mnli needs 3"),
    ("bad-label", "item 2 has label 'yes'"),
    ("encoder-task", "not a sequence classifier"),
    ("task-calib", "calibrates on the train.tsv in"),
    ("encoder-glue-dir", "must be a .txt or .jsonl file of texts, not a directory"),
    ("weights", "takes its weights from the dir"),
])
def test_bad_input_one_line_exit_2(assets, tmp_path, case, needle):
    bad, g, m = _bad_dirs(assets), assets["glue"], assets["models"]
    cls = f"hf:{m[2]}"
    args = {
        "no-dir": [f"hf:{tmp_path / 'nope'}"],
        "no-config": [f"hf:{bad['empty']}"],
        "no-weights": [f"hf:{bad['noweights']}", "--task", "glue:sst2", "--data", str(g["SST-2"])],
        "no-tokenizer": [f"hf:{bad['notok']}", "--task", "glue:sst2", "--data", str(g["SST-2"])],
        "no-task": [cls],
        "no-data": [cls, "--task", "glue:sst2"],
        "unknown-task": [cls, "--task", "glue:sst9", "--data", str(g["SST-2"])],
        "wrong-columns": [cls, "--task", "glue:sst2", "--data", str(g["MRPC"])],
        "missing-dev": [f"hf:{m[3]}", "--task", "glue:mnli", "--data", str(g["SST-2"])],
        "num-labels": [cls, "--task", "glue:mnli", "--data", str(g["MNLI"])],
        "bad-label": [cls, "--task", "glue:sst2", "--data", str(bad["badlabel"])],
        "encoder-task": [f"hf:{m['enc']}", "--task", "glue:sst2", "--data", str(g["SST-2"])],
        "task-calib": [cls, "--task", "glue:sst2", "--data", str(g["SST-2"]), "--calib", str(g["SST-2"])],
        "encoder-glue-dir": [f"hf:{m['enc']}", "--data", str(g["SST-2"])],
        "weights": [cls, "--weights", str(m[2] / "model.safetensors")],
    }[case]
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compile", *args, "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and needle in lines[-1], r.stderr
    # one error line; the pipeline prints its provider note before the model loads (the only other line)
    assert all("execution provider" in line for line in lines[:-1]) and len(lines) <= 2, r.stderr
    assert "Traceback" not in r.output and not out.exists()
