"""The drop-in classes: upstream signatures, state_dict keys, strict loading, same arithmetic."""
import io

import pytest
import torch
from torch import nn

import upstream_model as up
from salstm_kernels import compat
from salstm_kernels.testing import grads_of, scaled_error



def _expected_keys(layers, gated, prefix=""):
    keys = set()
    for l in range(layers):
        keys |= {f"{prefix}cell{l}.conv.weight", f"{prefix}cell{l}.conv.bias"}
    if gated:
        keys |= {f"{prefix}attention.{m}_matrix.{p}" for m in "qkv" for p in ("weight", "bias")}
    return keys


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("hidden", [[6], [5, 6]])
def test_net_state_dict_keys_match_design_table(gated, hidden):
    cls = compat.GatedTransLSTM if gated else compat.TransLSTM
    ucls = up.GatedTransLSTM if gated else up.TransLSTM
    ours = cls(6, hidden, 3, True, 63)
    theirs = ucls(6, hidden, 3, True, 63)
    assert set(ours.state_dict()) == _expected_keys(len(hidden), gated)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k


@pytest.mark.parametrize("gated", [False, True])
def test_layer_and_model_keys(gated):
    enc = nn.Conv2d(1, 6, 3, padding=1)
    cls, ucls = (compat.LSTMSA, up.LSTMSA) if gated else (compat.SALSTM, up.SALSTM)
    ours, theirs = cls(6, [6], 3, True, 3, 63, encoder=enc), ucls(6, [6], 3, True, 3, 63, encoder=enc)
    keys = {"encoder.weight", "encoder.bias", "lstmlayer.conv.weight", "lstmlayer.conv.bias"}
    for d in ("forward_net.", "reverse_net."):
        keys |= _expected_keys(1, gated, "lstmlayer." + d)
    assert set(ours.state_dict()) == keys == set(theirs.state_dict())


def test_upstream_default_constructor():
    m = compat.SALSTM(encoder=nn.Identity())
    assert m.lstmlayer.forward_net.attention_size == 224 * 224
    assert m.lstmlayer.conv.out_channels == 4
    assert m.lstmlayer.forward_net.cell0.conv.weight.shape == (256, 128, 5, 5)


def _load_from_upstream(ours, theirs):
    buf = io.BytesIO()
    torch.save(theirs.state_dict(), buf)
    buf.seek(0)
    result = ours.load_state_dict(torch.load(buf), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T", [1, 2, 3])
@pytest.mark.parametrize("hidden", [[5], [4, 5]])
def test_net_matches_upstream_forward_and_backward(gated, T, hidden):
    torch.manual_seed(T + 10 * len(hidden))
    cin = 5 if gated else 3  # upstream LSTM-SA needs input_channels == hidden[-1]
    ucls, cls = (up.GatedTransLSTM, compat.GatedTransLSTM) if gated else (up.TransLSTM, compat.TransLSTM)
    theirs = ucls(cin, hidden, 3, True, 7 * 9)
    ours = cls(cin, hidden, 3, True, 7 * 9)
    _load_from_upstream(ours, theirs)
    x = torch.randn(2, T, cin, 7, 9)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_up, y = theirs(x1), ours(x2)
    assert scaled_error(y, y_up) < 1e-5
    gy = torch.randn_like(y)
    g_up = grads_of([y_up], [x1, *theirs.parameters()], [gy])
    g = grads_of([y], [x2, *ours.parameters()], [gy])
    names = ["x"] + [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, g, g_up):
        assert scaled_error(a, b) < 1e-5, name


@pytest.mark.parametrize("gated", [False, True])
def test_full_model_checkpoint_round_trip(gated, tmp_path):
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    ucls, cls = (up.LSTMSA, compat.LSTMSA) if gated else (up.SALSTM, compat.SALSTM)
    theirs = ucls(4, [4], 3, True, 3, 11 * 7, encoder=enc)
    path = tmp_path / "upstream.pth"
    torch.save(theirs.state_dict(), path)
    ours = cls(4, [4], 3, True, 3, 11 * 7, encoder=nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()))
    ours.load_state_dict(torch.load(path), strict=True)
    xs = [torch.randn(2, 1, 11, 7) for _ in range(3)]
    y_up, y = theirs(*xs), ours(*xs)
    assert y.shape == (2, 3, 11, 7)
    assert scaled_error(y, y_up) < 1e-5
    gy = torch.randn_like(y)
    g_up = grads_of([y_up], theirs.parameters(), [gy])
    g = grads_of([y], ours.parameters(), [gy])
    for (name, _), a, b in zip(ours.named_parameters(), g, g_up):
        assert scaled_error(a, b) < 1e-5, name
    # and back: our checkpoint loads into the upstream classes
    path2 = tmp_path / "ours.pth"
    torch.save(ours.state_dict(), path2)
    theirs2 = ucls(4, [4], 3, True, 3, 11 * 7, encoder=nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()))
    theirs2.load_state_dict(torch.load(path2), strict=True)
    assert torch.equal(theirs2(*xs), y_up)


