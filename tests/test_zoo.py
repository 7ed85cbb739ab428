"""Conformance over a zoo of architectures (docs/design.md §3.1: "Test the binding on a zoo of models").

Every model is built in-process from a small config with random init (nothing downloads), compiled through
the Python API at 4.0 all-in bits on 16 calibration and 8 held-out items, and checked for:

(a) posterior binding: every quantized tensor has a real posterior, the Laplace one from the traced program
    (or, where legitimately unbindable, the layer-wise one put on the Laplace scale, printed), with data in
    it (Fisher mass > 0); no placeholder / prior-only source. Every Linear/Conv/Conv1D/MultiheadAttention
    weight the model uses that is big enough to be in scope (≥ 1024 weights) is planned under its own name
    or an alias, so nothing the analysis should bind silently falls out of the plan;
(b) budget and accounting: all-in bits ≤ 4.0, equal to what the written file holds (report and
    ``bayesq inspect``), and the size breakdown adds up to the file on disk;
(c) fidelity: the artifact, run in ONNX Runtime as a user loads it (a session with no options), agrees with
    the FP32 PyTorch model on the held-out items within what 4 bits cost that model.

What 4 bits cost depends on the model far more than on the method, so (c) is measured against round-to-
nearest: the same model compiled with ``method="rtn", bits=4`` (per-row 4-bit grids with FP16 scales, so
4.02–4.8 bits all-in: more than the 4.0 BayesQ gets). Observed (torch 2.14, ORT 1.31, this zoo): BayesQ's
relative L2 error is 0.02–0.51 and 0.15–1.11× RTN's; its cosine loss 1 − cos is 0.0002–0.11 and 0.03–1.16×
RTN's (near 1× only on the ViT, EfficientNet and the hand-written module; the CNNs with BatchNorm calibrated
on data are the sensitive ones: RTN-4 itself gives cosine 0.80–0.93 there). The bounds: relative L2 ≤ 1.5× RTN's and 1 − cos ≤ 2×
RTN's, and absolute floors cosine ≥ 0.8, relative L2 ≤ 0.8, so a collapsed artifact (cosine 0.05) fails
whatever RTN gives, as does one a broken binding or rewrite sends well past round-to-nearest. A guard checks
that each FP32 reference is finite, non-zero and varies across items, so a degenerate model (torchvision's
ViT with its zero-initialised head, or a CNN whose BatchNorm statistics do not match its activations, whose
output then no longer depends on the input) cannot pass vacuously.

Transformer configs use ``initializer_range=0.1`` (instead of 0.02): with 0.02 the residual branches barely
move the final LayerNorm's output (relative error 0.001 at 4 bits), and (c) would not see a wrong weight.

Runtime (~2.5 min): the machine this runs on may have 2 cores shared with others; torch's intra-op thread
pool then spends ~10 ms per small op waiting for a busy core (100× the op: the planner's clipping search took
5 s instead of 0.05 s on GPT-2), so the module runs torch single-threaded.
"""

from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bayesq_onnx
from bayesq_onnx import CompileConfig
from bayesq_onnx.errors import UserError
from bayesq_onnx.inspection import inspect_artifact

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

BITS = 4.0
MIN_COSINE = 0.8          # absolute floors: a collapsed artifact fails whatever round-to-nearest gives
MAX_RELATIVE_L2 = 0.8
COSINE_LOSS_VS_RTN = 2.0  # 1 − cosine at most this × round-to-nearest 4-bit's
L2_VS_RTN = 1.5           # relative L2 error at most this × round-to-nearest 4-bit's
MIN_SIZE = 1024  # CollectWeightsPass's default: smaller tensors stay in float by design
BAD_SOURCE = re.compile(r"none|placeholder|prior only", re.IGNORECASE)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- data --------------------------------------------------------------------------------------------------

