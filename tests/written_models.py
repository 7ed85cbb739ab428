"""Small models written the ways people write them (issue 29's "code people write"), each with its data.

Random init, nothing downloads. Every factory returns ``(model, calibration, evaluation, likelihood)``
with batches as the Python API takes them. The shapes are small so the whole set compiles in about a minute,
but every weight the model uses is at least 1024 values, so nothing is out of scope by size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- a classifier whose forward returns a dict ---------------------------------------------------------------

class DictOutput(nn.Module):
    """``forward`` returns ``{"logits": …, "features": …}``, as many research codebases do."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 48, 3, padding=1)
        self.conv2 = nn.Conv2d(48, 64, 3, padding=1, stride=2)
        self.head = nn.Linear(64, 100)

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        features = h.mean((2, 3))
        return {"logits": self.head(features), "features": features}


def fit_briefly(model: nn.Module, batches: list[torch.Tensor], label, steps: int = 60) -> nn.Module:
    """A few Adam steps toward ``label(x)``: a random-init classifier answers one class for every input,
    which no verdict can judge; a user's model is trained."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        x = batches[step % len(batches)]
        out = model(x)
        loss = F.cross_entropy(out["logits"] if isinstance(out, dict) else out, label(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def dict_output():
    """Classifies images by their brightest colour channel and whether the image is brighter on the left."""
    torch.manual_seed(0)
    g = _gen(0)
    images = [torch.randn(8, 3, 16, 16, generator=g) + torch.rand(8, 3, 1, 1, generator=g) * 2 for _ in range(12)]

    def label(x):
        return x.mean((2, 3)).argmax(1) * 2 + (x[..., :8].mean((1, 2, 3)) > x[..., 8:].mean((1, 2, 3))).long()

    model = fit_briefly(DictOutput(), images[:8], label)
    return model, images[8:11], images[11:], "categorical"


# ---- a GPT-2-style LM, written by hand, tied input/output embeddings -------------------------------------------

class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TiedLM(nn.Module):
    """Token and position embeddings, pre-LN blocks, ``logits = h @ wte.weight.T`` (weights tied)."""

    def __init__(self, vocab: int = 256, d: int = 64, context: int = 32, layers: int = 2):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, 4) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        nn.init.normal_(self.wte.weight, std=0.1)
        nn.init.normal_(self.wpe.weight, std=0.1)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.wte(ids) + self.wpe(pos)
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.ln_f(h))


def tied_lm():
    g = _gen(1)
    data = [torch.randint(0, 256, (8, 16), generator=g) for _ in range(4)]
    return TiedLM(), data[:3], data[3:], "categorical"


# ---- a UNet with ConvTranspose2d upsampling -------------------------------------------------------------------

class UNet(nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.down1 = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1, stride=2), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(2 * c, 4 * c, 3, padding=1, stride=2), nn.ReLU())
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.dec2 = nn.Conv2d(4 * c, 2 * c, 3, padding=1)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec1 = nn.Conv2d(2 * c, c, 3, padding=1)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        d1 = self.down1(x)
        d2 = self.down2(d1)
        m = self.mid(d2)
        u2 = F.relu(self.dec2(torch.cat([self.up2(m), d2], 1)))
        u1 = F.relu(self.dec1(torch.cat([self.up1(u2), d1], 1)))
        return self.out(u1)


def unet():
    g = _gen(2)
    model = UNet().eval()
    data = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(4)]
    return model, data[:3], data[3:], "gaussian"


# ---- attention written with einsum on bare parameters -----------------------------------------------------------

class EinsumAttention(nn.Module):
    """Projections as ``torch.einsum`` with bare ``nn.Parameter`` tensors on either side."""

    def __init__(self, d: int = 64, heads: int = 4, classes: int = 16):
        super().__init__()
        self.heads = heads
        self.w_qkv = nn.Parameter(torch.randn(3, heads, d, d // heads) / d ** 0.5)   # [3, h, d, dh]
        self.w_o = nn.Parameter(torch.randn(heads, d // heads, d) / d ** 0.5)        # [h, dh, d]
        self.w_in = nn.Parameter(torch.randn(d, 32) / 32 ** 0.5)                    # used as W @ xᵀ
        self.head = nn.Parameter(torch.randn(classes, d) / d ** 0.5)

    def forward(self, x):                                           # x [b, t, 32]
        h = torch.einsum("dc,btc->btd", self.w_in, x)
        q, k, v = torch.einsum("btd,shde->sbhte", h, self.w_qkv)
        a = torch.softmax(torch.einsum("bhte,bhse->bhts", q, k) / q.shape[-1] ** 0.5, dim=-1)
        o = torch.einsum("bhts,bhse->bhte", a, v)
        h = h + torch.einsum("bhte,hed->btd", o, self.w_o)
        return torch.einsum("bd,cd->bc", h.mean(1), self.head)


def sequences(batches: int, seed: int, length: int = 12, width: int = 32, items: int = 8) -> list[torch.Tensor]:
    """Noise sequences with a per-item drift (so that their means differ, as real sequences' do)."""
    g = _gen(seed)
    return [torch.randn(items, length, width, generator=g) + torch.randn(items, 1, width, generator=g)
            for _ in range(batches)]


def _sign_pattern(x: torch.Tensor, axis: int, classes: int) -> torch.Tensor:
    """A class from the signs of the first log2(classes) features' means over ``axis``."""
    bits = (x.mean(axis)[:, :classes.bit_length() - 1] > 0).long()
    return (bits * (2 ** torch.arange(bits.shape[1]))).sum(1)


def _classifier(build, inputs, seed: int, label):
    """``build()`` trained briefly on ``inputs(8 batches, 10·seed)``, then 4 batches of ``inputs(…, seed)``: 3 to
    calibrate, 1 to evaluate."""
    torch.manual_seed(seed)
    model = fit_briefly(build(), inputs(8, 10 * seed), label)
    data = inputs(4, seed)
    return model, data[:3], data[3:], "categorical"


def einsum_attention():
    return _classifier(EinsumAttention, sequences, 3, lambda x: _sign_pattern(x, 1, 16))


# ---- audio: Conv1d front end and a GRU --------------------------------------------------------------------------

class AudioGRU(nn.Module):
    def __init__(self, mels: int = 40, hidden: int = 64, classes: int = 12):
        super().__init__()
        self.conv = nn.Conv1d(mels, 64, 5, padding=2)
        self.conv2 = nn.Conv1d(64, 64, 3, padding=1, stride=2)
        self.gru = nn.GRU(64, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):                      # x [b, mels, frames]
        h = F.relu(self.conv2(F.relu(self.conv(x))))
        y, _ = self.gru(h.transpose(1, 2))
        return self.fc(y[:, -1])


def spectrograms(batches: int, seed: int) -> list[torch.Tensor]:
    return [x.transpose(1, 2) for x in sequences(batches, seed, length=32, width=40)]  # [b, mels, frames]


def audio_gru():
    return _classifier(AudioGRU, spectrograms, 4, lambda x: _sign_pattern(x, 2, 8))


class AudioLSTM(AudioGRU):
    def __init__(self):
        super().__init__()
        self.gru = nn.LSTM(64, 64, batch_first=True, num_layers=2)


def audio_lstm():
    return _classifier(AudioLSTM, spectrograms, 5, lambda x: _sign_pattern(x, 2, 8))


# ---- video: Conv3d ---------------------------------------------------------------------------------------------

class Video3d(nn.Module):
    def __init__(self, classes: int = 8):
        super().__init__()
        self.c1 = nn.Conv3d(3, 16, 3, padding=1)
        self.c2 = nn.Conv3d(16, 32, 3, padding=1, stride=2)
        self.c3 = nn.Conv3d(32, 32, (1, 3, 3), padding=(0, 1, 1))
        self.fc = nn.Linear(32, classes * 16)
        self.fc2 = nn.Linear(classes * 16, classes)

    def forward(self, x):                      # x [b, 3, frames, h, w]
        h = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.fc2(F.relu(self.fc(h.mean((2, 3, 4)))))


def clips(batches: int, seed: int) -> list[torch.Tensor]:
    """Noise clips that differ as videos do, in each channel's brightness and contrast (pure noise of one
    distribution pools to the same features for every clip, and the model would answer the same for all)."""
    g = _gen(seed)
    out = []
    for _ in range(batches):
        offset = torch.rand(4, 3, 1, 1, 1, generator=g) * 2 - 1
        contrast = torch.rand(4, 3, 1, 1, 1, generator=g) + 0.5
        out.append(torch.randn(4, 3, 8, 16, 16, generator=g) * contrast + offset)
    return out


def video3d():
    """A Conv3d classifier trained for a few steps to tell the clips' brightness pattern (the sign of each
    channel's offset: 8 classes), so that its outputs mean something, as a user's model's do."""
    torch.manual_seed(6)
    model = fit_briefly(Video3d(), clips(12, 60),
                        lambda x: ((x.mean((2, 3, 4)) > 0).long() * torch.tensor([1, 2, 4])).sum(1))
    data = clips(6, 6)
    return model, data[:4], data[4:], "gaussian"


WRITTEN = {"dict_output": dict_output, "tied_lm": tied_lm, "unet": unet, "einsum_attention": einsum_attention,
           "audio_gru": audio_gru, "audio_lstm": audio_lstm, "video3d": video3d}
