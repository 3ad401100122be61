"""Architecture contracts of the stage-1 U-Net, the teacher and the student."""

from __future__ import annotations

import io

import pytest
import torch

from CMBDetectLib.errors import ModelError
from CMBDetectLib.networks import (
    ShallowUNet,
    StudentNet,
    TeacherNet,
    build_network,
    count_parameters,
    network_config,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _weights_bytes(network: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(network.state_dict(), buffer)
    return len(buffer.getvalue())


def test_unet_outputs_two_class_logits_on_the_input_grid() -> None:
    network = ShallowUNet(in_channels=2, width=4).eval()
    with torch.no_grad():
        logits = network(torch.randn(2, 2, 24, 24, 24))
    assert logits.shape == (2, 2, 24, 24, 24)
    # Logits, not probabilities: the class scores do not sum to one and leave [0, 1].
    assert not torch.allclose(logits.sum(dim=1), torch.ones(1))


def test_unet_follows_the_paper_layout() -> None:
    network = ShallowUNet(in_channels=2, width=8)
    projection = network.encoder.projection
    assert projection.kernel_size == (1, 1, 1) and projection.out_channels == 3
    first = network.encoder.level1[0]
    assert first.kernel_size == (3, 3, 3) and first.out_channels == 8
    pools = [m for m in network.modules() if isinstance(m, torch.nn.MaxPool3d)]
    assert len(pools) == 2  # two pooling levels (shallow U-Net)
    convs3 = [m for m in network.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size == (3, 3, 3)]
    assert len(convs3) == 10  # two 3x3x3 convs per encoder level (3) and per decoder level (2)
    assert network.head.kernel_size == (1, 1, 1) and network.head.out_channels == 2
    assert network.encoder.out_channels == (8, 16, 32)


def test_parameter_counts_match_the_measured_design_anchor() -> None:
    # DESIGN.md: width 16 -> 0.35 M parameters, width 64 (the paper's) -> 5.7 M.
    assert 0.33e6 < count_parameters(ShallowUNet(width=16)) < 0.37e6
    assert 5.4e6 < count_parameters(ShallowUNet(width=64)) < 5.9e6


def test_teacher_returns_segmentation_and_class_logits() -> None:
    teacher = TeacherNet(width=4, arm_channels=8, fc=(64, 16, 8)).eval()
    with torch.no_grad():
        seg, cls = teacher(torch.randn(3, 2, 24, 24, 24))
    assert seg.shape == (3, 2, 24, 24, 24)
    assert cls.shape == (3, 2)
    # A 1-output sigmoid or a softmax would pin the values to [0, 1]; logits are unbounded scores.
    with torch.no_grad():
        teacher.arm.classifier[-1].bias.fill_(5.0)
        _, cls = teacher(torch.randn(1, 2, 24, 24, 24))
    assert float(cls.min()) > 1.0
    with torch.no_grad():
        assert torch.allclose(teacher.classify(torch.ones(1, 2, 24, 24, 24)),
                              teacher(torch.ones(1, 2, 24, 24, 24))[1])


def test_teacher_classifier_arm_matches_the_paper() -> None:
    teacher = TeacherNet(width=4)
    linear = [m for m in teacher.arm.classifier if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linear] == [1024, 128, 32, 2]
    dropout_index = [i for i, m in enumerate(teacher.arm.classifier) if isinstance(m, torch.nn.Dropout)]
    fc128_index = list(teacher.arm.classifier).index(linear[1])
    assert len(dropout_index) == 1 and dropout_index[0] == fc128_index - 1
    assert teacher.arm.classifier[dropout_index[0]].p == pytest.approx(0.2)
    assert teacher.arm.features[0].kernel_size == (1, 1, 1)


def test_teacher_initialises_from_stage1_weights() -> None:
    stage1 = ShallowUNet(width=4).eval()
    teacher = TeacherNet(width=4, arm_channels=8, fc=(32, 16, 8)).eval()
    teacher.load_stage1(stage1.state_dict())
    x = torch.randn(1, 2, 24, 24, 24)
    with torch.no_grad():
        assert torch.equal(teacher(x)[0], stage1(x))


def test_student_returns_class_logits_for_24_cubed_patches() -> None:
    student = StudentNet().eval()
    with torch.no_grad():
        logits = student(torch.randn(5, 2, 24, 24, 24))
    assert logits.shape == (5, 2)
    assert count_parameters(student) < count_parameters(TeacherNet())


def test_default_bundle_fits_in_15_megabytes() -> None:
    total = (_weights_bytes(ShallowUNet(width=16)) + _weights_bytes(TeacherNet(width=16))
             + _weights_bytes(StudentNet()))
    assert total <= 15e6


def test_build_network_round_trips_through_a_json_config() -> None:
    original = StudentNet(width=4, fc=(32, 16, 8))
    config = network_config(original)
    assert isinstance(config["fc"], list)
    rebuilt = build_network("StudentNet", config)
    rebuilt.load_state_dict(original.state_dict())  # same architecture, same tensor shapes
    assert count_parameters(rebuilt) == count_parameters(original)


def test_build_network_refuses_unknown_names_and_options() -> None:
    with pytest.raises(ModelError, match="unknown network"):
        build_network("os.system", {})
    with pytest.raises(ModelError, match="invalid configuration"):
        build_network("ShallowUNet", {"depth": 5})


def test_stage1_starts_at_the_cmb_prior():
    """An untrained stage 1 predicts a small CMB probability everywhere (prior-initialised head), so
    training learns shapes instead of spending its first hundreds of steps lowering the background."""
    import torch

    from CMBDetectLib.networks import build_network
    from CMBDetectLib.networks.unet import CMB_PRIOR

    torch.manual_seed(0)
    net = build_network("ShallowUNet", {"width": 4}).eval()
    with torch.no_grad():
        probability = torch.softmax(net(torch.rand(1, 2, 24, 24, 24)), dim=1)[:, 1]
    assert float(probability.mean()) < 5 * CMB_PRIOR


def test_a_network_reads_the_leading_feature_channels_it_was_built_for() -> None:
    stage1 = ShallowUNet(width=4).eval()
    x = torch.randn(1, 3, 24, 24, 24)      # image, FRST, image before vessel suppression
    with torch.no_grad():
        assert torch.equal(stage1(x), stage1(x[:, :2]))
        with pytest.raises(RuntimeError):
            StudentNet(in_channels=3, width=4, arm_channels=8, fc=(16, 8, 4))(x[:, :2])


def test_a_vessel_context_teacher_starts_as_stage1_and_can_learn_the_extra_channel() -> None:
    stage1 = ShallowUNet(width=4).eval()
    teacher = TeacherNet(in_channels=3, width=4, arm_channels=8, fc=(32, 16, 8)).eval()
    teacher.load_stage1(stage1.state_dict())
    x = torch.randn(1, 3, 24, 24, 24)
    other = x.clone()
    other[:, 2] = torch.randn(24, 24, 24)
    with torch.no_grad():
        assert torch.equal(teacher(x)[0], stage1(x[:, :2]))
        assert torch.equal(teacher(other)[0], teacher(x)[0])    # zero weights on the extra channel ...
    segmentation, _ = teacher(x)
    segmentation.sum().backward()
    gradient = teacher.unet.encoder.projection.weight.grad
    assert gradient[:, 2].abs().sum() > 0                        # ... which training can move


def test_batch_norm_folding_keeps_the_outputs_and_refuses_training_mode() -> None:
    import copy

    from CMBDetectLib.networks.fusion import fuse_batch_norm

    torch.manual_seed(0)
    for network in (StudentNet(in_channels=3, width=8), ShallowUNet(2, 8, 2)):
        for module in network.modules():   # trained-looking statistics, not the identity of a fresh norm
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.2, 0.2)
        with pytest.raises(ValueError, match="eval mode"):
            fuse_batch_norm(copy.deepcopy(network).train())
        network.eval()
        fused = fuse_batch_norm(copy.deepcopy(network))
        assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in fused.modules())
        x = torch.randn(2, network.encoder.in_channels, 24, 24, 24)
        with torch.inference_mode():
            reference, folded = network(x), fused(x)
        assert torch.allclose(reference, folded, atol=1e-4), (reference - folded).abs().max()