def images(items: int, seed: int, size: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, size, size, generator=g) for _ in range(items // 8)]


def token_batches(items: int, seed: int, length: int = 12, vocab: int = 100) -> list[tuple[torch.Tensor, ...]]:
    """(input_ids, attention_mask) batches of 8; every third sequence padded over its last 3 positions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(items // 8):
        ids = torch.randint(3, vocab, (8, length), generator=g)
        mask = torch.ones(8, length, dtype=torch.int64)
        mask[::3, length - 3:] = 0
        out.append((ids, mask))
    return out


def randomize_batchnorm(model: nn.Module, gamma=(0.3, 0.6)) -> int:
    """BatchNorm as after training, so that a fold changes the weights: affine parameters moved off 1 / 0,
    then running statistics measured on random images (freshly initialised ones, mean 0 / variance 1, do
    not match the activations, and in deep nets the mismatch leaves an output that no longer depends on the
    input). Returns how many BatchNorm layers the model has."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    g = torch.Generator().manual_seed(1)
    momenta = [m.momentum for m in norms]
    with torch.no_grad():
        for m in norms:
            if m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * (gamma[1] - gamma[0]) + gamma[0])
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
        model.train()
        for batch in images(32, seed=99):
            model(batch)
    model.eval()
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return len(norms)


# ---- the zoo -----------------------------------------------------------------------------------------------

class LastTensor(nn.Module):
    """A transformers model as ``forward(input_ids, attention_mask) -> one tensor``."""

    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, input_ids, attention_mask):
        return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask), self.output)


def resnet18():
    """torchvision's ResNet/BasicBlock (stem 7×7 conv, max-pool, BN after every conv, 1×1 downsample + BN),
    one block per stage, without the 512-wide stage 4 (stock resnet18 takes ~35 s to plan here)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    m = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    m.layer4 = nn.Identity()
    m.fc = nn.Linear(256, 10)
    return m


def mobilenet_v3_small():
    """Stock architecture (depthwise 3×3/5×5, squeeze-excite, hardswish), 10 classes."""
    return torchvision.models.mobilenet_v3_small(num_classes=10)


def efficientnet_b0():
    """EfficientNet-B0's MBConv stack (depthwise, squeeze-excite with SiLU, stochastic depth) at width 0.35,
    depth 0.25."""
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    setting, _ = _efficientnet_conf("efficientnet_b0", width_mult=0.35, depth_mult=0.25)
    return EfficientNet(setting, dropout=0.2, stochastic_depth_prob=0.2, num_classes=10)


def regnet_x_400mf():
    """RegNetX blocks (grouped 3×3 convs, group width 16) from a 4-block design."""
    from torchvision.models.regnet import BlockParams, RegNet

    return RegNet(BlockParams.from_init_params(depth=4, w_0=24, w_a=24.48, w_m=2.54, group_width=16), num_classes=10)


def convnext_tiny():
    """ConvNeXt blocks (depthwise 7×7, LayerNorm over channels, layer scale, stochastic depth), LayerNorm2d
    downsampling; layer scale 0.5 instead of 1e-6 so the blocks contribute to the output."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)], stochastic_depth_prob=0.1,
                    layer_scale=0.5, num_classes=10)


def vit_b_16():
    """VisionTransformer (patchify conv, class token, nn.MultiheadAttention with packed in_proj_weight);
    the head is zero-initialised by torchvision, re-drawn so the model has an output."""
    from torchvision.models.vision_transformer import VisionTransformer

    m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                          num_classes=10)
    nn.init.normal_(m.heads.head.weight, std=0.2)
    return m


def swin_t():
    """SwinTransformer (shifted windows, relative position bias, PatchMerging, stochastic depth) at 32×32."""
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 1], num_heads=[2, 4], window_size=[4, 4],
                           stochastic_depth_prob=0.1, num_classes=10)


_HF = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
           max_position_embeddings=64, initializer_range=0.1)


def bert():
    return LastTensor(transformers.BertModel(transformers.BertConfig(**_HF), add_pooling_layer=False),
                      "last_hidden_state")


def distilbert():
    config = transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                           max_position_embeddings=64, initializer_range=0.1)
    return LastTensor(transformers.DistilBertModel(config), "last_hidden_state")


def roberta():
    return LastTensor(transformers.RobertaModel(transformers.RobertaConfig(**_HF, pad_token_id=1),
                                                add_pooling_layer=False), "last_hidden_state")


def mpnet():
    """MPNet: relative-position attention bias (an embedding read per pair of positions)."""
    return LastTensor(transformers.MPNetModel(transformers.MPNetConfig(**_HF), add_pooling_layer=False),
                      "last_hidden_state")


def albert():
    """ALBERT: one layer's weights shared by both layers (each weight consumed by two ops)."""
    return LastTensor(transformers.AlbertModel(transformers.AlbertConfig(**_HF, embedding_size=32),
                                               add_pooling_layer=False), "last_hidden_state")


