"""Loading predictions for scoring: annotate's Parquet folder or a COCO results JSON.

``PREDICTIONS`` is any fsspec URI. A directory (or a single ``.parquet`` file) is read as the
output of ``jobs.annotate``: every ``*.parquet`` file below it, nested folders included, with
columns ``uri``, ``detections`` (list of {category_id, label, score, box=[x_min, y_min,
x_max, y_max] pixels}) and ``error``. Anything else is read as a COCO results JSON: a list of
{image_id, category_id, bbox=[x, y, w, h], score}.

Parquet rows are joined to ground-truth images by :mod:`coco.join`'s rule (trailing path
components of the URI against ``images[].file_name``); two inputs matching the same image is an
error. Results JSON rows carry the ground-truth ``image_id`` directly.

Category ids are used as given: COCO's ids for the COCO model, the dataset's own ids for
fine-tuned weights.

Whole-file problems raise :class:`coco.CocoFormatError` naming the file. Individually bad detections
(box not 4 numbers, NaN/inf score or coordinate, negative width or height, a category the
ground truth does not have) are skipped and counted in ``PredictionCounts``.
"""

from __future__ import annotations

from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from storage import StorageError, filesystem_for, folder_exists, one_line

from .annotations import CocoFormatError, CocoInstances, read_json
from .boxes import xyxy_to_xywh
from .detection_table import SCORED_COLUMNS, table_files
from .evaluation import DetectionBoxes
from .join import first_repeated, match_uris_to_images


@dataclass(frozen=True)
class PredictionCounts:
    """What was read, and what was left out of scoring and why.

    Args:
        images_predicted: ground-truth images with a prediction (a successful Parquet row,
            possibly with no detections; for a results JSON, at least one result).
        images_without_ground_truth: predicted images that match no ground-truth image.
        failed_inputs: inputs whose Parquet rows all have an ``error`` (annotate could not read them; a
            retryable error row that a later run superseded with a successful row does not count).
        detections_kept: detections passed to the evaluator.
        skipped_malformed: detections whose box is not 4 values or whose category id is missing.
        skipped_not_finite: detections with a NaN/inf score or coordinate.
        skipped_negative_size: detections with ``x_max < x_min`` or ``y_max < y_min``.
        skipped_unknown_category: detections whose category is not in the ground truth.
    """

    images_predicted: int
    images_without_ground_truth: int
    failed_inputs: int
    detections_kept: int
    skipped_malformed: int
    skipped_not_finite: int
    skipped_negative_size: int
    skipped_unknown_category: int


@dataclass(frozen=True)
class Predictions:
    """Validated detections joined to ground-truth image ids.

    Args:
        uri: where they were read from.
        detections: the detections kept (``xywh`` pixels), in file order.
        image_ids: ``int64[P]`` the ground-truth images that have a prediction, ascending.
        counts: what was read and skipped.
    """

    uri: str
    detections: DetectionBoxes
    image_ids: np.ndarray
    counts: PredictionCounts


def load_predictions(uri: str, ground_truth: CocoInstances) -> Predictions:
    """Read annotate's Parquet folder (or one ``.parquet`` file) or a COCO results JSON.

    Raises:
        CocoFormatError: the URI is missing, empty, unreadable, of the wrong shape, or none of
            its images / categories match the ground truth.
    """
    try:
        filesystem, path = filesystem_for(uri)
        is_directory = folder_exists(filesystem, path)
        exists = is_directory or filesystem.isfile(path)
    except StorageError as error:
        raise CocoFormatError(str(error)) from None
    except OSError as error:
        raise CocoFormatError(f"{uri}: cannot be opened ({one_line(error)})") from None
    if not exists:
        raise CocoFormatError(f"{uri}: no such file or directory")
    if is_directory:
        files = table_files(filesystem, path)
        if not files:
            raise CocoFormatError(f"{uri}: empty predictions folder (no .parquet files below it)")
        predictions = _load_parquet(uri, filesystem, files, ground_truth)
    elif path.endswith(".parquet"):
        predictions = _load_parquet(uri, filesystem, [path], ground_truth)
    else:
        predictions = _load_results_json(uri, ground_truth)
    _check_usable(predictions, ground_truth)
    return predictions


