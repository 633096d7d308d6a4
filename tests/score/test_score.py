"""End-to-end tests of ``python -m jobs.score``: annotate's Parquet in, pycocotools' numbers out."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jobs.score import run
from jobs.score.plots import AP_PER_CATEGORY, PR_OVERALL, PR_PER_CATEGORY

REPO_ROOT = Path(__file__).resolve().parents[2]
STAT_ORDER = [
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
]

# The schema jobs.annotate writes: one row per input, detections as [x_min, y_min, x_max, y_max] pixels.
ANNOTATE_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        (
            "detections",
            pa.list_(
                pa.struct(
                    [
                        ("category_id", pa.int32()),
                        ("label", pa.string()),
                        ("score", pa.float32()),
                        ("box", pa.list_(pa.float32())),
                    ]
                )
            ),
        ),
        ("error", pa.string()),
        ("model", pa.string()),
    ]
)


def make_case(seed: int = 0, num_images: int = 40) -> tuple[dict, list[dict], list[dict], dict]:
    """A small scoring case in both forms.

    Returns:
        ground truth (COCO instances dict), annotate rows (Parquet form, including an error
        row, a row for an unknown image and bad detections), the valid detections as COCO
        results for pycocotools (``xywh`` from the float32 ``xyxy``, in row order), and the
        expected counts.
    """
    rng = np.random.default_rng(seed)
    categories = [{"id": c, "name": f"thing-{c}"} for c in (1, 3, 7, 12, 40)]
    images, annotations, rows, results = [], [], [], []
    for index in range(num_images):
        image_id = 100 + index
        images.append({"id": image_id, "file_name": f"val/{image_id:06d}.jpg", "width": 320, "height": 240})
        gt_boxes = []
        for _ in range(int(rng.integers(0, 6))):
            w, h = float(rng.uniform(5, 150)), float(rng.uniform(5, 120))
            x, y = float(rng.uniform(0, 320 - w)), float(rng.uniform(0, 240 - h))
            category = int(rng.choice([1, 3, 7, 12]))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(rng.random() < 0.08),
                }
            )
            gt_boxes.append((x, y, w, h, category))
        detections = []
        for rank in range(int(rng.integers(0, 12))):
            if gt_boxes and rank < 2 * len(gt_boxes):
                x, y, w, h, category = gt_boxes[rank % len(gt_boxes)]
                jitter = rng.normal(0, 0.1, 4)
                x, y, w, h = x + jitter[0] * w, y + jitter[1] * h, w * np.exp(jitter[2]), h * np.exp(jitter[3])
            else:
                w, h = rng.uniform(5, 100), rng.uniform(5, 100)
                x, y, category = rng.uniform(0, 200), rng.uniform(0, 150), int(rng.choice([1, 3, 7, 12, 40]))
            box = np.array([x, y, x + w, y + h], dtype=np.float32)
            score = np.float32(rng.random())
            detections.append({"category_id": category, "label": "x", "score": float(score), "box": box.tolist()})
            xyxy = box.astype(np.float64)
            results.append(
                {
                    "image_id": image_id,
                    "category_id": category,
                    "score": float(score),
                    "bbox": [xyxy[0], xyxy[1], xyxy[2] - xyxy[0], xyxy[3] - xyxy[1]],
                }
            )
        if index % 9 == 4:  # GT images that annotate never saw
            results = [r for r in results if r["image_id"] != image_id]
            continue
        uri = f"s3://photos/data/val/{image_id:06d}.jpg"
        rows.append({"uri": uri, "width": 320, "height": 240, "detections": detections, "error": None, "model": "detr"})
    # Individually bad detections (skipped and counted) on a known image.
    bad = [
        {"category_id": 1, "label": "x", "score": float("nan"), "box": [1.0, 1.0, 5.0, 5.0]},
        {"category_id": 1, "label": "x", "score": 0.5, "box": [9.0, 9.0, 5.0, 20.0]},  # x_max < x_min
        {"category_id": 99, "label": "x", "score": 0.5, "box": [1.0, 1.0, 5.0, 5.0]},  # unknown category
        {"category_id": 1, "label": "x", "score": 0.5, "box": [1.0, 1.0, 5.0]},  # 3 values
    ]
    rows[0]["detections"] = rows[0]["detections"] + bad
    rows.append(
        {
            "uri": "s3://photos/data/val/not-annotated.jpg",
            "width": 10,
            "height": 10,
            "detections": [{"category_id": 1, "label": "x", "score": 0.9, "box": [0.0, 0.0, 5.0, 5.0]}],
            "error": None,
            "model": "detr",
        }
    )
    rows.append(
        {
            "uri": "s3://photos/data/val/broken.jpg",
            "width": None,
            "height": None,
            "detections": [],
            "error": "cannot decode",
            "model": "detr",
        }
    )
    scored = sorted(
        {
            int(row["uri"].rsplit("/", 1)[-1][:6])
            for row in rows
            if row["uri"][-10:-4].isdigit() and row["error"] is None
        }
    )
    expected_counts = {
        "images_scored": len(scored),
        "images_with_predictions_without_ground_truth": 1,
        "ground_truth_images_without_predictions": num_images - len(scored),
        "failed_inputs": 1,
        "detections_scored": len(results),
        "detections_skipped": {"malformed": 1, "not_finite": 1, "negative_size": 1, "unknown_category": 1},
    }
    return {"images": images, "annotations": annotations, "categories": categories}, rows, results, expected_counts


def write_parquet_folder(root: Path, rows: list[dict], parts: int = 3) -> None:
    """Write rows as several part files, some in a nested folder, the way a Ray write may."""
    root.mkdir(parents=True, exist_ok=True)
    for part, chunk in enumerate(np.array_split(np.arange(len(rows)), parts)):
        folder = root / "nested" if part % 2 else root
        folder.mkdir(exist_ok=True)
        table = pa.Table.from_pylist([rows[i] for i in chunk], schema=ANNOTATE_SCHEMA)
        pq.write_table(table, folder / f"part-{part:05d}.parquet")


def pycocotools_stats(ground_truth: dict, results: list[dict], image_ids: list[int] | None) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(ground_truth)
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return list(evaluator.stats)


def scored_image_ids(rows: list[dict]) -> list[int]:
    return sorted(
        int(r["uri"].rsplit("/", 1)[-1][:6]) for r in rows if r["uri"][-10:-4].isdigit() and r["error"] is None
    )


@pytest.fixture
def case(tmp_path: Path) -> dict:
    ground_truth, rows, results, counts = make_case()
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(ground_truth))
    write_parquet_folder(tmp_path / "predictions", rows)
    return {
        "gt": ground_truth,
        "rows": rows,
        "results": results,
        "counts": counts,
        "annotations": str(annotations),
        "predictions": str(tmp_path / "predictions"),
        "tmp": tmp_path,
    }


def test_parquet_folder_equals_pycocotools_with_report_and_plots(case: dict, capsys: pytest.CaptureFixture) -> None:
    output, plots = case["tmp"] / "out" / "metrics.json", case["tmp"] / "plots"
    code = run([case["predictions"], case["annotations"], "--output", str(output), "--plot", str(plots)])
    assert code == 0
    report = json.loads(output.read_text())
    expected = pycocotools_stats(case["gt"], case["results"], scored_image_ids(case["rows"]))
    assert list(report["stats"]) == STAT_ORDER
    np.testing.assert_allclose(list(report["stats"].values()), expected, rtol=0, atol=1e-9)
    assert report["counts"] == case["counts"]
    by_id = {entry["category_id"]: entry for entry in report["per_category"]}
    assert by_id[3]["name"] == "thing-3" and 0 < by_id[3]["ap"] <= by_id[3]["ap50"] <= 1
    assert by_id[40]["ap"] is None and by_id[40]["ground_truth_boxes"] == 0  # no ground truth

    printed = capsys.readouterr().out
    assert f" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = {expected[0]:0.3f}" in printed
    assert f" Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = {expected[11]:0.3f}" in printed
    assert "images with predictions without ground truth: 1" in printed
    for name in (PR_OVERALL, PR_PER_CATEGORY, AP_PER_CATEGORY):
        with Image.open(plots / name) as image:
            assert image.format == "PNG" and image.width >= 300 and image.height >= 200
            # a chart, not a blank canvas
            assert len(np.unique(np.asarray(image.convert("L")))) > 10


def test_all_images_equals_pycocotools_default(case: dict) -> None:
    output = case["tmp"] / "all.json"
    assert run([case["predictions"], case["annotations"], "--all-images", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    expected = pycocotools_stats(case["gt"], case["results"], None)
    np.testing.assert_allclose(list(report["stats"].values()), expected, rtol=0, atol=1e-9)
    assert report["counts"]["images_scored"] == len(case["gt"]["images"])


def test_results_json_input_equals_pycocotools(case: dict) -> None:
    results_path, output = case["tmp"] / "results.json", case["tmp"] / "r.json"
    results_path.write_text(json.dumps(case["results"]))
    assert run([str(results_path), case["annotations"], "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    image_ids = sorted({r["image_id"] for r in case["results"]})
    expected = pycocotools_stats(case["gt"], case["results"], image_ids)
    np.testing.assert_allclose(list(report["stats"].values()), expected, rtol=0, atol=1e-9)


def test_subprocess_cli_prints_stats_and_reports_bad_input_in_one_line(case: dict) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "jobs.score"]
    done = subprocess.run(
        [*command, case["predictions"], case["annotations"]],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Average Precision") == 6 and done.stdout.count("Average Recall") == 6
    assert "images scored: " in done.stdout

    broken = case["tmp"] / "broken.json"
    broken.write_text('{"images": [')
    done = subprocess.run(
        [*command, case["predictions"], str(broken)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert str(broken) in done.stderr and "not valid JSON" in done.stderr


def _bad_inputs(tmp: Path, case: dict) -> dict[str, tuple[str, str, str]]:
    """name -> (predictions, annotations, expected message fragment)."""
    (tmp / "empty").mkdir(parents=True)
    (tmp / "not-coco.json").write_text(json.dumps({"hello": 1}))
    (tmp / "malformed.json").write_text("{not json")
    (tmp / "dict-results.json").write_text(json.dumps({"annotations": []}))
    other_names = [dict(row, uri=row["uri"].replace("/val/", "/val/x")) for row in case["rows"]]
    write_parquet_folder(tmp / "other-images", other_names)
    wrong_ids = [dict(row, detections=[dict(d, category_id=77) for d in row["detections"]]) for row in case["rows"]]
    write_parquet_folder(tmp / "wrong-categories", wrong_ids)
    (tmp / "garbage").mkdir()
    (tmp / "garbage" / "part-0.parquet").write_bytes(b"this is not parquet")
    p, a = case["predictions"], case["annotations"]
    return {
        "empty folder": (str(tmp / "empty"), a, "empty predictions folder"),
        "annotations not COCO": (p, str(tmp / "not-coco.json"), "not a COCO instances JSON"),
        "annotations malformed": (p, str(tmp / "malformed.json"), "not valid JSON"),
        "annotations missing": (p, str(tmp / "missing.json"), "no such file"),
        "predictions not results": (str(tmp / "dict-results.json"), a, "not a COCO results JSON"),
        "no image matches": (str(tmp / "other-images"), a, "none of its"),
        "no category matches": (str(tmp / "wrong-categories"), a, "categories that"),
        "not parquet": (str(tmp / "garbage"), a, "cannot read Parquet"),
    }


ANNOTATION_PROBLEMS = ("not a COCO instances JSON", "not valid JSON", "no such file")


def test_bad_inputs_give_one_line_errors_naming_the_file(case: dict, capsys: pytest.CaptureFixture) -> None:
    for name, (predictions_uri, annotations_uri, fragment) in _bad_inputs(case["tmp"] / "bad", case).items():
        code = run([predictions_uri, annotations_uri])
        err = capsys.readouterr().err
        assert code == 2, name
        assert err.startswith("score: error: ") and err.count("\n") == 1, (name, err)
        assert fragment in err, (name, err)
        culprit = annotations_uri if fragment in ANNOTATION_PROBLEMS else predictions_uri
        assert culprit in err, (name, err)


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch):
    """A real S3 API (moto's server) on loopback, reached through AWS_ENDPOINT_URL; yields the endpoint."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # cached clients would keep an old endpoint
    yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_scores_from_s3(case: dict, s3_server: str) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="scoring")
    s3.upload_file(case["annotations"], "scoring", "gt/instances.json")
    for path in sorted(Path(case["predictions"]).rglob("*.parquet")):
        s3.upload_file(str(path), "scoring", f"run-1/{path.relative_to(case['predictions']).as_posix()}")
    code = run(["s3://scoring/run-1", "s3://scoring/gt/instances.json", "--output", "s3://scoring/metrics/m.json"])
    assert code == 0
    report = json.loads(s3.get_object(Bucket="scoring", Key="metrics/m.json")["Body"].read())
    expected = pycocotools_stats(case["gt"], case["results"], scored_image_ids(case["rows"]))
    np.testing.assert_allclose(list(report["stats"].values()), expected, rtol=0, atol=1e-9)
    assert report["counts"] == case["counts"]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


