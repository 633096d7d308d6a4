"""COCO bounding-box evaluation, vectorized with NumPy, equal to pycocotools' ``COCOeval``.

This is pycocotools' ``evaluate`` / ``accumulate`` / ``summarize`` for ``iouType="bbox"``
restated over whole arrays instead of per (image, category) Python loops:

* IoU: the same formula as ``maskApi.c:bbIou`` (crowd ground truth divides by the detection
  area), computed only for detection/ground-truth pairs of the same image and category.
* Matching: pycocotools' greedy rule - detections in score order each take the unmatched
  ground truth with the highest IoU at or above the threshold, preferring non-ignored over
  ignored (crowd or out-of-area-range) ground truth, ties going to the later annotation;
  crowd ground truth can be matched repeatedly. The greedy loop runs over a detection's
  rank within its (image, category) group, vectorized across all groups, IoU thresholds
  and area ranges at once.
* Accumulation: detections of a category ordered by score with pycocotools' tie-breaking
  (scored image order, then rank within the image), cumulative TP/FP, the interpolated
  precision envelope sampled at 101 recall thresholds, recall at the end of the list.

Boxes are absolute-pixel COCO ``xywh`` (x_min, y_min, width, height) in float64 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# pycocotools builds its thresholds with exactly these linspace calls; reusing them keeps
# every comparison against them bit-identical (e.g. AP75 is found by ``0.75 == iouThrs``).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RANGES = np.array([[0**2, 1e5**2], [0**2, 32**2], [32**2, 96**2], [96**2, 1e5**2]])
AREA_LABELS = ("all", "small", "medium", "large")
MAX_DETECTIONS = (1, 10, 100)

# The 12 standard COCO stats in pycocotools' order: (name, is_ap, iou, area, max_dets).
STAT_DEFINITIONS: tuple[tuple[str, bool, float | None, str, int], ...] = (
    ("AP", True, None, "all", 100),
    ("AP50", True, 0.5, "all", 100),
    ("AP75", True, 0.75, "all", 100),
    ("AP_small", True, None, "small", 100),
    ("AP_medium", True, None, "medium", 100),
    ("AP_large", True, None, "large", 100),
    ("AR1", False, None, "all", 1),
    ("AR10", False, None, "all", 10),
    ("AR100", False, None, "all", 100),
    ("AR_small", False, None, "small", 100),
    ("AR_medium", False, None, "medium", 100),
    ("AR_large", False, None, "large", 100),
)
STAT_NAMES: tuple[str, ...] = tuple(definition[0] for definition in STAT_DEFINITIONS)


@dataclass(frozen=True)
class GroundTruthBoxes:
    """Ground-truth annotations in file order (the order decides IoU ties, as in pycocotools).

    Args:
        image_ids: ``int64[G]`` image id of each annotation.
        category_ids: ``int64[G]`` category id of each annotation.
        boxes_xywh: ``float64[G, 4]`` absolute-pixel ``xywh`` boxes.
        areas: ``float64[G]`` the annotation's ``area`` field (used for small/medium/large).
        is_crowd: ``bool[G]`` crowd regions: ignored, matchable by any number of detections.
        annotation_ids: ``int64[G]`` annotation ids (pycocotools treats a match to id 0 as no match).
    """

    image_ids: np.ndarray
    category_ids: np.ndarray
    boxes_xywh: np.ndarray
    areas: np.ndarray
    is_crowd: np.ndarray
    annotation_ids: np.ndarray


@dataclass(frozen=True)
class DetectionBoxes:
    """Detections in result order (the order decides score ties, as in pycocotools).

    Args:
        image_ids: ``int64[D]`` ground-truth image id of each detection.
        category_ids: ``int64[D]`` category id of each detection.
        boxes_xywh: ``float64[D, 4]`` absolute-pixel ``xywh`` boxes.
        scores: ``float64[D]`` confidence scores.
    """

    image_ids: np.ndarray
    category_ids: np.ndarray
    boxes_xywh: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class CocoEvaluation:
    """Accumulated results, laid out like pycocotools' ``COCOeval.eval``.

    Args:
        category_ids: ``int64[K]`` evaluated categories, ascending.
        precision: ``float64[T, R, K, A, M]`` interpolated precision, -1 where a category has
            no non-ignored ground truth (T IoU thresholds, R recall thresholds, A area ranges,
            M max-detection limits).
        recall: ``float64[T, K, A, M]`` final recall, -1 likewise.
        stats: the 12 standard stats keyed by ``STAT_NAMES``.
        ground_truth_counts: ``int64[K]`` non-crowd ground truth per category (area ``all``).
    """

    category_ids: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    stats: dict[str, float]
    ground_truth_counts: np.ndarray

    def category_ap(self, iou_index: int | None = None) -> np.ndarray:
        """Per-category AP over all areas at 100 detections, NaN for categories without ground truth.

        Args:
            iou_index: an index into ``IOU_THRESHOLDS`` (0 is AP50), or None for AP@[.50:.95].

        Returns:
            ``float64[K]``, the mean of the valid precision entries, as pycocotools' summarize.
        """
        precision = self.precision[:, :, :, 0, -1]  # (T, R, K)
        if iou_index is not None:
            precision = precision[iou_index : iou_index + 1]
        valid = precision > -1
        totals = np.where(valid, precision, 0.0).sum(axis=(0, 1))
        counts = valid.sum(axis=(0, 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


def box_iou_xywh(detections_xywh: np.ndarray, ground_truth_xywh: np.ndarray, is_crowd: np.ndarray) -> np.ndarray:
    """IoU of paired boxes, operation for operation as pycocotools' ``bbIou``.

    Args:
        detections_xywh: ``float64[P, 4]`` absolute-pixel ``xywh`` detection boxes.
        ground_truth_xywh: ``float64[P, 4]`` the ground-truth box paired with each detection.
        is_crowd: ``bool[P]`` crowd ground truth: intersection over the detection's area.

    Returns:
        ``float64[P]`` IoU of each pair (0 for disjoint boxes).
    """
    dx, dy, dw, dh = detections_xywh.T
    gx, gy, gw, gh = ground_truth_xywh.T
    width = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    height = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    intersection = width * height
    detection_area = dw * dh
    union = np.where(is_crowd, detection_area, detection_area + gw * gh - intersection)
    overlapping = (width > 0) & (height > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(overlapping, intersection / np.where(overlapping, union, 1.0), 0.0)


def _index_in(sorted_ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position of each value in an ascending id array, and whether it is there at all.

    Returns:
        ``int64[N]`` positions (meaningless where not found) and ``bool[N]`` found.
    """
    position = np.minimum(np.searchsorted(sorted_ids, values), max(len(sorted_ids) - 1, 0))
    found = (sorted_ids[position] == values) if len(sorted_ids) else np.zeros(len(values), dtype=bool)
    return position, found