def _load_parquet(
    uri: str, filesystem: fsspec.AbstractFileSystem, files: list[str], ground_truth: CocoInstances
) -> Predictions:
    """Read the Parquet part files vectorized: flatten ``list<struct>`` once, no per-row loops."""
    try:
        dataset = ds.dataset(files, format="parquet", filesystem=filesystem)
        missing = [column for column in SCORED_COLUMNS if column not in dataset.schema.names]
        if missing:
            raise CocoFormatError(f"{uri}: not annotate's Parquet output: missing column(s) {', '.join(missing)}")
        table = dataset.to_table(columns=list(SCORED_COLUMNS))
    except (pa.ArrowException, OSError) as error:
        raise CocoFormatError(f"{uri}: cannot read Parquet ({one_line(error)})") from None

    succeeded = pc.and_(pc.is_null(table["error"]), pc.is_valid(table["uri"])).to_numpy(zero_copy_only=False)
    row_image, uri_image = _join_rows(uri, table["uri"].to_numpy(zero_copy_only=False), succeeded, ground_truth)
    row_of_detection, category_ids, boxes_xyxy, scores, well_formed = _flatten_detections(uri, table["detections"])
    return _select(
        uri,
        ground_truth,
        image_ids=row_image[row_of_detection],
        category_ids=category_ids,
        boxes_xywh=xyxy_to_xywh(boxes_xyxy),
        scores=scores,
        well_formed=well_formed,
        predicted_image_ids=uri_image[uri_image >= 0],
        images_without_ground_truth=int((uri_image < 0).sum()),
        failed_inputs=_failed_inputs(table["uri"], succeeded),
    )


def _failed_inputs(uris: pa.ChunkedArray, succeeded: np.ndarray) -> int:
    """Distinct inputs with an error row and no successful row."""
    failed = pc.unique(uris.filter(pa.array(~succeeded)))
    healed = pc.is_in(failed, value_set=pc.unique(uris.filter(pa.array(succeeded))))
    return int(len(failed) - (pc.sum(healed).as_py() or 0))


