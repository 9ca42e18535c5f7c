"""Target-mask sampling: where synthetic defects go (exemplar jitter, boxes, foreground)."""

from models.masks.sampling import as_bool_mask, bounding_box, foreground_mask, sample_target_mask

__all__ = ["as_bool_mask", "bounding_box", "foreground_mask", "sample_target_mask"]