# A throwaway loopback cluster: no token auth, so nothing depends on ~/.ray/auth_token.
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


@pytest.fixture
def ray_cluster() -> str:
    """A local Ray head (``ray start --block``) on free ports; yields its job-submission address.

    Every port is chosen explicitly: Ray's defaults (e.g. the dashboard agent's 52365) collide
    with any other Ray cluster on the machine, and the job agent then never comes up.
    """
    ray_cli = Path(sys.executable).parent / "ray"
    if not ray_cli.exists():
        pytest.skip(f"no ray command next to {sys.executable}")
    gcs, dashboard, agent, agent_grpc, runtime_env, metrics, node_manager, object_manager, client = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="ray-score-", dir="/tmp")  # short: Ray's unix sockets live under it
    # fmt: off
    command = [
        str(ray_cli), "start", "--head", "--block", "--num-cpus", "1", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--temp-dir", temp_dir,
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
        "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
        "--ray-client-server-port", str(client),
    ]
    # fmt: on
    head = subprocess.Popen(
        command, env=RAY_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        head.terminate()  # --block: stopping this process stops the cluster it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_runs_under_ray_job_submit(case: dict, ray_cluster: str) -> None:
    """``ray job submit -- python -m jobs.score ...`` against a real local Ray cluster."""
    output = case["tmp"] / "ray-metrics.json"
    # fmt: off
    command = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster,
        "--working-dir", str(REPO_ROOT),
        "--runtime-env-json", json.dumps({"excludes": [".git", "tests", "benchmarks"]}),
        "--", "python", "-m", "jobs.score", case["predictions"], case["annotations"], "--output", str(output),
    ]
    # fmt: on
    deadline = time.monotonic() + 180
    while True:  # the head's dashboard and job agent come up some seconds after it starts
        done = subprocess.run(command, env=RAY_ENV, capture_output=True, text=True, timeout=300)
        unavailable = "No available agent" in done.stderr or "Failed to connect" in done.stderr
        if not unavailable or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in done.stdout
    expected = pycocotools_stats(case["gt"], case["results"], scored_image_ids(case["rows"]))
    np.testing.assert_allclose(list(json.loads(output.read_text())["stats"].values()), expected, rtol=0, atol=1e-9)
