"""The QueryDiff student end to end: outputs, trainable set, frozen backbone, inference, bad input."""
import pytest
import torch

from qd_core import build_student, load_config
from qd_core.model import QueryDiffStudent


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = load_config("tiny")
    return build_student(cfg).eval()


def test_forward_returns_every_decoder_output(tiny):
    cfg = tiny.cfg.model
    out = tiny(torch.randn(2, 3, 128, 160))
    n_out = cfg.head.decoder_layers + 1
    assert len(out.class_logits) == len(out.mask_logits) == n_out
    for cls, mask in zip(out.class_logits, out.mask_logits):
        assert cls.shape == (2, cfg.head.num_queries, cfg.head.num_classes + 1)
        assert mask.shape == (2, cfg.head.num_queries, 32, 40)
    assert out.agent_queries.shape == (2, cfg.head.num_queries, cfg.backbone.embed_dim)


def test_semantic_logits_combine_class_and_mask_probabilities(tiny):
    images = torch.randn(1, 3, 128, 128)
    logits = tiny.semantic_logits(images)
    assert logits.shape == (1, 19, 32, 32)
    out = tiny(images)
    probs = out.class_logits[-1].softmax(-1)[..., :19]
    expected = torch.einsum("bqc,bqhw->bchw", probs, out.mask_logits[-1].sigmoid())
    torch.testing.assert_close(logits, expected)