def _join_rows(
    uri: str, row_uris: np.ndarray, succeeded: np.ndarray, ground_truth: CocoInstances
) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth image id per row (-1 for failed or unmatched rows) and per distinct successful URI.

    Raises:
        CocoFormatError: one input appears in two successful rows, or two inputs match one image.
    """
    unique_uris, row_uri_index, uri_counts = np.unique(
        row_uris[succeeded].astype(str), return_inverse=True, return_counts=True
    )
    if (uri_counts > 1).any():
        raise CocoFormatError(
            f"{uri}: input {unique_uris[np.argmax(uri_counts > 1)]} appears in more than one successful row"
        )
    uri_image = match_uris_to_images(unique_uris.tolist(), ground_truth)
    matched_images = uri_image[uri_image >= 0]
    if len(np.unique(matched_images)) != len(matched_images):
        duplicate = first_repeated(matched_images)
        twins = unique_uris[uri_image == duplicate].tolist()
        raise CocoFormatError(f"{uri}: inputs {twins[0]} and {twins[1]} both match ground-truth image id {duplicate}")
    row_image = np.full(len(row_uris), -1, dtype=np.int64)
    row_image[succeeded] = uri_image[row_uri_index]
    return row_image, uri_image


def _flatten_detections(
    uri: str, column: pa.ChunkedArray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flatten ``list<struct<category_id, score, box>>`` into arrays, one entry per detection.

    Returns:
        row index ``int64[N]``, category ids ``int64[N]`` (-1 if null), boxes ``float64[N, 4]``
        ``xyxy`` pixels (NaN unless well formed), scores ``float64[N]`` (NaN if null), and
        ``well_formed`` ``bool[N]``: a category id and a box of exactly 4 values.
    """
    if pa.types.is_null(column.type):  # every row failed, so the writer never saw a detection
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0), np.zeros(0, bool)
    try:
        detections = column.combine_chunks()
        row_of_detection = pc.list_parent_indices(detections).to_numpy()
        items = pc.list_flatten(detections)
        category = pc.struct_field(items, "category_id")
        score = pc.struct_field(items, "score")
        box = pc.struct_field(items, "box")
        has_four_values = pc.fill_null(pc.equal(pc.list_value_length(box), 4), False)
        well_formed = pc.and_(pc.is_valid(category), has_four_values).to_numpy(zero_copy_only=False)
        boxes_xyxy = np.full((len(items), 4), np.nan)
        four_values = pc.list_flatten(box.filter(pa.array(well_formed))).to_numpy(zero_copy_only=False)
        boxes_xyxy[well_formed] = four_values.astype(np.float64).reshape(-1, 4)
        category_ids = pc.fill_null(category, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        scores = pc.cast(score, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
    except (pa.ArrowException, KeyError, TypeError) as error:
        raise CocoFormatError(
            f"{uri}: 'detections' is not list<struct<category_id, score, box>> ({one_line(error)})"
        ) from None
    return row_of_detection, category_ids, boxes_xyxy, scores, well_formed


def _load_results_json(uri: str, ground_truth: CocoInstances) -> Predictions:
    """Read a COCO results JSON: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``."""
    results = read_json(uri)
    if not isinstance(results, list):
        raise CocoFormatError(
            f"{uri}: not a COCO results JSON (expected a list of {{image_id, category_id, bbox, score}}, "
            f"got {type(results).__name__})"
        )
    try:
        image_ids = np.array([result["image_id"] for result in results], dtype=np.int64)
        category_ids = np.array([result["category_id"] for result in results], dtype=np.int64)
        boxes = np.array([result["bbox"] for result in results], dtype=np.float64).reshape(-1, 4)
        scores = np.array([result["score"] for result in results], dtype=np.float64)
    except (KeyError, TypeError, ValueError, OverflowError):
        raise CocoFormatError(f"{uri}: not a COCO results JSON: {_first_bad_result(results)}") from None
    if len(boxes) != len(results):
        raise CocoFormatError(f"{uri}: not a COCO results JSON: {_first_bad_result(results)}")

    known = np.isin(image_ids, ground_truth.image_ids)
    return _select(
        uri,
        ground_truth,
        image_ids=np.where(known, image_ids, -1),
        category_ids=category_ids,
        boxes_xywh=boxes,
        scores=scores,
        well_formed=np.ones(len(results), dtype=bool),
        predicted_image_ids=image_ids[known],
        images_without_ground_truth=len(np.unique(image_ids[~known])),
        failed_inputs=0,
    )


def _first_bad_result(results: list) -> str:
    for index, result in enumerate(results):
        if not isinstance(result, dict):
            return f"entry [{index}] is {type(result).__name__}, expected an object"
        missing = [key for key in ("image_id", "category_id", "bbox", "score") if key not in result]
        if missing:
            return f"entry [{index}] lacks {', '.join(missing)}"
        bbox = result["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4:
            return f"entry [{index}] bbox must be [x, y, w, h], got {bbox!r:.80}"
        for key in ("image_id", "category_id", "score"):
            try:
                float(result[key])
            except (TypeError, ValueError):
                return f"entry [{index}] {key} must be a number, got {result[key]!r:.80}"
    return "entries have mixed or non-numeric fields"


def _select(
    uri: str,
    ground_truth: CocoInstances,
    *,
    image_ids: np.ndarray,
    category_ids: np.ndarray,
    boxes_xywh: np.ndarray,
    scores: np.ndarray,
    well_formed: np.ndarray,
    predicted_image_ids: np.ndarray,
    images_without_ground_truth: int,
    failed_inputs: int,
) -> Predictions:
    """Keep detections on ground-truth images that pass every check; count the others by first failure.

    Args:
        image_ids: ``int64[N]`` ground-truth image id per detection, -1 for unmatched images.
        category_ids: ``int64[N]``.
        boxes_xywh: ``float64[N, 4]`` ``xywh`` pixels.
        scores: ``float64[N]``.
        well_formed: ``bool[N]`` False where the box or category was malformed.
        predicted_image_ids: ``int64[P]`` ground-truth images with a prediction, even an empty one.
    """
    predicted_image_ids = np.unique(predicted_image_ids)
    on_image = image_ids >= 0
    finite = np.isfinite(scores) & np.isfinite(boxes_xywh).all(axis=1)
    non_negative = (boxes_xywh[:, 2] >= 0) & (boxes_xywh[:, 3] >= 0)
    known_category = np.isin(category_ids, ground_truth.category_ids)
    malformed = on_image & ~well_formed
    not_finite = on_image & well_formed & ~finite
    negative = on_image & well_formed & finite & ~non_negative
    unknown = on_image & well_formed & finite & non_negative & ~known_category
    keep = on_image & well_formed & finite & non_negative & known_category
    return Predictions(
        uri=uri,
        detections=DetectionBoxes(
            image_ids=image_ids[keep],
            category_ids=category_ids[keep],
            boxes_xywh=boxes_xywh[keep],
            scores=scores[keep],
        ),
        image_ids=predicted_image_ids,
        counts=PredictionCounts(
            images_predicted=len(predicted_image_ids),
            images_without_ground_truth=images_without_ground_truth,
            failed_inputs=failed_inputs,
            detections_kept=int(keep.sum()),
            skipped_malformed=int(malformed.sum()),
            skipped_not_finite=int(not_finite.sum()),
            skipped_negative_size=int(negative.sum()),
            skipped_unknown_category=int(unknown.sum()),
        ),
    )


def _check_usable(predictions: Predictions, ground_truth: CocoInstances) -> None:
    """Refuse inputs that cannot be meant for this ground truth (scoring them would say nothing)."""
    counts = predictions.counts
    if counts.images_predicted == 0 and counts.images_without_ground_truth == 0:
        reason = (
            f"all {counts.failed_inputs} of its rows are annotate errors"
            if counts.failed_inputs
            else "it holds no predictions"
        )
        raise CocoFormatError(f"{predictions.uri}: nothing to score: {reason}")
    if counts.images_predicted == 0:
        example = f" (e.g. {ground_truth.file_names[0]!r})" if ground_truth.file_names else ""
        raise CocoFormatError(
            f"{predictions.uri}: none of its {counts.images_without_ground_truth} predicted images is in "
            f"{ground_truth.uri}{example}; check that the two files describe the same images"
        )
    if counts.skipped_unknown_category and counts.detections_kept == 0:
        raise CocoFormatError(
            f"{predictions.uri}: all {counts.skipped_unknown_category} detections have categories that "
            f"{ground_truth.uri} "
            "does not have; the model's category ids do not match the annotations"
        )