def test_gated_rejects_mismatched_channels_at_construction():
    with pytest.raises(ValueError, match="input_channels=8.*hidden_channels\\[-1\\]=6"):
        compat.GatedTransLSTM(8, [6], 3, True, 49)
    with pytest.raises(ValueError, match="input_channels"):
        compat.LSTMSA(8, [4, 6], 3, True, 2, 49, encoder=nn.Identity())


def test_scale_is_fixed_from_constructor_not_runtime_size():
    torch.manual_seed(1)
    a, b = compat.TransLSTM(3, [4], 3, True, 224 * 224), compat.TransLSTM(3, [4], 3, True, 5 * 5)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 2, 3, 5, 5)
    assert not torch.allclose(a(x), b(x))


def test_missing_encoder_is_a_clear_error():
    with pytest.raises(RuntimeError, match="encoder"):
        compat.SALSTM(4, [4], 3, True, 2, 49)(*[torch.randn(1, 4, 7, 7)] * 3)


def test_even_kernel_rejected():
    with pytest.raises(ValueError, match="kernel_size"):
        compat.TransLSTM(3, [4], 4, True, 49)


@pytest.mark.parametrize("gated", [False, True])
def test_constructor_takes_the_numbers_upstream_takes(gated):
    """Upstream passes its constructor values to ``nn.Conv2d`` and ``math.sqrt``, so numpy integers
    and a float ``attention_size`` work there; they work here too, with the same numbers."""
    np = pytest.importorskip("numpy")
    ucls, cls = (up.GatedTransLSTM, compat.GatedTransLSTM) if gated else (up.TransLSTM, compat.TransLSTM)
    args = (np.int64(4), [np.int64(4)], np.int64(3), True, float(7 * 9) + 0.5)
    torch.manual_seed(0)
    theirs, ours = ucls(*args), cls(*args)
    _load_from_upstream(ours, theirs)
    x = torch.randn(2, 2, 4, 7, 9)
    assert scaled_error(ours(x), theirs(x)) < 1e-5
    assert type(ours.in_channels) is int and ours.hidden_list == [4] and type(ours.hidden_list[0]) is int


@pytest.mark.parametrize("bad", [True, 0, -3, float("nan"), float("inf"), "63"])
def test_bad_attention_size_is_rejected(bad):
    with pytest.raises(ValueError, match="attention_size must be a positive number or None"):
        compat.TransLSTM(4, [4], 3, True, bad)