def test_window_logits_upsample_the_mask_logits_before_the_sigmoid(tiny, monkeypatch):
    """The reference head's test-time order: mask logits resized bilinearly (half-pixel centres) to the window,
    then sigmoid and the class-weighted sum, not the stride-4 semantic map resized afterwards."""
    images = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(3))
    out = tiny(images)
    # A random student's mask logits hardly vary over the image, which would hide the order: make them vary.
    out.mask_logits[-1] = torch.randn(out.mask_logits[-1].shape, generator=torch.Generator().manual_seed(4)) * 8
    monkeypatch.setattr(tiny, "forward", lambda x, all_layers=True: out)
    probs = out.class_logits[-1].softmax(-1)[..., :19]
    masks = torch.nn.functional.interpolate(out.mask_logits[-1], size=(96, 128), mode="bilinear",
                                            align_corners=False)
    expected = torch.einsum("bqc,bqhw->bchw", probs, masks.sigmoid())
    torch.testing.assert_close(tiny.window_logits(images), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_predict_returns_labels_at_input_size_for_any_size(tiny, mode):
    labels = tiny.predict(torch.randn(2, 3, 100, 230), mode=mode)
    assert labels.shape == (2, 100, 230) and labels.dtype == torch.int64
    assert int(labels.min()) >= 0 and int(labels.max()) < 19


def test_whole_and_slide_agree_on_one_window(tiny):
    images = torch.randn(1, 3, 128, 128)  # equal to the tiny config's window
    torch.testing.assert_close(tiny.predict_logits(images, "whole"), tiny.predict_logits(images, "slide"))


def test_slide_logits_do_not_depend_on_how_many_windows_share_a_forward(tiny, monkeypatch):
    """inference.window_batch only groups windows into batches: every image of a batch is treated on its own."""
    images = torch.randn(2, 3, 150, 260)  # 2 × 3 windows of 128² at stride 85, the last ones pushed back inside
    monkeypatch.setattr(tiny.cfg.inference, "window_batch", 1)
    one = tiny.predict_logits(images, "slide")
    monkeypatch.setattr(tiny.cfg.inference, "window_batch", 3)
    torch.testing.assert_close(tiny.predict_logits(images, "slide"), one, atol=1e-5, rtol=1e-5)


def test_trainable_set_is_reins_agent_queries_link_and_head():
    student = QueryDiffStudent(load_config("tiny"))
    trainable = {n.split(".")[0] for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {"reins", "agent_queries", "query_link", "pixel_decoder", "refine", "decoder"}
    assert not any(p.requires_grad for p in student.backbone.parameters())


def test_backbone_stays_in_eval_mode_after_train():
    student = QueryDiffStudent(load_config("tiny")).train()
    assert student.decoder.training
    assert not student.backbone.training
    assert not any(m.training for m in student.backbone.modules())


def test_every_trainable_parameter_receives_a_gradient():
    torch.manual_seed(0)
    student = QueryDiffStudent(load_config("tiny")).train()
    out = student(torch.randn(2, 3, 128, 128))
    loss = sum(c.square().mean() for c in out.class_logits) + sum(m.square().mean() for m in out.mask_logits)
    loss = loss + out.agent_queries.square().mean()
    loss.backward()
    missing = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_without_reins_agent_queries_use_their_own_tokens():
    student = QueryDiffStudent(load_config("tiny", ["model.reins.enabled=false"]))
    assert student.reins is None
    out = student(torch.randn(1, 3, 128, 128))
    assert out.agent_queries.shape == (1, 20, 64)


@pytest.mark.parametrize("bad, match", [
    (torch.randn(1, 4, 128, 128), "3 channels"),
    (torch.zeros(1, 3, 128, 128, dtype=torch.uint8), "float"),
    (torch.randn(3, 128, 128), r"\(B, 3, H, W\)"),
    (torch.randn(1, 3, 120, 128), "multiples of 32"),
])
def test_bad_input_gives_clear_value_error(tiny, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(bad)


def test_normalize_applies_imagenet_statistics(tiny):
    rgb = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    torch.testing.assert_close(tiny.normalize(rgb), torch.zeros(1, 3, 2, 2))


@pytest.mark.slow
def test_vitl16_512_forward_on_cpu_has_documented_shapes():
    torch.manual_seed(0)
    student = build_student(load_config("vitl16_512")).eval()
    with torch.no_grad():
        out = student(torch.randn(1, 3, 512, 512))
        sem = student.combine(out.class_logits[-1], out.mask_logits[-1])
    assert len(out.class_logits) == 10
    assert out.class_logits[-1].shape == (1, 100, 20)
    assert out.mask_logits[-1].shape == (1, 100, 128, 128)
    assert out.agent_queries.shape == (1, 100, 1024)
    assert sem.shape == (1, 19, 128, 128)
    assert torch.isfinite(sem).all()


def test_a_forward_moves_no_host_tensor_to_the_device_after_the_first(monkeypatch):
    """On a GPU a host tensor moved to the device (``torch.tensor(..., device="cuda")``, ``.to("cuda")``) is a copy
    that waits for the stream to drain and is not allowed while a CUDA graph is captured. After the first forward
    (which makes the shared constants: level sizes and offsets, position encodings) a forward must make none, in
    training mode too. The meta device stands in for the GPU."""
    from torch.utils._pytree import tree_flatten
    from torch.utils._python_dispatch import TorchDispatchMode

    from qd_core.summary import build_meta_student

    copies: list[str] = []

    class HostToDevice(TorchDispatchMode):  # .to(device) / copy_ of a host tensor
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            if any(t.device.type == "cpu" for t in inputs) and any(t.is_meta for t in outputs):
                copies.append(str(func))
            return out

    def spy(make):  # torch.tensor / as_tensor build on the host and move below the dispatcher
        def made_on_device(data, *args, device=None, **kwargs):
            if device is not None and torch.device(device).type != "cpu":
                copies.append(f"torch.{make.__name__}({data!r}, device={device})")
            return make(data, *args, device=device, **kwargs)
        return made_on_device

    student = build_meta_student(load_config("vitl16_512"))
    images = torch.zeros(1, 3, 512, 512, device="meta")
    for train in (False, True):
        student.train(train)
        student(images)  # makes the constants
        with monkeypatch.context() as patch, HostToDevice():
            patch.setattr(torch, "tensor", spy(torch.tensor))
            patch.setattr(torch, "as_tensor", spy(torch.as_tensor))
            student(images)
        assert copies == [], f"host-to-device copies in a {'training' if train else 'eval'} forward: {copies}"


def test_full_size_labels_resize_mask_logits_with_half_pixel_centres_before_the_sigmoid() -> None:
    """The export's labels must be the argmax of what predict computes (window_logits, METHOD §5/§6.4: bilinear,
    align_corners=False, resized before the sigmoid); a non-integer scale makes the corner convention visible."""
    student = QueryDiffStudent(load_config("tiny")).eval()
    g = torch.Generator().manual_seed(5)
    classes = torch.randn(2, 6, student.num_classes + 1, generator=g) * 3
    masks = torch.randn(2, 6, 7, 5, generator=g) * 8  # strongly varying, so labels change across the image
    size = (30, 17)
    probs = classes.softmax(-1)[..., :student.num_classes]
    full = torch.nn.functional.interpolate(masks, size=size, mode="bilinear", align_corners=False)
    expected = torch.einsum("bqc,bqhw->bchw", probs, full.sigmoid()).argmax(1)
    labels = student.full_size_labels(classes, masks, size)
    assert labels.shape == (2, *size) and labels.dtype == torch.int32
    assert torch.equal(labels.long(), expected)
