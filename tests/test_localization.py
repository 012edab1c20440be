"""Localisation scores, and Grad-CAM localising a known object on synthetic images far above chance."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_introspect.methods.attribution import grad_cam
from lightning_introspect.methods.localization import chance_level, energy_in_mask, pointing_game


def test_pointing_game_rules():
    mask = torch.zeros(3, 6, 6, dtype=torch.bool)
    mask[:, 1:3, 1:3] = True
    maps = torch.zeros(3, 6, 6)
    maps[0, 2, 2] = 1.0  # max inside
    maps[1, 5, 5] = 1.0  # max outside
    maps[2, 2, 2] = maps[2, 4, 4] = 1.0  # tie: one maximum outside -> miss
    assert pointing_game(maps, mask).tolist() == [1.0, 0.0, 0.0]
    assert pointing_game(torch.zeros(1, 6, 6), mask[:1]).tolist() == [0.0]  # a constant map points nowhere
    near = torch.zeros(1, 6, 6)
    near[0, 3, 2] = 1.0  # one row below the mask
    assert pointing_game(near, mask[:1]).tolist() == [0.0]
    assert pointing_game(near, mask[:1], tolerance=1).tolist() == [1.0]
    # (N, 1, h, w) maps at lower resolution are resized to the mask
    coarse = torch.zeros(1, 1, 3, 3)
    coarse[0, 0, 0, 0] = 1.0
    corner = torch.zeros(1, 6, 6, dtype=torch.bool)
    corner[0, :2, :2] = True
    assert pointing_game(coarse, corner).tolist() == [1.0]
    assert pointing_game(coarse, mask[:1]).tolist() == [0.0]
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(maps, mask, tolerance=-1)
    with pytest.raises(ValueError, match="masks"):
        pointing_game(maps, mask[:2])


def test_energy_in_mask_and_chance():
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :2, :2] = True
    maps = torch.ones(2, 4, 4)
    maps[1] = -1.0
    maps[1, 0, 0] = 3.0  # only positive mass counts
    torch.testing.assert_close(energy_in_mask(maps, mask), torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(chance_level(mask), torch.tensor([0.25, 0.25]))
    assert energy_in_mask(torch.zeros(1, 4, 4), mask[:1]).tolist() == [0.0]


def _objects(n: int, gen: torch.Generator, size: int = 16, obj: int = 4, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise images with one bright square at a random place; the class is the channel it lights up.

    Every class has its own positive evidence (no class is "the absence of the others"), so the
    explained class's evidence is the object. ``masks`` are the squares.
    """
    x = 0.3 * torch.randn(n, classes, size, size, generator=gen)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    y = torch.randint(0, classes, (n,), generator=gen)
    pos = torch.randint(0, size - obj + 1, (n, 2), generator=gen)
    for i in range(n):
        r, c = pos[i].tolist()
        x[i, y[i], r : r + obj, c : c + obj] += 1.0
        masks[i, r : r + obj, c : c + obj] = True
    return x, y, masks


@pytest.mark.slow
def test_grad_cam_localises_the_object_far_above_chance():
    gen = torch.Generator().manual_seed(0)
    x_train, y_train, _ = _objects(512, gen)
    x_test, y_test, masks = _objects(128, gen)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),  # "6": the Grad-CAM layer, 8x8
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
        )
        untrained = copy.deepcopy(net).eval()
        opt = torch.optim.Adam(net.parameters(), lr=2e-2)
        for _ in range(100):  # about 2 s on one core
            idx = torch.randint(0, x_train.shape[0], (64,), generator=gen)
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.9

    cams = grad_cam(net, x_test, y_test, "6")
    chance = chance_level(masks).mean().item()  # 16 / 256
    hits = pointing_game(cams, masks).mean().item()
    energy = energy_in_mask(cams, masks).mean().item()
    assert chance == pytest.approx(1 / 16)
    assert hits > 0.9, (hits, chance)
    assert energy > 3 * chance, (energy, chance)
    # the same architecture untrained does not localise: the score comes from training, not the method
    cold = pointing_game(grad_cam(untrained, x_test, y_test, "6"), masks).mean().item()
    assert cold < hits - 0.5, (cold, hits)
