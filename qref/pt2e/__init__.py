from .convert import convert_pt2e

__all__ = ["convert_pt2e"]