def gpt2():
    """GPT-2 LM: Conv1D weights ([in, out], applied with addmm) and lm_head tied to the token embedding."""
    config = transformers.GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     initializer_range=0.1, bos_token_id=0, eos_token_id=0)
    return LastTensor(transformers.GPT2LMHeadModel(config), "logits")


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    data: Callable[[int, int], list] = images
    likelihood: str = "categorical"
    # (what, predicate on a planned tensor's report entry): at least one planned tensor must match
    must_plan: tuple[tuple[str, Callable[[dict], bool]], ...] = ()
    # a model the compiler cannot handle: the one-line UserError must contain this (none in the zoo so far)
    unsupported: str | None = None


def _depthwise(t: dict) -> bool:
    s = t["shape"]
    return len(s) == 4 and s[1] == 1 and s[0] > 1


def _named(fragment: str) -> Callable[[dict], bool]:
    return lambda t: fragment in t["name"]


ZOO = {
    "resnet18": Case(resnet18, must_plan=(("1×1 downsample conv", _named("downsample")),)),
    "mobilenet_v3_small": Case(mobilenet_v3_small, must_plan=(("depthwise conv", _depthwise),
                                                              ("squeeze-excite conv", _named("fc1")))),
    "efficientnet_b0": Case(efficientnet_b0, must_plan=(("depthwise conv", _depthwise),)),
    "regnet_x_400mf": Case(regnet_x_400mf, must_plan=(
        ("grouped 3×3 conv", lambda t: len(t["shape"]) == 4 and t["shape"][2] == 3 and 1 < t["shape"][1] < t["shape"][0]),)),
    "convnext_tiny": Case(convnext_tiny, must_plan=(("depthwise 7×7 conv", _depthwise), ("block Linear", _named("block.3")))),
    "vit_b_16": Case(vit_b_16, must_plan=(("packed MHA in_proj_weight", _named("in_proj_weight")),
                                          ("patchify conv", _named("conv_proj")))),
    "swin_t": Case(swin_t, must_plan=(("window attention qkv", _named("attn.qkv")), ("PatchMerging", _named("reduction")))),
    "bert": Case(bert, token_batches, "gaussian", (("attention query", _named("query")),)),
    "distilbert": Case(distilbert, token_batches, "gaussian", (("attention q_lin", _named("q_lin")),)),
    "roberta": Case(roberta, token_batches, "gaussian", (("attention query", _named("query")),)),
    "mpnet": Case(mpnet, token_batches, "gaussian", (("attention q", _named("attn.q")),)),
    "albert": Case(albert, token_batches, "gaussian", (("shared attention query", _named("albert_layers.0.attention.query")),)),
    "gpt2": Case(gpt2, token_batches, "categorical", (("Conv1D c_attn", _named("c_attn")),
                                                      ("tied wte / lm_head", _named("wte")))),
}


# ---- checks ------------------------------------------------------------------------------------------------

def source_kind(source: str) -> str:
    """A posterior source string → its kind, for the per-model counts."""
    if source.startswith("Laplace"):
        inner = source[source.find("(") + 1:source.rfind(")")]
        uses = inner.count(" at op ") + inner.count("computed weight of op ")
        tags = []
        if uses > 1:
            tags.append(f"{uses} ops")
        if "per-channel scale" in inner:
            tags.append("scaled")
        if "computed weight of op " in inner:
            tags.append("computed weight")
        return "Laplace" + (f" [{', '.join(tags)}]" if tags else "")
    if "onto the Laplace scale" in source:
        return "layer-wise × c onto the Laplace scale"
    return source


def in_scope_weights(model: nn.Module) -> dict[str, set[str]]:
    """Weights the default scope must quantize: every Linear / Conv1d-2d / GPT-2 Conv1D / MultiheadAttention
    weight of ≥ MIN_SIZE values; name → every name of the tensor (tied weights have several)."""
    aliases: dict[int, set[str]] = collections.defaultdict(set)
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases[id(p)].add(name)
    out = {}
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        weights = []
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) or type(m).__name__ == "Conv1D":
            weights.append(("weight", m.weight))
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            weights.append(("in_proj_weight", m.in_proj_weight))
        for leaf, p in weights:
            if p.numel() >= MIN_SIZE:
                out[prefix + leaf] = aliases[id(p)]
    return out