def _rank_in_runs(sorted_keys: np.ndarray) -> np.ndarray:
    """``int64[N]`` position of each element within its run of equal keys in an ascending key array."""
    index = np.arange(len(sorted_keys))
    run_start = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]] if len(sorted_keys) else np.zeros(0, dtype=bool)
    return index - np.maximum.accumulate(np.where(run_start, index, 0)) if len(sorted_keys) else index


def evaluate_boxes(
    ground_truth: GroundTruthBoxes,
    detections: DetectionBoxes,
    image_ids: np.ndarray,
    category_ids: np.ndarray,
) -> CocoEvaluation:
    """Score detections against ground truth exactly as pycocotools' bbox ``COCOeval``.

    Args:
        ground_truth: all ground-truth annotations; those outside ``image_ids`` / ``category_ids``
            are left out.
        detections: detections; those outside ``image_ids`` / ``category_ids`` are left out.
        image_ids: ``int64[I]`` the images to score (pycocotools' ``params.imgIds``).
        category_ids: ``int64[K]`` the categories to score (pycocotools' ``params.catIds``).

    Returns:
        The accumulated precision/recall tables and the 12 summary stats.
    """
    image_ids = np.unique(np.asarray(image_ids, dtype=np.int64))
    category_ids = np.unique(np.asarray(category_ids, dtype=np.int64))
    num_categories = len(category_ids)

    # Ground truth grouped by (image, category) in scored-image order, file order within a group.
    gt_image, gt_image_found = _index_in(image_ids, ground_truth.image_ids)
    gt_category, gt_category_found = _index_in(category_ids, ground_truth.category_ids)
    gt_index = np.flatnonzero(gt_image_found & gt_category_found)
    gt_group = gt_image[gt_index] * num_categories + gt_category[gt_index]
    gt_order = np.argsort(gt_group, kind="stable")
    gt_index, gt_group = gt_index[gt_order], gt_group[gt_order]
    gt_boxes = ground_truth.boxes_xywh[gt_index]
    gt_crowd = ground_truth.is_crowd[gt_index].astype(bool)
    gt_has_id = ground_truth.annotation_ids[gt_index] != 0
    gt_category_index = gt_category[gt_index]
    gt_area = ground_truth.areas[gt_index]
    # (A, G): crowd or outside the area range.
    gt_ignored = gt_crowd[None, :] | (gt_area[None, :] < AREA_RANGES[:, :1]) | (gt_area[None, :] > AREA_RANGES[:, 1:])

    # Detections grouped the same way, by score (descending) then result order within a group.
    dt_image, dt_image_found = _index_in(image_ids, detections.image_ids)
    dt_category, dt_category_found = _index_in(category_ids, detections.category_ids)
    dt_index = np.flatnonzero(dt_image_found & dt_category_found)
    dt_group = dt_image[dt_index] * num_categories + dt_category[dt_index]
    dt_order = np.lexsort((dt_index, -detections.scores[dt_index], dt_group))
    dt_index, dt_group = dt_index[dt_order], dt_group[dt_order]
    dt_rank = _rank_in_runs(dt_group)
    within_limit = dt_rank < MAX_DETECTIONS[-1]  # pycocotools keeps the top maxDets[-1] per group
    dt_index, dt_group, dt_rank = dt_index[within_limit], dt_group[within_limit], dt_rank[within_limit]
    dt_boxes = detections.boxes_xywh[dt_index]
    dt_scores = detections.scores[dt_index]
    dt_area = dt_boxes[:, 2] * dt_boxes[:, 3]
    dt_outside = (dt_area[None, :] < AREA_RANGES[:, :1]) | (dt_area[None, :] > AREA_RANGES[:, 1:])  # (A, D)

    match_t, match_a, match_dt, match_gt = _match_greedy(
        dt_rank,
        dt_boxes,
        np.searchsorted(gt_group, dt_group),
        np.searchsorted(gt_group, dt_group, side="right"),
        gt_boxes,
        gt_crowd,
        gt_ignored,
        _rank_in_runs(gt_group),
    )
    # (T, A, D) flags. A match to an annotation with id 0 is stored as "no match" by pycocotools.
    dt_matched = np.zeros((len(IOU_THRESHOLDS), len(AREA_RANGES), len(dt_rank)), dtype=bool)
    dt_matched[match_t, match_a, match_dt] = gt_has_id[match_gt]
    dt_ignored = np.zeros_like(dt_matched)
    dt_ignored[match_t, match_a, match_dt] = gt_ignored[match_a, match_gt]
    dt_ignored |= ~dt_matched & dt_outside[None]

    # (K, A): non-ignored ground truth, the recall denominator.
    gt_not_ignored = np.zeros((num_categories, len(AREA_RANGES)), dtype=np.int64)
    for area in range(len(AREA_RANGES)):
        gt_not_ignored[:, area] = np.bincount(gt_category_index[~gt_ignored[area]], minlength=num_categories)

    precision, recall = _accumulate(
        dt_group % num_categories,
        dt_group // num_categories,
        dt_rank,
        dt_scores,
        dt_matched & ~dt_ignored,
        ~dt_matched & ~dt_ignored,
        gt_not_ignored,
    )
    return CocoEvaluation(
        category_ids=category_ids,
        precision=precision,
        recall=recall,
        stats=summarize(precision, recall),
        ground_truth_counts=np.bincount(gt_category_index[~gt_crowd], minlength=num_categories),
    )


