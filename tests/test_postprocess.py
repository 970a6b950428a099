"""Each post-processing rule on volumes whose answer is known by construction."""

import numpy as np

from nnunet_bento.postprocess import postprocess
from nnunet_bento.request import StageSettings


def rules(**fields: object) -> StageSettings:
    """Stage settings with the given post-processing fields and server defaults otherwise."""
    return StageSettings(series_folders=["T2"], **fields)


def two_components() -> tuple[np.ndarray, np.ndarray]:
    """Label 1 in two blobs: a confident one at the left, a doubtful one at the right."""
    segmentation = np.zeros((6, 20, 20), dtype=np.uint8)
    probabilities = np.zeros((2, 6, 20, 20), dtype=np.float32)
    segmentation[1:4, 2:6, 2:6] = 1
    probabilities[0, 1:4, 2:6, 2:6] = 0.95
    segmentation[1:4, 12:16, 12:16] = 1
    probabilities[0, 1:4, 12:16, 12:16] = 0.6
    segmentation[4:6, 8:10, 8:10] = 2
    probabilities[1, 4:6, 8:10, 8:10] = 0.9
    return segmentation, probabilities


def test_class_idx_keeps_only_selected_labels_in_mask_and_map():
    segmentation, probabilities = two_components()
    mask, proba, labels = postprocess(segmentation, probabilities, (1, 2), rules(class_idx=[2]))
    assert set(np.unique(mask)) == {0, 2}
    assert labels == (2,) and proba.shape == (1, 6, 20, 20)
    np.testing.assert_array_equal(proba[0], probabilities[1])


def test_threshold_with_class_idx_makes_the_mask_from_probabilities():
    segmentation = np.zeros((4, 8, 8), dtype=np.uint8)
    probabilities = np.zeros((1, 4, 8, 8), dtype=np.float32)
    probabilities[0, 1, 1:3, 1:3] = 0.3
    settings = rules(class_idx=[1], proba_threshold=0.25)
    mask, _, _ = postprocess(segmentation, probabilities, (1,), settings)
    assert mask.sum() == 4 and mask[1, 1, 1] == 1
    without_class = rules(proba_threshold=0.25)
    assert postprocess(segmentation, probabilities, (1,), without_class)[0].sum() == 0


def test_threshold_zeroes_low_probabilities_in_the_map():
    segmentation, probabilities = two_components()
    _, proba, _ = postprocess(segmentation, probabilities, (1, 2), rules(proba_threshold=0.7))
    assert proba[0, 2, 13, 13] == 0 and proba[0, 2, 3, 3] == np.float32(0.95)


def test_min_confidence_removes_components_whose_peak_is_below_it():
    segmentation, probabilities = two_components()
    mask, _, _ = postprocess(segmentation, probabilities, (1, 2), rules(min_confidence=0.7))
    assert mask[2, 3, 3] == 1 and mask[2, 13, 13] == 0 and mask[5, 9, 9] == 2


def test_components_are_26_connected():
    segmentation = np.zeros((4, 4, 4), dtype=np.uint8)
    segmentation[0, 0, 0] = segmentation[1, 1, 1] = 1
    probabilities = np.zeros((1, 4, 4, 4), dtype=np.float32)
    probabilities[0, 0, 0, 0] = 0.9
    mask, _, _ = postprocess(segmentation, probabilities, (1,), rules(min_confidence=0.5))
    assert mask[1, 1, 1] == 1, "a diagonal neighbour belongs to the confident component"


def test_intersection_keeps_components_mostly_inside_the_reference():
    segmentation, _ = two_components()
    reference = np.zeros_like(segmentation)
    reference[:, :10, :10] = 1
    reference[3, 12, 12] = 1
    settings = rules(min_intersection=0.1)
    mask, _, _ = postprocess(segmentation, None, (1, 2), settings, reference)
    assert mask[2, 3, 3] == 1, "the left blob lies inside the reference"
    assert mask[2, 13, 13] == 0, "1 of 48 voxels inside is below 0.1"
    assert mask[5, 9, 9] == 2
    assert (
        postprocess(segmentation, None, (1, 2), rules(min_intersection=0.02), reference)[0][
            2, 13, 13
        ]
        == 1
    )