def run_artifact(path, batches) -> np.ndarray:
    """The artifact in ONNX Runtime as a user loads it: a session with no options, CPU."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outs = []
    for b in batches:
        b = b if isinstance(b, tuple) else (b,)
        outs.append(session.run(None, {n: t.numpy() for n, t in zip(names, b)})[0])
    return np.concatenate(outs)


def torch_outputs(model: nn.Module, batches) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(*(b if isinstance(b, tuple) else (b,))).numpy() for b in batches])


def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    r = reference.reshape(len(reference), -1).astype(np.float64)
    c = candidate.reshape(len(candidate), -1).astype(np.float64)
    cos = (r * c).sum(1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1))
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "relative_l2": float(np.linalg.norm(c - r) / np.linalg.norm(r))}


def check_posteriors(report: dict) -> tuple[collections.Counter, list[str]]:
    """(a): every planned tensor has a real posterior with data in it. Returns (kind counts, layer-wise names)."""
    sources = report["posterior_sources"]
    kinds, layerwise = collections.Counter(), []
    for t in report["plan"]["tensors"]:
        name = t["name"]
        src = sources.get(name)
        assert src, f"{name} is planned without a posterior source"
        assert not BAD_SOURCE.search(src), f"{name}: posterior source {src!r}"
        if not src.startswith("Laplace"):
            assert re.search(r"× \S+ onto the Laplace scale", src), f"{name}: {src!r} is neither Laplace nor rescaled"
            layerwise.append(f"{name}: {src}")
        assert t.get("fisher_mass", 0) > 0, f"{name}: no data in its posterior (fisher_mass {t.get('fisher_mass')})"
        kinds[source_kind(src)] += 1
    return kinds, layerwise


def check_accounting(report: dict, artifact) -> None:
    """(b): the budget holds and the file holds exactly what the plan and the report say."""
    bits, sizes, plan = report["bits"], report["sizes"], report["plan"]
    assert bits["all_in"] <= BITS + 1e-9
    assert bits["all_in_from_file"] == pytest.approx(bits["all_in"], rel=1e-12)
    assert sizes["missing_arrays"] == []
    assert sizes["quantized_tensor_bytes"] + sizes["float_tensor_bytes"] + sizes["graph_and_metadata_bytes"] \
        == sizes["artifact_bytes"] == artifact.stat().st_size
    assert bits["quantized_weights"] == sum(t["weights"] for t in plan["tensors"]) == plan["weights"]
    assert bits["quantized_tensors"] == len(plan["tensors"])
    assert sum(t["stored_bits"] for t in plan["tensors"]) == 8 * sizes["quantized_tensor_bytes"]
    seen = inspect_artifact(artifact)
    assert seen["totals"]["accounting_ok"], seen["totals"]
    assert seen["totals"]["all_in_bits"] == pytest.approx(bits["all_in"], rel=1e-12)
    assert seen["totals"]["quantized_weights"] == bits["quantized_weights"]
    assert {t["name"] for t in seen["tensors"]} == {t["name"] for t in plan["tensors"]}


def check_bindings(model: nn.Module, report: dict) -> None:
    """Every in-scope weight of the model is planned (under one of its names, or its transposed copy's)."""
    planned = {t["name"] for t in report["plan"]["tensors"]}
    planned |= {n[:-2] for n in planned if n.endswith(".T")}
    missing = sorted(w for w, names in in_scope_weights(model).items() if not names & planned)
    assert not missing, (f"in-scope weights not planned: {missing}; left in float: {report['left_in_float']}; "
                         f"unbound: {report['export']['parameters_unbound']}")


def compile_and_check(name: str, model: nn.Module, calibration, evaluation, likelihood: str, tmp_path,
                      must_plan=()) -> dict:
    model = model.eval()
    n_bn = randomize_batchnorm(model)
    reference = torch_outputs(model, evaluation)
    # the FP32 reference is a real, input-dependent output: a degenerate model cannot pass (c) vacuously
    spread = float(np.linalg.norm(reference - reference.mean(0)) / np.linalg.norm(reference))
    assert np.isfinite(reference).all() and np.abs(reference).max() > 0 and spread > 1e-3, (name, spread)

    start = time.perf_counter()
    result = bayesq_onnx.compile(model, calibration, evaluation=evaluation, likelihood=likelihood,
                                 config=CompileConfig(bits=BITS, out=tmp_path / "out", latency_runs=2, memory_loads=1,
                                                      latency_warmup=1))
    wall = time.perf_counter() - start
    r = result.report

    # the user's model is left as it was (BatchNorm is folded on the traced copy only)
    np.testing.assert_allclose(torch_outputs(model, evaluation), reference, rtol=0, atol=1e-6)
    assert r["export"]["max_abs_diff"] <= 1e-4 * max(1.0, float(np.abs(reference).max()))
    if n_bn:
        assert r["model"]["batchnorm"] == f"{n_bn} of {n_bn} BatchNorm folded into their convs"

    kinds, layerwise = check_posteriors(r)
    check_bindings(model, r)
    for what, predicate in must_plan:
        assert any(predicate(t) for t in r["plan"]["tensors"]), f"{name}: no {what} among the planned tensors"
    check_accounting(r, result.artifact)

    got = fidelity(reference, run_artifact(result.artifact, evaluation))
    assert got["cosine_mean"] == pytest.approx(r["fidelity"]["cosine_mean"], abs=1e-4)
    assert got["cosine_mean"] >= MIN_COSINE and got["relative_l2"] <= MAX_RELATIVE_L2, (name, got)
    # what 4 bits cost this model: round-to-nearest, 4-bit per-row grids (all-in ≥ 4.0: FP16 scales on top),
    # decoded to float at load. The default target keeps MatMul weights packed in 2/4/8-bit MatMulNBits forms
    # (it trades fidelity for memory), so the method is held to RTN on the same folded forms: --target fold.
    rtn = bayesq_onnx.compile(model, calibration, evaluation=evaluation, likelihood=likelihood,
                              config=CompileConfig(method="rtn", bits=4, out=tmp_path / "rtn", latency_runs=1,
                                                   memory_loads=1,
                                                   latency_warmup=1))
    base = fidelity(reference, run_artifact(rtn.artifact, evaluation))
    fold = bayesq_onnx.compile(model, calibration, evaluation=evaluation, likelihood=likelihood,
                               config=CompileConfig(bits=BITS, target="fold", out=tmp_path / "fold", latency_runs=1,
                                                    memory_loads=1,
                                                    latency_warmup=1))
    folded = fidelity(reference, run_artifact(fold.artifact, evaluation))
    print(f"\nZOO {name}: compile {wall:.1f} s | all-in {r['bits']['all_in']:.4f} bits "
          f"({r['bits']['quantized_tensors']} tensors, {r['bits']['quantized_weights']} weights) | "
          f"cosine {got['cosine_mean']:.4f} (min {got['cosine_min']:.4f}), rel L2 {got['relative_l2']:.4f} | "
          f"fold: cosine {folded['cosine_mean']:.4f}, rel L2 {folded['relative_l2']:.4f} | "
          f"rtn4 ({rtn.report['bits']['all_in']:.3f} bits): cosine {base['cosine_mean']:.4f}, rel L2 "
          f"{base['relative_l2']:.4f} | spread {spread:.3f} | sources {dict(sorted(kinds.items()))} | stages "
          f"{ {k.split(' (')[0]: round(v, 1) for k, v in r['timings_s'].items()} }")
    for line in layerwise:
        print(f"ZOO {name}: layer-wise: {line}")
    if r["left_in_float"]:
        print(f"ZOO {name}: left in float: {r['left_in_float']}")
    assert folded["cosine_mean"] >= max(MIN_COSINE, 1 - COSINE_LOSS_VS_RTN * (1 - base["cosine_mean"])), (name, folded, base)
    assert folded["relative_l2"] <= min(MAX_RELATIVE_L2, L2_VS_RTN * base["relative_l2"]), (name, folded, base)
    return r


# the fast tier (`pytest -m "not slow"`) keeps one CNN and one transformer; CI runs the whole zoo
FAST_ZOO = ("resnet18", "bert")


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST_ZOO else pytest.mark.slow) for n in ZOO])
def test_zoo(name, tmp_path):
    case = ZOO[name]
    torch.manual_seed(0)
    model = case.build()
    calibration, evaluation = case.data(16, 0), case.data(8, 1)
    if case.unsupported is not None:
        with pytest.raises(UserError) as err:
            bayesq_onnx.compile(model, calibration, evaluation=evaluation, likelihood=case.likelihood,
                                config=CompileConfig(bits=BITS, out=tmp_path / "out"))
        message = str(err.value)
        assert "\n" not in message and case.unsupported in message, message
        assert not (tmp_path / "out").exists()
        return
    compile_and_check(name, model, calibration, evaluation, case.likelihood, tmp_path, case.must_plan)