@pytest.mark.parametrize("gated", [False, True])
def test_upstream_plain_attributes(gated):
    """The attributes upstream's constructor sets, with upstream's values (its ``model.py``:
    ``input_channels = [input_channels] + hidden_channels``, ``all_layers`` the cells,
    ``attention.scale = 1 / sqrt(attention_size)``), and no new state_dict keys for them."""
    cls = compat.GatedTransLSTM if gated else compat.TransLSTM
    m = cls(6, [5, 6], 3, True, 49)
    assert m.input_channels == [6, 5, 6] and m.hidden_channels == [5, 6]
    assert m.kernel_size == 3 and m.num_layers == 2 and m.bias is True
    assert m.all_layers == [m.cell0, m.cell1]
    assert m.attention.scale == pytest.approx(1 / 7)
    attention_keys = [k for k in m.state_dict() if k.startswith("attention.")]
    assert attention_keys == ([f"attention.{q}_matrix.{p}" for q in "qkv" for p in ("weight", "bias")] if gated else [])


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("gated", [False, True])
def test_a_scale_written_to_attention_scale_is_used_as_upstream(gated, backend):
    """Upstream reads ``attention.scale`` in every forward; ours kept the constructor's copy, so a
    scale set afterwards (retraining at another resolution) was silently ignored."""
    torch.manual_seed(2)
    ucls, cls = (up.GatedTransLSTM, compat.GatedTransLSTM) if gated else (up.TransLSTM, compat.TransLSTM)
    theirs, ours = ucls(4, [4], 3, True, 16), cls(4, [4], 3, True, 16)
    _load_from_upstream(ours, theirs)
    ours.backend = backend if backend in __import__("salstm_kernels").available_backends("cpu") else "reference"
    x = torch.randn(2, 2, 4, 4, 4)
    before = ours(x)
    # (the real upstream TransLSTM keeps it on its ``attention`` too; this file's stand-in keeps it on itself)
    (theirs.attention if gated else theirs).scale = ours.attention.scale = 0.5
    assert scaled_error(ours(x), theirs(x)) < 1e-5
    assert scaled_error(before, theirs(x)) > 1e-4  # the new scale changes the output


@pytest.mark.parametrize("reparametrize", ["weight_norm", "spectral_norm_eval", "prune", "parametrizations.weight_norm"])
def test_weight_reparametrizations_of_the_conv_train_as_upstream(reparametrize):
    """``torch.nn.utils.weight_norm`` / ``spectral_norm`` / ``prune`` keep the conv's weight in a
    forward pre-hook, which runs only when the conv is called; the modules read the weight without
    calling it, so it went stale (0.05-0.09 off upstream after an update) and ``weight_orig`` / ``_g``
    / ``_v`` got no gradient.  The modules now run those hooks; parametrizations work as they are."""
    from torch.nn.utils import prune

    torch.manual_seed(3)
    theirs, ours = up.GatedTransLSTM(4, [4], 3, True, 16), compat.GatedTransLSTM(4, [4], 3, True, 16)
    _load_from_upstream(ours, theirs)
    for m in (theirs, ours):
        conv = m.cell0.conv
        if reparametrize == "weight_norm":
            torch.nn.utils.weight_norm(conv)
        elif reparametrize == "spectral_norm_eval":  # eval: no power iteration, so the weights agree
            torch.nn.utils.spectral_norm(conv)
            m.eval()
        elif reparametrize == "prune":
            prune.l1_unstructured(conv, "weight", amount=0.3)
        else:
            torch.nn.utils.parametrizations.weight_norm(conv)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # the reparametrization's own state too
    named, named_up = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert named.keys() == named_up.keys()
    with torch.no_grad():  # an optimizer step on the reparametrization's own parameters
        for name, p in named.items():
            noise = 0.1 * torch.randn_like(p)
            p.add_(noise)
            named_up[name].add_(noise)
    x = torch.randn(2, 2, 4, 5, 4)
    y_up, y = theirs(x), ours(x)
    assert scaled_error(y, y_up) < 1e-5
    gy = torch.randn_like(y)
    g_up = grads_of([y_up], list(named_up.values()), [gy])
    g = grads_of([y], list(named.values()), [gy])
    for name, a, b in zip(named, g, g_up):
        assert a is not None and b is not None and scaled_error(a, b) < 1e-5, name