def _match_greedy(
    dt_rank: np.ndarray,
    dt_boxes: np.ndarray,
    dt_gt_start: np.ndarray,
    dt_gt_end: np.ndarray,
    gt_boxes: np.ndarray,
    gt_crowd: np.ndarray,
    gt_ignored: np.ndarray,
    gt_position: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """pycocotools' greedy matching for every IoU threshold and area range at once.

    Args:
        dt_rank: ``int64[D]`` rank of each detection by score within its (image, category) group.
        dt_boxes: ``float64[D, 4]`` detection boxes, ``xywh`` pixels.
        dt_gt_start, dt_gt_end: ``int64[D]`` the range of ground truth in each detection's group.
        gt_boxes: ``float64[G, 4]`` ground-truth boxes, ``xywh`` pixels, grouped.
        gt_crowd: ``bool[G]`` crowd flags.
        gt_ignored: ``bool[A, G]`` ignore flags per area range.
        gt_position: ``int64[G]`` position of each ground truth within its group (tie-breaker).

    Returns:
        The matches as four aligned ``int64[N]`` arrays: IoU threshold index, area range index,
        detection index and ground-truth index.
    """
    num_thresholds, num_areas = len(IOU_THRESHOLDS), gt_ignored.shape[0]
    matches: list[tuple[np.ndarray, ...]] = [(np.zeros(0, dtype=np.int64),) * 4]

    # Candidate (detection, ground truth) pairs: same group, IoU at or above the lowest threshold.
    gt_counts = dt_gt_end - dt_gt_start
    pair_dt = np.repeat(np.arange(len(dt_rank)), gt_counts)
    pair_offsets = np.arange(len(pair_dt)) - np.repeat(np.cumsum(gt_counts) - gt_counts, gt_counts)
    pair_gt = dt_gt_start[pair_dt] + pair_offsets
    pair_iou = box_iou_xywh(dt_boxes[pair_dt], gt_boxes[pair_gt], gt_crowd[pair_gt])
    thresholds = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)  # pycocotools caps the threshold below 1
    candidate = pair_iou >= thresholds[0]
    pair_dt, pair_gt, pair_iou = pair_dt[candidate], pair_gt[candidate], pair_iou[candidate]
    if len(pair_dt) == 0:
        return matches[0]

    # Pairs are ordered by detection, so a rank step's pairs are contiguous runs per detection.
    pair_rank = dt_rank[pair_dt]
    order = np.argsort(pair_rank, kind="stable")
    pair_dt, pair_gt, pair_iou, pair_rank = pair_dt[order], pair_gt[order], pair_iou[order], pair_rank[order]
    rank_starts = np.searchsorted(pair_rank, np.arange(pair_rank[-1] + 2))
    gt_taken = np.zeros((num_thresholds, num_areas, len(gt_boxes)), dtype=bool)
    above = pair_iou[None, :] >= thresholds[:, None]  # (T, P)

    for rank in range(len(rank_starts) - 1):
        lo, hi = rank_starts[rank], rank_starts[rank + 1]
        if lo == hi:
            continue
        step_dt, step_gt, step_iou = pair_dt[lo:hi], pair_gt[lo:hi], pair_iou[lo:hi]
        segment_starts = np.flatnonzero(np.r_[True, step_dt[1:] != step_dt[:-1]])
        segment_of_pair = np.cumsum(np.r_[False, step_dt[1:] != step_dt[:-1]])
        # (T, A, P): still available (crowd is never used up) and above the threshold.
        available = (~gt_taken[:, :, step_gt] | gt_crowd[step_gt]) & above[:, None, lo:hi]
        not_ignored = ~gt_ignored[:, step_gt][None]  # (1, A, P)
        # Prefer non-ignored ground truth; fall back to ignored only when none qualifies.
        prefers = np.logical_or.reduceat(available & not_ignored, segment_starts, axis=2)
        eligible = available & (not_ignored == prefers[:, :, segment_of_pair])
        best_iou = np.maximum.reduceat(np.where(eligible, step_iou, -1.0), segment_starts, axis=2)
        at_best = eligible & (step_iou == best_iou[:, :, segment_of_pair])
        best_position = np.maximum.reduceat(np.where(at_best, gt_position[step_gt], -1), segment_starts, axis=2)
        found = best_position >= 0  # (T, A, S)
        chosen = dt_gt_start[step_dt[segment_starts]][None, None, :] + best_position
        t_index, a_index, s_index = np.nonzero(found)
        winners = chosen[t_index, a_index, s_index]
        gt_taken[t_index, a_index, winners] = True
        matches.append((t_index, a_index, step_dt[segment_starts][s_index], winners))
    return tuple(np.concatenate(column) for column in zip(*matches, strict=True))


