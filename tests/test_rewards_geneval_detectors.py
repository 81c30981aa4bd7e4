"""GenEval's real-image detectors (Mask2Former, OWLv2 via transformers) and the CLIP colour classifier,
on tiny random models saved to tmp dirs: they run end to end and produce well-formed detections (their
accuracy needs real weights; see docs/rewards.md)."""

from __future__ import annotations

import pytest
import torch
from tiny_clip import _byte_vocab, save_tiny_transformers_clip

from rewards import load_reward
from rewards.geneval.detectors import (
    COCO_CLASSES,
    GENEVAL_COLORS,
    ClipColorClassifier,
    Mask2FormerDetector,
    Owlv2Detector,
    box_from_mask,
)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_transformers_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def mask2former_dir(tmp_path_factory):
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    directory = tmp_path_factory.mktemp("mask2former")
    backbone = SwinConfig(
        image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    labels = {
        0: "circle",
        1: "square",
        2: "mouse",
    }  # "mouse" is COCO's spelling of GenEval's "computer mouse"
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
        dim_feedforward=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_queries=5, num_labels=3,
        id2label=labels, label2id={v: k for k, v in labels.items()}, common_stride=4,
    )  # fmt: skip
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(config).eval().save_pretrained(directory)
    Mask2FormerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def owlv2_dir(tmp_path_factory):
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    directory = tmp_path_factory.mktemp("owlv2")
    vocab = _byte_vocab()
    special = {k: vocab[v] for k, v in [("bos_token_id", "<|startoftext|>"), ("eos_token_id", "<|endoftext|>"), ("pad_token_id", "<|endoftext|>")]}  # fmt: skip
    config = Owlv2Config(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 16, **special},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    Owlv2ForObjectDetection(config).eval().save_pretrained(directory)
    Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[]),
    ).save_pretrained(directory)
    return directory


def _images(batch: int = 2, height: int = 48, width: int = 48) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(0))


def test_box_from_mask_is_exclusive_like_mmdetection():
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[2:5, 3:9] = True
    assert box_from_mask(mask) == (3.0, 2.0, 9.0, 5.0)
    assert box_from_mask(torch.zeros(4, 4, dtype=torch.bool)) is None


def test_color_classifier_names_one_geneval_colour_per_object(clip_dir):
    classifier = ClipColorClassifier(clip_dir, backend="transformers")
    image = _images(1)[0]
    mask = torch.zeros(48, 48, dtype=torch.bool)
    mask[10:30, 5:25] = True
    colors = classifier(image, [(5, 10, 25, 30), (0, 0, 48, 48)], [mask, None], "circle")
    assert len(colors) == 2 and set(colors) <= set(GENEVAL_COLORS)
    assert classifier.classifier("circle").shape == (16, 10)
    assert classifier(image, [(5, 10, 25, 30)], [mask], "circle") == colors[:1]  # deterministic


def test_mask2former_detector_feeds_the_geneval_reward(mask2former_dir, clip_dir):
    detector = Mask2FormerDetector(
        mask2former_dir, clip_path=clip_dir, clip_backend="transformers", min_confidence=0.0
    )
    assert "computer mouse" in detector.classes and "mouse" not in detector.classes
    detections = detector(_images())
    assert len(detections) == 2 and all(detections)
    for det in (d for image in detections for d in image):
        assert det.class_name in detector.classes and det.color in GENEVAL_COLORS
        x0, y0, x1, y1 = det.bbox
        assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48 and 0 <= det.confidence <= 1
    reward = load_reward(
        "geneval",
        detector="mask2former",
        mode="partial",
        detector_kwargs={
            "model_path": mask2former_dir,
            "clip_path": clip_dir,
            "clip_backend": "transformers",
        },
    )
    meta = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}]}
    out = reward(_images(), ["a red circle"] * 2, [meta] * 2)
    assert out.scores.shape == (2,) and ((out.scores >= 0) & (out.scores <= 1)).all()


def test_owlv2_detector_runs_with_nms_and_clamped_boxes(owlv2_dir):
    detector = Owlv2Detector(owlv2_dir, classes=["circle", "square"], query_template="{}", min_confidence=0.0)
    detections = detector(_images(2, 48, 40))
    assert len(detections) == 2
    for det in (d for image in detections for d in image):
        x0, y0, x1, y1 = det.bbox
        assert det.class_name in ("circle", "square") and det.color is None
        assert 0 <= x0 < x1 <= 40 and 0 <= y0 < y1 <= 48
    loose = Owlv2Detector(
        owlv2_dir, classes=["circle", "square"], query_template="{}", min_confidence=0.0, nms_iou=1.0
    )
    assert sum(map(len, loose(_images(2, 48, 40)))) >= sum(map(len, detections))
    assert len(COCO_CLASSES) == 80
