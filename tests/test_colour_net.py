"""The colour network of issue 31 (psal.apps.colour_net) and its training data
(psal.examples.train_colorization): shapes, the twins' equal sizes, what each mixer reads, the
data's windows against hand-made crops, the colourings' luminance, a few steps that fit a batch,
and the checkpoint's round trip."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gen

from psal.apps.colorize import lab_from_rgb
from psal.apps.colour_net import MIXERS, ColourNet, colorize_with_model, load_pretrained, mse_ab, parameter_count


def _pair(size=24, seed=0):
    g = gen(seed)
    return torch.rand(2, 1, size, size, generator=g), torch.rand(2, 3, size, size, generator=g)


@pytest.mark.parametrize("mixer", MIXERS)
def test_shapes_and_the_twins_equal_size(mixer):
    target, reference = _pair()
    model = ColourNet(mixer, width=8, features=6, values=4)
    ab = model(target, reference)
    assert ab.shape == (2, 2, 24, 24) and torch.isfinite(ab).all()
    # the three models differ only in how the reference reaches a pixel: the same weights but
    # the attention's temperature
    sizes = {m: parameter_count(ColourNet(m, width=8, features=6, values=4)) for m in MIXERS}
    assert sizes["psal"] == sizes["full"] == sizes["conv"] + 1


def test_hand_features_feed_the_encoder_and_old_checkpoints_load_without(tmp_path):
    """``hand_features`` (the default): the encoder reads the luminance and the zero-shot
    colorizer's 9 statistics, each divided by its spread over the pair; ``with_hand_features``
    turns a model trained without them into one that reads them and computes the same; a
    checkpoint whose config predates the option loads as it was trained."""
    from psal.apps.colorize import _feature_scale, _features, _luminance
    from psal.apps.colour_net import with_hand_features

    target, reference = _pair()
    model = ColourNet("psal", width=8, features=6, values=4)
    assert model.hand_features and model.encode[0][0].in_channels == 10
    seen = []
    hook = model.encode.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model(target, reference)
    hook.remove()
    L, Lr = _luminance(target), lab_from_rgb(reference)[:, :1]
    fq, fk = _features(L), _features(Lr)
    scale = _feature_scale(fq, fk)
    assert scale.shape == (2, 9, 1, 1)  # per pair
    for b in range(2):
        torch.testing.assert_close(scale[b], _feature_scale(fq[b : b + 1], fk[b : b + 1])[0])
    torch.testing.assert_close(seen[0], torch.cat([L / 100, fq / scale], 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[1], torch.cat([Lr / 100, fk / scale], 1), rtol=1e-5, atol=1e-5)
    # the second stage's start: the same function, the new inputs' weights zero
    plain = ColourNet("psal", width=8, features=6, values=4, hand_features=False).eval()
    assert plain.encode[0][0].in_channels == 1
    grown = with_hand_features(plain).eval()
    assert grown.hand_features and grown.config == plain.config | {"hand_features": True}
    torch.testing.assert_close(colorize_with_model(target[:1], reference[:1], grown, seed=1),
                               colorize_with_model(target[:1], reference[:1], plain, seed=1))  # fmt: skip
    with pytest.raises(ValueError, match="with_hand_features: the model reads them already"):
        with_hand_features(grown)
    # a checkpoint saved before the option (no such key in its config) loads without them
    config = {k: v for k, v in plain.config.items() if k != "hand_features"}
    path = str(tmp_path / "old.pt")
    torch.save({"config": config, "model": plain.state_dict()}, path)
    back = load_pretrained(path)
    assert not back.hand_features
    torch.testing.assert_close(colorize_with_model(target[:1], reference[:1], back, seed=1),
                               colorize_with_model(target[:1], reference[:1], plain, seed=1))  # fmt: skip


def test_the_conv_twin_reads_the_reference_by_position_and_psal_by_match():
    """Moving the reference's content away from the target's place changes what the conv twin
    sees at each pixel; a PSAL model finds the content where it went: with an identity-like
    network (the mix and refinement zeroed, the features the luminance) its chroma is the
    reference's at the matches, the target's own."""
    torch.manual_seed(0)
    from psal import images

    picture = images.load_bundled("astronaut", (48, 48))
    target, reference = picture[..., 8:40, 8:40], picture[..., 12:44, 4:36]  # the content moved by (4, -4)
    for mixer in ("psal", "conv"):
        model = ColourNet(mixer, width=8, features=6, values=4, patch_size=5, num_neighbors=1)
        for block in (model.mix, model.refine):
            torch.nn.init.zeros_(block[-1].weight)
            torch.nn.init.zeros_(block[-1].bias)
        with torch.no_grad():  # the matching features: the luminance itself, 6 times
            enc = model.encode
            for layer in (enc[0][0], enc[1][0], enc[2]):
                layer.weight.zero_()
                layer.bias.zero_()
            enc[0][0].weight[:, 0, 1, 1] = 1.0  # GELU of L / 100 > 0: close to linear for one step
            enc[1][0].weight[:, :, 1, 1] = torch.eye(8)
            enc[2].weight[:, :, 1, 1] = torch.eye(8)[:6]
        if mixer == "psal":
            model.attention.generator = gen(1)
        ab = model(target, reference)
        true_ab = lab_from_rgb(target)[:, 1:]
        err = (ab - true_ab)[..., 6:-6, 6:-6].abs().mean()  # away from the border the content left
        if mixer == "psal":
            assert err < 1.0, float(err)  # the matches' colours: measured 0.0 Lab units (exact matches, k = 1)
        else:
            assert err > 5.0, float(err)  # the colours of other content: measured 18.5


def test_bad_input_names_the_argument():
    model = ColourNet("conv", width=4, features=2, values=3)
    with pytest.raises(ValueError, match=r"reference must have shape \(B, 3, H, W\), got \(1, 1, 8, 8\)"):
        model(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))
    with pytest.raises(TypeError, match="target must be a floating-point tensor"):
        model(torch.zeros(1, 1, 8, 8, dtype=torch.int64), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="same batch size"):
        model(torch.rand(2, 1, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="mixer must be one of psal, conv, full, got 'dense'"):
        ColourNet("dense")
    with pytest.raises(ValueError, match="values must be an int >= 3"):
        ColourNet(values=2)


def test_training_pairs_are_windows_of_one_source():
    pytest.importorskip("skimage")
    from psal.examples import train_colorization as tc

    pic = torch.rand(1, 3, 40, 50, generator=gen(2))
    # the identity window is the crop itself, pixel for pixel
    torch.testing.assert_close(tc._window(pic, 19.5, 24.5, 16), pic[0, :, 12:28, 17:33], atol=1e-5, rtol=0)
    # a quarter turn of a square window is the crop rotated
    turned = tc._window(pic, 19.5, 24.5, 16, angle=math.pi / 2)
    torch.testing.assert_close(turned, pic[0, :, 12:28, 17:33].rot90(1, (1, 2)), atol=1e-4, rtol=0)
    # the random colourings keep the gray picture's luminance
    yy, xx = torch.meshgrid(torch.linspace(0, 3, 30), torch.linspace(0, 4, 40), indexing="ij")
    gray = (0.5 + 0.2 * torch.sin(yy + 2 * xx))[None, None]  # mid-tones: little of the chroma is clipped
    coloured = tc.random_colouring(gray, gen(4))
    L = lab_from_rgb(gray.expand(1, 3, 30, 40))[:, 0]
    assert (lab_from_rgb(coloured)[:, 0] - L).abs().median() < 0.5  # up to the gamut's clipping
    assert lab_from_rgb(coloured)[:, 1:].abs().mean() > 10  # and they are colourful
    data = tc.Pairs(crop=32, seed=0)
    t1, r1 = data.sample(4, gen(5))
    t2, r2 = data.sample(4, gen(5))
    assert t1.shape == r1.shape == (4, 3, 32, 32) and torch.equal(t1, t2) and torch.equal(r1, r2)
    assert 0 <= float(t1.min()) and float(t1.max()) <= 1


def test_a_few_steps_fit_a_batch_and_the_checkpoint_round_trips(tmp_path):
    pytest.importorskip("skimage")
    from psal.examples import train_colorization as tc

    target, reference = tc.Pairs(crop=24, seed=0).sample(4, gen(6))
    truth = lab_from_rgb(target)[:, 1:]
    torch.manual_seed(0)
    model = ColourNet("psal", width=8, features=6, values=4)
    model.attention.generator = gen(7)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = mse_ab(model(target, reference), truth).item()
    for _ in range(40):
        loss = mse_ab(model(target, reference), truth)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first, (first, loss.item())  # measured 0.100 -> 0.059
    path = str(tmp_path / "psal.pt")
    tc._save(path, model, {"steps": 40})
    shipped = str(tmp_path / "colour.pt")
    tc.export(path, shipped)
    back = load_pretrained(shipped)
    assert back.config == model.config
    model.eval()
    a = colorize_with_model(target[:1], reference[:1], model, seed=3)
    b = colorize_with_model(target[:1], reference[:1], back, seed=3)
    assert a.shape == (1, 3, 24, 24) and torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_pretrained(str(tmp_path / "none.pt"))


def test_the_shipped_network_colours_unseen_pictures_better_than_zero_shot():
    """The weights in the package (``python -m psal.examples.train_colorization``, 36 minutes on
    2 cores) on frame pairs of camera moves over pictures it never trained on: far closer to the
    truth than the zero-shot colorizer from the same reference, 3 and 10 frames apart."""
    pytest.importorskip("skimage")
    from psal.apps.colorize import colorize
    from psal.apps.metrics import chroma_psnr
    from psal.bench.colour_video import camera_video, gray_frames

    model = load_pretrained()
    assert model.mixer_kind == "psal" and not model.training
    for name in ("coffee", "astronaut"):
        video = camera_video(name, 80, 60, 12, seed=7)
        gray = gray_frames(video)
        for offset in (3, 10):
            net = colorize_with_model(gray[offset : offset + 1], video[:1], model, seed=0)
            zero_shot = colorize(gray[offset : offset + 1], video[:1], generator=gen(0))
            truth = video[offset : offset + 1]
            # measured coffee 39.3 / 36.2 dB against 31.8 / 32.2; astronaut 34.6 / 33.0 against 28.3 / 28.5
            assert chroma_psnr(net, truth) > chroma_psnr(zero_shot, truth) + 2, (name, offset)
