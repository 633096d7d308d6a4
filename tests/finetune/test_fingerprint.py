"""jobs/finetune/fingerprint.py: which settings a resume must share, and the one line naming those that differ."""

from __future__ import annotations

import dataclasses

import pytest

import detr
from jobs.finetune.fingerprint import (
    CLASSES,
    MODEL,
    OPERATIONAL,
    RunMismatchError,
    check_resumable,
    differences,
    fingerprint_digest,
    run_fingerprint,
)
from jobs.finetune.settings import FinetuneConfig

CATEGORIES = (detr.Category(10, "square"), detr.Category(20, "circle"))


def fingerprint(**changes) -> dict:
    config = FinetuneConfig("s3://b/train", "s3://b/train.json", **({"output": "s3://b/out"} | changes))
    return run_fingerprint(config, CATEGORIES, detr.DetrConfig(num_classes=2))


def test_every_setting_but_the_operational_ones_is_fingerprinted():
    stored = fingerprint()
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    assert {f"--{n.replace('_', '-')}" for n in fields - OPERATIONAL - {"loss"}} <= set(stored)
    assert {"--eos-coef", "--loss-giou", "--cost-class", CLASSES, MODEL} <= set(stored)
    assert not {f"--{n.replace('_', '-')}" for n in OPERATIONAL} & set(stored)
    assert fingerprint_digest(stored) == fingerprint_digest(fingerprint())


def test_operational_changes_resume():
    operational = fingerprint(epochs=500, loader_workers=8, max_failures=-1, checkpoint_every_steps=100)
    assert operational == fingerprint(output="s3://elsewhere", gpus_per_worker=1.0, restart=True)
    check_resumable(fingerprint(), operational, "s3://b/out/checkpoints")


def test_a_changed_flag_is_named_with_both_values():
    with pytest.raises(RunMismatchError) as error:
        check_resumable(fingerprint(), fingerprint(lr=2e-4, workers=4), "s3://b/out/checkpoints")
    message = str(error.value)
    assert message.startswith("s3://b/out/checkpoints holds a run with other settings (")
    assert "--lr 0.0001 in the checkpoint, 0.0002 now; --workers 1 in the checkpoint, 4 now" in message
    assert "pass --restart to start over" in message and "\n" not in message


def test_classes_and_architecture_are_compared_too():
    other_classes = run_fingerprint(
        FinetuneConfig("s3://b/train", "s3://b/train.json", "s3://b/out"),
        (detr.Category(10, "square"), detr.Category(30, "triangle")),
        detr.DetrConfig(num_classes=2, num_queries=50),
    )
    found = differences(fingerprint(), other_classes)
    assert found == [
        f'{CLASSES} [[10, "square"], [20, "circle"]] in the checkpoint, [[10, "square"], [30, "triangle"]] now',
        f'{MODEL} {{"num_queries": 100}} in the checkpoint, {{"num_queries": 50}} now',
    ]


def test_checkpoints_without_a_fingerprint_are_not_resumed():
    with pytest.raises(RunMismatchError, match="without a settings fingerprint .* pass --restart"):
        check_resumable(None, fingerprint(), "out/checkpoints")