def _accumulate(
    dt_category: np.ndarray,
    dt_image: np.ndarray,
    dt_rank: np.ndarray,
    dt_scores: np.ndarray,
    true_positive: np.ndarray,
    false_positive: np.ndarray,
    gt_not_ignored: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """pycocotools' ``accumulate``: precision at 101 recall points and final recall.

    Args:
        dt_category, dt_image, dt_rank: ``int64[D]`` category index, image index and rank within
            the (image, category) group of each detection.
        dt_scores: ``float64[D]`` scores.
        true_positive, false_positive: ``bool[T, A, D]`` matched / unmatched and not ignored.
        gt_not_ignored: ``int64[K, A]`` non-ignored ground truth per category and area range.

    Returns:
        ``precision`` ``float64[T, R, K, A, M]`` and ``recall`` ``float64[T, K, A, M]``.
    """
    num_thresholds, num_recalls = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)
    num_categories, num_areas = gt_not_ignored.shape
    precision = -np.ones((num_thresholds, num_recalls, num_categories, num_areas, len(MAX_DETECTIONS)))
    recall = -np.ones((num_thresholds, num_categories, num_areas, len(MAX_DETECTIONS)))

    # pycocotools concatenates each image's score-sorted detections in image order, then
    # stable-sorts by score: ties resolve by image, then by rank within the image.
    order = np.lexsort((dt_rank, dt_image, -dt_scores, dt_category))
    sorted_category, sorted_rank = dt_category[order], dt_rank[order]
    # (A, T, D) in accumulation order, so each category is one contiguous run.
    # uint8 and contiguous: numpy's cumsum over strided bools is an order of magnitude slower.
    sorted_tp = np.ascontiguousarray(true_positive[:, :, order].transpose(1, 0, 2)).view(np.uint8)
    sorted_fp = np.ascontiguousarray(false_positive[:, :, order].transpose(1, 0, 2)).view(np.uint8)
    for m, max_detections in enumerate(MAX_DETECTIONS):
        within = sorted_rank < max_detections
        tp_m, fp_m = (sorted_tp, sorted_fp) if within.all() else (sorted_tp[:, :, within], sorted_fp[:, :, within])
        starts = np.searchsorted(sorted_category[within], np.arange(num_categories + 1))
        for k in range(num_categories):
            has_gt = gt_not_ignored[k] > 0  # (A,)
            if not has_gt.any():
                continue
            lo, hi = starts[k], starts[k + 1]
            if lo == hi:
                recall[:, k, has_gt, m] = 0.0
                precision[:, :, k, has_gt, m] = 0.0
                continue
            # (A, T, n) cumulative counts; integers, so the float64 values equal pycocotools'.
            tp_sum = np.cumsum(tp_m[has_gt, :, lo:hi], axis=2, dtype=np.int32).astype(np.float64)
            fp_sum = np.cumsum(fp_m[has_gt, :, lo:hi], axis=2, dtype=np.int32).astype(np.float64)
            recall_curve = tp_sum / gt_not_ignored[k, has_gt][:, None, None]
            precision_curve = tp_sum / (fp_sum + tp_sum + np.spacing(1))
            recall[:, k, has_gt, m] = recall_curve[:, :, -1].T
            # The precision envelope: running maximum from the right.
            envelope = np.maximum.accumulate(precision_curve[:, :, ::-1], axis=2)[:, :, ::-1]
            for a_row, a in enumerate(np.flatnonzero(has_gt)):
                for t in range(num_thresholds):
                    positions = np.searchsorted(recall_curve[a_row, t], RECALL_THRESHOLDS, side="left")
                    reached = positions < hi - lo
                    sampled = np.zeros(num_recalls)
                    sampled[reached] = envelope[a_row, t, positions[reached]]
                    precision[t, :, k, a, m] = sampled
    return precision, recall


