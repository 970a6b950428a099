"""Which voxel a pixel of a preview PNG shows, for checks of what is drawn where."""

from nnunet_bento.preview import PanelGeometry


def voxel_at(panel: PanelGeometry, x: int, y: int) -> tuple[int, int, int]:
    """The (i, j, k) grid index drawn at PNG pixel (x, y) (x right, y down): the voxel nearest
    to the pixel's centre when the panel's voxels are stretched over its box."""
    x0, y0, x1, y1 = panel.box
    column = int((x - x0 + 0.5) * (panel.shape[0] / (x1 - x0)))
    row = int((y - y0 + 0.5) * (panel.shape[1] / (y1 - y0)))
    index = [panel.slice_index] * 3
    index[panel.axes[0]] = column
    index[panel.axes[1]] = panel.shape[1] - 1 - row if panel.flip_vertical else row
    return index[0], index[1], index[2]
