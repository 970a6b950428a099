"""Per-stage post-processing rules, applied in this order (docs/postprocessing.md):

1. class_idx keeps only the selected labels, in the mask and in the probability map.
2. The mask is nnU-Net's argmax, except when both proba_threshold and class_idx are given:
   then each selected label's mask is {p >= proba_threshold} (ties between labels go to the
   label with the higher probability).
3. proba_threshold sets probabilities below it to 0 in the saved map.
4. Connected components of each label (26-connectivity in 3D) whose maximum probability is
   below min_confidence are removed.
5. With a reference mask (intersect_with), a component is kept when
   |component ∩ reference| / |component| >= min_intersection. This is the fraction of the
   component inside the reference, not IoU: IoU would drop every small lesion in a large organ.
"""

import numpy as np
from scipy import ndimage

from .request import StageSettings


def select_labels(
    segmentation: np.ndarray,
    probabilities: np.ndarray | None,
    labels: tuple[int, ...],
    class_idx: tuple[int, ...] | None,
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, ...]]:
    """Rule 1: keep only class_idx labels; probabilities are indexed like ``labels``."""
    if class_idx is None:
        return segmentation, probabilities, labels
    kept = np.where(np.isin(segmentation, class_idx), segmentation, 0).astype(segmentation.dtype)
    if probabilities is None:
        return kept, None, class_idx
    return kept, probabilities[[labels.index(label) for label in class_idx]], class_idx


def threshold_mask(
    probabilities: np.ndarray, labels: tuple[int, ...], threshold: float, dtype: np.dtype
) -> np.ndarray:
    """Rule 2: each label where p >= threshold; overlaps go to the most probable label."""
    passing = np.where(probabilities >= threshold, probabilities, -1.0)
    winner = np.argmax(passing, axis=0)
    any_passing = passing.max(axis=0) >= 0
    return np.where(any_passing, np.asarray(labels)[winner], 0).astype(dtype)


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components with full connectivity (26 in 3D, 8 in 2D)."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    return ndimage.label(mask, structure=structure)


def drop_components(
    segmentation: np.ndarray,
    label_probabilities: dict[int, np.ndarray],
    min_confidence: float | None,
    reference: np.ndarray | None,
    min_intersection: float,
) -> np.ndarray:
    """Rules 4 and 5: remove low-confidence components and those outside the reference."""
    result = segmentation.copy()
    for label in np.unique(segmentation):
        if label == 0:
            continue
        labelled, count = components(segmentation == label)
        if count == 0:
            continue
        index = np.arange(1, count + 1)
        keep = np.ones(count, dtype=bool)
        if min_confidence is not None and label in label_probabilities:
            peak = ndimage.maximum(label_probabilities[label], labelled, index)
            keep &= np.asarray(peak) >= min_confidence
        if reference is not None:
            inside = ndimage.sum(reference > 0, labelled, index)
            size = ndimage.sum(np.ones_like(labelled, dtype=bool), labelled, index)
            keep &= np.asarray(inside) / np.asarray(size) >= min_intersection
        removed = index[~keep]
        if removed.size:
            result[np.isin(labelled, removed)] = 0
    return result


def postprocess(
    segmentation: np.ndarray,
    probabilities: np.ndarray | None,
    labels: tuple[int, ...],
    settings: StageSettings,
    reference: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, ...]]:
    """Apply rules 1-5; returns the mask, the thresholded map and the labels it holds."""
    class_idx = None if settings.class_idx is None else tuple(settings.class_idx)
    segmentation, probabilities, labels = select_labels(
        segmentation, probabilities, labels, class_idx
    )
    if probabilities is not None and class_idx is not None and settings.proba_threshold is not None:
        segmentation = threshold_mask(
            probabilities, labels, settings.proba_threshold, segmentation.dtype
        )
    label_probabilities = (
        {} if probabilities is None else dict(zip(labels, probabilities, strict=True))
    )
    segmentation = drop_components(
        segmentation,
        label_probabilities,
        settings.min_confidence,
        reference,
        settings.min_intersection,
    )
    if probabilities is not None and settings.proba_threshold is not None:
        probabilities = np.where(probabilities >= settings.proba_threshold, probabilities, 0)
    return segmentation, probabilities, labels
