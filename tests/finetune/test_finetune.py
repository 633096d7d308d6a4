"""jobs/finetune on a local Ray cluster: it learns, survives a killed worker mid-epoch, skips unusable
images, resumes only what matches, and fails cleanly.

The learning proof trains a small DETR from scratch (ResNet-18, width 64, 1 encoder and 2 decoder
layers, 10 queries) on synthetic shapes with 2 Ray Train workers on CPU. One large shape per image
(plus empty images) keeps it within a couple of minutes on 2 cores: with several shapes per image
DETR needs far more steps before its queries attend to single objects.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs
import torch
from torch.utils.data import DataLoader

import detr
from jobs.finetune import main, parse_config, run
from jobs.finetune.data import CocoDetectionDataset, read_training_set
from jobs.finetune.engine import (
    NonFiniteLossError,
    TooManyBadImagesError,
    build_model,
    coco_box_ap,
    collate_detection_batch,
    predict_detections,
    train_one_epoch,
)
from jobs.finetune.settings import FinetuneConfig
from jobs.finetune.trainer import initial_model
from jobs.finetune.transforms import AugmentationConfig, eval_transform
from jobs.synthetic_shapes import ShapesConfig, generate

from checkpoints import write_tiny_checkpoint

SHAPE_NAMES = ["square", "circle", "triangle"]  # ids 10, 20, 30
ONE_BIG_SHAPE = ShapesConfig(image_size=128, min_object_size=40, max_object_size=80, max_objects=1)
TINY_SCRATCH = [
    "--weights",
    "scratch",
    "--backbone",
    "resnet18",
    "--hidden-dim",
    "64",
    "--num-heads",
    "4",
    "--enc-layers",
    "1",
    "--dec-layers",
    "2",
    "--ffn-dim",
    "128",
    "--num-queries",
    "10",
    "--dropout",
    "0",
    "--min-size",
    "128",
    "--max-size",
    "213",
]


def dataset_args(root: str, validation: bool = True) -> list[str]:
    args = ["--train-images", f"{root}/train/images", "--train-annotations", f"{root}/train/annotations.json"]
    if validation:
        args += ["--val-images", f"{root}/val/images", "--val-annotations", f"{root}/val/annotations.json"]
    return args


def box_ap50(model: detr.DETR, images: str, annotations_uri: str, min_size: int, max_size: int) -> float:
    """AP50 of ``model`` on a dataset, predicted here in one process."""
    annotations = read_training_set(annotations_uri)
    dataset = CocoDetectionDataset(images, annotations, eval_transform(AugmentationConfig.scaled(min_size, max_size)))
    loader = DataLoader(dataset, batch_size=8, collate_fn=collate_detection_batch)
    return coco_box_ap(annotations.instances, predict_detections(model, loader, torch.device("cpu")))["AP50"]


def _alive_train_workers() -> list[dict]:
    from ray._private import state

    return [a for a in state.actors().values() if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"]


def test_learns_synthetic_shapes_with_two_workers(ray_cluster, tmp_path):
    root = str(tmp_path)
    generate(f"{root}/train", 200, seed=0, config=ONE_BIG_SHAPE)
    generate(f"{root}/val", 60, seed=1, config=ONE_BIG_SHAPE)
    args = parse_config(
        [
            *dataset_args(root),
            "--output",
            f"{root}/out",
            *TINY_SCRATCH,
            "--workers",
            "2",
            "--batch-size",
            "2",
            "--epochs",
            "12",
            "--lr-drop",
            "10",
            "--lr",
            "1e-4",
            "--lr-backbone",
            "1e-4",
            "--augmentation",
            "scale",
            "--loader-workers",
            "0",
        ]
    )
    val = (f"{root}/val/images", f"{root}/val/annotations.json", 128, 213)
    categories = read_training_set(f"{root}/train/annotations.json").categories
    chance = box_ap50(initial_model(args, categories), *val)  # the same random init the run starts from

    summary = main(args)

    history = summary.metrics["epochs"]
    assert [m["epoch"] for m in history] == list(range(12))
    assert [m["lr"] for m in history] == [1e-4] * 10 + [pytest.approx(1e-5)] * 2  # StepLR at --lr-drop
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    for term in ("loss_ce", "loss_bbox", "loss_giou"):
        assert history[-1][term] < history[0][term]
    best_ap50 = max(m["val_AP50"] for m in history)
    print(
        f"chance AP50 {chance:.4f}; val AP50 by epoch {[round(m['val_AP50'], 3) for m in history]}; "
        f"loss {[round(m['loss'], 2) for m in history]}"
    )
    # Chance (random init) measures ~0.003; a detector that found shapes and their colours is far above it.
    assert chance < 0.02 and best_ap50 > max(0.15, 10 * chance)
    assert history[-1]["val_AP50"] > 0.1

    best = detr.from_pretrained(f"{root}/out/best.pth")
    assert box_ap50(best, *val) == pytest.approx(max(history, key=lambda m: m["val_AP"])["val_AP50"], abs=0.02)
    final = detr.from_pretrained(f"{root}/out/final.pth")
    assert [(c.id, c.name) for c in final.categories] == list(zip([10, 20, 30], SHAPE_NAMES))
    metrics = json.loads(Path(f"{root}/out/metrics.json").read_text())
    assert metrics["epochs"] == history and metrics["train_images"] == 200 and metrics["skipped_images"] == 0

    # The hub folder is best.pth in transformers' layout: transformers loads it and predicts what we do.
    from transformers import DetrForObjectDetection

    hub = DetrForObjectDetection.from_pretrained(f"{root}/out/hub").eval()
    assert hub.config.id2label == dict(enumerate(SHAPE_NAMES))
    pixel_values, pixel_mask = torch.randn(1, 3, 128, 160), torch.ones(1, 128, 160, dtype=torch.bool)
    with torch.no_grad():
        ours, theirs = best(pixel_values, pixel_mask), hub(pixel_values=pixel_values, pixel_mask=pixel_mask.long())
    torch.testing.assert_close(ours["pred_logits"], theirs.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours["pred_boxes"], theirs.pred_boxes, atol=1e-4, rtol=0)
    # Curves: TensorBoard scalars per step and epoch, validation AP, and the PNG.
    scalars = read_scalars(Path(f"{root}/out/tensorboard"))
    assert [v for _, v in scalars["val/AP50"]] == pytest.approx([m["val_AP50"] for m in history])
    assert len(scalars["train/loss"]) == history[-1]["step"] // 20
    assert Path(f"{root}/out/curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The annotate job labels images with the new classes.
    from jobs.annotate import main as annotate
    from jobs.annotate import parse_config as annotate_args

    annotate(
        annotate_args(
            [
                f"{root}/val/images",
                f"{root}/annotated",
                "--weights",
                f"{root}/out/final.pth",
                "--threshold",
                "0.3",
                "--min-size",
                "128",
                "--max-size",
                "213",
                "--actors",
                "1",
            ]
        )
    )
    rows = pq.read_table(f"{root}/annotated").to_pylist()
    labels = [(d["category_id"], d["label"]) for row in rows for d in row["detections"]]
    assert len(rows) == 60 and labels and set(labels) <= set(zip([10, 20, 30], SHAPE_NAMES))


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every TensorBoard event file in ``folder``, plus ``"session start"``:
    the steps at which a writer told TensorBoard to drop the earlier files' later events (``purge_step``).
    TFRecord framing: length, its CRC, the Event protobuf, its CRC."""
    import struct

    from tensorboardX.proto.event_pb2 import Event, SessionLog

    scalars: dict[str, list[tuple[int, float]]] = {"session start": []}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                scalars["session start"].append((event.step, 0.0))
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_killed_worker_resumes_mid_epoch_from_object_storage(ray_cluster, s3_bucket, tmp_path, capsys):
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    root = f"s3://{s3_bucket}"
    small = ShapesConfig(image_size=96, min_object_size=30, max_object_size=60, max_objects=1)
    generate(f"{root}/train", 64, seed=0, config=small)
    argv = [
        *dataset_args(root, validation=False),
        "--output",
        f"{root}/run",
        *TINY_SCRATCH[:-4],
        "--min-size",
        "96",
        "--max-size",
        "160",
        "--workers",
        "2",
        "--batch-size",
        "2",  # 64 images / (2 x 2) = 16 steps per epoch
        "--epochs",
        "2",
        "--loader-workers",
        "1",
        "--max-failures",
        "1",
        "--checkpoint-every-steps",
        "4",
        "--log-every-steps",
        "2",
    ]
    outcome: dict = {}
    job = threading.Thread(target=lambda: outcome.update(summary=main(parse_config(argv))), daemon=True)
    job.start()
    fs = s3fs.S3FileSystem()
    snapshot = f"{s3_bucket}/run/checkpoints/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}"
    deadline = time.monotonic() + 240
    registered: list[int] = []
    workers: list[dict] = []
    # The workers are looked up first (the state API lists every actor of the session: seconds, late in a
    # suite), so that the kill follows the first registered checkpoint at once.
    while not registered:  # the snapshot lists a checkpoint once the controller has registered it
        assert job.is_alive() and time.monotonic() < deadline, "the run ended before a worker could be killed"
        if not workers:
            workers = _alive_train_workers()
            continue
        fs.invalidate_cache()
        if fs.exists(snapshot):
            registered = [int(s) for s in re.findall(r"epoch_0000_step_(\d+)", fs.cat(snapshot).decode())]
        time.sleep(0.05)
    victim = workers[0]
    os.kill(victim["Pid"], signal.SIGKILL)
    job.join(timeout=300)

    history = outcome["summary"].metrics["epochs"]
    assert [m["epoch"] for m in history] == [0, 1]
    # The restarted workers began at the mid-epoch checkpoint the kill followed (or the next one, if it was
    # registered before the kill landed), at the sample that checkpoint had reached - not at the epoch's start.
    interrupted = history[0]
    assert interrupted["resumed_from_epoch"] == 0
    assert interrupted["resumed_from_step"] in (max(registered), max(registered) + 4), (registered, interrupted)
    assert interrupted["resumed_at_position"] == 4 * interrupted["resumed_from_step"] < 64
    # Each image once per epoch across the restart: the steps before the kill and after it add up to 64.
    assert [m["images"] for m in history] == [64, 64] and [m["step"] for m in history] == [16, 32]
    assert victim["Pid"] not in {a["Pid"] for a in _alive_train_workers()}
    model = detr.from_pretrained(f"{root}/run/final.pth")
    assert [c.name for c in model.categories] == SHAPE_NAMES

    # Curves on object storage: TensorBoard events (the resumed session's purge the replayed steps) and a PNG.
    fs.get(f"{s3_bucket}/run/tensorboard/", str(tmp_path / "tensorboard"), recursive=True)
    scalars = read_scalars(tmp_path / "tensorboard")
    assert {step for step, _ in scalars["train/loss"]} == set(range(2, 33, 2))
    assert sorted(step for step, _ in scalars["session start"]) == [0, interrupted["resumed_from_step"]]
    assert [step for step, _ in scalars["epoch/loss"]] == [16, 32]
    assert fs.cat(f"{s3_bucket}/run/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"

    # Started again as it was: complete, nothing trained. With another --lr: refused, one line, exit 2.
    capsys.readouterr()
    assert run(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("already complete: wrote ")
    assert run([*argv, "--lr", "2e-4"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--lr 0.0001 in the checkpoint, 0.0002 now" in error[0], error


def test_unusable_images_are_skipped_and_counted_and_a_changed_run_restarts_only_when_asked(
    ray_cluster, tmp_path, capsys
):
    generate(str(tmp_path / "train"), 8, seed=0, config=ONE_BIG_SHAPE)
    truncated = sorted((tmp_path / "train" / "images").iterdir())[3]
    truncated.write_bytes(truncated.read_bytes()[:100])
    argv = [
        *dataset_args(str(tmp_path), False),
        "--output",
        str(tmp_path / "out"),
        *TINY_SCRATCH,
        "--epochs",
        "2",
        "--loader-workers",
        "0",
        "--max-bad-fraction",
        "0.2",
    ]
    assert run(argv) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["skipped_images"] == 1
    assert metrics["skipped"] == [f"{truncated}: not a decodable image (truncated PNG)"]
    assert [(m["images"], m["skipped_images"]) for m in metrics["epochs"]] == [(7, 1), (7, 1)]
    assert "1 unusable training images skipped" in capsys.readouterr().out

    # --epochs is not part of the fingerprint: raising it extends the finished run by the missing epochs.
    assert run([*argv, "--epochs", "3"]) == 0
    extended = json.loads((tmp_path / "out" / "metrics.json").read_text())["epochs"]
    assert extended[:2] == metrics["epochs"] and extended[2]["epoch"] == 2 and extended[2]["resumed_from_epoch"] == 2
    assert "resuming " in capsys.readouterr().out

    # Another class table is refused before Ray Train starts (it used to fail the strict load, and be retried).
    document = json.loads((tmp_path / "train" / "annotations.json").read_text())
    document["categories"][0]["name"] = "box"
    (tmp_path / "renamed.json").write_text(json.dumps(document))
    renamed = [a if a != f"{tmp_path}/train/annotations.json" else str(tmp_path / "renamed.json") for a in argv]
    assert run(renamed) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"--train-annotations {tmp_path}/train/annotations.json in the checkpoint" in error[0]
    assert '[[10, "box"], [20, "circle"], [30, "triangle"]] now' in error[0], error

    # --restart deletes the old run and its outputs; this time the one bad image in 8 is too many: one line, exit 1.
    assert run([*renamed, "--restart", "--max-bad-fraction", "0.1"]) == 1
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()
    assert "--restart: deleted" in captured.out
    assert error == [
        "finetune: training failed: 1 training images of epoch 0 are unusable, more than --max-bad-fraction 0.1 "
        "of 8; the log has a line for each ('skipped training image ...')"
    ]
    assert not (tmp_path / "out" / "final.pth").exists() and not (tmp_path / "out" / "metrics.json").exists()


def test_pretrained_weights_keep_all_but_the_class_head(tmp_path):
    weights = write_tiny_checkpoint(str(tmp_path / "tiny.pth"))  # 91 COCO classes, 20 queries
    pretrained = detr.from_pretrained(weights)
    generate(str(tmp_path / "train"), 2, seed=0)
    categories = read_training_set(str(tmp_path / "train/annotations.json")).categories

    model = initial_model(
        parse_config([*dataset_args(str(tmp_path), False), "--output", "o", "--weights", weights]), categories
    )
    assert model.config.num_classes == 3 and model.categories == categories
    new, old = model.state_dict(), pretrained.state_dict()
    assert new["class_embed.weight"].shape == (4, 64)
    assert all(torch.equal(new[k], old[k]) for k in new if not k.startswith("class_embed."))

    model = initial_model(
        parse_config(
            [*dataset_args(str(tmp_path), False), "--output", "o", "--weights", weights, "--num-queries", "7"]
        ),
        categories,
    )
    new = model.state_dict()
    assert new["query_embed.weight"].shape == (7, 64)
    assert all(torch.equal(new[k], old[k]) for k in new if not k.startswith(("class_embed.", "query_embed.")))


def test_non_finite_loss_names_the_step(tmp_path):
    generate(str(tmp_path / "train"), 4, seed=0, config=ONE_BIG_SHAPE)
    args = parse_config([*dataset_args(str(tmp_path), False), "--output", "o", *TINY_SCRATCH])
    categories = read_training_set(str(tmp_path / "train/annotations.json")).categories
    model = initial_model(args, categories)
    state = model.state_dict()
    state["bbox_embed.layers.2.bias"] = torch.full_like(state["bbox_embed.layers.2.bias"], float("nan"))
    config = FinetuneConfig(
        f"{tmp_path}/train/images", f"{tmp_path}/train/annotations.json", "o", batch_size=2, loader_workers=0
    )
    model, criterion = build_model(config, model.config, model.categories, state)
    dataset = CocoDetectionDataset(
        config.train_images,
        read_training_set(config.train_annotations),
        eval_transform(AugmentationConfig.scaled(128, 213)),
    )
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_detection_batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 5, step 17 \(loss=nan"):
        train_one_epoch(model, criterion, loader, optimizer, config, torch.device("cpu"), epoch=5, step=17)


def test_unusable_images_are_logged_counted_and_too_many_stop_the_epoch(tmp_path, caplog):
    generate(str(tmp_path / "train"), 4, seed=0, config=ONE_BIG_SHAPE)
    images = sorted((tmp_path / "train" / "images").iterdir())
    for path in images[:2]:  # the first batch has no usable image at all
        path.write_bytes(b"not an image")
    config = FinetuneConfig(
        f"{tmp_path}/train/images", f"{tmp_path}/train/annotations.json", "o", batch_size=2, max_bad_fraction=0.5
    )
    args = parse_config([*dataset_args(str(tmp_path), False), "--output", "o", *TINY_SCRATCH])
    model = initial_model(args, read_training_set(config.train_annotations).categories)
    model, criterion = build_model(config, model.config, model.categories, model.state_dict())
    dataset = CocoDetectionDataset(
        config.train_images,
        read_training_set(config.train_annotations),
        eval_transform(AugmentationConfig.scaled(128, 213)),
        skip_bad_images=True,
    )
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_detection_batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with caplog.at_level(logging.WARNING, logger="jobs.finetune.engine"):
        metrics, step = train_one_epoch(
            model, criterion, loader, optimizer, config, torch.device("cpu"), epoch=0, step=0, dataset_size=4
        )

    assert step == 2 and metrics["images"] == 2 and metrics["skipped_images"] == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"skipped training image {p}: not a decodable image (not an image)" for p in images[:2]
    ]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "the good batch trained"
    strict = dataclasses.replace(config, max_bad_fraction=0.25)
    expected = "2 training images of epoch 3 are unusable, more than --max-bad-fraction 0.25 of 4"
    with pytest.raises(TooManyBadImagesError, match=expected):
        train_one_epoch(model, criterion, loader, optimizer, strict, torch.device("cpu"), 3, 0, dataset_size=4)


def test_diverged_run_stops_with_one_line_and_no_retries(ray_cluster, tmp_path, capsys):
    generate(str(tmp_path / "train"), 4, seed=0, config=ONE_BIG_SHAPE)
    # A learning rate this absurd overflows the weights in the first steps.
    argv = [
        *dataset_args(str(tmp_path), False),
        "--output",
        str(tmp_path / "out"),
        *TINY_SCRATCH,
        "--lr",
        "1e30",
        "--lr-backbone",
        "1e30",
        "--clip-max-norm",
        "0",
        "--epochs",
        "3",
        "--loader-workers",
        "0",
    ]
    assert run(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "non-finite loss at epoch" in error[0] and "step" in error[0]
    assert not (tmp_path / "out" / "final.pth").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--epochs", "0"], "--epochs must be positive, got 0"),
        (["--val-images", "v"], "--val-images and --val-annotations go together"),
        (["--weights", "scratch", "--min-size", "1400"], "--min-size 1400 exceeds --max-size 1333"),
        (["--precision", "fp16"], "--precision fp16 needs --gpus-per-worker > 0"),
        (["--weights", "TINY", "--hidden-dim", "32"], "['--hidden-dim'] only apply with --weights scratch"),
        (["--weights", "/nonexistent/weights.pth"], "weights file not found: /nonexistent/weights.pth"),
        (
            ["--weights", "scratch", "--hidden-dim", "30", "--num-heads", "4"],
            "hidden_dim 30 is not divisible by num_heads 4",
        ),
        (["--train-annotations", "MISSING"], "missing.json: no such file"),
        (["--train-annotations", "BAD"], "bad.json: annotations[0] (id 1) refers to category_id 99"),
        (["--train-images", "/nowhere"], "/nowhere/000001.png: image listed in"),
    ],
)
def test_bad_input_is_one_line_with_exit_status_2(tmp_path, capsys, extra, message):
    generate(str(tmp_path / "train"), 2, seed=0)
    document = json.loads((tmp_path / "train/annotations.json").read_text())
    document["annotations"][0]["category_id"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(document))
    weights = write_tiny_checkpoint(str(tmp_path / "tiny.pth"))
    substitutions = {"MISSING": str(tmp_path / "missing.json"), "BAD": str(tmp_path / "bad.json"), "TINY": weights}
    extra = [substitutions.get(a, a) for a in extra]
    argv = [
        *dataset_args(str(tmp_path), False),
        "--output",
        str(tmp_path / "out"),
        "--weights",
        "scratch",
        "--epochs",
        "1",
        *extra,
    ]

    assert run(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("finetune: error: ") and message in error[0], error
