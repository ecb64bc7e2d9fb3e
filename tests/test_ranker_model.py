"""Ranker networks: shapes, ranges, the padding guarantee, the model.pt payload."""

from __future__ import annotations

import functools

import pytest
import torch

from pipeline.errors import ConfrankError
from pipeline.ranker.model import (RankerConfig, conf_width, box_statistics, build_ranker, model_from_payload,
                                   model_payload)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


N = 64
CONFIGS = {
    "mobilenet": RankerConfig(num_boxes=N, backbone="mobilenet", image_size=128),
    "resnet50": RankerConfig(num_boxes=N, backbone="resnet50", image_size=64),
    "box-only": RankerConfig(num_boxes=N, image_branch="none"),
}


def inputs(config, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, config.image_size, config.image_size, generator=g)
    xy = torch.rand(batch, N, 2, generator=g) * 0.8
    wh = torch.rand(batch, N, 2, generator=g) * 0.2 + 0.01
    conf = torch.rand(batch, N, 1, generator=g).sort(dim=1, descending=True).values
    mask = torch.zeros(batch, N, dtype=torch.bool)
    mask[0, :40] = True
    mask[1, :5] = True
    return image, torch.cat([xy, wh, conf], dim=2), mask


def perturbed(model):
    """The model with its zero-initialised output layers randomised (so outputs vary)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("fc.weight", "mlp.4.weight")):
                p.normal_(0, 0.5)
    return model.eval()


@functools.cache
def trained_like(name):
    return perturbed(build_ranker(CONFIGS[name]))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shapes_range_and_padded_slots(name):
    config = CONFIGS[name]
    model = trained_like(name)
    image, boxes, mask = inputs(config)
    with torch.no_grad():
        out = model(image, boxes, mask)
    assert out.shape == (2, N)
    assert ((out >= 0) & (out <= 1)).all()
    assert (out[~mask] == 0).all()
    assert not torch.equal(out[mask], boxes[..., 4][mask])  # the residual is not trivially 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_padded_rows_never_influence_real_outputs(name):
    config = CONFIGS[name]
    model = trained_like(name)
    image, boxes, mask = inputs(config)
    garbage = boxes.clone()
    garbage[~mask] = torch.rand(int((~mask).sum()), 5) * 5 + 3
    with torch.no_grad():
        a = model(image, boxes, mask)
        b = model(image, garbage, mask)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_untrained_model_returns_detector_confidence(name):
    config = CONFIGS[name]
    model = build_ranker(config).eval()
    image, boxes, mask = inputs(config)
    with torch.no_grad():
        out = model(image, boxes, mask)
    assert torch.equal(out[mask], boxes[..., 4][mask])


def test_box_statistics_by_hand():
    # box 0 and 1 overlap with IoU 1/3 (x-shifted by half a width); box 2 stands alone
    boxes = torch.tensor([[[0.0, 0.0, 0.2, 0.2, 0.9], [0.1, 0.0, 0.2, 0.2, 0.8],
                           [0.6, 0.6, 0.1, 0.1, 0.7], [0.0, 0.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, True, True, False]])
    f = box_statistics(boxes, mask, topk=2)
    assert f.shape == (1, 4, 14)
    assert torch.equal(f[0, 3], torch.zeros(14))
    top_iou, top_conf, max_higher = f[0, :, 7:9], f[0, :, 10:12], f[0, :, 12]
    assert top_iou[0, 0] == pytest.approx(1 / 3) and top_iou[1, 0] == pytest.approx(1 / 3)
    assert top_conf[0, 0] == pytest.approx(0.8) and top_conf[1, 0] == pytest.approx(0.9)
    assert top_iou[2].tolist() == [0.0, 0.0] and top_conf[2].tolist() == [0.0, 0.0]
    assert max_higher.tolist()[:3] == pytest.approx([0.0, 1 / 3, 0.0])
    assert f[0, :3, 6].tolist() == pytest.approx([0.0, 1 / 3, 2 / 3])  # rank / count


def test_payload_round_trip_and_foreign_files_refused():
    config = CONFIGS["box-only"]
    model = perturbed(build_ranker(config))
    payload = model_payload(model, config, {"note": "x"})
    rebuilt, cfg = model_from_payload(payload, "model.pt")
    assert cfg == config
    image, boxes, mask = inputs(config)
    with torch.no_grad():
        assert torch.equal(model(image, boxes, mask), rebuilt.eval()(image, boxes, mask))
    with pytest.raises(ConfrankError, match="not a confrank ranker"):
        model_from_payload({"state_dict": {}}, "resnet50.pth")
    with pytest.raises(ConfrankError, match="version"):
        model_from_payload({**payload, "version": 99}, "model.pt")
    bad = {**payload, "config": {**payload["config"], "hidden": 8}}
    with pytest.raises(ConfrankError, match="do not match"):
        model_from_payload(bad, "model.pt")


def test_bad_configs_rejected():
    with pytest.raises(ConfrankError):
        RankerConfig(backbone="vgg")
    with pytest.raises(ConfrankError):
        RankerConfig(bpn_layers=4)
    assert conf_width(RankerConfig(backbone="mobilenet")) == 64
    assert conf_width(RankerConfig()) == 256
    with pytest.raises(ConfrankError, match="output must be one of"):
        RankerConfig(output="tanh")


def test_output_is_clipped_to_unit_interval():
    config = RankerConfig(num_boxes=4, image_branch="none")
    model = build_ranker(config)
    boxes = torch.tensor([[[0.1, 0.1, 0.2, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2, 0.9],
                           [0.3, 0.3, 0.1, 0.1, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, True, True, False]])
    with torch.no_grad():
        model.mlp[-1].bias.fill_(-0.4)
        assert model(None, boxes, mask).tolist()[0] == pytest.approx([0.0, 0.5, 0.1, 0.0], abs=1e-6)
        model.mlp[-1].bias.fill_(0.3)
        assert model(None, boxes, mask).tolist()[0] == pytest.approx([0.5, 1.0, 0.8, 0.0], abs=1e-6)


def test_logit_output_never_saturates_and_keeps_the_order():
    """sigmoid(logit(c) + r): r = 0 gives c back, a constant r shifts every box the same way
    in logit space (the order is kept) without the ties clip(c + r) makes at 1, and 0 or 1
    inputs stay finite; padded slots are 0."""
    config = RankerConfig(num_boxes=5, image_branch="none", output="logit")
    model = build_ranker(config)
    boxes = torch.tensor([[[0.1, 0.1, 0.2, 0.2, 1.0], [0.5, 0.5, 0.2, 0.2, 0.9], [0.3, 0.3, 0.1, 0.1, 0.5],
                           [0.2, 0.6, 0.1, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, True, True, True, False]])
    with torch.no_grad():
        out = model(None, boxes, mask)[0]
        assert out[:4].tolist() == pytest.approx([1.0, 0.9, 0.5, 0.0], abs=2e-6) and out[4] == 0
        for bias in (-8.0, 8.0):  # (float32 itself rounds sigmoid to 0 or 1 beyond about +-17)
            model.mlp[-1].bias.fill_(bias)
            out = model(None, boxes, mask)[0]
            assert torch.isfinite(out).all() and out[4] == 0
            assert torch.equal(torch.sort(out[:4], descending=True).indices, torch.arange(4))
        model.mlp[-1].bias.fill_(3.0)  # where clip(c + r) would put 0.9 and 0.5 both at 1
        out = model(None, boxes, mask)[0]
        assert 1 > out[1] > out[2] > 0.9
        assert out[2].item() == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item(), abs=1e-6)
