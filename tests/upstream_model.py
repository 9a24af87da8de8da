"""A stand-in for the authors' ``model.py`` (github.com/yeshunlong/SALSTM), written for these tests.

It reproduces their class names, constructor signatures, parameter names and order of arithmetic
(``conv(cat(x, h))`` every step, ``nn.Linear`` over transposed ``(B, N, C)`` features, ``bmm`` then an
in-place scale, softmax over the last axis) so that the compat classes can be checked against the
upstream formulation and checkpoint format.  Devices: zero state on the input's device (upstream
calls ``.cuda()``).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class LSTMCell(nn.Module):
    def __init__(self, input_channels, hidden_channels, kernel_size, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(input_channels + hidden_channels, 4 * hidden_channels, kernel_size, 1, (kernel_size - 1) // 2)

    def forward(self, x, h, c):
        gates = self.conv(torch.cat((x, h), dim=1))
        a_i, a_f, a_o, a_g = torch.split(gates, gates.size(1) // 4, dim=1)
        i, f, o, g = torch.sigmoid(a_i), torch.sigmoid(a_f), torch.sigmoid(a_o), torch.tanh(a_g)
        c = c * f + i * g
        return o * torch.tanh(c), c, i, f, o, g


class _Recurrent(nn.Module):
    def __init__(self, input_channels, hidden_channels, kernel_size):
        super().__init__()
        self.hidden_channels = hidden_channels
        chans = [input_channels] + hidden_channels
        for layer in range(len(hidden_channels)):
            setattr(self, f"cell{layer}", LSTMCell(chans[layer], hidden_channels[layer], kernel_size))

    def run(self, x):
        B, T, _, H, W = x.size()
        state = [(x.new_zeros(B, C, H, W), x.new_zeros(B, C, H, W)) for C in self.hidden_channels]
        for t in range(T):
            inp = x[:, t]
            for layer in range(len(self.hidden_channels)):
                inp, c, i, f, o, g = getattr(self, f"cell{layer}")(inp, *state[layer])
                state[layer] = (inp, c)
        return inp, c, f, g


class TransLSTM(_Recurrent):
    def __init__(self, input_channels, hidden_channels, kernel_size, bias, attention_size):
        super().__init__(input_channels, hidden_channels, kernel_size)
        self.scale = 1.0 / math.sqrt(attention_size)

    def forward(self, x):
        B, _, _, H, W = x.size()
        h, c, f, g = self.run(x)
        q, k, v = ((c + f) / 2).view(B, -1, H * W), ((g + h) / 2).view(B, -1, H * W), h.view(B, -1, H * W)
        energy = F.softmax(torch.bmm(q, k.transpose(1, 2)).mul_(self.scale), dim=2)
        return torch.bmm(energy, v).view(B, -1, H, W)


class GatedAttention(nn.Module):
    def __init__(self, query_dim, nchannels):
        super().__init__()
        self.scale = 1.0 / math.sqrt(query_dim)
        self.q_matrix = nn.Linear(nchannels, nchannels)
        self.k_matrix = nn.Linear(nchannels, nchannels)
        self.v_matrix = nn.Linear(nchannels, nchannels)

    def forward(self, x, gq, gk, gv):
        x, gq, gk, gv = (t.transpose(1, 2) for t in (x, gq, gk, gv))  # (B, N, C)
        q = (gq * self.q_matrix(x)).transpose(1, 2)
        k = gk * self.k_matrix(x)
        energy = F.softmax(torch.bmm(q, k).mul_(self.scale), dim=2)
        return torch.bmm(energy, (gv * self.v_matrix(x)).transpose(1, 2))


class GatedTransLSTM(_Recurrent):
    def __init__(self, input_channels, hidden_channels, kernel_size, bias, attention_size):
        super().__init__(input_channels, hidden_channels, kernel_size)
        self.attention = GatedAttention(attention_size, input_channels)

    def forward(self, x):
        B, _, _, H, W = x.size()
        h, c, f, g = self.run(x)
        flat = lambda t: t.view(B, -1, H * W)  # noqa: E731
        return self.attention(flat(h), flat((c + f) / 2), flat((g + h) / 2), flat(h)).view(B, -1, H, W)


class _Layer(nn.Module):
    net = None

    def __init__(self, input_channels, hidden_channels, kernel_size, bias, num_classes, attenion_size):
        super().__init__()
        self.forward_net = self.net(input_channels, hidden_channels, kernel_size, bias, attention_size=attenion_size)
        self.reverse_net = self.net(input_channels, hidden_channels, kernel_size, bias, attention_size=attenion_size)
        self.conv = nn.Conv2d(2 * hidden_channels[-1], num_classes, kernel_size=1)

    def forward(self, x1, x2, x3):
        x1, x2, x3 = (t.unsqueeze(1) for t in (x1, x2, x3))
        y = torch.cat((self.forward_net(torch.cat((x1, x2), 1)), self.reverse_net(torch.cat((x3, x2), 1))), 1)
        return self.conv(y)


class TransLSTMLayer(_Layer):
    net = TransLSTM


class GatedTransLSTMLayer(_Layer):
    net = GatedTransLSTM


class _Model(nn.Module):
    layer = None

    def __init__(self, input_channels=64, hidden_channels=[64], kernel_size=5, bias=True, num_classes=4, attenion_size=224 * 224, encoder=None):  # noqa: B006
        super().__init__()
        self.encoder = encoder
        self.lstmlayer = self.layer(input_channels, hidden_channels, kernel_size, bias, num_classes, attenion_size)

    def forward(self, x1, x2, x3):
        return self.lstmlayer(self.encoder(x1), self.encoder(x2), self.encoder(x3))


class SALSTM(_Model):
    layer = TransLSTMLayer


class LSTMSA(_Model):
    layer = GatedTransLSTMLayer
