"""An honest learning test: a PSAL block learns a task that needs non-local information, and a
conv-only network with as many parameters cannot (the full run: python -m psal.examples.nonlocal_copy)."""

from __future__ import annotations

import torch

from psal.examples import nonlocal_copy as task


def test_the_task_cannot_be_solved_locally():
    # The right half's code is the left half's moved by a random shift, different per sample.
    inputs, target, mask = task.make_batch(4, 16, torch.Generator().manual_seed(0))
    assert inputs.shape == (4, 8, 16, 32) and target.shape == (4, 3, 16, 16) and mask.shape == (4, 16, 32)
    assert mask[:, :, :16].all() and not mask[:, :, 16:].any()
    assert (inputs[:, 4:7, :, 16:] == 0).all()  # no texture where it must be produced
    code_left, code_right, texture = inputs[:, :4, :, :16], inputs[:, :4, :, 16:], inputs[:, 4:7, :, :16]
    for b in range(4):  # one shift moves the code and the texture alike
        hits = [(dy, dx) for dy in range(16) for dx in range(16) if torch.equal(code_left[b].roll((dy, dx), (1, 2)), code_right[b])]
        assert len(hits) == 1
        assert torch.equal(texture[b].roll(hits[0], (1, 2)), target[b])


def test_psal_learns_what_convolutions_of_the_same_size_cannot():
    torch.manual_seed(0)
    psal_net = task.PSALNet(num_neighbors=4, learn_temperature=True)
    conv_net = task.ConvNet()
    n_psal, n_conv = task.num_parameters(psal_net), task.num_parameters(conv_net)
    assert abs(n_conv - n_psal) / n_psal < 0.1, (n_psal, n_conv)
    psal_loss = task.train(psal_net, steps=120, size=16)
    conv_loss = task.train(conv_net, steps=120, size=16)
    # Predicting zero scores 1.0 (unit-variance textures); measured: PSAL 0.15, conv 0.996.
    assert conv_loss > 0.9
    assert psal_loss < 0.4
