"""Student backbone levels, feature regressor shapes and strides, level pairing."""

import pytest
import torch

from dreamteacher.core.errors import UserError
from dreamteacher.methods.dt_feat import pair_levels, resize_to
from dreamteacher.nn.backbone import Backbone
from dreamteacher.nn.regressor import FeatureRegressor
from dreamteacher.data.features import FeatureSpec


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext"])
def test_backbone_levels_have_strides_4_to_32(name):
    backbone = Backbone(name)
    feats = backbone(torch.rand(2, 3, 64, 96) * 2 - 1)
    assert [tuple(f.shape[-2:]) for f in feats] == [(64 // s, 96 // s) for s in (4, 8, 16, 32)]
    assert [f.shape[1] for f in feats] == backbone.channels


def test_regressor_output_shapes_and_strides():
    backbone = Backbone("test_resnet")
    regressor = FeatureRegressor(backbone.channels, [7, None, 11, 13], width=32)
    outputs = regressor(backbone(torch.randn(2, 3, 64, 64)))
    assert outputs[1] is None
    assert [tuple(o.shape) for o in outputs if o is not None] == [(2, 7, 16, 16), (2, 11, 4, 4), (2, 13, 2, 2)]
    assert "1" not in regressor.outputs  # nothing is built for a level without output


def test_pairing_sends_the_coarsest_teacher_feature_to_the_deepest_level():
    # the paper's ADM blocks 3, 6, 9, 12 are at strides 16, 8, 4, 2
    specs = [FeatureSpec(3, 1024, 16), FeatureSpec(6, 512, 8), FeatureSpec(9, 512, 4), FeatureSpec(12, 256, 2)]
    assert pair_levels(specs) == [3, 2, 1, 0]
    assert pair_levels([FeatureSpec(9, 8, 4), FeatureSpec(3, 8, 16)]) == [2, 3]


def test_resize_to_averages_when_shrinking():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.allclose(resize_to(x, (2, 2)), torch.nn.functional.avg_pool2d(x, 2))
    assert resize_to(x, (8, 8)).shape[-2:] == (8, 8)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(UserError, match="student.backbone 'resnet_nope'"):
        Backbone("resnet_nope")