# ---- a hand-written module: weights the exporter transforms ------------------------------------------------

class HandWritten(nn.Module):
    """A bare parameter in ``F.linear``, a constant-scaled weight, a transposed conv, a depthwise conv followed
    by BatchNorm and a sequence-first ``nn.MultiheadAttention``; every tensor ≥ 1024 weights."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 128, 3, padding=1)
        self.dw = nn.Conv2d(128, 128, 3, padding=1, groups=128, bias=False)   # 1152 weights
        self.bn = nn.BatchNorm2d(128)
        self.up = nn.ConvTranspose2d(128, 32, 2, stride=2)                     # 16384 weights
        self.attn = nn.MultiheadAttention(32, 2)                               # batch_first=False
        self.w = nn.Parameter(torch.randn(64, 32) / 32 ** 0.5)                # bare, F.linear(x, w)
        self.v = nn.Parameter(torch.randn(16, 64) / 64 ** 0.5)                # used as F.linear(x, 0.5 v)

    def forward(self, x):
        h = F.relu(self.bn(self.dw(F.relu(self.stem(x)))))
        h = F.avg_pool2d(self.up(h), 4)                  # [B, 32, H/2, W/2]
        t = h.flatten(2).permute(2, 0, 1)                # [sequence, B, 32]
        a, _ = self.attn(t, t, t, need_weights=False)
        h = F.gelu(F.linear((a + t).mean(0), self.w))
        return F.linear(h, self.v * 0.5)


def test_hand_written_transformed_weights(tmp_path):
    torch.manual_seed(0)
    model = HandWritten()
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)]
    evaluation = [torch.randn(8, 3, 8, 8, generator=g)]
    r = compile_and_check("hand-written", model, calibration, evaluation, "gaussian", tmp_path)
    sources = r["posterior_sources"]
    planned = {t["name"] for t in r["plan"]["tensors"]}
    # every quantized tensor is on a Laplace posterior (none layer-wise here)
    assert all(sources[n].startswith("Laplace") for n in planned), {n: sources[n] for n in planned}
    assert {"w", "attn.in_proj_weight", "attn.out_proj.weight", "dw.weight", "stem.weight"} <= planned
    # the constant-scaled weight is a computed initializer, bound to its op by content
    scaled = planned - {"w", "attn.in_proj_weight", "attn.out_proj.weight", "dw.weight", "stem.weight", "up.weight"}
    assert len(scaled) == 1 and sources[scaled.pop()].startswith("Laplace (computed weight of op "), sources
    # a transposed conv is quantized with a Laplace posterior, or (outside docs/design.md §2's Conv/Gemm/MatMul scope)
    # left in float with the reason said
    assert "up.weight" in planned or "ConvTranspose" in r["left_in_float"].get("up.weight", ""), r["left_in_float"]


# ---- sequences of different lengths, per-token output --------------------------------------------------------

def test_varying_sequence_length_with_per_token_output(tmp_path):
    """The Python API exports axes that vary across batches as dynamic; a per-token output ([B, T, H]) then
    differs in length between batches, and every step that gathers outputs over batches must cope."""
    torch.manual_seed(0)
    model = bert().eval()

    def batches(lengths, seed):
        return [token_batches(8, seed + i, length=n)[0] for i, n in enumerate(lengths)]

    calibration, evaluation = batches([12, 9], 0), batches([14, 10], 10)
    result = bayesq_onnx.compile(model, calibration, evaluation=evaluation,
                                 config=CompileConfig(bits=BITS, out=tmp_path / "out", latency_runs=2, memory_loads=1,
                                                      latency_warmup=1))
    check_posteriors(result.report)
    check_accounting(result.report, result.artifact)
    for batch in evaluation:  # one batch at a time: the outputs differ in length
        got = fidelity(torch_outputs(model, [batch]), run_artifact(result.artifact, [batch]))
        assert got["cosine_mean"] >= MIN_COSINE and got["relative_l2"] <= MAX_RELATIVE_L2, got
