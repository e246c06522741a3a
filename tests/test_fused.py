"""Conv + BN fused at inference on channels-last tensors (crm_d2.modeling.fused)."""

import pytest
import torch
from torch import nn

from crm_d2.modeling import CRMArch, CRMNet
from crm_d2.modeling.fused import conv_bn


def _pair(k: int, stride: int = 1, groups: int = 1, dilation: int = 1):
    torch.manual_seed(k * 10 + stride + groups)
    cin = 8
    conv = nn.Conv2d(cin, 12 if groups == 1 else cin, k, stride=stride, padding=(k // 2) * dilation,
                     dilation=dilation, groups=groups, bias=False)
    bn = nn.BatchNorm2d(conv.out_channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return conv.eval(), bn.eval()


@pytest.mark.parametrize("k,stride,groups,dilation", [(1, 1, 1, 1), (3, 2, 1, 1), (5, 1, 8, 2),
                                                      (1, 2, 1, 1)])
def test_fused_matches_conv_then_bn(k, stride, groups, dilation):
    conv, bn = _pair(k, stride, groups, dilation)
    x = torch.randn(2, 8, 13, 11)
    ref = bn(conv(x))
    with torch.no_grad():
        out = conv_bn(x.contiguous(memory_format=torch.channels_last), conv, bn)
        again = conv_bn(x.contiguous(memory_format=torch.channels_last), conv, bn)  # cached
    assert out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out, again)


def test_plain_path_outside_fast_inference_and_cache_follows_weights():
    conv, bn = _pair(1)
    x = torch.randn(1, 8, 6, 7)
    with torch.no_grad():
        # contiguous input: exactly bn(conv(x)) (exact=True relies on this)
        assert torch.equal(conv_bn(x, conv, bn), bn(conv(x)))
        xc = x.contiguous(memory_format=torch.channels_last)
        first = conv_bn(xc, conv, bn)
        bn.running_mean.add_(1.0)  # in-place change: the folded weights must follow
        torch.testing.assert_close(conv_bn(xc, conv, bn), bn(conv(x)), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(first, conv_bn(xc, conv, bn))
    # with autograd on, the plain modules run (gradients flow to the BN parameters)
    out = conv_bn(x.contiguous(memory_format=torch.channels_last), conv, bn)
    out.sum().backward()
    assert bn.weight.grad is not None


@pytest.mark.parametrize("encoder", ["resnet", "efficientnet_lite0"])
def test_whole_encoder_channels_last_matches_contiguous(encoder):
    torch.manual_seed(0)
    arch = (CRMArch(block="basic", layers=(1, 1, 1, 1), width=16, feat_dim=32,
                    mlp_hidden=(16,), with_layer4=False)
            if encoder == "resnet" else
            CRMArch(encoder="efficientnet_lite0", feat_dim=32, mlp_hidden=(16,),
                    with_layer4=False))
    net = CRMNet(arch).eval()
    for m in net.modules():  # non-trivial statistics so that folding matters
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    img, msk = torch.randn(1, 3, 40, 56), torch.rand(1, 1, 40, 56) * 2 - 1
    with torch.no_grad():
        ref = net.project_features(net.encode(img, msk))
        net.to(memory_format=torch.channels_last)
        out = net.project_features(net.encode(
            img.contiguous(memory_format=torch.channels_last),
            msk.contiguous(memory_format=torch.channels_last)))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_inference_mode_models_and_cache_clearing():
    """Models built under torch.inference_mode work (no version counters); clear_folded."""
    from crm_d2.modeling.fused import clear_folded

    with torch.inference_mode():
        conv, bn = _pair(3)
        x = torch.randn(1, 8, 9, 10).contiguous(memory_format=torch.channels_last)
        ref = bn(conv(x.contiguous()))
        out = conv_bn(x, conv, bn)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert hasattr(bn, "_crm_folded")
    clear_folded(nn.Sequential(conv, bn))
    assert not hasattr(bn, "_crm_folded")


def test_refiner_under_inference_mode_and_empty_batch():
    from conftest import random_crm

    from crm_d2 import CRMRefiner
    from crm_d2.modeling.crm import TINY_ARCH

    with torch.inference_mode():
        ref = CRMRefiner(random_crm(TINY_ARCH, 1, random_bn=True), scales=(1.0,))
        img, msk = torch.randn(1, 3, 20, 24), torch.rand(1, 1, 20, 24) * 2 - 1
        out = ref.refine_tensors(img, msk)
        assert out.shape == (1, 20, 24)
        empty = ref.refine_tensors(img[:0], msk[:0])
        assert empty.shape == (0, 20, 24)