def summarize(precision: np.ndarray, recall: np.ndarray) -> dict[str, float]:
    """The 12 standard stats from accumulated tables, as pycocotools' ``summarize``.

    Args:
        precision: ``float64[T, R, K, A, M]``.
        recall: ``float64[T, K, A, M]``.

    Returns:
        ``STAT_NAMES`` -> value, -1 where no entry is defined.
    """
    stats = {}
    for name, is_ap, iou, area, max_detections in STAT_DEFINITIONS:
        a = AREA_LABELS.index(area)
        m = MAX_DETECTIONS.index(max_detections)
        table = precision[..., a, m] if is_ap else recall[..., a, m]
        if iou is not None:
            table = table[np.where(iou == IOU_THRESHOLDS)[0]]
        valid = table[table > -1]
        stats[name] = float(np.mean(valid)) if valid.size else -1.0
    return stats


def format_stats(stats: dict[str, float]) -> str:
    """The 12 stats in pycocotools' familiar ``summarize()`` layout, one per line."""
    lines = []
    for name, is_ap, iou, area, max_detections in STAT_DEFINITIONS:
        title, kind = ("Average Precision", "(AP)") if is_ap else ("Average Recall", "(AR)")
        iou_text = f"{IOU_THRESHOLDS[0]:0.2f}:{IOU_THRESHOLDS[-1]:0.2f}" if iou is None else f"{iou:0.2f}"
        lines.append(
            f" {title:<18} {kind} @[ IoU={iou_text:<9} | area={area:>6s} | maxDets={max_detections:>3d} ]"
            f" = {stats[name]:0.3f}"
        )
    return "\n".join(lines)
